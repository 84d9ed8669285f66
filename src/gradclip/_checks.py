"""Validation of the scalar arguments shared by the public functions."""

from __future__ import annotations

import math
import numbers
from typing import Any

from . import _compat

__all__ = ["SKIP", "check_nonfinite", "check_nonneg", "check_ord", "scalar_or_array"]

NONFINITE = ("propagate", "raise", "zero")
SKIP = "skip"  # the whole optimizer step left undone: only an optimizer hook can do that


def check_ord(ord: Any) -> float:
    """``ord`` as a float: any real ``p > 0`` or ``math.inf``."""
    if isinstance(ord, bool) or not isinstance(ord, numbers.Real):
        raise ValueError(f"ord must be a real number > 0 or math.inf, got {ord!r}")
    p = float(ord)
    if not p > 0:  # also catches NaN
        raise ValueError(f"ord must be a real number > 0 or math.inf, got {ord!r}")
    return p


def check_nonneg(value: Any, name: str) -> Any:
    """A Python real ``value`` must be ``>= 0`` and not NaN; arrays pass unchecked.

    Arrays are not read (that would be a host read-back, impossible under ``jit``).
    """
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number or a 0-d array, got {value!r}")
    if isinstance(value, numbers.Real):
        if math.isnan(value) or value < 0:
            raise ValueError(f"{name} must be >= 0, got {value!r}")
        return value
    if _compat.is_array_api_obj(value):
        if getattr(value, "ndim", 0) != 0:
            raise ValueError(f"{name} must be a scalar (0-d array), got shape {value.shape}")
        return value
    raise TypeError(f"{name} must be a number or a 0-d array, got {type(value).__name__}")


def check_nonfinite(nonfinite: Any, *, skip: bool = False) -> str:
    """``nonfinite`` as given: one of ``NONFINITE``, or ``"skip"`` where ``skip`` says
    the caller can skip a whole optimizer step."""
    allowed = (*NONFINITE, SKIP) if skip else NONFINITE
    if isinstance(nonfinite, str) and nonfinite == SKIP and not skip:
        raise ValueError(
            "nonfinite='skip' leaves a whole optimizer step undone, which a clip alone "
            "cannot do: use gradclip.torch.clip_before_step(optimizer, ..., "
            "nonfinite='skip'), or wrap the optax optimizer in "
            "gradclip.optax.skip_nonfinite; here pass one of "
            f"{NONFINITE}"
        )
    if nonfinite not in allowed:
        raise ValueError(f"nonfinite must be one of {allowed}, got {nonfinite!r}")
    return nonfinite


def scalar_or_array(xp: Any, value: Any, dtype: Any, device: Any) -> Any:
    """``value`` (a Python number or a 0-d array) as a 0-d array of ``dtype`` on ``device``."""
    if isinstance(value, numbers.Real):
        # full() fills on the device; asarray would copy from the host, which a CUDA
        # graph capture forbids
        try:
            return xp.full((), float(value), dtype=dtype, device=device)
        except (OverflowError, RuntimeError):
            # torch refuses values past the dtype's range (1e39 for float32, meaning
            # "never clip"); rounded from float64 they become inf, as anywhere else
            wide = xp.full((), float(value), dtype=xp.float64, device=device)
            return xp.astype(wide, dtype)
    if _compat.array_namespace(value) is not xp:
        # A 0-d array from another library (a NumPy scalar with torch grads, say):
        # it lives on the host, so reading it is not a device read-back.
        if _compat.is_numpy_array(value):
            return xp.asarray(float(value), dtype=dtype, device=device)
        raise TypeError(
            f"a 0-d {_compat.library_name(value)} array cannot be combined with "
            f"{xp.__name__} gradients; pass a Python number or an array of the same library"
        )
    return value if value.dtype == dtype else xp.astype(value, dtype)
