"""Optax gradient transformations built on gradclip's clipping functions.

Every transform here is an ``optax.GradientTransformation`` usable in
``optax.chain``, pure and jittable. Where optax has the same transform, the
update is optax's (to rounding), with gradclip's numerics: the global norm is
accumulated in float32 for float16/bfloat16 updates and never overflows for finite
ones, and differentiating through the clip gives finite gradients at a zero norm.
Switching is one import::

    import gradclip.optax as gco
    tx = optax.chain(gco.clip_by_global_norm(1.0), optax.adam(1e-3))

``clip_by_global_norm`` also takes a *stateful clipper* in place of the number
(a threshold that adapts to the history of norms, such as AutoClip or ZClip), and
``skip_nonfinite`` skips a step whose updates hold an inf or NaN without
advancing the wrapped optimizer.

References
----------
Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural
networks", ICML 2013 (arXiv:1211.5063).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from . import _backends, _checks, _clipping, _tree, _unitwise
from ._clippers import StatefulClipper

__all__ = [
    "ClipByGlobalNormState",
    "SkipNonfiniteState",
    "adaptive_grad_clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_norm",
    "clip_by_value",
    "skip_nonfinite",
]


class ClipByGlobalNormState(NamedTuple):
    """State of ``clip_by_global_norm`` with a stateful clipper.

    Attributes
    ----------
    clipper_state
        The clipper's own state.
    norm
        The pre-clip global norm of the last update (0 before the first).
    max_norm
        The threshold the clipper gave for the last update (0 before the first).
    clipped
        Whether the last update was scaled down (``False`` before the first, and for
        a non-finite norm, which ``norm`` shows).
    """

    clipper_state: Any
    norm: jax.Array
    max_norm: jax.Array
    clipped: jax.Array


class SkipNonfiniteState(NamedTuple):
    """State of ``skip_nonfinite``.

    Attributes
    ----------
    inner_state
        The wrapped transformation's state; it does not change on a skipped step.
    last_finite
        Whether the last updates were all finite.
    consecutive
        Steps skipped in a row up to now; 0 after any applied step.
    skipped
        Steps skipped since ``init`` (applied steps are never counted).
    """

    inner_state: Any
    last_finite: jax.Array
    consecutive: jax.Array
    skipped: jax.Array


def clip_by_global_norm(
    max_norm: Any,
    *,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    ord: float = 2,
    axis_name: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> optax.GradientTransformation:
    """Scale the updates by ``min(1, max_norm / (norm + eps))`` (Pascanu et al.).

    With a number for ``max_norm`` this is ``optax.clip_by_global_norm`` (the
    same updates to rounding, the same empty state) computed by
    ``gradclip.clip_by_global_norm``: the norm is accumulated in float32 for
    float16/bfloat16 updates and does not overflow for finite ones, any ``ord``
    may be used, and the derivative through the clip is finite at a zero norm.

    Parameters
    ----------
    max_norm : float, 0-d array or StatefulClipper
        The threshold (``>= 0``), or a stateful clipper (an object with
        ``init(like) -> state`` and ``threshold(state, norm) -> (max_norm, state)``,
        see ``gradclip.StatefulClipper``) that gives a threshold at every step.
    eps : float, optional
        Added to the norm before dividing (default 0, optax's rule; torch uses 1e-6).
    nonfinite : {"propagate", "raise", "zero"}, optional
        What to do when the norm is inf or NaN, as in
        ``gradclip.clip_by_global_norm``. ``"zero"`` makes the update zero but
        the optimizers after it in a chain still advance their state; wrap them in
        ``skip_nonfinite`` to skip the step properly. ``"raise"`` cannot work
        under ``jax.jit``.
    ord : float, optional
        The norm's order: any real ``p > 0`` or ``math.inf`` (default 2).
    axis_name, replicated, sharded : optional
        Inside ``shard_map`` or ``pmap``, the axes the updates are sharded over and
        which leaves are replicated (or, with ``sharded=``, the axes each leaf is
        split over: the ``in_specs`` given to ``shard_map``), as in
        ``gradclip.global_norm``: every device then clips by the norm of the whole
        model.

    Returns
    -------
    optax.GradientTransformation
        Stateless for a number; for a clipper, its state is a
        ``ClipByGlobalNormState`` with the clipper's state and the last norm,
        threshold and clipped flag.

    Notes
    -----
    ``ord`` and ``eps`` must be Python numbers; ``max_norm`` may be an array, so
    ``optax.inject_hyperparams(clip_by_global_norm, static_args=("ord", "eps"))``
    makes it a hyperparameter that can change from step to step.

    Examples
    --------
    >>> import jax.numpy as jnp, optax, gradclip.optax as gco
    >>> tx = optax.chain(gco.clip_by_global_norm(2.5), optax.sgd(1.0))
    >>> grads = {"w": jnp.array([3.0, 4.0])}
    >>> updates, _ = tx.update(grads, tx.init(grads))
    >>> print(updates["w"])
    [-1.5 -2. ]
    """
    p, eps = _static_options(ord, eps)
    nonfinite = _checks.check_nonfinite(nonfinite)
    options = {
        "eps": eps,
        "nonfinite": nonfinite,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    if isinstance(max_norm, StatefulClipper):
        return _with_clipper(max_norm, p, options)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        del params
        tree = _tree.flatten(updates, "updates")
        step = _clipping.clip_step(tree, max_norm, ord=p, **options)
        return tree.unflatten(step.leaves), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def clip_by_norm(
    max_norm: Any, *, eps: float = 0.0, ord: float = 2
) -> optax.GradientTransformation:
    """Scale each leaf of the updates on its own by ``min(1, max_norm / (norm + eps))``.

    The per-tensor rule of ``tf.clip_by_norm`` and Keras ``clipnorm``, by
    ``gradclip.clip_by_norm``.

    Examples
    --------
    >>> import jax.numpy as jnp, gradclip.optax as gco
    >>> tx = gco.clip_by_norm(2.5)
    >>> updates, _ = tx.update([jnp.array([3.0, 4.0]), jnp.array([0.5])], tx.init(None))
    >>> print(updates[0], updates[1])
    [1.5 2. ] [0.5]
    """
    p, eps = _static_options(ord, eps)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")
    return _stateless(_clipping.clip_by_norm, max_norm, ord=p, eps=eps)


def clip_by_value(clip_value: Any) -> optax.GradientTransformation:
    """Clip every element of the updates to ``[-clip_value, clip_value]``.

    ``optax.clip`` (and ``torch.nn.utils.clip_grad_value_``) as a transform,
    by ``gradclip.clip_by_value``.

    Examples
    --------
    >>> import jax.numpy as jnp, gradclip.optax as gco
    >>> tx = gco.clip_by_value(1.0)
    >>> print(tx.update(jnp.array([-3.0, 0.5, 2.0]), tx.init(None))[0])
    [-1.   0.5  1. ]
    """
    clip_value = _checks.check_nonneg(clip_value, "clip_value")
    return _stateless(_clipping.clip_by_value, clip_value)


def adaptive_grad_clip(
    clipping: Any, *, eps: float = 1e-3, axis: Any = None, exclude: Any = None
) -> optax.GradientTransformation:
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, arXiv:2102.06171).

    ``optax.adaptive_grad_clip`` by ``gradclip.adaptive_grad_clip``: each
    unit's gradient is scaled to at most ``clipping * max(||param_unit||, eps)``,
    with overflow-free unit norms. ``update`` needs ``params``. ``exclude`` is a
    predicate on a leaf's path (e.g. the final classifier, as in the paper).

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp, gradclip.optax as gco
    >>> tx = gco.adaptive_grad_clip(0.1)
    >>> params = {"w": jnp.ones((2, 2))}
    >>> updates, _ = tx.update({"w": jnp.full((2, 2), 10.0)}, tx.init(params), params)
    >>> print(np.asarray(updates["w"], dtype=float).round(4))
    [[0.1 0.1]
     [0.1 0.1]]
    """
    clipping = _checks.check_nonneg(clipping, "clipping")
    eps = _checks.check_nonneg(eps, "eps")
    return _stateless(
        _unitwise.adaptive_grad_clip,
        clipping,
        eps=eps,
        axis=axis,
        exclude=exclude,
        needs_params=True,
    )


def clip_by_block_rms(threshold: Any) -> optax.GradientTransformation:
    """Scale each leaf so that its root mean square is at most ``threshold``.

    ``optax.clip_by_block_rms`` by ``gradclip.clip_by_block_rms``
    (overflow-free for float16 leaves).

    Examples
    --------
    >>> import numpy as np, jax.numpy as jnp, gradclip.optax as gco
    >>> tx = gco.clip_by_block_rms(1.0)
    >>> updates, _ = tx.update(jnp.array([3.0, 4.0]), tx.init(None))
    >>> print(np.asarray(updates, dtype=float).round(4))
    [0.8485 1.1314]
    """
    threshold = _checks.check_nonneg(threshold, "threshold")
    return _stateless(_unitwise.clip_by_block_rms, threshold)


def skip_nonfinite(
    inner: optax.GradientTransformation, *, max_consecutive: int | None = None
) -> optax.GradientTransformationExtraArgs:
    """Skip a step whose updates hold an inf or NaN: a zero update, ``inner`` untouched.

    On such a step the update is zero and ``inner``'s state (Adam's moments and
    step count, a schedule's count) is returned bit for bit unchanged, so the next
    finite step proceeds exactly as if the bad one had never happened. Clipping
    with ``nonfinite="zero"`` alone zeroes the update but lets the optimizer's
    state advance (Adam's moments decay and its bias correction moves on).

    This is ``optax.apply_if_finite`` with honest counters. Optax's
    ``notfinite_count`` is not reset when it gives up: after
    ``max_consecutive_errors`` skipped steps, *every* further non-finite step of the
    streak is applied (not one), until a finite step arrives; and its
    ``total_notfinite`` counts those applied steps too, so it is not the number of
    skipped steps. Here ``consecutive`` counts skipped steps in a row and returns
    to 0 after any applied step, and ``skipped`` counts skipped steps only.

    Parameters
    ----------
    inner : optax.GradientTransformation
        The transformation to protect (an optimizer or a chain).
    max_consecutive : int or None, optional
        ``None`` (default): skip every non-finite step. An integer ``k >= 0``:
        skip at most ``k`` in a row; the next non-finite one is passed to
        ``inner`` (so a persistent NaN shows up in the parameters rather than
        stalling training silently), and the count starts again.

    Returns
    -------
    optax.GradientTransformationExtraArgs
        With a ``SkipNonfiniteState``.

    Examples
    --------
    >>> import jax.numpy as jnp, optax, gradclip.optax as gco
    >>> tx = gco.skip_nonfinite(optax.adam(0.1))
    >>> params = jnp.array([1.0, 2.0])
    >>> state = tx.init(params)
    >>> updates, new = tx.update(jnp.array([jnp.nan, 1.0]), state, params)
    >>> print(updates, int(new.skipped), bool(new.last_finite))
    [0. 0.] 1 False
    """
    if max_consecutive is not None:
        if isinstance(max_consecutive, bool) or not isinstance(max_consecutive, int):
            raise TypeError(f"max_consecutive must be an int or None, got {max_consecutive!r}")
        if max_consecutive < 0:
            raise ValueError(f"max_consecutive must be >= 0, got {max_consecutive!r}")
    inner = optax.with_extra_args_support(inner)

    def init(params: Any) -> SkipNonfiniteState:
        zero = jnp.zeros((), jnp.int32)
        return SkipNonfiniteState(inner.init(params), jnp.asarray(True), zero, zero)

    def update(
        updates: Any, state: SkipNonfiniteState, params: Any = None, **extra_args: Any
    ) -> tuple[Any, SkipNonfiniteState]:
        finite = _all_finite(updates)
        apply = finite
        if max_consecutive is not None:
            apply = finite | (state.consecutive >= max_consecutive)
        new_updates, inner_state = jax.lax.cond(
            apply,
            lambda: inner.update(updates, state.inner_state, params, **extra_args),
            lambda: (jax.tree.map(jnp.zeros_like, updates), state.inner_state),
        )
        skip = jnp.logical_not(apply)
        return new_updates, SkipNonfiniteState(
            inner_state,
            finite,
            jnp.where(skip, _increment(state.consecutive), jnp.zeros_like(state.consecutive)),
            jnp.where(skip, _increment(state.skipped), state.skipped),
        )

    return optax.GradientTransformationExtraArgs(init, update)


# -- building blocks ------------------------------------------------------------------


def _stateless(
    fn: Callable[..., Any], /, *args: Any, needs_params: bool = False, **kwargs: Any
) -> optax.GradientTransformation:
    """A stateless transform whose update is ``fn(updates, *args, **kwargs)``.

    With ``needs_params`` it is ``fn(updates, params, *args, **kwargs)`` and
    ``params`` must be passed to ``update`` (adaptive clipping).
    """

    def update(updates: Any, state: Any, params: Any = None) -> tuple[Any, Any]:
        if not needs_params:
            return fn(updates, *args, **kwargs), state
        if params is None:
            raise ValueError(f"{fn.__name__} needs the parameters: pass params to update()")
        return fn(updates, params, *args, **kwargs), state

    return optax.GradientTransformation(optax.init_empty_state, update)


def _static_options(ord: Any, eps: Any) -> tuple[float, float]:
    """``ord`` and ``eps`` checked; they choose the computation, so they are Python numbers."""
    for name, value in (("ord", ord), ("eps", eps)):
        if hasattr(value, "shape"):
            raise TypeError(
                f"{name} must be a Python number, not an array; with "
                "optax.inject_hyperparams pass static_args=('ord', 'eps')"
            )
    return _checks.check_ord(ord), _checks.check_nonneg(eps, "eps")


def _with_clipper(
    clipper: StatefulClipper, p: float, options: dict[str, Any]
) -> optax.GradientTransformation:
    """``clip_by_global_norm`` with a threshold from a stateful clipper."""

    def init(params: Any) -> ClipByGlobalNormState:
        tree = _tree.flatten(params, "params", allow_empty=True)
        zero = jnp.zeros((), tree.acc_dtype or jnp.float32)
        return ClipByGlobalNormState(clipper.init(zero), zero, zero, jnp.asarray(False))

    def update(
        updates: Any, state: ClipByGlobalNormState, params: Any = None
    ) -> tuple[Any, ClipByGlobalNormState]:
        del params
        tree = _tree.flatten(updates, "updates")
        dt = state.norm.dtype  # the state keeps its dtypes from step to step
        clipper_dt = _InDtype(clipper, dt)
        step = _clipping.clip_step(
            tree, ord=p, clipper=clipper_dt, state=state.clipper_state, **options
        )
        new = ClipByGlobalNormState(
            step.state, step.norm.astype(dt), step.max_norm.astype(dt), step.clipped
        )
        return tree.unflatten(step.leaves), new

    return optax.GradientTransformation(init, update)


class _InDtype:
    """A clipper that sees the norm in its state's dtype (the state's dtypes stay
    the same from step to step, as ``lax.scan`` needs)."""

    def __init__(self, clipper: StatefulClipper, dtype: Any) -> None:
        self.clipper, self.dtype = clipper, dtype

    def threshold(self, state: Any, norm: Any) -> tuple[Any, Any]:
        return self.clipper.threshold(state, norm.astype(self.dtype))


def _increment(count: jax.Array) -> jax.Array:
    """``count + 1``, staying at the largest int32 rather than wrapping around."""
    return count + (count < jnp.iinfo(count.dtype).max).astype(count.dtype)


def _all_finite(updates: Any) -> jax.Array:
    """True when every element is finite: the largest magnitude is finite."""
    tree = _tree.flatten(updates, "updates", allow_empty=True)
    if not tree.leaves:
        return jnp.asarray(True)
    return jnp.isfinite(_backends.plan(tree).norm(math.inf))
