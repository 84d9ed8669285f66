"""No host read-back: jax.jit (traced max_norm), jax.vmap, lazy Dask."""

from __future__ import annotations

import math

import numpy as np
import pytest

import gradclip as gc


def test_jit_with_traced_max_norm():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    grads = {"a": jnp.array([3.0, 4.0], dtype=jnp.float32), "b": None}
    f = jax.jit(lambda g, m: gc.clip_by_global_norm(g, m, eps=1e-6))
    for m in (1.0, 10.0):
        clipped, norm = f(grads, jnp.float32(m))
        assert clipped["b"] is None
        expected = np.array([3.0, 4.0]) * min(1.0, m / (5.0 + 1e-6))
        np.testing.assert_allclose(clipped["a"], expected, rtol=1e-6)
        assert float(norm) == pytest.approx(5.0)


@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_jit_nonfinite_policies(nonfinite):
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    g = jnp.array([1.0, jnp.inf], dtype=jnp.float32)
    clipped, norm = jax.jit(lambda g: gc.clip_by_global_norm(g, 1.0, nonfinite=nonfinite))(g)
    assert float(norm) == math.inf
    if nonfinite == "zero":
        assert np.array_equal(np.asarray(clipped), [0.0, 0.0])


def test_jit_raise_is_a_clear_error():
    jax = pytest.importorskip("jax")
    f = jax.jit(lambda g: gc.clip_by_global_norm(g, 1.0, nonfinite="raise"))
    with pytest.raises(ValueError, match="nonfinite='zero'"):
        f(jax.numpy.ones(3))


def test_vmap_clips_each_example():
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    rng = np.random.default_rng(0)
    batch = {"w": rng.standard_normal((6, 3, 2)), "b": rng.standard_normal((6, 2))}
    jb = jax.tree_util.tree_map(lambda a: jnp.asarray(a, dtype=jnp.float32), batch)
    clipped, norms = jax.vmap(lambda g: gc.clip_by_global_norm(g, 1.0))(jb)
    assert norms.shape == (6,)
    for i in range(6):
        example = {k: v[i] for k, v in batch.items()}
        ref = math.sqrt(sum(float(np.sum(v**2)) for v in example.values()))
        assert float(norms[i]) == pytest.approx(ref, rel=1e-6)
        for k in batch:
            np.testing.assert_allclose(
                clipped[k][i], example[k] * min(1.0, 1.0 / ref), rtol=1e-5, atol=1e-7
            )


def _forbid_compute(*args, **kwargs):
    raise AssertionError("a Dask graph was computed inside gradclip")


def test_dask_stays_lazy():
    da = pytest.importorskip("dask.array")
    dask = pytest.importorskip("dask")
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((1000, 10)), rng.standard_normal(37)
    grads = {"a": da.from_array(a, chunks=(100, 10)), "b": da.from_array(b, chunks=10)}
    with dask.config.set(scheduler=_forbid_compute):
        for nonfinite in ("propagate", "zero"):
            clipped, norm = gc.clip_by_global_norm(grads, 1.0, nonfinite=nonfinite)
            assert isinstance(norm, da.Array) and isinstance(clipped["a"], da.Array)
        norms = [gc.global_norm(grads, ord=p) for p in (1, 2, math.inf)]
        per_leaf = gc.clip_by_norm(grads, 1.0)
        assert isinstance(per_leaf["b"], da.Array)
    ref = math.sqrt(np.sum(a**2) + np.sum(b**2))
    assert float(norm.compute()) == pytest.approx(ref, rel=1e-12)
    np.testing.assert_allclose(clipped["a"].compute(), a / ref, rtol=1e-12)
    assert clipped["a"].chunks == grads["a"].chunks
    np.testing.assert_allclose(
        [float(n.compute()) for n in norms],
        [np.abs(np.concatenate([a.ravel(), b])).sum(), ref, max(abs(a).max(), abs(b).max())],
        rtol=1e-12,
    )
