"""The JAX backend: a one-read norm inside traces, compiled calls outside them.

* Inside a trace the 2-norm reads each leaf once. On the CPU it is the plain sum of
  squares, and ``lax.cond`` runs the reference only when that sum may have lost
  something to overflow or underflow. On accelerators, where a ``lax.cond``'s
  predicate is read on the host, the same read sums the squares at a few
  power-of-two scales at once (``ladder_norm``) and ``jnp.where`` picks a good
  one: no branch, no host read.
* Eager calls on concrete arrays run compiled functions (the norm, the scaling, or
  the whole clip step the caller hands over), cached by ``jax.jit`` per tree
  structure, shapes and dtypes: one dispatch instead of a few per leaf.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from .. import _reference
from .._tree import Tree, flatten

__all__ = ["guarded_norm", "ladder_norm", "ladder_root", "parts", "select", "traced_norm"]

# sums of squares inside these bounds lost nothing to overflow or underflow
_BOUNDS = {
    jnp.dtype(jnp.float32): (2.0**-60, 2.0**120),
    jnp.dtype(jnp.float64): (2.0**-900, 2.0**900),
}
_REAL = {jnp.dtype(t) for t in (jnp.float16, jnp.bfloat16, jnp.float32, jnp.float64)}
_FLOATING = _REAL | {jnp.dtype(jnp.complex64), jnp.dtype(jnp.complex128)}


def select(tree: Tree) -> JaxPath | None:
    """The fast path for trees of floating point JAX arrays (complex ones: the
    reference's norm, with its derivative, and the reference compiled)."""
    dtypes = tree.dtypes if tree.dtypes is not None else {x.dtype for x in tree.leaves}
    if not all(jnp.dtype(dt) in _FLOATING for dt in dtypes):
        return None
    tracer = jax.core.Tracer  # (one pass over the leaves' types, in C)
    return JaxPath(tree, any(issubclass(t, tracer) for t in set(map(type, tree.leaves))))


class JaxPath:
    def __init__(self, tree: Tree, traced: bool) -> None:
        self.tree, self.traced = tree, traced

    def norm(self, p: float) -> Any:
        if self.traced:
            return traced_norm(self.tree, p)
        return _jitted_norm(p)(self.tree.leaves)

    def scale(self, scale: Any, norm: Any, nonfinite: str, inplace: bool) -> list[Any]:
        if not self.traced:
            return _jitted_scale(nonfinite)(self.tree.leaves, scale, norm)
        return _reference.scale_leaves(_barrier(self.tree), scale, norm, nonfinite, inplace=False)

    def compiled(self, step: Callable[..., Any], **static: Any) -> Callable[..., Any] | None:
        """``step(tree, max_norm, **static)`` as one compiled call for concrete
        (eager) arrays; inside a trace the caller's own trace is the compilation."""
        if self.traced or static.get("nonfinite") == "raise":  # raising reads the host
            return None
        compiled = _jitted_step(step, tuple(sorted(static.items())))
        acc = self.tree.acc_dtype

        def run(max_norm: Any) -> Any:
            if not isinstance(max_norm, jax.Array):  # a Python number: no recompile per value
                max_norm = jnp.asarray(max_norm, dtype=acc)
            return compiled(self.tree.leaves, max_norm)

        return run


SMALL = 1 << 16  # leaves up to this size are concatenated: one reduction, not thousands


def traced_norm(tree: Tree, p: float) -> Any:
    """The global norm of a (traced or concrete) tree, to a few ulps of the reference;
    for finite ``p`` with the derivative of ``gradclip._reference.norm_grad``."""
    if math.isinf(p):  # the largest magnitude: its automatic derivative is exact
        return _reference.tree_norm(tree, p)
    return _smooth_norm(list(tree.leaves), p)


@functools.partial(jax.custom_jvp, nondiff_argnums=(1,))
def _smooth_norm(leaves: list[Any], p: float) -> Any:
    """The ``p``-norm of ``leaves``: for real 2-norms one read of each leaf (the plain
    sum, guarded, on the CPU; the ladder elsewhere), else the reference."""
    tree = flatten(leaves)
    if p != 2 or not all(jnp.dtype(dt) in _REAL for dt in {x.dtype for x in leaves}):
        return _reference.tree_norm(tree, p)
    return jax.lax.platform_dependent(parts(tree), cpu=guarded_norm, default=ladder_norm)


@_smooth_norm.defjvp
def _smooth_norm_jvp(
    p: float, primals: tuple[Any, ...], tangents: tuple[Any, ...]
) -> tuple[Any, Any]:
    # d|x|_p = sum Re(conj(g) dx), g from the ratio |x| / norm: finite wherever the
    # derivative is, where one through the scaled sums would square the scale (or
    # through the ladder's unused rungs, whose squares overflowed, give inf * 0)
    (leaves,), (dleaves,) = primals, tangents
    norm = _smooth_norm(leaves, p)
    tree = flatten(leaves)
    dot = sum(
        jnp.real(jnp.vdot(g, dx.astype(g.dtype)))
        for g, dx in zip((_reference.norm_grad(tree, x, norm, p) for x in leaves), dleaves)
    )
    return norm, jnp.asarray(dot, norm.dtype)


def parts(tree: Tree) -> list[Any]:
    """The large leaves, and the small ones concatenated into one (in the accumulation
    dtype). The large ones are widened inside the reductions: a cast here would be a
    copy of each leaf for ``lax.cond``'s operands."""
    acc = jnp.dtype(tree.acc_dtype)
    small = [x.astype(acc).reshape(-1) for x in tree.leaves if x.size <= SMALL]
    out = [x for x in tree.leaves if x.size > SMALL]
    if small:
        out.append(jnp.concatenate(small) if len(small) > 1 else small[0])
    return out


def _acc(parts: list[Any]) -> Any:
    return jnp.dtype(jnp.result_type(jnp.float32, *(x.dtype for x in parts)))


def guarded_norm(parts: list[Any]) -> Any:
    """The 2-norm of ``parts``: the plain sum of squares, or the core where that may
    have lost something."""
    acc = _acc(parts)
    fast = sum(jnp.sum(jnp.square(x.astype(acc))) for x in parts)
    lo, hi = _BOUNDS[acc]
    ok = (fast >= lo) & (fast <= hi)  # False for inf and NaN

    def exact(parts: list[Any]) -> Any:
        # the reference on the same elements, only when the sum may have lost something
        return _reference.tree_norm(flatten(parts), 2)

    # the parts as explicit operands: few (one for all the small leaves), not one per leaf
    return jax.lax.cond(ok, lambda parts: jnp.sqrt(fast), exact, parts)


# (smallest sum that lost nothing to underflow, the exponents k of the ladder's 2**k, each
# 2**k and 2**-k a normal number of the dtype)
_LADDER = {
    jnp.dtype(jnp.float32): (2.0**-60, (0, -80, 80, 126)),
    jnp.dtype(jnp.float64): (2.0**-900, (0, -640, 640)),
}


@jax.custom_jvp
def ladder_norm(parts: list[Any]) -> Any:
    """The 2-norm of ``parts`` (real arrays, accumulated in float32 or float64)
    without a branch.

    One read gives the sum of squares of ``x * 2**k`` for each ``k`` of the ladder
    (float32: 0, -80, 80, 126). A sum that is finite overflowed nowhere, and one of at
    least 2**-60 lost at most ``n * 2**-126`` to underflow, so any such sum is the
    square of ``norm * 2**k`` to the accuracy of the plain sum; the first one is
    taken. For every finite input one of them is (huge values need ``k = -80``, tiny
    ones 80 or 126); when none is (zeros, inf, NaN) the plain sum is the answer.
    """
    acc = _acc(parts)
    _, ks = _LADDER[acc]
    # behind a barrier: XLA would fold (x * c)**2 into x**2 * (c * c), which overflows
    scales = jax.lax.optimization_barrier([jnp.asarray(2.0**k, acc) for k in ks])
    sums = [sum(jnp.sum(jnp.square(x.astype(acc) * c)) for x in parts) for c in scales]
    return ladder_root(sums, acc)


def ladder_root(sums: list[Any], acc: Any) -> Any:
    """The norm from the ladder's sums of squares (one per ``k``, in ``acc``): the
    first good one's root times ``2**-k``, else the plain sum's root."""
    lo, ks = _LADDER[acc]
    norm = jnp.sqrt(sums[0])  # zeros, inf, NaN
    for s, k in reversed(list(zip(sums, ks))):  # the first good one wins
        good = jnp.isfinite(s) & (s >= lo)
        norm = jnp.where(good, jnp.sqrt(s) * acc.type(2.0**-k), norm)
    return norm


@ladder_norm.defjvp
def _ladder_norm_jvp(primals: tuple[Any, ...], tangents: tuple[Any, ...]) -> tuple[Any, Any]:
    # d|x| = <x, dx> / |x|: written out, since the unused rungs' overflowed squares
    # would give inf * 0 = NaN in an automatic derivative
    (parts,), (dparts,) = primals, tangents
    norm = ladder_norm(parts)
    acc = _acc(parts)
    dot = sum(jnp.vdot(x.astype(acc), dx.astype(acc)) for x, dx in zip(parts, dparts))
    return norm, dot / jnp.where(norm > 0, norm, jnp.ones_like(norm))


def _barrier(tree: Tree) -> Tree:
    """The leaves behind ``lax.optimization_barrier``, for the multiply after the norm.

    Without it XLA shares each 16-bit leaf's widening between the norm and the
    multiply: one float32 copy of every leaf, written and read again, which makes a
    clip of bfloat16 gradients several times slower than its norm and multiply apart.
    """
    # one barrier per leaf: under shard_map a barrier's outputs vary over the union of
    # its inputs' mesh axes, and each leaf must keep its own
    return flatten(list(map(jax.lax.optimization_barrier, tree.leaves)))


@functools.cache
def _jitted_norm(p: float) -> Callable[[list[Any]], Any]:
    return jax.jit(lambda leaves: traced_norm(flatten(leaves), p))


@functools.cache
def _jitted_scale(nonfinite: str) -> Callable[[list[Any], Any, Any], Any]:
    def scale(leaves: list[Any], s: Any, norm: Any) -> Any:
        return _reference.scale_leaves(flatten(leaves), s, norm, nonfinite, inplace=False)

    return jax.jit(scale)


@functools.cache
def _jitted_step(step: Callable[..., Any], static: tuple) -> Callable[[list[Any], Any], Any]:
    return jax.jit(lambda leaves, max_norm: step(flatten(leaves), max_norm, **dict(static)))
