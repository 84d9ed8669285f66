"""Clipping relative to each block: unit-wise AGC (Brock et al.) and block RMS.

Brock, De, Smith and Simonyan, "High-Performance Large-Scale Image Recognition
Without Normalization", ICML 2021 (arXiv:2102.06171), section 3: a gradient unit
``G_i`` (one output unit's row of a weight) is scaled to ``lambda * ||W_i|| / ||G_i||``
when ``||G_i|| / max(||W_i||, eps) > lambda``. Unit norms are taken with the overflow-free
scaling of ``gradclip._reference``, in float32 (float64) accumulation.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

from . import _checks, _compat, _tree
from ._reference import (
    axis_norms,
    cast_scale,
    clip_scale,
    divide,
    element_count,
    leaf_norms,
    nan_unless_nonneg,
    scaled,
)

__all__ = ["adaptive_grad_clip", "clip_by_block_rms"]

# optax's and timm's guard on the unit's gradient norm in the clipped branch
_DIV_EPS = 1e-6
_LAYOUTS = ("torch", "optax")


def adaptive_grad_clip(
    grads: Any,
    params: Any,
    /,
    clipping: Any,
    *,
    eps: float = 1e-3,
    axis: int | tuple[int, ...] | None = None,
    layout: str | None = None,
    exclude: Callable[[str], bool] | None = None,
) -> Any:
    """Unit-wise adaptive gradient clipping (AGC) of Brock et al. (arXiv:2102.06171).

    For each unit ``i`` of each leaf, with ``max_i = clipping * max(||W_i||, eps)``,
    the gradient unit becomes ``G_i * max_i / max(||G_i||, 1e-6)`` where
    ``||G_i|| > max_i`` and stays ``G_i`` otherwise (the rule of
    ``optax.adaptive_grad_clip`` and timm's ``adaptive_clip_grad``).

    Parameters
    ----------
    grads, params : trees of arrays
        Gradients and the parameters they belong to: the same structure, the same
        shapes and the same array library.
    clipping : float or 0-d array
        ``lambda``, the largest allowed ratio of a unit's gradient norm to its
        parameter norm (the paper uses 0.01 to 0.16). A 0-d array of the gradients'
        library is not read on the host: a negative or NaN one gives NaN results.
    eps : float or 0-d array, optional
        The smallest parameter norm used, so zero-initialised units still move
        (finite, ``>= 0``; an array as ``clipping``).
    axis : int or tuple of int, optional
        The axes reduced to get a unit's norm (as ``optax.adaptive_grad_clip``). With
        ``None``, the framework's layout decides (see ``layout``). Leaves of rank 0 or
        1 are always one unit.
    layout : {"torch", "optax"}, optional
        The layout used when ``axis`` is ``None``: ``"torch"`` for ``(out, in, ...)``
        weights (every axis but the first is reduced, as timm does); ``"optax"`` for
        ``(..., in, out)`` weights (optax's rule: axis 0 for rank 2 and 3,
        ``(0, 1, 2)`` for rank 4, ``(0, 1, 2, 3)`` for rank 5; a leaf that squeezes to
        rank 0 or 1 is one unit). Default: ``"torch"`` for PyTorch tensors, ``"optax"``
        for every other library.
    exclude : callable, optional
        ``exclude(path) -> bool`` on each leaf's path string (such as
        ``"['head']['w']"``); excluded leaves are returned unchanged. The paper leaves
        the final classifier unclipped.

    Returns
    -------
    same structure as ``grads``

    Raises
    ------
    TypeError
        ``grads`` and ``params`` from different libraries, a leaf that is not an array.
    ValueError
        Mismatched structures or shapes (naming the first), a bad ``axis`` or ``layout``,
        a leaf of rank above 5 with ``layout="optax"`` and no ``axis``.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> w = np.array([[3.0, 4.0], [0.0, 1.0]])        # torch layout: rows are units
    >>> g = np.array([[0.3, 0.4], [1.0, 0.0]])
    >>> gc.adaptive_grad_clip(g, w, 0.1, layout="torch")
    array([[0.3, 0.4],
           [0.1, 0. ]])
    """
    eps = _checks.check_nonneg(eps, "eps", finite=True)
    clipping = _checks.check_nonneg(clipping, "clipping")
    # thresholds given as arrays are not read: NaN results where one is < 0 or NaN
    unread = (not isinstance(clipping, float), not isinstance(eps, float))
    if layout is not None:
        _checks.check_choice(layout, "layout", _LAYOUTS)
    gtree = _tree.flatten(grads, "grads")
    ptree = _tree.flatten(params, "params")
    if gtree.xp is not ptree.xp:
        raise TypeError(
            f"grads and params must come from one array library, but grads are "
            f"{_compat.library_name(gtree.leaves[0])} arrays and params are "
            f"{_compat.library_name(ptree.leaves[0])} arrays"
        )
    _tree.check_same_structure(gtree, ptree, ("grads", "params"))
    if layout is None:
        layout = "torch" if _compat.is_torch_array(gtree.leaves[0]) else "optax"
    xp = gtree.xp
    out = []
    for g, w, path in zip(gtree.leaves, ptree.leaves, gtree.paths):
        if not _same_shape(g.shape, w.shape):
            raise ValueError(
                f"{path} has shape {tuple(g.shape)} but its parameter has shape {tuple(w.shape)}"
            )
        if exclude is not None and exclude(path[len("grads") :]):
            out.append(g)
            continue
        axes = _unit_axes(g, axis, layout, path)
        g_norm = axis_norms(gtree, g, 2.0, axes)
        w_norm = axis_norms(ptree, w, 2.0, axes)
        if w_norm.dtype != g_norm.dtype:
            w_norm = xp.astype(w_norm, g_norm.dtype)
        dev = _compat.device(g_norm)
        c = _checks.scalar_or_array(xp, clipping, g_norm.dtype, dev)
        e = _checks.scalar_or_array(xp, eps, g_norm.dtype, dev)
        max_norm = c * xp.maximum(w_norm, e)
        guard = xp.maximum(g_norm, xp.asarray(_DIV_EPS, dtype=g_norm.dtype))
        scale = xp.where(g_norm > max_norm, divide(xp, max_norm, guard), xp.ones_like(g_norm))
        scale = nan_unless_nonneg(xp, scale, *(v for v, u in zip((c, e), unread) if u))
        out.append(_compat.as_array(xp, scaled(gtree, g, cast_scale(gtree, {}, scale, g))))
    return gtree.unflatten(out)


def _same_shape(a: Any, b: Any) -> bool:
    """Equal shapes, where a size Dask does not know yet (NaN or None) matches any."""
    known = _tree.known
    return len(a) == len(b) and all(m == n for m, n in zip(a, b) if known(m) and known(n))


def _unit_axes(
    x: Any, axis: int | tuple[int, ...] | None, layout: str, path: str
) -> tuple[int, ...]:
    """The axes reduced for one unit's norm of leaf ``x`` (all of them: one unit)."""
    ndim = x.ndim
    every = tuple(range(ndim))
    if ndim <= 1:
        return every
    if axis is not None:
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        if not axes or not all(isinstance(a, int) and -ndim <= a < ndim for a in axes):
            raise ValueError(f"axis {axis!r} is out of range for {path} of rank {ndim}")
        axes = tuple(sorted({a % ndim for a in axes}))
        return axes
    if layout == "torch":  # timm: (out, in, ...) weights, every axis but the first
        return every[1:]
    if sum(n != 1 for n in x.shape) <= 1:  # optax: squeezes to a scalar or vector
        return every
    if ndim in (2, 3):
        return (0,)
    if ndim in (4, 5):
        return every[:-1]
    raise ValueError(
        f"{path} has rank {ndim}; optax's layout knows ranks 0 to 5: pass axis= to say "
        "which axes make a unit"
    )


