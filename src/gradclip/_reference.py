"""The reference math: norms and scaling of gradient trees, on any Array API library.

Every backend fast path must agree with this module to a few ulps; it imports no
array library and no backend, and reads nothing back to the host (``jax.jit``,
``torch.compile`` and lazy Dask arrays work).

The p-norm of all leaves as one vector is taken per leaf as ``m * (sum (|x| / m) **
p) ** (1 / p)``, ``m`` the leaf's largest magnitude, and the leaves are combined with
the largest ``m`` as the common scale: every term is at most 1, so no finite input
overflows (float16 squares, float32 values of 1e30), and the sums run in float32 or
float64. Inf and NaN propagate (NaN first). A zero norm has a finite derivative.
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Any

from . import _checks, _compat
from ._tree import Tree, known, size

__all__ = [
    "axis_norms",
    "cast_scale",
    "clip_scale",
    "clip_values",
    "combine",
    "divide",
    "element_count",
    "example_norms",
    "leaf_norms",
    "leaf_terms",
    "nan_unless_nonneg",
    "norm_grad",
    "power",
    "real_dtype",
    "safe_scale",
    "scale_leaves",
    "scaled",
    "scaled_root",
    "to_common_device",
    "tree_norm",
]


# -- norms -------------------------------------------------------------------------------


def tree_norm(tree: Tree, p: float) -> Any:
    """The global ``p``-norm of a flattened tree (in its accumulation dtype)."""
    terms = [leaf_terms(tree, x, p) for x in tree.leaves]
    return _compat.as_array(tree.xp, combine(tree, terms, p))


def leaf_norms(tree: Tree, p: float) -> list[Any]:
    """Each leaf's own ``p``-norm (accumulation dtype, on the leaf's device)."""
    return [axis_norms(tree, x, p) for x in tree.leaves]


def axis_norms(tree: Tree, x: Any, p: float, axis: tuple[int, ...] | None = None) -> Any:
    """The ``p``-norms of leaf ``x`` over ``axis``, kept as size-1 axes (unit norms);
    over every axis, as a 0-d array, when ``axis`` is ``None``."""
    m, s = leaf_terms(tree, x, p, axis)
    return m if math.isinf(p) else scaled_root(tree.xp, m, s, p)


def example_norms(tree: Tree, p: float) -> Any:
    """The ``p``-norm of each example: axis 0 of every leaf is the batch, every other
    axis of every leaf is reduced. Shape ``(batch,)``, accumulation dtype."""
    xp = tree.xp
    terms = []
    for x in tree.leaves:
        # (an index and squeeze, not reshapes: Dask may not know the batch size yet)
        if x.ndim == 1:  # one number per example; torch reads axis=() as "all axes"
            x = x[:, None]
        axes = tuple(range(1, x.ndim))
        m, s = leaf_terms(tree, x, p, axes)
        terms.append((xp.squeeze(m, axis=axes), None if s is None else xp.squeeze(s, axis=axes)))
    return combine(tree, terms, p)


def leaf_terms(tree: Tree, x: Any, p: float, axis: tuple[int, ...] | None = None) -> tuple:
    """``(m, s)`` for one leaf: its largest magnitude and ``sum (|x| / d) ** p``.

    ``d`` is ``m`` where ``m`` is finite and positive, else 1, so the terms are at
    most 1 for finite leaves and inf/NaN flow into ``s`` otherwise. For ``p = inf``
    ``s`` is unused (``None``). With ``axis``, both are taken over those axes only
    and have the leaf's rank (the reduced axes kept with size 1). For finite ``p``,
    ``m`` has no derivative (torch, JAX): only ``s`` carries the norm's.
    """
    xp, acc = tree.xp, tree.acc_dtype
    keep = axis is not None
    n = size(x)
    if n == 0:
        shape = tuple(1 if i in axis else k for i, k in enumerate(x.shape)) if keep else ()
        zero = xp.zeros(shape, dtype=acc, device=tree.device)
        return zero, (None if math.isinf(p) else zero)
    a = xp.abs(x)
    if a.dtype != acc:
        a = xp.astype(a, acc)
    if n is None:
        a = _pad_unknown(tree, x, a, axis)
    m = xp.max(a, axis=axis, keepdims=keep)
    if math.isinf(p):
        return to_common_device(tree, m), None
    # The scale is a constant to autodiff: the norm's derivative does not depend on it,
    # and one taken through it would square it (x / d has -x / d**2 for d, which
    # overflows in float32 for d = 1e20), where the terms that cancel lose their balance.
    m = _compat.stop_gradient(xp, m)
    d = safe_scale(xp, m)
    if p == 2 and n is not None and _compat.dtype_kind(xp, x.dtype) != "complex":
        # the same squares from x itself: XLA then need not keep |x| for a second pass
        y = divide(xp, x if x.dtype == acc else xp.astype(x, acc), d)
    else:
        y = divide(xp, a, d)
    s = xp.sum(power(xp, y, p), axis=axis, keepdims=keep)
    return to_common_device(tree, m), to_common_device(tree, s)


def _pad_unknown(tree: Tree, x: Any, a: Any, axis: tuple[int, ...] | None) -> Any:
    """``a`` (the magnitudes of leaf ``x``) with one zero more along each reduced axis
    whose size is not known until computed (Dask after boolean indexing), which may
    be 0: the max is then defined, and the sum gains nothing."""
    xp = tree.xp
    if axis is None:
        if a.ndim > 1:  # Dask's reshape needs the size: no lazy flattening
            path = next((p for y, p in zip(tree.leaves, tree.paths) if y is x), "a leaf")
            raise ValueError(
                f"{path} has shape {tuple(x.shape)}, known only once computed (Dask after "
                "boolean indexing of rows), and Dask cannot flatten it lazily: call "
                ".compute_chunk_sizes() on it first, or index with a mask of its full shape"
            )
        zero = xp.zeros((1,), dtype=a.dtype, device=tree.device)
        return xp.concat([a, zero])
    for ax in axis:
        if not known(a.shape[ax]) or a.shape[ax] == 0:
            shape = tuple(1 if i == ax else d for i, d in enumerate(a.shape))
            if all(map(known, shape)):  # (else not padded: Dask cannot make the zeros)
                zero = xp.zeros(shape, dtype=a.dtype, device=tree.device)
                a = xp.concat([a, zero], axis=ax)
    return a


def element_count(tree: Tree, x: Any) -> Any:
    """The number of elements of ``x`` as a 0-d array (accumulation dtype), counted on
    the device: for shapes known only once computed (Dask after boolean indexing)."""
    xp = tree.xp
    return xp.sum(xp.ones_like(x, dtype=tree.acc_dtype))


def combine(tree: Tree, terms: list[tuple[Any, Any]], p: float) -> Any:
    """The global norm from the per-leaf ``(m, s)`` terms (0-d, or arrays of one shape
    for norms taken per example)."""
    xp = tree.xp
    ms = [m for m, _ in terms]
    # (Dask cannot stack arrays whose length is known only once computed: folded)
    fold = len(ms) > 1 and size(ms[0]) is None
    big = functools.reduce(xp.maximum, ms) if fold else xp.max(xp.stack(ms), axis=0)
    if math.isinf(p):
        return big
    scale = safe_scale(xp, big)

    def weighted(m: Any, s: Any) -> Any:
        # A zero leaf weighs 0 (its divisor of 1 could overflow against a tiny scale);
        # an inf/NaN leaf weighs 1 and its inf/NaN sum flows through.
        r = divide(xp, xp.where(m > 0, safe_scale(xp, m), xp.zeros_like(m)), scale)
        return power(xp, r, p) * s

    if fold:
        total = functools.reduce(operator.add, (weighted(m, s) for m, s in terms))
    else:  # axis 0 runs over the leaves
        total = xp.sum(weighted(xp.stack(ms), xp.stack([s for _, s in terms])), axis=0)
    return scaled_root(xp, scale, total, p)


def power(xp: Any, y: Any, p: float) -> Any:
    """``y ** p`` for ``y >= 0`` (inf and NaN kept), with a finite derivative at
    ``y = 0`` for ``p < 1`` too (0 there: ``pow``'s own is ``p * 0 ** (p - 1)``, inf,
    and NaN once multiplied by a zero)."""
    if p == 2:
        return y * y
    if p >= 1:
        return y if p == 1 else xp.pow(y, p)
    zero = y == 0
    return xp.where(zero, xp.zeros_like(y), xp.pow(xp.where(zero, xp.ones_like(y), y), p))


def divide(xp: Any, x: Any, d: Any) -> Any:
    """``x / d`` for an array ``d >= 0``, right also where XLA multiplies by ``1 / d``.

    XLA (JAX) rewrites a division by a broadcast value as a multiplication by its
    reciprocal, and flushes that to zero when it is subnormal (``d > 2**126`` in
    float32): ``x / d`` would be 0. There, beyond ``finfo.max / 16``, both sides are
    first multiplied by ``2**-64`` (exact: what it flushes is below the result's
    range). Other libraries divide (no extra kernels on a GPU).
    """
    if not _compat.is_jax_namespace(xp):
        return x / d
    c = xp.where(d > xp.finfo(d.dtype).max / 16, xp.full_like(d, 2.0**-64), xp.ones_like(d))
    return (x * c) / (d * c)


def safe_scale(xp: Any, m: Any) -> Any:
    """``m`` where it is finite and positive, else 1: a divisor that is never 0."""
    ok = xp.isfinite(m) & (m > 0)
    return xp.where(ok, m, xp.ones_like(m))


def scaled_root(xp: Any, d: Any, s: Any, p: float) -> Any:
    """``d * s ** (1/p)`` with ``d`` made safe, and a finite derivative at ``s = 0``."""
    d = safe_scale(xp, d)
    pos = s > 0
    s_safe = xp.where(pos, s, xp.ones_like(s))
    root = xp.sqrt(s_safe) if p == 2 else s_safe if p == 1 else xp.pow(s_safe, 1.0 / p)
    # s itself where it is 0 (the norm is 0) or NaN (the norm is NaN)
    return xp.where(pos, d * root, s)


def norm_grad(tree: Tree, x: Any, norm: Any, p: float) -> Any:
    """The derivative of the tree's ``p``-norm ``norm`` (finite ``p``) by leaf ``x``:
    ``u * (|x| / norm) ** (p - 1)``, ``u = x / |x|`` (the sign of a real ``x``), in the
    accumulation dtype (its complex one for a complex leaf), on ``x``'s device.

    Formed from the ratio ``|x| / norm``, never a power of ``|x|`` or of the norm on
    its own, so it is finite wherever the derivative is (an automatic derivative of
    the scaled form passes the scale's square or reciprocal on the way); a ratio below
    the smallest normal number (an element far below the norm) is taken through
    logarithms, where its power may still be large (``p < 1``) or normal. At a zero
    norm, and at a zero element, it is 0 (for ``p < 1`` a subgradient).
    """
    xp, acc = tree.xp, tree.acc_dtype
    n = _to_device(norm, _leaf_device(x))
    n = xp.where(n == 0, xp.ones_like(n), n)  # a zero norm: every element is 0 too
    if _compat.dtype_kind(xp, x.dtype) == "complex":
        u = _direction(xp, x)
        a = xp.abs(x)
    else:
        y = x if x.dtype == acc else xp.astype(x, acc)
        if p == 2:
            return _quotient(xp, y, n)
        u, a = xp.sign(y), xp.abs(y)
    if p == 1:
        return u
    r = _quotient(xp, a, n)
    tiny = xp.finfo(acc).smallest_normal
    pos = a > 0
    # where r underflows, through logarithms (of 1 where unused: no log of 0)
    a1, r1 = xp.where(pos, a, xp.ones_like(a)), xp.where(r >= tiny, r, xp.ones_like(r))
    w = xp.where(r >= tiny, xp.pow(r1, p - 1), xp.exp((p - 1) * (xp.log(a1) - xp.log(n))))
    # a zero element: 0 (for p < 1 it has no finite derivative)
    return u * xp.where(pos, w, xp.zeros_like(w))


def to_common_device(tree: Tree, v: Any) -> Any:
    """Move a per-leaf 0-d result to the first leaf's device (torch/CuPy multi-device)."""
    return _to_device(v, tree.device)


# -- the scale and the multiply -----------------------------------------------------------


def clip_scale(norm: Any, /, max_norm: Any, *, eps: Any = 0.0) -> Any:
    """``min(1, max_norm / (norm + eps))``, exactly 1 when ``norm + eps <= max_norm``.

    The factor every clip by global norm multiplies the gradients by, for a norm the
    caller has (summed over ranks by hand, say). A NaN norm gives a NaN scale and an
    infinite norm a zero scale (values flow through, as in torch). The division never
    sees a zero denominator, so the derivative is finite at a zero norm.

    ``max_norm`` and ``eps`` may be numbers (a negative or NaN one is a
    ``ValueError``) or 0-d arrays of the norm's library, which are not read on the
    host: a negative or NaN one gives a NaN scale.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> gc.clip_scale(np.float32(5.0), max_norm=1.0)
    array(0.2, dtype=float32)
    """
    xp = _compat.array_namespace(norm)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")
    eps = _checks.check_nonneg(eps, "eps", finite=True)
    dev = _compat.device(norm)
    m = _checks.scalar_or_array(xp, max_norm, norm.dtype, dev)
    unread = [m] if not isinstance(max_norm, float) else []
    if isinstance(eps, float):
        den = norm + eps if eps else norm
    else:
        e = _checks.scalar_or_array(xp, eps, norm.dtype, dev)
        den, unread = norm + e, [*unread, e]
    keep = den <= m  # False for NaN
    one = xp.ones_like(den)
    scale = xp.where(keep, one, _quotient(xp, m, xp.where(keep, one, den)))
    return _compat.as_array(xp, nan_unless_nonneg(xp, scale, *unread))


def nan_unless_nonneg(xp: Any, x: Any, *limits: Any) -> Any:
    """``x``, but NaN wherever one of ``limits`` is negative or NaN.

    ``limits`` are thresholds given as 0-d arrays of the gradients' library, whose
    value is never read on the host (``gradclip._checks``): this makes a bad one
    visible in the results, on the device, instead of a silent sign flip.
    """
    for m in limits:
        x = xp.where(m >= 0, x, xp.full_like(x, math.nan))
    return x


def _quotient(xp: Any, m: Any, d: Any) -> Any:
    """``m / d`` for ``d > 0`` (inf and NaN too), with a derivative by ``d`` that does
    not underflow where autodiff's would: the value ``(m / d) * exp(log d - log d)``,
    one ``d`` of each pair a constant, is ``m / d`` bit for bit, and reverse-mode
    autodiff forms its derivative as ``-(g * (m / d)) / d``, not from ``1 / d**2``
    (below float32's range for ``d`` beyond 1e19)."""
    if not _compat.differentiable(xp, d):
        return divide(xp, m, d)
    fin = xp.where(xp.isfinite(d), d, xp.ones_like(d))  # (inf, NaN: m / d as it is)
    c = _compat.stop_gradient(xp, fin)
    return divide(xp, m, _compat.stop_gradient(xp, d)) * xp.exp(xp.log(c) - xp.log(fin))


def clip_values(tree: Tree, x: Any, c: Any) -> Any:
    """Leaf ``x`` clipped elementwise to ``[-c, c]`` (``c`` a 0-d array of its real
    dtype), in ``x``'s dtype; NaN stays NaN. A complex element whose magnitude exceeds
    ``c`` becomes ``c`` times its direction, also where the magnitude is infinite or
    overflows (``x * (c / |x|)`` would be ``inf * 0``, NaN there)."""
    xp = tree.xp
    if _compat.dtype_kind(xp, x.dtype) != "complex":
        xn = _compat.native_byte_order(x)  # (NumPy's clip refuses other byte orders)
        cn = xp.astype(c, xn.dtype)
        # (clip needs a shape; one Dask knows only once computed takes min and max)
        y = xp.clip(xn, -cn, cn) if size(xn) is not None else xp.minimum(xp.maximum(xn, -cn), cn)
    else:
        y = xp.where(xp.abs(x) <= c, x, c * _direction(xp, x))  # False for NaN, inf
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)


