"""The one module that imports array-api-compat.

Everything else in gradclip asks this module for a namespace, a device or a
library test, so the choice of backend is made from the input's type in one place.
"""

from __future__ import annotations

import contextlib
import operator
import sys
from collections.abc import Callable
from typing import Any

import array_api_compat as _aac
from array_api_compat import (
    device,
    is_array_api_obj,
    is_cupy_array,
    is_dask_array,
    is_jax_array,
    is_jax_namespace,
    is_numpy_array,
    is_torch_array,
    is_torch_namespace,
    to_device,
)

__all__ = [
    "accumulation_dtype",
    "any_requires_grad",
    "array_namespace",
    "as_array",
    "default_float",
    "device",
    "differentiable",
    "dtype_kind",
    "first_unwritable",
    "is_array_api_obj",
    "is_cupy_array",
    "is_jax_array",
    "is_jax_namespace",
    "is_lazy",
    "is_numpy_array",
    "is_torch_array",
    "is_torch_namespace",
    "library_name",
    "native_byte_order",
    "stop_gradient",
    "to_device",
]


def array_namespace(*xs: Any) -> Any:
    """The Array API namespace of ``xs`` (array-api-compat's wrapper where needed)."""
    return _aac.array_namespace(*xs)


def library_name(x: Any) -> str:
    """A short, human name for the library an array comes from (for messages)."""
    for test, name in (
        (is_numpy_array, "numpy"),
        (is_torch_array, "torch"),
        (is_jax_array, "jax"),
        (is_cupy_array, "cupy"),
        (is_dask_array, "dask"),
    ):
        if test(x):
            return name
    return type(x).__module__.split(".")[0]


def is_lazy(x: Any) -> bool:
    """True when reading ``x``'s value would trigger a computation or is impossible.

    JAX tracers (under ``jit``, ``vmap``, ``grad``), Dask arrays and other lazy
    libraries; also torch tensors being traced by ``torch.compile``.
    """
    if is_jax_array(x):  # array-api-compat calls every JAX array lazy; only tracers are
        return isinstance(x, sys.modules["jax"].core.Tracer)
    if _aac.is_lazy_array(x):
        return True
    return is_torch_array(x) and _torch_compiling()


def _writable_problem(x: Any) -> str | None:
    """Why ``x`` cannot be scaled in place, or ``None`` when it can."""
    if is_numpy_array(x):  # first: this runs once per leaf on every in-place call
        return None if x.flags.writeable else "the NumPy array is read-only"
    if is_torch_array(x):
        if x.requires_grad and x.is_leaf:
            return "the tensor is a leaf that requires grad"
        # torch.compile cannot trace is_inference(); a compiled graph fails on its own
        if not _torch_compiling() and x.is_inference() and not _torch_inference_mode():
            return "the tensor is an inference tensor"
        return None
    if is_jax_array(x):
        return "JAX arrays are immutable"
    if is_dask_array(x) or _aac.is_lazy_array(x):
        return f"{library_name(x)} arrays are lazy and cannot be written in place"
    if not _aac.is_writeable_array(x):
        return f"{library_name(x)} arrays are not writable"
    return None


_WRITEABLE = operator.attrgetter("flags.writeable")
_REQUIRES_GRAD = operator.attrgetter("requires_grad")


def any_requires_grad(leaves: Any) -> bool:
    """True when any of the (torch) ``leaves`` requires grad: one pass at C speed."""
    return any(map(_REQUIRES_GRAD, leaves))


def first_unwritable(
    leaves: Any, requires_grad: Callable[[], bool] | None = None
) -> tuple[int, str] | None:
    """``(index, why)`` of the first leaf that cannot be scaled in place, or ``None``.

    One pass at C speed for the common cases (all NumPy arrays, all plain torch
    tensors); :func:`_writable_problem` leaf by leaf otherwise. ``requires_grad()``
    tells whether any torch leaf requires grad, when the caller keeps that answer.
    """
    x = leaves[0]
    if is_numpy_array(x) and len(set(map(type, leaves))) == 1:
        if all(map(_WRITEABLE, leaves)):  # map: no list of 1000s of flags
            return None
    elif is_cupy_array(x) and len(set(map(type, leaves))) == 1:
        return None  # CuPy arrays are always writable
    elif (
        is_torch_array(x)
        and not _torch_compiling()
        and not _torch_inference_mode()
        and not (any_requires_grad(leaves) if requires_grad is None else requires_grad())
        and not any(map(sys.modules["torch"].Tensor.is_inference, leaves))
    ):
        return None
    for i, y in enumerate(leaves):
        problem = _writable_problem(y)
        if problem is not None:
            return i, problem
    return None