def clip_by_block_rms(grads: Any, /, max_rms: Any) -> Any:
    """Scale each leaf so that its root mean square is at most ``max_rms``.

    Each leaf ``g`` becomes ``g / max(1, rms(g) / max_rms)`` with
    ``rms(g) = ||g||_2 / sqrt(g.size)`` (``optax.clip_by_block_rms``), accumulated
    without overflow as ``gradclip.global_norm``. A leaf of zeros, or an empty
    one, is unchanged.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> out = gc.clip_by_block_rms([np.array([3.0, -3.0]), np.array([0.5])], 1.0)
    >>> out[0], out[1]
    (array([ 1., -1.]), array([0.5]))
    """
    max_rms = _checks.check_nonneg(max_rms, "max_rms")
    tree = _tree.flatten(grads)
    xp = tree.xp
    out = []
    for x, n in zip(tree.leaves, leaf_norms(tree, 2.0)):
        # rms > t  <=>  norm > t * sqrt(size): a per-leaf norm clip
        size = _tree.size(x)
        # (a size unknown until computed, as after a Dask boolean index: counted lazily)
        root = math.sqrt(size) if size is not None else xp.sqrt(element_count(tree, x))
        if isinstance(max_rms, float) and size is not None:
            limit: Any = max_rms * root if size else max_rms  # (inf * 0 would be NaN)
        else:  # an array is not read: clip_scale makes a negative or NaN one NaN
            limit = _checks.scalar_or_array(xp, max_rms, n.dtype, _compat.device(n)) * root
        scale = clip_scale(n, limit)
        out.append(_compat.as_array(xp, scaled(tree, x, cast_scale(tree, {}, scale, x))))
    return tree.unflatten(out)
