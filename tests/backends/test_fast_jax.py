"""The JAX backend (``gradclip._backends._jax``): compiled eager calls, and the norm
inside traces.

Eager calls run one compiled function per tree structure (a new ``max_norm`` must not
recompile); under ``jit`` the multiply reads the leaves behind a barrier, and the
2-norm reads each leaf once: guarded by ``lax.cond`` on the CPU, the branch-free
ladder elsewhere (run here on the CPU, and checked in the program lowered for CUDA).
That the JAX path matches the reference on every common case is checked in
test_fast_common.py.
"""

from __future__ import annotations

import math
import re

import numpy as np
import pytest
from conftest import ULPS, assert_ulps, ulp

import gradclip as gc
from gradclip import _backends

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
from gradclip._backends import _jax  # noqa: E402

# -- eager calls are compiled; traced ones read the leaves once -------------------------------


def test_jax_eager_call_is_compiled_once(monkeypatch):
    made = []  # the compiled clip steps the calls run (cached per step and options)

    def jitted_step(step, static):
        made.append(_jitted_step(step, static))
        return made[-1]

    _jitted_step = _jax._jitted_step
    monkeypatch.setattr(_jax, "_jitted_step", jitted_step)
    g = {"a": jnp.ones((4, 5), jnp.float32), "b": jnp.arange(3.0, dtype=jnp.float32)}
    _, n1 = gc.clip_by_global_norm(g, 1.0)
    fn = made[-1]
    size = fn._cache_size()
    out2, n2 = gc.clip_by_global_norm(g, 0.5)  # another max_norm: no recompile
    assert made[-1] is fn
    assert fn._cache_size() == size
    assert float(n1) == float(n2) == pytest.approx(math.sqrt(25.0))
    np.testing.assert_allclose(np.asarray(out2["b"]), np.arange(3.0) * 0.5 / 5.0, rtol=1e-6)
    jitted, n3 = jax.jit(lambda g: gc.clip_by_global_norm(g, 0.5))(g)
    assert float(n3) == float(n2)
    np.testing.assert_array_equal(np.asarray(jitted["a"]), np.asarray(out2["a"]))


@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_jax_traced_multiply_reads_the_leaves_behind_a_barrier(nonfinite):
    """Under jit the multiply reads each leaf through ``optimization_barrier`` (else XLA
    shares a float32 copy of every bfloat16 leaf between the norm and the multiply,
    3x slower), and the values are the core's."""
    g = [jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16), jnp.arange(8, dtype=jnp.bfloat16)]

    def clip(g):
        return gc.clip_by_global_norm(g, 1.0, nonfinite=nonfinite)

    # one per leaf, and one for the scales of the norm's branch for accelerators
    assert str(jax.make_jaxpr(clip)(g)).count("optimization_barrier") == len(g) + 1
    out, n = jax.jit(clip)(g)
    with _backends.fast_paths(False):
        ref, rn = clip(g)
        # a new function: make_jaxpr caches its traces by function
        assert "optimization_barrier" not in str(jax.make_jaxpr(lambda g: clip(g))(g))
    assert_ulps(float(n), float(rn), "float32")
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# -- the branch-free norm of accelerators, run on the CPU -------------------------------------

LADDER_CASES = {
    "normal": [np.linspace(-3, 3, 1001), np.arange(70_000) / 7e4],
    "1e30": [np.full(100, 1e30), np.ones(10)],  # squares overflow float32
    "3e38": [np.full(100, 3e38)],  # the norm itself overflows: inf
    "1e19 and 1": [np.array([1e19, -2e19]), np.ones(5000)],
    "1e-30": [np.full(100, 1e-30), np.full(3, 2e-31)],  # squares underflow
    "1e-20": [np.full(100, 1e-20)],
    "1e-36 and 1e-44": [np.array([1e-36, -3e-37]), np.full(7, 1e-44)],
    "1e20 alone": [np.array(1e20)],  # one element: XLA simplifies scalar expressions
    "1.3e-21 alone": [np.array([1.257e-21])],
    "zero": [np.zeros(10)],
    "inf": [np.array([1.0, -np.inf])],
    "nan": [np.array([1.0, np.nan, np.inf])],
}


def _ladder_ref(leaves):
    """math.fsum in float64, then rounded to float32 (inf where it overflows), with
    the subnormals that XLA's CPU flushes to zero left out."""
    xs = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    if not np.isfinite(xs).all():
        return float(np.sqrt(np.sum(xs * xs)))
    xs = xs[np.abs(xs) >= np.finfo(np.float32).tiny]
    with np.errstate(over="ignore"):
        return float(np.float32(math.sqrt(math.fsum(xs * xs))))


