"""PyTorch fast path: grouped (foreach) norms and scaling, the NumPy kernel on CPU.

* Plain CPU tensors (eager, not traced by ``torch.compile`` or ``torch.func``, no
  autograd history): the blocked sum of squares of :mod:`gradclip._fast_numpy` on
  the large tensors' own memory (zero-copy NumPy views: a BLAS dot per chunk, on all
  cores) plus one ``torch._foreach_norm`` per dtype over the small ones (a C++ loop,
  ~1 us a tensor), added in float64. CPU memory is host memory, so the total is
  checked on the host at no cost; where it could have overflowed or underflowed
  every tensor is recomputed exactly by the NumPy path. torch's own CPU
  ``_foreach_norm`` is slower on large tensors (~1 ms per 2^20 elements on one
  thread) and inaccurate (relative error ~1e-3 at 2^25 elements).
* Any other device (CUDA, MPS, ...): the core's per-leaf terms ``(m, s)`` from
  ``torch._foreach_norm`` over each (device, dtype) group (one fused launch per group
  instead of several kernels per leaf), combined by the core's ``_combine``. float16
  groups need one pass (their squares cannot overflow float32); other groups take the
  maxima first and then the norms of the leaves divided by them.
* Scaling: ``torch._foreach_mul_`` per (device, dtype) group with the scale as a 0-d
  tensor, so there is no host synchronisation (on the CPU a scale of exactly 1 writes
  nothing).
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch

from . import _clipping, _compat, _fast_numpy, _norms, _tree

__all__ = ["global_norm_impl", "leaf_terms", "scale_impl"]

_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# (weak reference to the tree, {what: value}): the norm and the scaling of one call
# both ask for the tree's kind and groups
_last: tuple[Any, dict[str, Any]] = (lambda: None, {})


def _cached(tree: _tree.Tree, what: str, find: Callable[[_tree.Tree], Any]) -> Any:
    global _last
    last_tree, found = _last
    if last_tree() is not tree:
        found = {}
        _last = (weakref.ref(tree), found)
    if what not in found:
        found[what] = find(tree)
    return found[what]


def _kind(tree: _tree.Tree) -> str | None:
    """``"host"`` for plain eager CPU tensors, ``"device"`` for other eager tensors,
    ``None`` where the core must run (traced, autograd history, other dtypes,
    tensor subclasses such as DTensor)."""
    return _cached(tree, "kind", _find_kind)


_TYPES = {torch.Tensor, torch.nn.Parameter}
SMALL = 1 << 15  # CPU tensors up to this size: torch._foreach_norm, not a NumPy view


def _find_kind(tree: _tree.Tree) -> str | None:
    leaves = tree.leaves
    if _compat.is_lazy(leaves[0]):
        return None
    types = set(map(type, leaves))
    if not types <= _TYPES:
        return None  # DTensor and other subclasses: their own dispatch, in the core
    if not {x.dtype for x in leaves} <= _FLOATS:
        return None
    if any([x.requires_grad for x in leaves]):
        return None  # autograd history: the core's ops are differentiable
    if any(map(torch._C._functorch.is_functorch_wrapped_tensor, leaves)):
        return None
    host = types == {torch.Tensor} and all([x.is_cpu for x in leaves])
    if host and any(x.dtype == torch.bfloat16 for x in leaves if x.numel() > SMALL):
        host = _importable("ml_dtypes")
    return "host" if host else "device"


def _numpy_view(x: torch.Tensor) -> Any:
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _groups(leaves: Sequence[torch.Tensor]) -> dict[tuple[Any, Any], list[int]]:
    """``{(device, dtype): indices}`` of the leaves (torch's own C++ grouping)."""
    group = getattr(torch._C, "_group_tensors_by_device_and_dtype", None)
    if group is not None and leaves:
        return {key: idx for key, (_, idx) in group([list(leaves)], True).items()}
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    return groups


def _tree_groups(tree: _tree.Tree) -> dict[tuple[Any, Any], list[int]]:
    return _cached(tree, "groups", lambda tree: _groups(tree.leaves))


def leaf_terms(tree: _tree.Tree, p: float) -> list[tuple[Any, Any]]:
    """The core's per-leaf ``(m, s)`` (``p`` 2 or inf) from grouped foreach norms."""
    acc = tree.acc_dtype
    terms: list[Any] = [None] * len(tree.leaves)
    for (_, dtype), idx in _tree_groups(tree).items():
        empty = [i for i in idx if tree.leaves[i].numel() == 0]
        for i in empty:  # no elements: m = s = 0 (the inf-norm has no identity)
            zero = torch.zeros((), dtype=acc, device=tree.leaves[i].device)
            terms[i] = (zero, None if math.isinf(p) else zero)
        idx = [i for i in idx if tree.leaves[i].numel() > 0]
        if not idx:
            continue
        xs = [tree.leaves[i] for i in idx]
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
        ds = [_norms._safe_scale(torch, m) for m in ms]
        if dtype != acc:  # 16-bit leaves: divide in float32
            xs = [x.to(acc) for x in xs]
        scaled = torch._foreach_div(xs, ds)
        for i, m, n in zip(idx, ms, torch._foreach_norm(scaled, 2, dtype=acc)):
            terms[i] = (m, n * n)
    return [
        (_norms._to_common_device(tree, m), s if s is None else _norms._to_common_device(tree, s))
        for m, s in terms
    ]


def _host_norm(tree: _tree.Tree, p: float) -> Any:
    """The norm of plain CPU tensors: NumPy's blocked sum for the large ones, foreach
    norms for the small ones, added in float64 and checked on the host."""
    acc = tree.acc_dtype
    np_acc = _fast_numpy.np.float64 if acc == torch.float64 else _fast_numpy.np.float32
    if math.isinf(p):
        value = _fast_numpy.norm_of_arrays([_numpy_view(x) for x in tree.leaves], p)
        return torch.tensor(value, dtype=acc)
    big, small, size = [], [], 0
    for x in tree.leaves:
        n = x.numel()
        if n > SMALL:
            big.append(_numpy_view(x))
            size += n
        elif n:
            small.append(x)
    total = _fast_numpy.sum_of_squares(big, np_acc, size) if big else 0.0
    for idx in _groups(small).values():
        norms = torch._foreach_norm([small[i] for i in idx], 2, dtype=acc)
        total += float(torch.stack(norms).to(torch.float64).square().sum())
    if not _fast_numpy.is_safe(total, np_acc):  # every tensor again, exactly
        views = [_numpy_view(x) for x in tree.leaves]
        return torch.tensor(_fast_numpy.norm_of_arrays(views, p, np_acc), dtype=acc)
    return torch.tensor(math.sqrt(total), dtype=acc)


def global_norm_impl(tree: _tree.Tree) -> Callable[[_tree.Tree, float], Any] | None:
    kind = _kind(tree)
    if kind is None:
        return None

    def norm(tree: _tree.Tree, p: float) -> Any:
        if p != 2 and not math.isinf(p):
            from . import _backends

            with _backends.fast_paths(False):
                return _norms.tree_norm(tree, p)
        if kind == "host":
            return _host_norm(tree, p)
        return _norms._combine(tree, leaf_terms(tree, p), p)

    return norm


def _importable(name: str) -> bool:
    try:
        __import__(name)
    except ImportError:
        return False
    return True


def scale_impl(tree: _tree.Tree, *, inplace: bool) -> Callable[[_tree.Tree, Any], Any] | None:
    kind = _kind(tree)
    if kind is None:  # traced, autograd history (the core's ops are differentiable), ...
        return None
    host = kind == "host"

    def scale(tree: _tree.Tree, scale: Any) -> list[Any]:
        if host and inplace and float(scale) == 1.0:  # x * 1 is x bit for bit
            return tree.leaves
        casts: dict[Any, Any] = {}
        out: list[Any] = list(tree.leaves)
        for (_, dtype), idx in _tree_groups(tree).items():
            xs = [tree.leaves[i] for i in idx]
            s = _clipping._cast(tree, casts, scale, xs[0])
            if inplace:
                torch._foreach_mul_(xs, s)
            else:
                low = s.dtype != dtype  # 16-bit leaves: multiply in float32, round once
                ys = torch._foreach_mul([x.to(s.dtype) for x in xs] if low else xs, s)
                for i, y in zip(idx, ys):
                    out[i] = y.to(dtype) if low else y
        return out

    return scale
