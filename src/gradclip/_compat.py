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
    "first_overlap",
    "first_unstrided",
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
        if x.requires_grad and x._is_view() and sys.modules["torch"].is_grad_enabled():
            return _autograd_view_problem(x)
        return None
    if is_jax_array(x):
        return "JAX arrays are immutable"
    if is_dask_array(x) or _aac.is_lazy_array(x):
        return f"{library_name(x)} arrays are lazy and cannot be written in place"
    if not _aac.is_writeable_array(x):
        return f"{library_name(x)} arrays are not writable"
    return None


def _autograd_view_problem(x: Any) -> str | None:
    """Why autograd refuses an in-place change of the view ``x`` (which requires grad)
    with grad mode on, or ``None``: torch's own rules (``check_inplace``)."""
    if x._base.is_leaf:
        return "the tensor is a view of a leaf that requires grad"
    autograd = sys.modules["torch"]._C._autograd
    meta = getattr(autograd, "_get_creation_meta", None)
    if meta is not None and meta(x) != autograd.CreationMeta.DEFAULT:
        return (
            "autograd forbids changing this view in place with grad mode on (a view made "
            "under no_grad or inference mode, or one of several views a function returned)"
        )
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
    tensors); ``_writable_problem`` leaf by leaf otherwise. ``requires_grad()``
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


# -- memory that an in-place multiply would write twice ------------------------------

# Elements of a leaf whose layout the quick test cannot clear: past this many, its
# offsets are not enumerated, and it counts as overlapping itself (only as_strided
# views with interleaved strides get there).
OVERLAP_ENUMERATE_MAX = 1 << 24
_FLAGS = operator.attrgetter("flags")
_OWNDATA = operator.attrgetter("owndata")
_C_CONTIGUOUS = operator.attrgetter("c_contiguous")
_NBYTES = operator.attrgetter("nbytes")


def first_overlap(leaves: Any) -> tuple[int, int | None] | None:
    """Where scaling ``leaves`` in place would write some memory more than once:
    ``(i, None)`` for a leaf whose elements overlap one another (an expanded or
    ``as_strided`` view: torch refuses the write, NumPy multiplies such an element
    once per alias), ``(i, j)`` for two leaves that share memory (the same array
    twice, overlapping views of one buffer); ``None`` when no memory is shared.

    NumPy and CuPy arrays and plain eager torch tensors are checked (views of one
    buffer that touch disjoint elements are fine); other arrays are not. Contiguous
    leaves and arrays that own their memory are cleared at C speed; bounds that
    overlap are then decided exactly (NumPy's ``shares_memory``).
    """
    n, x, types = len(leaves), leaves[0], set(map(type, leaves))
    plain_torch = is_torch_array(x) and types <= _plain_torch()
    if is_torch_array(x) and (_torch_compiling() or _torch_transforming()):
        return None  # no data pointers to compare; a compiled graph checks its own
    if not plain_torch and _repeats(leaves):  # (tensors: caught below)
        seen: dict[int, int] = {}
        for i, y in enumerate(leaves):
            if id(y) in seen:
                return seen[id(y)], i
            seen[id(y)] = i
    if (is_numpy_array(x) or is_cupy_array(x)) and len(types) == 1:
        # (the flags made one at a time and dropped: no object kept per leaf)
        strided = (
            []
            if all(map(_C_CONTIGUOUS, map(_FLAGS, leaves)))
            else [i for i, y in enumerate(leaves) if not y.flags.c_contiguous]
        )
        owners = all(map(_OWNDATA, map(_FLAGS, leaves)))  # owners of memory share none
    elif plain_torch:
        contiguous = sys.modules["torch"].Tensor.is_contiguous
        strided = (
            []
            if all(map(contiguous, leaves))
            else [i for i, y in enumerate(leaves) if not y.is_contiguous()]
        )
        owners = False
    else:
        strided, owners = list(range(n)), False
    for i in strided:
        layout = _layout(leaves[i])
        if layout is not None and _overlaps_itself(*layout[1:]):
            return i, None
    return None if owners or n == 1 else _first_shared(leaves, strided)