@pytest.mark.parametrize("case", list(LADDER_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_ladder_norm_matches_the_exact_norm(case, dtype):
    """The GPU's branch-free norm (every rung of the ladder is used by some case)
    against the float64 sum, and against the core: to a few float32 ulps."""
    leaves = [jnp.asarray(np.asarray(x, np.float32)).astype(dtype) for x in LADDER_CASES[case]]
    parts = [x.astype(jnp.float32).reshape(-1) for x in leaves]
    got = float(jax.jit(_jax.ladder_norm)(parts))
    want = _ladder_ref(leaves)
    with _backends.fast_paths(False):
        core = float(gc.global_norm(leaves))
    for ref in (want, core):
        assert_ulps(got, ref, "float32")  # zeros, inf and NaN exactly


@pytest.mark.parametrize("value", [1.5, 1e200, 1e-200, 1e300, 1e-300])
def test_jax_ladder_norm_in_float64(value):
    """The float64 rungs (0, -640, 640): squares that overflow or underflow float64."""
    x = np.array([value, -2 * value, value / 3])
    got = float(jax.jit(_jax.ladder_norm)([jnp.asarray(x, jnp.float64)]))
    want = value * math.sqrt(1 + 4 + 1 / 9)  # |x| = value * |[1, -2, 1/3]|
    assert got == pytest.approx(want, rel=ULPS * ulp("float64"))


@pytest.mark.parametrize("fast", [True, False])
def test_jax_divisions_by_huge_values(fast):
    """XLA multiplies by ``1 / d``, which flushes to 0 beyond 2**126 in float32: the
    core's norm of 3e38s was 0, and a clip by a norm of 2e38 zeroed the gradients."""
    with _backends.fast_paths(fast):
        assert float(gc.global_norm([jnp.full(100, 3e38, jnp.float32)])) == math.inf
        g = [jnp.full(4, 1e38, jnp.float32)]
        assert float(gc.global_norm(g)) == pytest.approx(2e38, rel=1e-6)
        out, _ = gc.clip_by_global_norm(g, 1000.0)
        np.testing.assert_allclose(np.asarray(out[0]), np.full(4, 500.0), rtol=1e-6)
        (u,) = gc.adaptive_grad_clip(g, [jnp.full(4, 1e4, jnp.float32)], 0.01)
        np.testing.assert_allclose(np.asarray(u), np.full(4, 100.0), rtol=1e-6)


def test_jax_ladder_norm_derivatives():
    """``x / |x|``, also where unused rungs overflow (1e30) or underflow (1), 0 at 0;
    ``vmap`` gives each row's norm."""
    for x in (jnp.linspace(-2.0, 3.0, 50), jnp.full(4, 1e30), jnp.full(4, 1e-30)):
        (g,) = jax.grad(_jax.ladder_norm)([x])
        ref = np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64))
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6)
    (g,) = jax.grad(_jax.ladder_norm)([jnp.zeros(3)])
    np.testing.assert_array_equal(np.asarray(g), np.zeros(3))
    rows = np.random.default_rng(0).standard_normal((5, 9)).astype(np.float32)
    got = jax.vmap(lambda r: _jax.ladder_norm([r]))(jnp.asarray(rows))
    np.testing.assert_allclose(np.asarray(got), np.linalg.norm(rows, axis=1), rtol=1e-6)


def test_jax_traced_norm_is_branch_free_off_the_cpu():
    """Lowered for CUDA (no GPU needed), a jitted clip holds the ladder and not the
    ``lax.cond`` guard, whose predicate XLA's GPU backend would read on the host; for
    the CPU, the guard."""
    g = [jnp.ones((300, 300), jnp.float32), jnp.ones(10, jnp.bfloat16)]
    fn = jax.jit(lambda g: gc.clip_by_global_norm(g, 1.0))

    def constants(platform):
        text = jax.export.export(fn, platforms=[platform])(g).mlir_module()
        found = re.findall(r"dense<([-+.0-9Ee]+)> : tensor<f32>", text)
        return {float(np.float32(v)) for v in found}  # printed with 9 digits

    rung, guard = 2.0**80, 2.0**120  # a factor of the ladder, the guard's upper bound
    assert rung in constants("cuda") and guard not in constants("cuda")
    assert guard in constants("cpu") and rung not in constants("cpu")
