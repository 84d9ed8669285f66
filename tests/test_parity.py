"""eps=1e-6 reproduces torch.nn.utils.clip_grad_norm_; eps=0 reproduces optax (in jit)."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc

SHAPES = [(8, 5), (5,), (3, 4, 2), (1,)]


def _arrays(seed, scale):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s) * scale for s in SHAPES]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf, 3.0])
@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
def test_eps_1e_6_equals_torch_clip_grad_norm(dtype, norm_type, scale):
    torch = pytest.importorskip("torch")
    arrays = _arrays(int(scale * 100) + int(min(norm_type, 9)), scale)
    params = [torch.nn.Parameter(torch.from_numpy(a.astype(dtype))) for a in arrays]
    for p, a in zip(params, arrays):
        p.grad = torch.from_numpy(a.astype(dtype) * 1.5)
    ours = [p.grad.clone() for p in params]
    tnorm = torch.nn.utils.clip_grad_norm_(params, max_norm=1.0, norm_type=norm_type)
    gnorm = gc.clip_by_global_norm_(ours, 1.0, ord=norm_type, eps=1e-6)
    rtol = 2e-6 if dtype == "float32" else 1e-13
    assert gnorm.dtype == tnorm.dtype
    torch.testing.assert_close(gnorm, tnorm, rtol=rtol, atol=0)
    for p, g in zip(params, ours):
        torch.testing.assert_close(g, p.grad, rtol=rtol, atol=1e-30)
    # and the functional form gives the same
    clipped, _fnorm = gc.clip_by_global_norm(
        [torch.from_numpy(a.astype(dtype) * 1.5) for a in arrays], 1.0, ord=norm_type, eps=1e-6
    )
    for c, g in zip(clipped, ours):
        torch.testing.assert_close(c, g, rtol=0, atol=0)


@pytest.mark.parametrize("scale", [0.01, 1.0, 100.0])
@pytest.mark.parametrize("max_norm", [0.5, 2.0])
def test_eps_0_equals_optax_clip_by_global_norm_in_jit(scale, max_norm):
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    jnp = jax.numpy
    arrays = _arrays(7, scale)
    grads = {
        "w": [jnp.asarray(a, dtype=jnp.float32) for a in arrays[:2]],
        "b": jnp.asarray(arrays[2], dtype=jnp.float32),
    }
    tx = optax.clip_by_global_norm(max_norm)

    @jax.jit
    def theirs(g):
        updates, _ = tx.update(g, tx.init(g))
        return updates, optax.tree.norm(g)

    @jax.jit
    def ours(g, m):
        return gc.clip_by_global_norm(g, m)

    t_up, t_norm = theirs(grads)
    o_up, o_norm = ours(grads, max_norm)
    np.testing.assert_allclose(o_norm, t_norm, rtol=1e-6)
    assert jax.tree_util.tree_structure(o_up) == jax.tree_util.tree_structure(t_up)
    for o, t in zip(jax.tree_util.tree_leaves(o_up), jax.tree_util.tree_leaves(t_up)):
        assert o.dtype == t.dtype
        np.testing.assert_allclose(o, t, rtol=2e-6, atol=1e-37)


def test_where_optax_fails_we_do_not():
    """float16 grads of 300: optax's norm is inf and it zeroes the grads; ours is exact."""
    jax = pytest.importorskip("jax")
    optax = pytest.importorskip("optax")
    g = jax.numpy.full((1000,), 300.0, dtype=jax.numpy.float16)
    assert not np.isfinite(float(optax.tree.norm(g)))  # the peer's failure, measured
    clipped, norm = gc.clip_by_global_norm(g, 1e4)
    assert float(norm) == pytest.approx(300 * math.sqrt(1000), rel=1e-6)
    assert np.array_equal(np.asarray(clipped), np.asarray(g))


def test_where_torch_fails_we_do_not():
    """float32 grads of 1e30: torch's norm is inf and the grads become 0/NaN."""
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3e30, 4e30])
    tnorm = torch.nn.utils.clip_grad_norm_([p], 1.0)
    assert not torch.isfinite(tnorm)  # the peer's failure, measured
    g = torch.tensor([3e30, 4e30])
    norm = gc.clip_by_global_norm_([g], 1.0, eps=1e-6)
    assert float(norm) == pytest.approx(5e30, rel=1e-6)
    torch.testing.assert_close(g, torch.tensor([0.6, 0.8]), rtol=1e-6, atol=0)
