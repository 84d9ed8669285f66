"""The torch backend: blocked norms on the CPU, grouped (foreach) norms elsewhere.

Eager tensors and Parameters only; traced ones (``torch.compile``, ``torch.func``),
other subclasses (DTensor) and trees spread over the CPU and another device take the
reference.

* CPU tensors (plain ones and Parameters): a blocked sum of squares, added in float64
  and checked on the host (CPU memory is host memory: reading it waits on nothing).
  Contiguous bfloat16 and float32 tensors go to the C kernels of ``._native`` in
  tables of addresses; the others are summed by ``._host.sumsq`` (the kernel, or
  float64 dots where it is missing): large tensors on NumPy views (16-bit ones
  widened by torch into a bounded float32 buffer), small ones concatenated in
  batches into a bounded buffer (one call per batch, not per tensor), strided ones
  through ``._host``. No float32 lane adds more than a few squares, so the sum is
  accurate for any layout of the values; a float64 total that could have overflowed
  or underflowed is recomputed exactly by the host path. Views with the negative bit
  set are read without it (their magnitudes are the same, and scaling commutes with
  the negation).
* CUDA, 2-norm of 16/32-bit floats: one ``torch._foreach_norm(..., dtype=float64)``
  per (device, dtype) group (no finite float32 square overflows in float64), their
  norm rounded once: torch's own launches, no temporaries.
* Other devices, float64, the inf-norm: the reference's per-leaf terms from
  ``torch._foreach_norm``, combined by ``gradclip._reference.combine``.
* Tensors that require grad: the reference's norm as an autograd function whose
  derivative, from the ratio ``|x| / norm``, does not overflow where autograd's through
  the scaled sums would; the reference's scale and multiply.
* Scaling: ``torch._foreach_mul_`` per group by a 0-d scale tensor: no host read, so
  a clipping step compiles and can be captured in a CUDA graph. On CUDA, 16-bit
  leaves are multiplied by the scale rounded to their dtype, as torch's own clip
  does (its fused kernel reads the scale in the leaves' dtype): an ulp of the leaf
  from the reference at most. Large 16-bit CPU tensors go through a float32 buffer
  (widen, multiply, round back: torch's result bit for bit, faster out of cache).
"""

from __future__ import annotations

import bisect
import functools
import itertools
import math
import numbers
import operator
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from .. import _compat, _reference
from .._checks import scalar_or_array
from .._tree import Tree
from . import _host, _native

__all__ = ["AutogradPath", "TorchPath", "leaf_terms", "select"]

_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
_COMPLEX = {torch.complex64, torch.complex128}
_TYPES = {torch.Tensor, torch.nn.Parameter}
_IS_CPU = operator.attrgetter("is_cpu")
# the buffer small CPU tensors are concatenated into: at most this share of the
# gradients' bytes, and this many elements
CAT_SHARE, CAT_MAX = 0.008, 1 << 16
WIDE_MAX = 1 << 18  # elements of the float32 buffer 16-bit tensors are widened into
# 16-bit tensors smaller than this together are likely in the last-level cache, where
# torch's own 16-bit multiply beats widening them through the float32 buffer; past
# it, out of the cache, the buffer is faster
WIDE_MIN_BYTES = 1 << 26
# elements of 16-bit tensors widened at a time for the norm: torch's grain size, so the
# copy runs on the calling thread (a longer one wakes torch's OpenMP workers, which then
# spin beside the C kernel or NumPy that sums the piece: several times slower)
WIDEN_PIECE = 1 << 15


def _leaf_dtypes(tree: Tree) -> frozenset[Any]:
    return tree.dtypes if tree.dtypes is not None else frozenset(x.dtype for x in tree.leaves)


def select(tree: Tree) -> TorchPath | AutogradPath | None:
    """The fast path for eager float tensors (with a derivative of its own for those
    that require grad), or ``None`` where the reference must run (traced, inside
    ``torch.func`` transforms, other dtypes, tensor subclasses such as DTensor)."""
    kind = _kind(tree)
    if kind == "autograd":
        return AutogradPath(tree)
    return None if kind is None else TorchPath(tree, kind)