def _repeats(leaves: Any) -> bool:
    """Whether an object appears twice in ``leaves``: their ids sorted in one array of
    machine words, for a few leaves or where that stays within ``ALIAS_SHARE`` of their
    bytes (a set would hold an object per leaf). Thousands of leaves of a few hundred
    elements each are not checked: the check alone would exceed the 1 % memory bound."""
    np = sys.modules.get("numpy")
    n = len(leaves)
    if np is None:
        return len(set(map(id, leaves))) < n
    if n > ALIAS_FEW and 9 * n > ALIAS_SHARE * sum(map(_NBYTES, leaves)):
        return False
    ids = np.fromiter(map(id, leaves), dtype=np.uintp, count=n)
    ids.sort()
    return bool(np.any(ids[1:] == ids[:-1]))


# the share of the gradients' bytes the check for a leaf given twice may take (8 bytes
# per id and a byte per comparison), within the in-place calls' 1 % bound
ALIAS_SHARE = 0.005
ALIAS_FEW = 64  # leaves whose ids are checked whatever their size (a call's fixed cost)


def _plain_torch() -> set[type]:
    torch = sys.modules["torch"]
    return {torch.Tensor, torch.nn.Parameter}


def _torch_transforming() -> bool:
    """True inside a ``torch.func`` transform (its wrapped tensors have no storage)."""
    functorch = sys.modules["torch"]._C._functorch
    return functorch.peek_interpreter_stack() is not None


def _layout(x: Any) -> tuple[int, tuple[int, ...], tuple[int, ...], int] | None:
    """``(address of the first element, shape, strides in bytes, item size)``, or
    ``None`` for arrays whose memory cannot be located (other libraries, torch
    subclasses such as DTensor, meta tensors)."""
    if is_numpy_array(x):
        return x.__array_interface__["data"][0], x.shape, x.strides, x.itemsize
    if is_torch_array(x):
        if type(x) not in _plain_torch() or x.device.type == "meta" or _torch_transforming():
            return None
        size = x.element_size()
        return x.data_ptr(), tuple(x.shape), tuple(s * size for s in x.stride()), size
    if is_cupy_array(x):
        return x.data.ptr, x.shape, x.strides, x.itemsize
    return None


def _overlaps_itself(shape: Any, strides: Any, itemsize: int) -> bool:
    """Whether two elements of a layout share a byte (exact up to
    ``OVERLAP_ENUMERATE_MAX`` elements, and above it for all but rare layouts)."""
    if 0 in shape:
        return False
    # nested blocks: each stride (smallest first) steps over the block of the smaller
    # ones, as in every slice or transpose of a dense array
    extent = itemsize
    for stride, k in sorted((abs(s), k) for k, s in zip(shape, strides) if k > 1):
        if stride < extent:
            return stride == 0 or _overlaps_exactly(shape, strides, itemsize)
        extent += stride * (k - 1)
    return False


def _overlaps_exactly(shape: Any, strides: Any, itemsize: int) -> bool:
    """Every element's first byte, sorted: overlapping when two lie closer than an item."""
    np = sys.modules.get("numpy")
    count = 1
    for k in shape:
        count *= k
    if np is None or count > OVERLAP_ENUMERATE_MAX:
        return True  # cannot be cleared: counted as overlapping
    offsets = np.zeros(1, dtype=np.int64)
    for k, s in zip(shape, strides):
        offsets = np.add.outer(offsets, np.arange(k, dtype=np.int64) * s).reshape(-1)
    offsets.sort()
    return bool(np.any(np.diff(offsets) < itemsize))


