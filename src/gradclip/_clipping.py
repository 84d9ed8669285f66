"""The public clipping functions, and the one clip step they and the clippers share.

Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
networks", ICML 2013 (arXiv:1211.5063): when the norm of the gradient exceeds a
threshold, rescale it to the threshold. The scale ``min(1, max_norm / (norm + eps))``
is computed on the device and always multiplied in, so no value is read back to the
host (``jax.jit``, ``torch.compile``, CUDA graphs and Dask laziness keep working).
"""

from __future__ import annotations

from typing import Any, NamedTuple

from . import _backends, _checks, _compat, _distributed, _reference, _tree

__all__ = [
    "Step",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_value",
    "clip_step",
    "global_norm",
]


def global_norm(
    grads: Any,
    /,
    *,
    ord: float = 2,
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
    sharded: Any = None,
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
        like ``grads`` (or a prefix of it), a function of each leaf's path, or one
        marker for all, giving ``True`` (the same on every rank), ``False``/``None``
        (a shard, the default) or the group(s)/axis name(s) a leaf is replicated
        over (tied embeddings); sharded over the call's other groups.
    sharded : tree of markers or callable, optional
        The other way round (give one of the two): the group(s)/axis name(s) (or a
        ``PartitionSpec``) each leaf is split over, which join the reduction, with
        ``True`` for all and ``False``/``None`` for none; the leaf holds copies over
        the call's other groups. Either tree may hold a ``gradclip.Layout``
        that names both (see ``docs/parallel_layouts.md``).

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
    plan = _backends.plan(_tree.flatten(grads))
    dist = {
        "process_group": process_group,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    return _distributed.tree_norm(plan, p, **dist)


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
    sharded: Any = None,
) -> tuple[Any, Any]:
    """Scale every leaf by ``min(1, max_norm / (norm + eps))``; return it and the norm.

    Pascanu et al.'s rule (arXiv:1211.5063). ``norm`` is ``global_norm`` of
    ``grads``: the norm of all elements taken as one vector, accumulated in float32
    (float64 when any leaf is float64) and free of overflow for finite gradients.

    Parameters
    ----------
    grads : array or tree of arrays
        A single array or a nested ``list``/``tuple``/``dict`` (any JAX pytree for
        JAX arrays) of arrays from one library; ``None`` leaves are kept. Integer
        leaves are promoted to the library's default floating dtype.
    max_norm : float or 0-d array
        The threshold (``>= 0``). A Python or NumPy number is checked on the host; a
        0-d array of the gradients' library (on an accelerator, or traced under
        ``jax.jit``) is never read there, and a negative or NaN one makes every
        clipped leaf NaN. It is rounded to the norm's dtype, so a number past that
        dtype's range (1e39 with float32 gradients, or an integer past float's) is
        inf: no clipping.
    ord : float, optional
        The norm's order: any real ``p > 0`` or ``math.inf`` (default 2).
    eps : float or 0-d array, optional
        Added to the norm before dividing (finite, ``>= 0``; an array as
        ``max_norm``). ``1e-6`` reproduces ``torch.nn.utils.clip_grad_norm_``; the
        default ``0.0`` reproduces ``optax.clip_by_global_norm``.
    nonfinite : {"propagate", "raise", "zero"}, optional
        What to do when the norm is inf or NaN: let the values flow through
        (torch's behaviour), raise ``FloatingPointError`` (reads the norm on the
        host, so it is an error under ``jax.jit`` or on Dask arrays), or make every
        leaf zero (decided on the device).
    process_group, axis_name, replicated, sharded : optional
        For gradients sharded over processes or devices: as in ``global_norm``;
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
        A negative or NaN ``max_norm`` or ``eps`` given as a number, an infinite
        ``eps``, a bad ``ord`` or ``nonfinite``, a tree that contains itself.
    TypeError
        A leaf that is not an array (or a sparse one), leaves from two libraries, a
        ``max_norm`` or ``eps`` that is not a real number or 0-d real array (a
        bool, a string, an object array).
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
    tree = _tree.flatten(grads)
    dist = {
        "process_group": process_group,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    step = clip_step(tree, max_norm, ord=ord, eps=eps, nonfinite=nonfinite, **dist)
    return tree.unflatten(step.leaves), step.norm


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
    sharded: Any = None,
) -> Any:
    """``clip_by_global_norm`` in place, for writable arrays; returns the norm.

    Works on NumPy, CuPy and PyTorch arrays (views and non-contiguous arrays too)
    and DTensors (FSDP2 gradients). The keyword options are those of
    ``clip_by_global_norm``. Every leaf is checked before any is written, so on
    any error no leaf has changed.

    Raises
    ------
    TypeError
        For JAX arrays (immutable), Dask arrays (lazy), read-only NumPy arrays,
        integer arrays and torch leaf tensors that require grad: use the
        functional ``clip_by_global_norm`` for those.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> grads = {"w": np.array([3.0, 0.0]), "b": np.array([4.0])}
    >>> float(gc.clip_by_global_norm_(grads, max_norm=1.0))
    5.0
    >>> grads["w"], grads["b"]
    (array([0.6, 0. ]), array([0.8]))
    """
    tree = _tree.flatten(grads, inplace=True)  # every leaf checked before any is written
    dist = {
        "process_group": process_group,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    options = {"ord": ord, "eps": eps, "nonfinite": nonfinite, "inplace": True}
    return clip_step(tree, max_norm, **options, **dist).norm


def clip_by_norm(grads: Any, /, max_norm: Any, *, ord: float = 2, eps: float = 0.0) -> Any:
    """Scale each leaf on its own by ``min(1, max_norm / (norm(leaf) + eps))``.

    The per-tensor rule of ``tf.clip_by_norm`` and Keras ``clipnorm``; each leaf's
    norm is accumulated and protected from overflow as in ``global_norm``.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> out = gc.clip_by_norm([np.array([3.0, 4.0]), np.array([0.5])], max_norm=1.0)
    >>> out[0], out[1]
    (array([0.6, 0.8]), array([0.5]))
    """
    p = _checks.check_ord(ord)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")
    eps = _checks.check_nonneg(eps, "eps", finite=True)
    tree = _tree.flatten(grads)
    out = []
    for x, n in zip(tree.leaves, _reference.leaf_norms(tree, p)):
        s = _reference.cast_scale(tree, {}, _reference.clip_scale(n, max_norm, eps=eps), x)
        out.append(_compat.as_array(tree.xp, _reference.scaled(tree, x, s)))
    return tree.unflatten(out)


def clip_by_value(grads: Any, /, clip_value: Any) -> Any:
    """Clip every element to ``[-clip_value, clip_value]``.

    ``torch.nn.utils.clip_grad_value_`` and ``optax.clip`` as a function. NaN
    elements stay NaN. A complex element's magnitude is clipped and its phase kept,
    also for an infinite element (``inf + inf j`` becomes ``clip_value`` at pi/4). A
    ``clip_value`` given as a 0-d array of the gradients' library is not read on the
    host: a negative or NaN one makes every element NaN.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> gc.clip_by_value(np.array([-3.0, 0.5, 2.0]), 1.0)
    array([-1. ,  0.5,  1. ])
    """
    clip_value = _checks.check_nonneg(clip_value, "clip_value")
    unread = not isinstance(clip_value, float)  # an array: NaN results if it is < 0
    tree = _tree.flatten(grads)
    xp = tree.xp
    out = []
    for x in tree.leaves:
        dt = _reference.real_dtype(tree, x)
        c = _checks.scalar_or_array(xp, clip_value, dt, _compat.device(x))
        if unread:  # NaN bounds give NaN elements
            c = _reference.nan_unless_nonneg(xp, c, c)
        # complex gradients: the magnitude clipped, the phase kept
        out.append(_compat.as_array(xp, _reference.clip_values(tree, x, c)))
    return tree.unflatten(out)


# -- the one clip step ---------------------------------------------------------------------


class Step(NamedTuple):
    """What one clip step did: the new leaves and 0-d arrays, never read on the host."""

    leaves: list[Any]
    """The clipped leaves (the same arrays, written, when in place)."""
    norm: Any
    """The pre-clip global norm."""
    max_norm: Any
    """The threshold used."""
    scale: Any
    """The factor every leaf was multiplied by."""
    state: Any = None
    """A stateful clipper's new state."""

    @property
    def clipped(self) -> Any:
        """Whether the gradients were scaled down: ``scale < 1`` with a finite norm (a
        non-finite norm is reported as such, not as clipped)."""
        xp = _compat.array_namespace(self.scale)
        return _compat.as_array(xp, (self.scale < 1) & xp.isfinite(self.norm))


def clip_step(
    tree: _tree.Tree,
    max_norm: Any = None,
    *,
    ord: float = 2,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    inplace: bool = False,
    clipper: Any = None,
    state: Any = None,
    norm: Any = None,
    plan: _backends.Plan | None = None,
    multiply: bool = True,
    unscale: Any = None,
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> Step:
    """The step every clip by global norm is made of: the norm, the threshold, the
    scale ``min(1, max_norm / (norm + eps))``, and the multiply under the
    ``nonfinite`` policy.

    The threshold is ``max_norm``, or what a stateful ``clipper`` gives for this
    step's norm (``clipper.threshold(state, norm)``); ``norm`` may be given (torch's
    ``clip_grads_with_norm_``). Every argument is checked before anything is
    computed. The backend is chosen once per call (here, or by the caller: ``plan``)
    and serves every part of the step.

    ``multiply=False`` stops before the multiply (the leaves are returned as they
    are, and the caller applies ``scale``: a fused optimizer's kernel). ``unscale``
    is a loss scale the gradients are still multiplied by (GradScaler's): the norm
    is divided by it, so the threshold, the clipper and ``Step.norm`` see the
    unscaled gradients.
    """
    p = _checks.check_ord(ord)
    eps = _checks.check_nonneg(eps, "eps", finite=True)
    nonfinite = _checks.check_nonfinite(nonfinite)
    if clipper is None:
        max_norm = _checks.check_nonneg(max_norm, "max_norm")
    plan = _backends.plan(tree) if plan is None else plan
    dist = {
        "process_group": process_group,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    local = all(v is None for v in dist.values())
    whole = multiply and unscale is None and norm is None and clipper is None
    # (an array eps is an operand of the step, not a compile-time constant)
    if whole and not inplace and local and isinstance(eps, float):
        compiled = plan.compiled(_whole, ord=p, eps=eps, nonfinite=nonfinite)
        if compiled is not None:  # eager JAX: the whole step in one compiled call
            leaves, norm, scale = compiled(max_norm)
            return Step(leaves, norm, max_norm, scale)
    if norm is None:
        norm = _distributed.tree_norm(plan, p, **dist)
    if unscale is not None:
        u = _checks.scalar_or_array(tree.xp, unscale, norm.dtype, tree.device)
        norm = norm / _reference.to_common_device(tree, u)
    if clipper is not None:
        max_norm, state = clipper.threshold(state, norm)
        max_norm = _threshold(tree, norm, max_norm)
    if nonfinite == "raise":
        _raise_if_nonfinite(tree, norm)
    scale = plan.clip_scale(norm, max_norm, eps)
    if not multiply:
        return Step(list(tree.leaves), norm, max_norm, scale, state)
    return Step(plan.scale(scale, norm, nonfinite, inplace=inplace), norm, max_norm, scale, state)


def _whole(tree: _tree.Tree, max_norm: Any, **options: Any) -> tuple:
    step = clip_step(tree, max_norm, **options)
    return step.leaves, step.norm, step.scale


def _threshold(tree: _tree.Tree, norm: Any, max_norm: Any) -> Any:
    """A stateful clipper's threshold as a 0-d array of the norm's dtype and device,
    checked as a ``max_norm`` argument is (a host number must be >= 0; an array of
    the gradients' library is not read, and a negative or NaN one makes the scale
    NaN)."""
    max_norm = _checks.check_nonneg(max_norm, "the clipper's threshold")
    m = _checks.scalar_or_array(tree.xp, max_norm, norm.dtype, tree.device)
    return _reference.to_common_device(tree, m)


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