def _kind(tree: Tree) -> str | None:
    """``"host"`` for plain CPU tensors, ``"device"`` for other eager tensors,
    ``"autograd"`` for eager tensors that require grad."""
    leaves = tree.leaves
    if _compat.is_lazy(leaves[0]):
        return None
    types = set(map(type, leaves))
    if not types <= _TYPES:
        return None  # DTensor and other subclasses: their own dispatch, in the reference
    if torch._C._functorch.peek_interpreter_stack() is not None and any(
        map(torch._C._functorch.is_functorch_wrapped_tensor, leaves)
    ):  # (wrapped tensors exist only inside a torch.func transform)
        return None
    dtypes = _leaf_dtypes(tree)
    if tree.requires_grad:
        return "autograd" if dtypes <= _FLOATS | _COMPLEX else None
    if not dtypes <= _FLOATS:
        return None
    on_cpu = list(map(_IS_CPU, leaves))
    if all(on_cpu):  # plain tensors and Parameters alike: their memory is the host's
        return "host" if torch.bfloat16 not in dtypes or _importable("ml_dtypes") else None
    # on the CPU, torch's foreach norm sums thousands of squares per float32 lane
    return None if any(on_cpu) else "device"


def _numpy_view(x: torch.Tensor) -> Any:
    """A zero-copy NumPy view of CPU tensor ``x``, for its norm: a view with the
    negative bit set (``x.conj().imag``, ``torch._neg_view``) is read without it, the
    values negated and their magnitudes the same."""
    if x.is_neg():
        x = torch._neg_view(x)
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _groups(
    leaves: Sequence[torch.Tensor], one_cpu_dtype: bool = False
) -> dict[tuple[Any, Any], Sequence[int]]:
    """``{(device, dtype): indices}`` of the leaves (torch's own C++ grouping); one
    group when they are known to share a dtype on the CPU."""
    if one_cpu_dtype:
        return {(leaves[0].device, leaves[0].dtype): range(len(leaves))}
    group = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)
    if group is not None and leaves:
        return {key: idx for key, (_, idx) in group([list(leaves)], True).items()}
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    return groups


_IS_CUDA = operator.attrgetter("is_cuda")


def leaf_terms(t: TorchPath, p: float) -> list[tuple[Any, Any]]:
    """The reference's per-leaf ``(m, s)`` (``p`` 2 or inf) from grouped foreach norms."""
    leaves, acc = t.tree.leaves, t.tree.acc_dtype
    terms: list[Any] = [None] * len(leaves)
    for (_, dtype), idx in t.groups.items():
        empty = [i for i in idx if leaves[i].numel() == 0]
        for i in empty:  # no elements: m = s = 0 (the inf-norm has no identity)
            zero = torch.zeros((), dtype=acc, device=leaves[i].device)
            terms[i] = (zero, None if math.isinf(p) else zero)
        idx = [i for i in idx if leaves[i].numel() > 0]
        if not idx:
            continue
        xs = [leaves[i] for i in idx]
        if dtype == torch.float16 and not math.isinf(p):
            # squares of float16 fit float32: one pass; n = d * sqrt(s) with d = n, s = 1
            for i, n in zip(idx, torch._foreach_norm(xs, 2, dtype=acc)):
                ok = torch.isfinite(n) & (n > 0)
                terms[i] = (n, torch.where(ok, torch.ones_like(n), n))
            continue
        ms = [m.to(acc) for m in torch._foreach_norm(xs, math.inf)]
        if math.isinf(p):
            for i, m in zip(idx, ms):
                terms[i] = (m, None)
            continue
        ds = [_reference.safe_scale(torch, m) for m in ms]
        if dtype != acc:  # 16-bit leaves: divide in float32
            xs = [x.to(acc) for x in xs]
        scaled = torch._foreach_div(xs, ds)
        for i, m, n in zip(idx, ms, torch._foreach_norm(scaled, 2, dtype=acc)):
            terms[i] = (m, n * n)
    common = functools.partial(_reference.to_common_device, t.tree)
    return [(common(m), s if s is None else common(s)) for m, s in terms]


_WIDE = frozenset({torch.float16, torch.bfloat16, torch.float32})