def _first_shared(leaves: Any, strided: list[int]) -> tuple[int, int] | None:
    """The first two leaves that share memory: their byte ranges sorted (at C speed
    where NumPy is loaded), and those that overlap decided exactly."""
    bounds = _bounds(leaves, strided)
    if bounds is None:
        return None
    starts, ends = bounds
    np = sys.modules.get("numpy")
    order: Any = None
    if np is not None:
        try:
            lo, hi = np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)
        except OverflowError:  # addresses past 2**63: sorted in Python below
            pass
        else:
            located = np.flatnonzero((hi > lo) & (lo != 0))
            order = located[np.argsort(lo[located], kind="stable")]
            if order.size < 2 or not np.any(lo[order[1:]] < np.maximum.accumulate(hi[order])[:-1]):
                return None  # no two ranges overlap (the common case)
            order = order.tolist()
    if order is None:
        located = (i for i in range(len(leaves)) if ends[i] > starts[i] != 0)
        order = sorted(located, key=starts.__getitem__)
    reach: list[tuple[int, int]] = []  # (end, index) of earlier ranges that may reach on
    for i in order:
        reach = [(end, j) for end, j in reach if end > starts[i]]
        for _, j in reach:
            if _share(leaves[j], leaves[i]):
                return min(i, j), max(i, j)
        reach.append((ends[i], i))
    return None


def _bounds(leaves: Any, strided: list[int]) -> tuple[list[int], list[int]] | None:
    """Each leaf's first and past-last byte address (equal, e.g. 0, for empty leaves
    and those whose memory cannot be located); ``None`` for tensors without storage."""
    x = leaves[0]
    if is_torch_array(x):
        try:  # (a pass each at C speed; meta tensors' address is 0)
            starts = list(map(sys.modules["torch"].Tensor.data_ptr, leaves))
        except RuntimeError:  # tensors without storage (fake tensors)
            return None
        plain = _plain_torch()
        if not set(map(type, leaves)) <= plain:  # subclasses (DTensor): not located
            starts = [a if type(y) in plain else 0 for a, y in zip(starts, leaves)]
    elif is_numpy_array(x):
        starts = [y.__array_interface__["data"][0] for y in leaves]
    elif is_cupy_array(x):
        starts = [y.data.ptr for y in leaves]
    else:
        return None
    ends = list(map(operator.add, starts, list(map(_NBYTES, leaves))))  # (C speed)
    for i in strided:  # the range a strided layout spans
        layout = _layout(leaves[i])
        if layout is None or 0 in layout[1]:
            starts[i] = ends[i] = 0
            continue
        start, shape, strides, itemsize = layout
        starts[i] = start + sum(s * (k - 1) for k, s in zip(shape, strides) if s < 0)
        ends[i] = start + sum(s * (k - 1) for k, s in zip(shape, strides) if s > 0) + itemsize
    return starts, ends


def _share(a: Any, b: Any) -> bool:
    """Whether two arrays whose byte ranges overlap share a byte (NumPy's exact test,
    on views that stand for their layouts: no memory is read)."""
    np = sys.modules.get("numpy")
    if np is None:
        return True  # cannot be decided: counted as shared
    if not (is_numpy_array(a) and is_numpy_array(b)):
        la, lb = _layout(a), _layout(b)
        if la is None or lb is None:
            return False  # memory that cannot be located is not checked
        a, b = np.asarray(_Layout(*la)), np.asarray(_Layout(*lb))
    try:
        return bool(np.shares_memory(a, b))
    except np.exceptions.TooHardError:
        return True


class _Layout:
    """An object NumPy reads as an array at a given address (never dereferenced)."""

    def __init__(self, address: int, shape: Any, strides: Any, itemsize: int) -> None:
        self.__array_interface__ = {
            "data": (address, False),
            "shape": tuple(shape),
            "strides": tuple(strides),
            "typestr": f"|V{itemsize}",
            "version": 3,
        }


_LAYOUT = operator.attrgetter("layout")
_IS_NESTED = operator.attrgetter("is_nested")


def first_unstrided(leaves: Any) -> tuple[int, str] | None:
    """``(index, what)`` of the first torch tensor of ``leaves`` that is not a plain
    strided one (sparse layouts, nested tensors), or ``None``: one pass at C speed."""
    if _torch_compiling():  # (a compiled graph fails on such tensors before it runs)
        return None
    strided = sys.modules["torch"].strided
    if set(map(_LAYOUT, leaves)) == {strided} and not any(map(_IS_NESTED, leaves)):
        return None
    for i, x in enumerate(leaves):
        if x.is_nested:
            return i, "a nested tensor"
        if x.layout != strided:
            return i, f"a sparse tensor (layout {x.layout})"
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
