"""Validation of the scalar arguments shared by the public functions.

A threshold (``max_norm``, ``eps``, ``clip_value``, ...) is either a *host* number,
checked here, or a 0-d array of an array library, whose value is never read:

* Python ``int``/``float``, NumPy scalars and 0-d NumPy arrays of a real dtype live
  in host memory: a negative or NaN one is a ``ValueError``, a bool, a string or an
  object a ``TypeError``. They come back as a Python ``float`` (an integer past the
  float range as ``inf``, where ``inf`` is allowed).
* A 0-d array of another library (a torch tensor, a JAX array, traced or not, a CuPy
  or Dask array) may sit on an accelerator or be traced by a compiler: reading it
  would be a host read-back. Its dtype must be real (checked: metadata), its value is
  not: a negative or NaN one makes the clipped values NaN, on the device
  (``gradclip._reference.nan_unless_nonneg``), never a silent sign flip.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

from . import _compat

__all__ = [
    "SKIP",
    "check_choice",
    "check_nonfinite",
    "check_nonneg",
    "check_ord",
    "check_setting",
    "host_real",
    "scalar_or_array",
]

NONFINITE = ("propagate", "raise", "zero")
SKIP = "skip"  # the whole optimizer step left undone: only an optimizer hook can do that
_REAL_KINDS = ("int", "float", "low")  # dtype kinds a threshold may have


def host_real(value: Any, name: str) -> float | None:
    """``value`` as a Python float when it is a real number in host memory (a Python
    or NumPy number, a 0-d NumPy array); ``None`` for a 0-d array of another library.

    A bool, a string, a complex number or any other object is a ``TypeError`` naming
    ``name``, and so is an array of such a dtype; an array that is not 0-d is a
    ``ValueError``. An integer past the float range comes back as ``inf`` or ``-inf``.
    """
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        pass  # Python and NumPy numbers (NumPy's bool is not a numbers.Real)
    elif _compat.is_array_api_obj(value):
        _check_array(value, name)
        if not _compat.is_numpy_array(value):
            return None  # not read: it may be on an accelerator, or traced
    else:
        raise TypeError(f"{name} must be a real number or a 0-d array, got {_describe(value)}")
    try:
        return float(value)
    except OverflowError:  # a Python int past float's range
        return math.inf if value > 0 else -math.inf


def _check_array(x: Any, name: str) -> None:
    """A threshold given as an array must be 0-d, of a real (integer or float) dtype."""
    if getattr(x, "ndim", 0) != 0:
        raise ValueError(f"{name} must be a scalar (0-d array), got shape {tuple(x.shape)}")
    if _compat.dtype_kind(_compat.array_namespace(x), x.dtype) not in _REAL_KINDS:
        raise TypeError(
            f"{name} must be a real number, got a 0-d {_compat.library_name(x)} array of "
            f"dtype {x.dtype}"
        )


def _describe(value: Any) -> str:
    """``value`` for a message: its repr when short, else what it is."""
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"
    try:
        text = repr(value)
    except Exception:  # a repr that fails says nothing either
        text = ""
    return text if 0 < len(text) <= 40 else f"a {type(value).__name__}"


def check_nonneg(value: Any, name: str, *, finite: bool = False) -> Any:
    """A threshold: a host number ``>= 0`` (a ``float``; ``inf`` allowed unless
    ``finite``), or a 0-d real array, returned as it is (its value is not read).

    A negative or NaN host number is a ``ValueError``, and so is an infinite one (an
    integer past the float range included) when ``finite``.
    """
    v = host_real(value, name)
    if v is None:
        return value
    if math.isnan(v) or v < 0:
        raise ValueError(f"{name} must be >= 0, got {_describe(value)}")
    if finite and math.isinf(v):
        raise ValueError(f"{name} must be a finite number >= 0, got {_describe(value)}")
    return v


def check_setting(value: Any, name: str, *, finite: bool = False) -> float:
    """``check_nonneg`` for a setting read once, when an object is made (a
    clipper's option): a 0-d array of any library is read on the host too."""
    v = check_nonneg(value, name, finite=finite)
    return v if isinstance(v, float) else check_nonneg(float(v), name, finite=finite)


def check_ord(ord: Any) -> float:
    """``ord`` as a float: any real ``p > 0`` or ``math.inf``, as a host number (it
    chooses the computation, so it is never an array of the gradients' library)."""
    what = "ord must be a real number > 0 or math.inf"
    try:
        p = host_real(ord, "ord")
    except (TypeError, ValueError):
        p = None
    if p is None or not p > 0:  # also catches NaN
        raise ValueError(f"{what}, got {_describe(ord)}")
    if math.isinf(p) and isinstance(ord, numbers.Integral):
        raise ValueError(f"{what}, got {_describe(ord)}, past the float range")
    return p


def check_choice(value: Any, name: str, choices: Sequence[str]) -> str:
    """``value`` when it is one of the strings ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {tuple(choices)}, got {_describe(value)}")
    return value


def check_nonfinite(nonfinite: Any, *, skip: bool = False) -> str:
    """``nonfinite`` as given: one of ``NONFINITE``, or ``"skip"`` where ``skip`` says
    the caller can skip a whole optimizer step."""
    if isinstance(nonfinite, str) and nonfinite == SKIP and not skip:
        raise ValueError(
            "nonfinite='skip' leaves a whole optimizer step undone, which a clip alone "
            "cannot do: use gradclip.torch.clip_before_step(optimizer, ..., "
            "nonfinite='skip'), or wrap the optax optimizer in "
            f"gradclip.optax.skip_nonfinite; here pass one of {NONFINITE}"
        )
    return check_choice(nonfinite, "nonfinite", (*NONFINITE, SKIP) if skip else NONFINITE)


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