def _wide_norm(t: TorchPath) -> Any:
    """The 2-norm of 16/32-bit float leaves on a device: each group's leaf norms in
    float64 from one foreach launch, their norm rounded once. No host read."""
    groups = t.groups
    norms: list[torch.Tensor] = []
    for idx in groups.values():
        xs = t.tree.leaves if len(groups) == 1 else [t.tree.leaves[i] for i in idx]
        norms += torch._foreach_norm(xs, 2, dtype=torch.float64)
    if len(groups) > 1:
        norms = [_reference.to_common_device(t.tree, n) for n in norms]
    return torch.linalg.vector_norm(torch.stack(norms)).to(t.tree.acc_dtype)


def _np_dtype(acc: Any) -> Any:
    return np.float64 if acc == torch.float64 else np.float32


def _host_norm(t: TorchPath, p: float) -> Any:
    """The norm of CPU tensors, added in float64 and checked on the host: the C
    kernels, large tensors a piece at a time, batches of small ones, strided ones on
    NumPy views; every float32 lane adds a few squares at most (``._host``)."""
    acc = t.tree.acc_dtype
    np_acc = _np_dtype(acc)
    if math.isinf(p):
        value = _host.norm_of_arrays([_numpy_view(x) for x in t.tree.leaves], p)
        return torch.tensor(value, dtype=acc)
    sizes = t.sizes
    nbuf = t.cat_size
    leaves, total = t.tree.leaves, 0.0
    if _native_wanted(t, acc, t.dtypes, sizes):  # the C kernels (float32 lanes)
        groups, rest = _native_groups(leaves)
        for xs in groups.values():
            total += sum(_run_native(xs, _native.lib.sumsq_table))
        if len(rest) < len(leaves):
            leaves = [leaves[i] for i in rest]
            sizes = [sizes[i] for i in rest]
    big, rows, small, big_size = [], [], [], 0
    small_sizes = None
    if leaves and min(sizes) > 0 and max(sizes) * 4 <= nbuf:  # all small (many small)
        small, small_sizes = leaves, sizes
    else:
        for x, n in zip(leaves, sizes):
            if n * 4 <= nbuf:
                if n:
                    small.append(x)
            elif x.is_contiguous():
                rows.append(x)
            else:  # strided: NumPy's blocked sum over a view
                big.append(_numpy_view(x))
                big_size += n
    with np.errstate(over="ignore", invalid="ignore"):  # float64: checked by is_safe
        total += _host.sum_of_squares(big, np_acc, big_size) if big else 0.0
        total += _blocked_sum(rows, np_acc, t.wide_size)
        total += _concatenated_sum(small, np_acc, nbuf, t.one_group, small_sizes)
    if not _host.is_safe(total, np_acc):  # float64: every tensor again, exactly
        views = [_numpy_view(x) for x in t.tree.leaves]
        return torch.tensor(_host.norm_of_arrays(views, p, np_acc), dtype=acc)
    return torch.tensor(math.sqrt(total), dtype=acc)


def _mul_(xs: list[torch.Tensor], s: torch.Tensor) -> None:
    """``torch._foreach_mul_(xs, s)``, also for views with the negative bit set, which
    it refuses (before it writes any tensor): their memory, read without the bit, is
    scaled instead (the negated values times ``s``: the same product)."""
    try:
        torch._foreach_mul_(xs, s)
    except RuntimeError:
        if not any(map(torch.Tensor.is_neg, xs)):
            raise
        torch._foreach_mul_([torch._neg_view(x) if x.is_neg() else x for x in xs], s)