def _direction(xp: Any, z: Any) -> Any:
    """``z / |z|`` for complex ``z`` without overflow: its parts divided by the larger
    one's magnitude first; for an infinite part, the infinite parts' signs (the phase
    of ``inf + inf j`` is pi/4). NaN where a part is NaN; 0 for 0."""
    re, im = xp.real(z), xp.imag(z)
    m = xp.maximum(xp.abs(re), xp.abs(im))
    inf = xp.isinf(m)
    zero = xp.zeros_like(m)
    d = xp.where(inf | (m == 0), xp.ones_like(m), m)  # (NaN stays: NaN parts)
    ur = xp.where(inf, xp.where(xp.isinf(re), xp.sign(re), zero), divide(xp, re, d))
    ui = xp.where(inf, xp.where(xp.isinf(im), xp.sign(im), zero), divide(xp, im, d))
    r = xp.sqrt(ur * ur + ui * ui)  # in [1, sqrt(2)], or 0 for z = 0
    r = xp.where(r == 0, xp.ones_like(r), r)
    j = xp.asarray(1j, dtype=z.dtype, device=_compat.device(z))
    return xp.astype(ur / r, z.dtype) + xp.astype(ui / r, z.dtype) * j


def scale_leaves(tree: Tree, scale: Any, norm: Any, nonfinite: str, *, inplace: bool) -> list:
    """Every leaf times ``scale`` (all zeros when the norm is not finite and
    ``nonfinite == "zero"``); in place when asked, else new leaves."""
    xp = tree.xp
    ok = xp.isfinite(norm) if nonfinite == "zero" else None
    if ok is not None:  # a NaN norm makes a NaN scale
        scale = xp.where(ok, scale, xp.zeros_like(scale))
    casts: dict[Any, Any] = {}
    out = []
    for x in tree.leaves:
        s = cast_scale(tree, casts, scale, x)
        if inplace and ok is None and _multiplies_in_place(x):
            x *= s
            out.append(x)
            continue
        if ok is not None:  # zero the leaf before scaling, so inf * 0 never makes a NaN
            zero = xp.zeros((), dtype=x.dtype, device=_compat.device(x))
            y = scaled(tree, xp.where(_to_device(ok, _leaf_device(x)), x, zero), s)
        else:
            y = scaled(tree, x, s)
        if inplace:
            x[...] = y
            y = x
        out.append(_compat.as_array(xp, y))
    return out


