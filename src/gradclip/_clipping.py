"""Clipping by global norm (Pascanu et al.), per-leaf norm and value.

Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
networks", ICML 2013 (arXiv:1211.5063): when the norm of the gradient exceeds a
threshold, rescale it to the threshold. The scale ``min(1, max_norm / (norm + eps))``
is computed on the device and always multiplied in, so no value is read back to the
host (``jax.jit``, ``torch.compile``, CUDA graphs and Dask laziness keep working).
"""

from __future__ import annotations

from typing import Any

from . import _backends, _checks, _compat, _distributed, _norms, _tree

__all__ = [
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_value",
    "clip_scale",
]


def clip_scale(norm: Any, max_norm: Any, eps: float = 0.0) -> Any:
    """``min(1, max_norm / (norm + eps))``, exactly 1 when ``norm + eps <= max_norm``.

    A NaN norm gives a NaN scale and an infinite norm a zero scale (values flow
    through, as in torch). The division never sees a zero denominator, so the
    derivative is finite at a zero norm.
    """
    xp = _compat.array_namespace(norm)
    den = norm + eps if eps else norm
    keep = den <= max_norm  # False for NaN
    one = xp.ones_like(den)
    return xp.where(keep, one, _norms.divide(xp, max_norm, xp.where(keep, one, den)))