def _widened_mul_(
    xs: list[torch.Tensor], s: torch.Tensor, nbuf: int, sizes: Sequence[int]
) -> None:
    """``x *= s`` for 16-bit CPU tensors, ``s`` a float32 0-d tensor: torch's own
    result (the float32 product rounded once). Past ``WIDE_MIN_BYTES`` in all, large
    contiguous tensors go through a float32 buffer of ``nbuf`` elements instead."""
    large = []
    if sum(sizes) * 2 >= WIDE_MIN_BYTES:  # (smaller: likely in the cache)
        large = [i for i, n in enumerate(sizes) if n >= nbuf // 4 and xs[i].is_contiguous()]
    if len(large) < len(xs):
        skip = set(large)
        _mul_([x for i, x in enumerate(xs) if i not in skip] if skip else xs, s)
    if not large:
        return
    buf = torch.empty(nbuf, dtype=torch.float32)
    for i in large:
        for piece in torch.split(xs[i].view(-1), nbuf):
            b = buf[: piece.numel()]
            b.copy_(piece)
            b.mul_(s)
            piece.copy_(b)


_NATIVE = {torch.bfloat16: 2, torch.float32: 4}  # dtypes of the C kernels: item sizes


def _native_groups(xs: Sequence[torch.Tensor]) -> tuple[dict[Any, Sequence[Any]], Sequence[int]]:
    """The contiguous float32 and bfloat16 tensors of ``xs`` by dtype, for the C
    kernels, and the indices of the others."""
    return _native.native_groups(xs, _NATIVE, torch.Tensor.is_contiguous)


def _native_wanted(t: TorchPath, acc: Any, dtypes: Any, sizes: Sequence[int]) -> bool:
    """Whether tensors of ``dtypes`` go to the C kernels (float32 lanes): bfloat16 ones
    always, float32 ones unless all are small; small and large ones together all go (a
    torch op beside the pool would leave torch's OpenMP workers spinning)."""
    if _native.lib is None or acc != torch.float32 or not dtypes & _NATIVE.keys():
        return False
    return torch.bfloat16 in dtypes or max(sizes) > t.cat_size // 4


def _run_native(xs: Sequence[torch.Tensor], kernel: Callable, *args: Any) -> list[Any]:
    """``kernel`` over contiguous tensors of one dtype of the C kernels."""
    size = sum(map(torch.Tensor.numel, xs))
    return _native.run_native(
        xs,
        torch.Tensor.data_ptr,
        size,
        kernel,
        _NATIVE[xs[0].dtype],
        *args,
        size_of=torch.Tensor.numel,
    )


def _blocked_sum(xs: list[torch.Tensor], acc: Any, nbuf: int) -> float:
    """The sum of squares of contiguous CPU tensors for an ``acc`` accumulation (NumPy
    dtype), accurate for any values (``._host.sumsq``): float32 and float64 ones
    on NumPy views, 16-bit ones widened by torch (whose casts are vectorised, NumPy's
    float16 one is not) into a float32 buffer of at most ``nbuf`` elements."""
    total = 0.0
    wide = None
    for x in xs:
        if x.dtype in (torch.float32, torch.float64):
            total += _host.sumsq(_numpy_view(x).reshape(-1), acc)
            continue
        if wide is None:
            wide = torch.empty(min(nbuf, WIDEN_PIECE), dtype=torch.float32)
        total += _widened_sum(x.view(-1), wide, acc)
    return total


def _widened_sum(v: torch.Tensor, wide: torch.Tensor, acc: Any) -> float:
    """The sum of squares of 1-D 16-bit tensor ``v``, widened into the float32 buffer
    ``wide`` a piece at a time (at most ``WIDEN_PIECE`` elements)."""
    total = 0.0
    for piece in torch.split(v, wide.numel()):
        b = wide[: piece.numel()]
        b.copy_(piece)
        total += _host.sumsq(b.numpy(), acc)
    return total


def _concatenated_sum(
    xs: Sequence[torch.Tensor],
    acc: Any,
    nbuf: int,
    one_dtype: bool,
    sizes: Sequence[int] | None = None,
) -> float:
    """The sum of squares of small CPU tensors for an ``acc`` accumulation (NumPy
    dtype), concatenated in batches into a buffer of ``nbuf`` elements (one call per
    batch, not per tensor), 16-bit batches widened into float32 by torch."""
    total = 0.0
    wide = None
    for idx in _groups(xs, one_dtype).values() if xs else ():
        whole = len(idx) == len(xs)
        group = xs if whole else [xs[i] for i in idx]
        if set(map(torch.Tensor.dim, group)) != {1}:
            group = [x.reshape(-1) for x in group]
        counts = sizes if whole and sizes is not None else map(torch.Tensor.numel, group)
        ends = list(itertools.accumulate(counts))
        dtype = group[0].dtype
        buf = torch.empty(min(nbuf, ends[-1]), dtype=dtype)
        low = dtype not in (torch.float32, torch.float64)
        if low and wide is None:
            wide = torch.empty(min(nbuf, WIDEN_PIECE), dtype=torch.float32)
        start = base = 0
        while start < len(group):
            stop = max(start + 1, bisect.bisect_right(ends, base + nbuf, lo=start))
            n = ends[stop - 1] - base
            v = torch.cat(group[start:stop], out=buf[:n])
            total += _widened_sum(v, wide, acc) if low else _host.sumsq(v.numpy(), acc)
            start, base = stop, ends[stop - 1]
    return total


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


class TorchPath:
    """One call's facts of a tree of plain eager tensors, found when first asked."""

    def __init__(self, tree: Tree, kind: str) -> None:
        self.tree, self.kind = tree, kind

    @functools.cached_property
    def dtypes(self) -> frozenset[Any]:
        return _leaf_dtypes(self.tree)

    @functools.cached_property
    def sizes(self) -> list[int]:
        """The leaves' numbers of elements (asked by the norm and again by the scaling)."""
        return list(map(torch.Tensor.numel, self.tree.leaves))

    @functools.cached_property
    def one_group(self) -> bool:
        """Whether all leaves share one dtype and device (known without torch's
        grouping, which costs a call per tensor): plain CPU tensors, or tensors on
        one CUDA device."""
        if len(self.dtypes) != 1:
            return False
        if self.kind == "host":
            return True
        leaves = self.tree.leaves
        return all(map(_IS_CUDA, leaves)) and len(set(map(torch.Tensor.get_device, leaves))) == 1

    @functools.cached_property
    def groups(self) -> dict[tuple[Any, Any], Sequence[int]]:
        return _groups(self.tree.leaves, self.one_group)

    @functools.cached_property
    def on_cuda(self) -> bool:
        """Every leaf on a CUDA device, where ``torch._foreach_norm`` is one fused kernel
        (elsewhere it is a loop of ``vector_norm`` calls, whose ``dtype`` casts a copy)."""
        return all(device.type == "cuda" for device, _ in self.groups)

    @functools.cached_property
    def cat_size(self) -> int:
        """Elements of the buffer small tensors are concatenated into (``CAT_SHARE`` of
        the gradients' bytes, ``CAT_MAX`` at most); a quarter of it is a small tensor."""
        return min(CAT_MAX, max(1024, int(sum(self.sizes) * CAT_SHARE)))

    @functools.cached_property
    def wide_size(self) -> int:
        """Elements of the float32 buffer 16-bit tensors are widened into: at most
        ``WIDE_MAX`` and half of ``CAT_SHARE`` of the gradients' bytes."""
        size = int(sum(self.sizes) * CAT_SHARE) // 2
        return min(WIDE_MAX, max(1 << 14, size))

    def norm(self, p: float) -> Any:
        if p != 2 and not math.isinf(p):
            return None
        if self.kind == "host":
            return _host_norm(self, p)
        if p == 2 and self.dtypes <= _WIDE and self.on_cuda:
            return _wide_norm(self)
        return _reference.combine(self.tree, leaf_terms(self, p), p)

    def scale(self, scale: Any, norm: Any, nonfinite: str, inplace: bool) -> list[Any] | None:
        if nonfinite == "zero":
            return None
        tree, host = self.tree, self.kind == "host"
        # CPU memory is host memory: reading the scale there waits on nothing
        if host and inplace and float(scale) == 1.0:  # x * 1 is x bit for bit
            return tree.leaves
        casts: dict[Any, Any] = {}
        out: list[Any] = list(tree.leaves)
        groups = self.groups
        for (device, dtype), idx in groups.items():
            xs = tree.leaves if len(groups) == 1 else [tree.leaves[i] for i in idx]
            s = _reference.cast_scale(tree, casts, scale, xs[0])
            if s.dtype != dtype and device.type == "cuda":
                # torch's fused CUDA kernels read a tensor scale in the leaves' dtype
                # (another dtype takes a slow loop that rounds it all the same)
                s = s.to(dtype)
            sizes: Sequence[int] = []
            if inplace and host:
                sizes = self.sizes
                sizes = sizes if len(groups) == 1 else [sizes[i] for i in idx]
            if sizes and _native_wanted(self, s.dtype, {dtype}, sizes):
                # the C kernel on its pool (the float32 product, rounded once)
                by_dtype, rest = _native_groups(xs)
                for ys in by_dtype.values():
                    _run_native(ys, _native.lib.scale_table, float(s))
                if rest:
                    _mul_([xs[i] for i in rest], s)
            elif sizes and s.dtype != dtype:
                _widened_mul_(xs, s, self.wide_size, sizes)
            elif inplace:
                _mul_(xs, s)
            else:
                low = s.dtype != dtype  # 16-bit leaves: multiply in float32, round once
                ys = torch._foreach_mul([x.to(s.dtype) for x in xs] if low else xs, s)
                for i, y in zip(idx, ys):
                    out[i] = y.to(dtype) if low else y
        return out

    def clip_scale(self, norm: torch.Tensor, max_norm: Any, eps: Any) -> torch.Tensor:
        """The reference's ``clip_scale`` (1 where ``norm + eps <= max_norm``, else
        their quotient; NaN for a NaN norm) in three kernels where the Array API form
        takes more: a Python ``max_norm`` becomes a 0-d CPU tensor, which torch passes
        to a device kernel as an argument (no fill, no copy; a CUDA graph keeps its
        value), and the quotient where it is not used (0/0, inf/inf) is overwritten.
        Thresholds given as tensors are not read: a negative or NaN one makes the
        scale NaN, as in the reference."""
        unread = []
        if isinstance(eps, numbers.Real):
            den = norm + eps if eps else norm
        else:
            e = scalar_or_array(self.tree.xp, eps, norm.dtype, norm.device)
            den, unread = norm + e, [e]
        if isinstance(max_norm, numbers.Real):
            m = torch.tensor(float(max_norm), dtype=norm.dtype)
        else:
            m = scalar_or_array(self.tree.xp, max_norm, norm.dtype, norm.device)
            unread.append(m)
        scale = (m / den).masked_fill_(den <= m, 1.0)
        return _reference.nan_unless_nonneg(torch, scale, *unread)


class AutogradPath:
    """Tensors that require grad: the reference's norm (finite ``p``) with the
    derivative of ``gradclip._reference.norm_grad``; the reference's scale and
    multiply, differentiated by autograd."""

    def __init__(self, tree: Tree) -> None:
        self.tree = tree

    def norm(self, p: float) -> Any:
        if math.isinf(p):  # the largest magnitude: its automatic derivative is exact
            return None
        return _Norm.apply(self.tree, p, *self.tree.leaves)

    def scale(self, scale: Any, norm: Any, nonfinite: str, inplace: bool) -> None:
        return None


class _Norm(torch.autograd.Function):
    """The reference's ``p``-norm of tensors, differentiated by ``norm_grad``
    (finite wherever the derivative is: autograd through the scaled sums would square
    the scale). Its backward is differentiable in turn (``create_graph=True``)."""

    @staticmethod
    def forward(ctx: Any, tree: Tree, p: float, *leaves: torch.Tensor) -> torch.Tensor:
        norm = _reference.tree_norm(tree, p)  # (autograd records nothing in here)
        ctx.tree, ctx.p = tree, p
        ctx.save_for_backward(norm, *leaves)
        return norm

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Any, ...]:
        norm, *leaves = ctx.saved_tensors
        tree, p = ctx.tree, ctx.p
        if torch.is_grad_enabled():  # a derivative of the derivative: the norm's too
            norm = _Norm.apply(tree, p, *leaves)
        out: list[Any] = [None, None]
        for x, need in zip(leaves, ctx.needs_input_grad[2:]):
            if not need:
                out.append(None)
                continue
            g = _reference.norm_grad(tree, x, norm, p) * grad.to(x.device)
            out.append(g.to(x.dtype))
        return tuple(out)
