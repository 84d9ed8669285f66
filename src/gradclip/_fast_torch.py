"""PyTorch fast path: grouped (foreach) norms and scaling, the NumPy kernel on CPU.

* Plain CPU tensors (eager, not traced by ``torch.compile`` or ``torch.func``, no
  autograd history): the norm is taken by :mod:`gradclip._fast_numpy` on the
  tensors' own memory (zero-copy NumPy views): chunked BLAS dots on all cores,
  checked and recomputed exactly where a chunk could have overflowed or underflowed.
  CPU memory is host memory, so nothing waits on a device; torch's own CPU
  ``_foreach_norm`` is single-pass but runs ~1 ms per 2^20 elements on one thread and
  is inaccurate for large tensors (relative error ~1e-3 at 2^25 elements).
* Any other device (CUDA, MPS, ...): the core's per-leaf terms ``(m, s)`` from
  ``torch._foreach_norm`` over each (device, dtype) group (one fused launch per group
  instead of several kernels per leaf), combined by the core's ``_combine``. float16
  groups need one pass (their squares cannot overflow float32); other groups take the
  maxima first and then the norms of the leaves divided by them.
* Scaling: ``torch._foreach_mul_`` per (device, dtype) group with the scale as a 0-d
  tensor, so there is no host synchronisation.
"""

from __future__ import annotations

import math
import weakref
from collections.abc import Callable
from typing import Any

import torch

from . import _clipping, _compat, _fast_numpy, _norms, _tree

__all__ = ["global_norm_impl", "leaf_terms", "scale_impl"]

_FLOATS = {torch.float16, torch.bfloat16, torch.float32, torch.float64}
# (weak reference to the tree, its kind): the norm and the scaling of one call both ask
_last: tuple[Any, str | None] = (lambda: None, None)


def _kind(tree: _tree.Tree) -> str | None:
    """``"host"`` for plain eager CPU tensors, ``"device"`` for other eager tensors,
    ``None`` where the core must run (traced, autograd history, other dtypes,
    tensor subclasses such as DTensor)."""
    global _last
    last_tree, last_kind = _last
    if last_tree() is tree:
        return last_kind
    kind = _find_kind(tree)
    _last = (weakref.ref(tree), kind)
    return kind


def _find_kind(tree: _tree.Tree) -> str | None:
    if _compat.is_lazy(tree.leaves[0]):
        return None
    wrapped = torch._C._functorch.is_functorch_wrapped_tensor
    host = True
    for x in tree.leaves:
        if x.dtype not in _FLOATS or x.requires_grad or wrapped(x):
            return None
        if type(x) not in (torch.Tensor, torch.nn.Parameter):
            return None  # DTensor and other subclasses: their own dispatch, in the core
        host = host and type(x) is torch.Tensor and x.is_cpu
    if host and any(x.dtype == torch.bfloat16 for x in tree.leaves):
        host = _importable("ml_dtypes")
    return "host" if host else "device"


def _numpy_view(x: torch.Tensor) -> Any:
    if x.dtype == torch.bfloat16:
        import ml_dtypes

        return x.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return x.numpy()


def _groups(leaves: list[torch.Tensor]) -> dict[tuple[Any, Any], list[int]]:
    groups: dict[tuple[Any, Any], list[int]] = {}
    for i, x in enumerate(leaves):
        groups.setdefault((x.device, x.dtype), []).append(i)
    return groups


def leaf_terms(tree: _tree.Tree, p: float) -> list[tuple[Any, Any]]:
    """The core's per-leaf ``(m, s)`` (``p`` 2 or inf) from grouped foreach norms."""
    acc = tree.acc_dtype
    terms: list[Any] = [None] * len(tree.leaves)
    for (_, dtype), idx in _groups(tree.leaves).items():
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
            value = _fast_numpy.norm_of_arrays([_numpy_view(x) for x in tree.leaves], p)
            return torch.tensor(value, dtype=tree.acc_dtype)
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
    host = inplace and kind == "host"

    def scale(tree: _tree.Tree, scale: Any) -> list[Any]:
        casts: dict[Any, Any] = {}
        out: list[Any] = list(tree.leaves)
        for (_, dtype), idx in _groups(tree.leaves).items():
            xs = [tree.leaves[i] for i in idx]
            s = _clipping._cast(tree, casts, scale, xs[0])
            if host and dtype in (torch.float32, torch.float64):
                # CPU memory: NumPy's threaded chunks beat torch's CPU mul_ (same IEEE
                # product); x * 1 is x, so a scale of 1 writes nothing
                f = s.numpy()
                if f != 1:
                    _fast_numpy.scale_arrays([(v, v, f) for v in map(_numpy_view, xs)])
            elif inplace:
                torch._foreach_mul_(xs, s)
            else:
                low = s.dtype != dtype  # 16-bit leaves: multiply in float32, round once
                ys = torch._foreach_mul([x.to(s.dtype) for x in xs] if low else xs, s)
                for i, y in zip(idx, ys):
                    out[i] = y.to(dtype) if low else y
        return out

    return scale