def _torch_compiling() -> bool:
    """True while ``torch.compile`` traces the calling code."""
    dynamo = sys.modules.get("torch._dynamo")
    return dynamo is not None and dynamo.is_compiling()


def _torch_inference_mode() -> bool:
    torch = sys.modules["torch"]
    return torch.is_inference_mode_enabled()


def as_array(xp: Any, y: Any) -> Any:
    """``y`` as an array: NumPy reductions and 0-d arithmetic return NumPy scalars."""
    return xp.asarray(y) if _aac.is_numpy_namespace(xp) else y


def native_byte_order(x: Any) -> Any:
    """``x`` in the machine's byte order: a copy for a big-endian NumPy array on a
    little-endian machine (which some NumPy functions refuse), else ``x`` itself."""
    if is_numpy_array(x) and not x.dtype.isnative:
        return x.astype(x.dtype.newbyteorder("="))
    return x


def differentiable(xp: Any, v: Any) -> bool:
    """Whether autodiff may differentiate array ``v``: any JAX array (a trace may be
    a derivative's), a torch tensor that requires grad."""
    return is_jax_namespace(xp) or (is_torch_namespace(xp) and v.requires_grad)


def stop_gradient(xp: Any, v: Any) -> Any:
    """``v`` as a constant to automatic differentiation (torch, JAX); ``v`` itself in
    libraries that do not differentiate."""
    if is_jax_namespace(xp):
        return sys.modules["jax"].lax.stop_gradient(v)
    if is_torch_namespace(xp) and v.requires_grad:
        return v.detach()
    return v


def default_float(xp: Any, dev: Any) -> Any:
    """The namespace's default real floating dtype on ``dev``."""
    try:
        return xp.__array_namespace_info__().default_dtypes(device=dev)["real floating"]
    except Exception:  # namespaces that predate the inspection API
        return xp.float64 if hasattr(xp, "float64") else xp.float32


def accumulation_dtype(xp: Any, dtypes: Any) -> Any:
    """float64 if any dtype is a floating dtype wider than 32 bits (its real part, for
    complex ones): float64, complex128, and those in another byte order; else float32."""
    f32, c64 = xp.float32, getattr(xp, "complex64", None)
    for dt in dtypes:
        if dt == f32 or (c64 is not None and dt == c64):  # the common case, first
            continue
        if dtype_kind(xp, dt) in ("float", "complex") and xp.finfo(dt).bits > 32:
            return xp.float64
    return f32


# keyed by the namespace's name, not the module: torch.compile cannot hash a module
_KINDS: dict[tuple[str, Any], str] = {}


def dtype_kind(xp: Any, dt: Any) -> str:
    """``"low"`` (16-bit or narrower float), ``"float"``, ``"complex"``, ``"long"``
    (long double, wider than float64), ``"int"``, ``"bool"`` or ``"other"`` (cached:
    it runs once per leaf per call)."""
    key = (xp.__name__, dt)
    try:
        return _KINDS[key]
    except (KeyError, TypeError):  # TypeError: an unhashable dtype
        pass
    kind = _dtype_kind(xp, dt)
    with contextlib.suppress(TypeError):
        _KINDS[key] = kind
    return kind


def _dtype_kind(xp: Any, dt: Any) -> str:
    name = str(getattr(dt, "name", dt)).rsplit(".", 1)[-1]
    if name in ("float16", "bfloat16") or name.startswith("float8"):
        return "low"
    for kind, key in (
        ("bool", "bool"),
        ("int", "integral"),
        ("float", "real floating"),
        ("complex", "complex floating"),
    ):
        try:
            if not xp.isdtype(dt, key):
                continue
            if kind in ("float", "complex") and _bits(xp, dt) > 64:
                return "long"  # NumPy's long double (float128, complex256)
            return kind
        except TypeError:  # dtypes unknown to the namespace (ml_dtypes in NumPy)
            break
    return "other"


def _bits(xp: Any, dt: Any) -> int:
    try:
        return int(xp.finfo(dt).bits)
    except (TypeError, ValueError):  # a namespace whose finfo knows only its own dtypes
        return 0