def clip_by_global_norm(
    grads: Any,
    /,
    max_norm: Any,
    *,
    ord: float = 2,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> tuple[Any, Any]:
    """Scale every leaf by ``min(1, max_norm / (norm + eps))``; return it and the norm.

    Pascanu et al.'s rule (arXiv:1211.5063). ``norm`` is :func:`global_norm` of
    ``grads``: the norm of all elements taken as one vector, accumulated in float32
    (float64 when any leaf is float64) and free of overflow for finite gradients.

    Parameters
    ----------
    grads : array or tree of arrays
        A single array or a nested ``list``/``tuple``/``dict`` (any JAX pytree for
        JAX arrays) of arrays from one library; ``None`` leaves are kept. Integer
        leaves are promoted to the library's default floating dtype.
    max_norm : float or 0-d array
        The threshold (``>= 0``); a 0-d array may be a traced value under ``jax.jit``.
        It is rounded to the norm's dtype, so a number past that dtype's range (1e39
        with float32 gradients) is inf: no clipping.
    ord : float, optional
        The norm's order: any real ``p > 0`` or ``math.inf`` (default 2).
    eps : float, optional
        Added to the norm before dividing. ``1e-6`` reproduces
        ``torch.nn.utils.clip_grad_norm_``; the default ``0.0`` reproduces
        ``optax.clip_by_global_norm``.
    nonfinite : {"propagate", "raise", "zero"}, optional
        What to do when the norm is inf or NaN: let the values flow through
        (torch's behaviour), raise ``FloatingPointError`` (reads the norm on the
        host, so it is an error under ``jax.jit`` or on Dask arrays), or make every
        leaf zero (decided on the device).
    process_group, axis_name, replicated : optional
        For gradients sharded over processes or devices: as in :func:`global_norm`;
        every rank gets the same global norm and scale.

    Returns
    -------
    clipped : same structure as ``grads``
        Each leaf keeps its library, dtype, shape and device.
    norm : 0-d array
        The pre-clip global norm.

    Raises
    ------
    ValueError
        A negative or NaN ``max_norm`` or ``eps``, a bad ``ord`` or ``nonfinite``.
    TypeError
        A leaf that is not an array, leaves from two libraries, a non-numeric
        ``max_norm``.
    FloatingPointError
        With ``nonfinite="raise"``, when the norm is not finite.

    Examples
    --------
    The tutorial's example, clipped to norm 3:

    >>> import numpy as np, gradclip as gc
    >>> clipped, norm = gc.clip_by_global_norm(np.array([1, 2, 3, 4, 5]), max_norm=3)
    >>> round(float(norm), 4)
    7.4162
    >>> np.round(clipped, 4)
    array([0.4045, 0.809 , 1.2136, 1.6181, 2.0226])
    """
    tree, p, max_norm, nonfinite = _prepare(grads, max_norm, ord, eps, nonfinite, inplace=False)
    if process_group is None and axis_name is None and replicated is None:
        fast = _backends.clip_impl(tree, nonfinite=nonfinite)
        if fast is not None:  # the whole call compiled at once (eager JAX)
            leaves, norm = fast(tree, p, max_norm, eps)
            return tree.unflatten(leaves), norm
    norm = _distributed.tree_norm(
        tree, p, process_group=process_group, axis_name=axis_name, replicated=replicated
    )
    return tree.unflatten(_clip(tree, norm, max_norm, eps, nonfinite, inplace=False)[0]), norm


def clip_by_global_norm_(
    grads: Any,
    /,
    max_norm: Any,
    *,
    ord: float = 2,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
) -> Any:
    """:func:`clip_by_global_norm` in place, for writable arrays; returns the norm.

    Works on NumPy, CuPy and PyTorch arrays (views and non-contiguous arrays too)
    and DTensors (FSDP2 gradients). The keyword options are those of
    :func:`clip_by_global_norm`. Every leaf is checked before any is written, so on
    any error no leaf has changed.

    Raises
    ------
    TypeError
        For JAX arrays (immutable), Dask arrays (lazy), read-only NumPy arrays,
        integer arrays and torch leaf tensors that require grad: use the
        functional :func:`clip_by_global_norm` for those.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> grads = {"w": np.array([3.0, 0.0]), "b": np.array([4.0])}
    >>> float(gc.clip_by_global_norm_(grads, max_norm=1.0))
    5.0
    >>> grads["w"], grads["b"]
    (array([0.6, 0. ]), array([0.8]))
    """
    tree, p, max_norm, nonfinite = _prepare(grads, max_norm, ord, eps, nonfinite, inplace=True)
    norm = _distributed.tree_norm(
        tree, p, process_group=process_group, axis_name=axis_name, replicated=replicated
    )
    _clip(tree, norm, max_norm, eps, nonfinite, inplace=True)
    return norm


def clip_by_norm(grads: Any, /, max_norm: Any, *, ord: float = 2, eps: float = 0.0) -> Any:
    """Scale each leaf on its own by ``min(1, max_norm / (norm(leaf) + eps))``.

    The per-tensor rule of ``tf.clip_by_norm`` and Keras ``clipnorm``; each leaf's
    norm is accumulated and protected from overflow as in :func:`global_norm`.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> out = gc.clip_by_norm([np.array([3.0, 4.0]), np.array([0.5])], max_norm=1.0)
    >>> out[0], out[1]
    (array([0.6, 0.8]), array([0.5]))
    """
    tree, p, max_norm, _ = _prepare(grads, max_norm, ord, eps, "propagate", inplace=False)
    out = []
    for x, n in zip(tree.leaves, _norms.leaf_norms(tree, p)):
        m = _checks.scalar_or_array(tree.xp, max_norm, n.dtype, _compat.device(n))
        s = _cast(tree, {}, clip_scale(n, m, eps), x)
        out.append(_compat.as_array(tree.xp, _scaled(tree, x, s)))
    return tree.unflatten(out)


def clip_by_value(grads: Any, /, clip_value: Any) -> Any:
    """Clip every element to ``[-clip_value, clip_value]``.

    ``torch.nn.utils.clip_grad_value_`` and ``optax.clip`` as a function. NaN
    elements stay NaN.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> gc.clip_by_value(np.array([-3.0, 0.5, 2.0]), 1.0)
    array([-1. ,  0.5,  1. ])
    """
    clip_value = _checks.check_nonneg(clip_value, "clip_value")
    tree = _tree.flatten(grads)
    xp = tree.xp
    out = []
    for x in tree.leaves:
        c = _checks.scalar_or_array(xp, clip_value, _real_dtype(tree, x), _compat.device(x))
        if _tree.dtype_kind(xp, x.dtype) == "complex":
            # complex gradients: clip the magnitude, keep the phase
            y = x * clip_scale(xp.abs(x), c)
        else:
            y = xp.clip(x, -xp.astype(c, x.dtype), xp.astype(c, x.dtype))
        out.append(_compat.as_array(xp, y))
    return tree.unflatten(out)


# -- shared steps ---------------------------------------------------------------------


def _prepare(
    grads: Any, max_norm: Any, ord: Any, eps: Any, nonfinite: Any, *, inplace: bool
) -> tuple[_tree.Tree, float, Any, str]:
    """Validate every argument and every leaf before anything is computed or written."""
    p = _checks.check_ord(ord)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")
    eps = _checks.check_nonneg(eps, "eps")
    nonfinite = _checks.check_nonfinite(nonfinite)
    tree = _tree.flatten(grads, promote_int=not inplace)
    bad = _compat.first_unwritable(tree.leaves, lambda: tree.requires_grad) if inplace else None
    if bad is not None:
        raise TypeError(
            f"{tree.paths[bad[0]]} cannot be clipped in place: {bad[1]}; "
            "use the functional form gradclip.clip_by_global_norm, which returns new arrays"
        )
    return tree, p, max_norm, nonfinite


def _clip(
    tree: _tree.Tree, norm: Any, max_norm: Any, eps: float, nonfinite: str, *, inplace: bool
) -> tuple[list[Any], Any]:
    """Every leaf times ``min(1, max_norm / (norm + eps))`` under the ``nonfinite``
    policy, given the tree's global ``norm``: ``(leaves, scale)``. The one step that
    every clip by global norm ends with (plain, adaptive, torch's hook, optax's)."""
    scale = _scale(tree, norm, max_norm, eps, nonfinite)
    return _apply(tree, scale, norm, nonfinite, inplace=inplace), scale


def _scale(tree: _tree.Tree, norm: Any, max_norm: Any, eps: float, nonfinite: str) -> Any:
    if nonfinite == "raise":
        _raise_if_nonfinite(tree, norm)
    fast = _backends.clip_scale_impl(tree)
    if fast is not None:
        return fast(norm, max_norm, eps)
    m = _checks.scalar_or_array(tree.xp, max_norm, norm.dtype, tree.device)
    return clip_scale(norm, m, eps)


def _raise_if_nonfinite(tree: _tree.Tree, norm: Any) -> None:
    if _compat.is_lazy(norm):
        raise ValueError(
            "nonfinite='raise' reads the norm on the host, which a traced or lazy array "
            f"({_compat.library_name(norm)} under jit/compile, or Dask) cannot do; use "
            "nonfinite='zero' to skip the step on the device, or 'propagate'"
        )
    if not bool(tree.xp.isfinite(norm)):
        raise FloatingPointError(
            f"the global norm of the gradients is {float(norm)}: a gradient is inf or NaN "
            "(pass nonfinite='zero' to zero the step instead, or 'propagate')"
        )


def _apply(tree: _tree.Tree, scale: Any, norm: Any, nonfinite: str, *, inplace: bool) -> list[Any]:
    """Multiply every leaf by ``scale`` (zeroing all when the norm is not finite and
    ``nonfinite == "zero"``); in place when asked, else returning new leaves."""
    fast = _backends.scale_impl(tree, inplace=inplace)
    if fast is not None and nonfinite != "zero":
        return fast(tree, scale)
    tree = _backends.barrier(tree)
    xp = tree.xp
    ok = xp.isfinite(norm) if nonfinite == "zero" else None
    if ok is not None:  # a NaN norm makes a NaN scale
        scale = xp.where(ok, scale, xp.zeros_like(scale))
    casts: dict[Any, Any] = {}
    out = []
    for x in tree.leaves:
        s = _cast(tree, casts, scale, x)
        if inplace and ok is None and _multiplies_in_place(x):
            x *= s
            out.append(x)
            continue
        if ok is not None:  # zero the leaf before scaling, so inf * 0 never makes a NaN
            zero = xp.zeros((), dtype=x.dtype, device=_dev(x))
            y = _scaled(tree, xp.where(_to_device(ok, x), x, zero), s)
        else:
            y = _scaled(tree, x, s)
        if inplace:
            x[...] = y
            y = x
        out.append(_compat.as_array(xp, y))
    return out


def _multiplies_in_place(x: Any) -> bool:
    """NumPy, CuPy and torch compute ``x *= s`` in the scale's precision (a float32
    scale on a float16 leaf is rounded once), so the operator needs no temporary."""
    return _compat.is_numpy_array(x) or _compat.is_torch_array(x) or _compat.is_cupy_array(x)


def _scaled(tree: _tree.Tree, x: Any, scale: Any) -> Any:
    """``x * scale`` in the leaf's dtype, for a ``scale`` from :func:`_cast`:
    float16/bfloat16 leaves are multiplied in float32 and rounded once."""
    xp = tree.xp
    if scale.dtype != x.dtype and _tree.dtype_kind(xp, x.dtype) == "low":
        return xp.astype(xp.astype(x, scale.dtype) * scale, x.dtype)
    return x * scale


def _cast(tree: _tree.Tree, cache: dict[Any, Any], scale: Any, x: Any) -> Any:
    """The scale in the dtype (and on the device) to multiply leaf ``x`` by: the
    leaf's real dtype, or the scale's own float32 for low-precision leaves."""
    xp = tree.xp
    kind = _tree.dtype_kind(xp, x.dtype)
    key = (x.dtype, _device_key(x) if _moves(x) else None)
    if key not in cache:
        s = _to_device(scale, x)
        if kind != "low":
            dt = _real_dtype(tree, x)
            s = s if s.dtype == dt else xp.astype(s, dt)
        elif scale.dtype != xp.float32:
            s = xp.astype(s, xp.float32)
        cache[key] = s
    return cache[key]


def _real_dtype(tree: _tree.Tree, x: Any) -> Any:
    xp = tree.xp
    if _tree.dtype_kind(xp, x.dtype) == "complex":
        return xp.float64 if x.dtype == xp.complex128 else xp.float32
    return x.dtype


def _moves(x: Any) -> bool:
    return _compat.is_torch_array(x) or _compat.is_cupy_array(x)


def _dev(x: Any) -> Any:
    return _compat.device(x)


def _device_key(x: Any) -> Any:
    """A hashable name of a torch/CuPy array's device (CuPy's devices are not)."""
    return x.device.id if _compat.is_cupy_array(x) else x.device


def _to_device(v: Any, x: Any) -> Any:
    """``v`` on ``x``'s device, for leaves spread over several torch/CuPy devices."""
    if _moves(x) and v.device != x.device:
        return _compat.to_device(v, x.device)
    return v
