"""Norms of gradient trees, overflow-free and accurate, on any Array API library.

The p-norm of all leaves taken as one vector is computed per leaf as
``m * (sum (|x| / m) ** p) ** (1 / p)`` with ``m`` the leaf's largest magnitude, and
the leaves are combined with the largest ``m`` as the common scale. Every term is
then at most 1, so no finite input overflows, whatever its dtype or ``p``
(float16 squares, float32 values of 1e30 and bfloat16 all stay finite), and the sums
run in float32 or float64 (``accumulation dtype``) with the library's pairwise or
blocked reductions, which keep the relative error near one ulp of the accumulator
even for 10^8 elements. Inf and NaN propagate: a NaN anywhere gives NaN, else an
inf gives inf.

Nothing here reads a value back to the host, so it works under ``jax.jit``,
``torch.compile`` and on lazy Dask arrays. Zero gradients give a zero norm whose
derivative is finite (a "double where" keeps ``sqrt`` away from 0).
"""

from __future__ import annotations

import math
from typing import Any

from . import _backends, _checks, _distributed, _tree
from ._compat import as_array, is_cupy_array, is_jax_namespace, is_torch_array, to_device

__all__ = ["axis_norms", "example_norms", "global_norm", "leaf_norms", "tree_norm"]


def global_norm(
    grads: Any,
    /,
    *,
    ord: float = 2,
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> Any:
    """The norm of all leaves' elements taken as one vector.

    Equal to torch's norm of per-tensor norms and to optax's ``global_norm``, but
    accumulated in float32 for float16/bfloat16 leaves and free of overflow for
    finite gradients.

    Parameters
    ----------
    grads : array or tree of arrays
        A single array or a nested ``list``/``tuple``/``dict`` (any JAX pytree for
        JAX arrays) of arrays from one library; ``None`` leaves are skipped.
    ord : float, optional
        Any real ``p > 0`` or ``math.inf`` (default 2, the Euclidean norm).
    process_group : torch ProcessGroup, list of groups or DeviceMesh, optional
        The norm over the shards that every rank of the group(s) holds: each rank's
        share is all-reduced, so each shard counts once (see ``docs/distributed.md``).
        DTensor (FSDP2) leaves are reduced over their own mesh without it.
    axis_name : str or tuple of str, optional
        For JAX inside ``shard_map`` or ``pmap``: the axes the leaves are sharded over.
    replicated : tree of markers or callable, optional
        Which leaves hold the same values on several ranks and count once: a tree
        like ``grads`` (or a prefix of it) or a function of each leaf's path, giving
        ``True`` (the same on every rank), ``False``/``None`` (a shard, the default)
        or the group(s)/axis name(s) a leaf is replicated over (tied embeddings).

    Returns
    -------
    array
        A 0-d array of the grads' library on the grads' device: float32 for
        float16/bfloat16/float32 leaves, float64 when any leaf is float64.

    Raises
    ------
    ValueError
        For ``ord`` that is not a real number > 0 or inf, or a tree without arrays.
    TypeError
        For a leaf that is not an array or leaves from two libraries.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> float(gc.global_norm([np.array([3.0]), np.array([4.0])]))
    5.0
    >>> gc.global_norm(np.array([3e30, 4e30], dtype=np.float32))  # no overflow
    array(5.e+30, dtype=float32)
    """
    p = _checks.check_ord(ord)
    return _distributed.tree_norm(
        _tree.flatten(grads),
        p,
        process_group=process_group,
        axis_name=axis_name,
        replicated=replicated,
    )


def tree_norm(tree: _tree.Tree, p: float) -> Any:
    """The global ``p``-norm of a flattened tree (in its accumulation dtype)."""
    fast = _backends.global_norm_impl(tree)
    if fast is not None:
        return fast(tree, p)
    return as_array(tree.xp, _combine(tree, [_leaf_terms(tree, x, p) for x in tree.leaves], p))


def leaf_norms(tree: _tree.Tree, p: float) -> list[Any]:
    """Each leaf's own ``p``-norm (accumulation dtype, on the leaf's device)."""
    return [axis_norms(tree, x, p) for x in tree.leaves]


def axis_norms(tree: _tree.Tree, x: Any, p: float, axis: tuple[int, ...] | None = None) -> Any:
    """The ``p``-norms of leaf ``x`` over ``axis``, kept as size-1 axes (unit norms);
    over every axis, as a 0-d array, when ``axis`` is ``None``."""
    m, s = _leaf_terms(tree, x, p, axis)
    return m if math.isinf(p) else _scaled_root(tree.xp, m, s, p)


def example_norms(tree: _tree.Tree, p: float) -> Any:
    """The ``p``-norm of each example: axis 0 of every leaf is the batch, every other
    axis of every leaf is reduced. Shape ``(batch,)``, accumulation dtype."""
    xp = tree.xp
    terms = []
    for x in tree.leaves:
        if x.ndim == 1:  # one number per example; torch reads axis=() as "all axes"
            x = xp.reshape(x, (x.shape[0], 1))
        m, s = _leaf_terms(tree, x, p, tuple(range(1, x.ndim)))
        terms.append((xp.reshape(m, (-1,)), None if s is None else xp.reshape(s, (-1,))))
    return _combine(tree, terms, p)


def _leaf_terms(
    tree: _tree.Tree, x: Any, p: float, axis: tuple[int, ...] | None = None
) -> tuple[Any, Any]:
    """``(m, s)`` for one leaf: its largest magnitude and ``sum (|x| / d) ** p``.

    ``d`` is ``m`` where ``m`` is finite and positive, else 1, so the terms are at
    most 1 for finite leaves and inf/NaN flow into ``s`` otherwise. For ``p = inf``
    ``s`` is unused (``None``). With ``axis``, both are taken over those axes only
    and have the leaf's rank (the reduced axes kept with size 1).
    """
    xp, acc = tree.xp, tree.acc_dtype
    keep = axis is not None
    if _tree._size(x) == 0:
        shape = tuple(1 if i in axis else n for i, n in enumerate(x.shape)) if keep else ()
        zero = xp.zeros(shape, dtype=acc, device=tree.device)
        return zero, (None if math.isinf(p) else zero)
    a = xp.abs(x)
    if a.dtype != acc:
        a = xp.astype(a, acc)
    m = xp.max(a, axis=axis, keepdims=keep)
    if math.isinf(p):
        return _to_common_device(tree, m), None
    d = _safe_scale(xp, m)
    if p == 2 and _tree.dtype_kind(xp, x.dtype) != "complex":
        # the same squares from x itself: XLA then need not keep |x| for a second pass
        y = divide(xp, x if x.dtype == acc else xp.astype(x, acc), d)
    else:
        y = divide(xp, a, d)
    s = xp.sum(y * y if p == 2 else y if p == 1 else xp.pow(y, p), axis=axis, keepdims=keep)
    return _to_common_device(tree, m), _to_common_device(tree, s)


def divide(xp: Any, x: Any, d: Any) -> Any:
    """``x / d`` for an array ``d >= 0``, right also where XLA multiplies by ``1 / d``.

    XLA (JAX) rewrites a division by a broadcast value as a multiplication by its
    reciprocal, and flushes that to zero when it is subnormal (``d > 2**126`` in
    float32): ``x / d`` would be 0. There, beyond ``finfo.max / 16``, both sides are
    first multiplied by ``2**-64`` (exact: what it flushes is below the result's
    range). Other libraries divide (no extra kernels on a GPU).
    """
    if not is_jax_namespace(xp):
        return x / d
    c = xp.where(d > xp.finfo(d.dtype).max / 16, xp.full_like(d, 2.0**-64), xp.ones_like(d))
    return (x * c) / (d * c)


def _safe_scale(xp: Any, m: Any) -> Any:
    ok = xp.isfinite(m) & (m > 0)
    return xp.where(ok, m, xp.ones_like(m))


def _scaled_root(xp: Any, d: Any, s: Any, p: float) -> Any:
    """``d * s ** (1/p)`` with ``d`` made safe, and a finite derivative at ``s = 0``."""
    d = _safe_scale(xp, d)
    pos = s > 0
    s_safe = xp.where(pos, s, xp.ones_like(s))
    root = xp.sqrt(s_safe) if p == 2 else s_safe if p == 1 else xp.pow(s_safe, 1.0 / p)
    # s itself where it is 0 (the norm is 0) or NaN (the norm is NaN)
    return xp.where(pos, d * root, s)


def _combine(tree: _tree.Tree, terms: list[tuple[Any, Any]], p: float) -> Any:
    """The global norm from the per-leaf ``(m, s)`` terms (0-d, or arrays of one shape
    for norms taken per example)."""
    xp = tree.xp
    ms = xp.stack([m for m, _ in terms])  # axis 0 runs over the leaves
    big = xp.max(ms, axis=0)
    if math.isinf(p):
        return big
    ss = xp.stack([s for _, s in terms])
    scale = _safe_scale(xp, big)
    # A zero leaf weighs 0 (its divisor of 1 could overflow against a tiny scale); an
    # inf/NaN leaf weighs 1 and its inf/NaN sum flows through.
    r = divide(xp, xp.where(ms > 0, _safe_scale(xp, ms), xp.zeros_like(ms)), scale)
    weight = r * r if p == 2 else r if p == 1 else xp.pow(r, p)
    return _scaled_root(xp, scale, xp.sum(weight * ss, axis=0), p)


def _to_common_device(tree: _tree.Tree, v: Any) -> Any:
    """Move a per-leaf 0-d result to the first leaf's device (torch/CuPy multi-device)."""
    if (is_torch_array(v) or is_cupy_array(v)) and v.device != tree.device:
        return to_device(v, tree.device)
    return v
