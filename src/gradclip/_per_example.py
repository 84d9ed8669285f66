"""Per-example clipping for differentially private SGD (Abadi et al.).

Abadi, Chu, Goodfellow, McMahan, Mironov, Talwar and Zhang, "Deep Learning with
Differential Privacy", CCS 2016 (arXiv:1607.00133), algorithm 1: each example's
gradient ``g_i`` is clipped to ``g_i / max(1, ||g_i|| / C)`` before the batch is summed
(and noised, which is left to the caller). Every example's norm is taken at once by
reducing every axis but the batch axis, with the overflow-free scaling of
``gradclip._reference``; there is no Python loop over examples.
"""

from __future__ import annotations

from typing import Any

from . import _checks, _compat, _tree
from ._reference import cast_scale, clip_scale, example_norms, scaled

__all__ = ["per_example_clip"]

_REDUCE = ("sum", "mean", "none")


def per_example_clip(
    grads: Any, /, max_norm: Any, *, reduce: str = "sum", eps: float = 0.0
) -> tuple[Any, Any, Any]:
    """Clip each example's gradient to global L2 norm ``max_norm``, then reduce.

    Axis 0 of every leaf is the batch. Example ``i`` is scaled by
    ``min(1, C / (||g_i|| + eps))``, ``||g_i||`` being the norm of all its elements
    in every leaf. An example with zero gradient stays zero (no NaN), one with a NaN
    norm is passed through unscaled (as in optax).

    With ``eps=0`` (default) this is ``optax.per_example_global_norm_clip``;
    ``eps=1e-6`` is Opacus's flat clipping factor ``clamp(C / (N + 1e-6), max=1)``.

    Parameters
    ----------
    grads : tree of arrays
        Per-example gradients, every leaf with the same leading batch size.
    max_norm : float or 0-d array
        ``C``, the largest norm an example may contribute.
    reduce : {"sum", "mean", "none"}, optional
        Sum the clipped examples (DP-SGD, optax), average them, or return them all
        (each leaf keeps its batch axis).
    eps : float, optional
        Added to each norm before dividing.

    Returns
    -------
    clipped : same structure as ``grads``
        Leaves without the batch axis (``"sum"``, ``"mean"``) or with it (``"none"``),
        in each leaf's dtype.
    norms : array of shape ``(batch,)``
        Each example's norm before clipping (float32, float64 for float64 leaves).
    num_clipped : 0-d integer array
        How many examples were scaled down.

    Examples
    --------
    optax's example: four examples of norms 0, 5, 5 and 5.

    >>> import numpy as np, gradclip as gc
    >>> g = np.array([[0, 0, 0], [0, 3, 4], [4, 0, 3], [3, 4, 0]], dtype=np.float32)
    >>> clipped, norms, n = gc.per_example_clip(g, 1.25)
    >>> clipped, norms, int(n)
    (array([1.75, 1.75, 1.75], dtype=float32), array([0., 5., 5., 5.], dtype=float32), 3)
    """
    _checks.check_choice(reduce, "reduce", _REDUCE)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")
    eps = _checks.check_nonneg(eps, "eps", finite=True)
    tree = _tree.flatten(grads)
    xp = tree.xp
    batch = _batch_size(tree)
    norms = example_norms(tree, 2.0)
    scale = clip_scale(norms, max_norm, eps=eps)
    # an example with a NaN norm passes unscaled, as in optax (a NaN threshold given
    # as an array still makes every example NaN)
    scale = xp.where(xp.isnan(norms), xp.ones_like(scale), scale)
    num_clipped = xp.sum(xp.astype(scale < 1, xp.int32))
    if reduce == "mean":
        if batch is None:  # known only once computed (Dask): counted on the device
            scale = scale / xp.maximum(xp.sum(xp.ones_like(scale)), xp.ones_like(scale))
        else:
            scale = scale / max(batch, 1)
    casts: dict[Any, Any] = {}
    out = []
    for x in tree.leaves:
        s = cast_scale(tree, casts, scale, x)  # the leaf's real dtype (float32 for 16-bit leaves)
        if reduce == "none":
            # (an index, not a reshape: Dask may not know the batch size yet)
            y = scaled(tree, x, s[(...,) + (None,) * (x.ndim - 1)])
        else:
            y = _weighted_sum(tree, x, s)
        out.append(_compat.as_array(xp, y))
    return tree.unflatten(out), _compat.as_array(xp, norms), _compat.as_array(xp, num_clipped)


def _batch_size(tree: _tree.Tree) -> int | None:
    """The leaves' common size of axis 0; ``None`` when no leaf knows it yet (Dask
    after boolean indexing: leaves of unknown size are not compared)."""
    sizes = []
    for x, path in zip(tree.leaves, tree.paths):
        if x.ndim == 0:
            raise ValueError(f"{path} is 0-d, but per-example gradients need a batch axis 0")
        n = x.shape[0]
        sizes.append(int(n) if _tree.known(n) else None)
    known = [(n, path) for n, path in zip(sizes, tree.paths) if n is not None]
    if known and len(known) < len(sizes):  # (Dask cannot stack such leaves' norms)
        lazy = tree.paths[sizes.index(None)]
        raise ValueError(
            f"{known[0][1]} has {known[0][0]} examples, but the batch size of {lazy} is "
            "not known until computed (Dask after boolean indexing): select the same "
            "examples of every leaf, or call .compute_chunk_sizes() first"
        )
    for n, path in known:
        if n != known[0][0]:
            raise ValueError(
                f"every leaf needs the same batch size on axis 0, but {known[0][1]} has "
                f"{known[0][0]} examples and {path} has {n}"
            )
    return known[0][0] if known else None


def _weighted_sum(tree: _tree.Tree, x: Any, s: Any) -> Any:
    """``sum_i s[i] * x[i]`` over axis 0 (a matrix-vector product) in the leaf's dtype;
    16-bit leaves are summed in float32 and rounded once."""
    xp = tree.xp
    kind = _compat.dtype_kind(xp, x.dtype)
    if x.shape[0] == 0:
        return xp.zeros(x.shape[1:], dtype=x.dtype, device=_compat.device(x))
    if kind == "low":
        return xp.astype(xp.tensordot(s, xp.astype(x, s.dtype), axes=1), x.dtype)
    return xp.tensordot(xp.astype(s, x.dtype) if kind == "complex" else s, x, axes=1)