def _multiplies_in_place(x: Any) -> bool:
    """NumPy, CuPy and torch compute ``x *= s`` in the scale's precision (a float32
    scale on a float16 leaf is rounded once), so the operator needs no temporary.
    torch has no multiply for its 8-bit floats: those are written from the product
    in float32 instead."""
    if _compat.is_torch_array(x):
        return x.dtype.itemsize > 1
    return _compat.is_numpy_array(x) or _compat.is_cupy_array(x)


def scaled(tree: Tree, x: Any, scale: Any) -> Any:
    """``x * scale`` in the leaf's dtype, for a ``scale`` from ``cast_scale``:
    float16/bfloat16 leaves are multiplied in float32 and rounded once."""
    xp = tree.xp
    if scale.dtype != x.dtype and _compat.dtype_kind(xp, x.dtype) == "low":
        return xp.astype(xp.astype(x, scale.dtype) * scale, x.dtype)
    y = x * scale
    # NumPy's products are in native byte order: a big-endian leaf keeps its own
    return y if y.dtype == x.dtype else xp.astype(y, x.dtype)


def cast_scale(tree: Tree, cache: dict[Any, Any], scale: Any, x: Any) -> Any:
    """The scale in the dtype (and on the device) to multiply leaf ``x`` by: the
    leaf's real dtype, or the scale's own float32 for low-precision leaves; made once
    per dtype and device (``cache``)."""
    xp = tree.xp
    key = (x.dtype, _device_key(x) if _moves(x) else None)
    if key not in cache:
        s = _to_device(scale, _leaf_device(x))
        if _compat.dtype_kind(xp, x.dtype) != "low":
            dt = real_dtype(tree, x)
            s = s if s.dtype == dt else xp.astype(s, dt)
        elif scale.dtype != xp.float32:
            s = xp.astype(s, xp.float32)
        cache[key] = s
    return cache[key]


def real_dtype(tree: Tree, x: Any) -> Any:
    """The real dtype of leaf ``x`` (float32/float64 for complex leaves)."""
    xp = tree.xp
    if _compat.dtype_kind(xp, x.dtype) == "complex":
        return _compat.accumulation_dtype(xp, (x.dtype,))  # complex128 in any byte order
    return x.dtype


def _moves(x: Any) -> bool:
    return _compat.is_torch_array(x) or _compat.is_cupy_array(x)


def _leaf_device(x: Any) -> Any:
    return x.device if _moves(x) else None


def _device_key(x: Any) -> Any:
    """A hashable name of a torch/CuPy array's device (CuPy's devices are not)."""
    return x.device.id if _compat.is_cupy_array(x) else x.device


def _to_device(v: Any, device: Any) -> Any:
    """``v`` on ``device``, for leaves spread over several torch/CuPy devices."""
    if device is not None and _moves(v) and v.device != device:
        return _compat.to_device(v, device)
    return v
