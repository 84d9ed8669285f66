"""per_example_clip against optax.per_example_global_norm_clip, Opacus and float64 NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close

import gradclip as gc

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")


BATCH = 6


def _per_example_tree(seed=0, batch=BATCH):
    """Per-example gradients of a small model: example 0 is all zeros, the others have
    norms spread around 1."""
    rng = np.random.default_rng(seed)
    tree = {
        "w": rng.standard_normal((batch, 3, 4)) * 0.3,
        "b": rng.standard_normal((batch, 4)) * 0.3,
        "s": rng.standard_normal(batch) * 0.3,
    }
    scale = np.exp(rng.uniform(-1.5, 1.5, batch))
    for v in tree.values():
        v *= scale.reshape((batch,) + (1,) * (v.ndim - 1))
        v[0] = 0.0
    return tree


def _ref_norms(tree):
    flat = np.concatenate([v.reshape(v.shape[0], -1) for v in tree.values()], axis=1)
    return np.sqrt(np.sum(flat.astype(np.float64) ** 2, axis=1))


def _optax(tree, c):
    out, num = optax.per_example_global_norm_clip([jnp.asarray(v) for v in tree.values()], c)
    return dict(zip(tree, (np.asarray(o) for o in out))), int(num)


@pytest.mark.parametrize("c", [0.8, 0.0, math.inf])
def test_equals_optax_on_every_backend(backend, c):
    tree = _per_example_tree()
    want, want_num = _optax(tree, c)
    if c == 0.8:
        assert 0 < want_num < BATCH - 1  # some examples clipped, some not
    arrays = {k: backend.asarray(v) for k, v in tree.items()}
    got, norms, num = backend.call(gc.per_example_clip, arrays, c)
    assert int(backend.to_numpy(num)) == want_num
    assert_close(backend, norms, _ref_norms(tree), rtol=1e-13)
    for k in tree:
        assert backend.is_native(got[k])
        assert got[k].shape == tree[k].shape[1:]
        assert_close(backend, got[k], want[k], rtol=1e-12, atol=1e-15)
    assert np.isfinite(backend.to_numpy(got["w"])).all()  # the all-zero example: no NaN


def test_equals_opacus_flat_clipping():
    from opacus.optimizers import DPOptimizer

    tree = _per_example_tree(seed=1)
    params = {
        k: torch.nn.Parameter(torch.zeros(v.shape[1:], dtype=torch.float64))
        for k, v in tree.items()
    }
    opt = DPOptimizer(
        torch.optim.SGD(list(params.values()), lr=0.1),
        noise_multiplier=0.0,
        max_grad_norm=0.8,
        expected_batch_size=BATCH,
    )
    for k, p in params.items():
        p.grad_sample = torch.from_numpy(tree[k].copy())
    opt.clip_and_accumulate()
    got, _, _ = gc.per_example_clip(
        {k: torch.from_numpy(v.copy()) for k, v in tree.items()}, 0.8, eps=1e-6
    )
    for k, p in params.items():
        torch.testing.assert_close(got[k], p.summed_grad, rtol=1e-12, atol=1e-15)


def test_reduce_mean_and_none(backend):
    tree = _per_example_tree(seed=2)
    norms = _ref_norms(tree)
    factor = np.minimum(1.0, 0.8 / np.where(norms > 0, norms, 1.0))
    arrays = {k: backend.asarray(v) for k, v in tree.items()}
    each, _, _ = backend.call(gc.per_example_clip, arrays, 0.8, reduce="none")
    mean, _, _ = backend.call(gc.per_example_clip, arrays, 0.8, reduce="mean")
    for k, v in tree.items():
        ref = v * factor.reshape((BATCH,) + (1,) * (v.ndim - 1))
        assert_close(backend, each[k], ref, rtol=1e-12)
        assert_close(backend, mean[k], ref.mean(axis=0), rtol=1e-12)
        assert np.linalg.norm(ref.reshape(BATCH, -1), axis=1).max() <= 0.8 * (1 + 1e-12)


def test_low_precision_norms_do_not_overflow(backend):
    if "float16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float16")
    g = np.full((3, 1000), 300.0)  # each example's sum of squares overflows float16
    g[1] = 0.0
    got, norms, num = backend.call(gc.per_example_clip, backend.asarray(g, "float16"), 1.0)
    assert str(norms.dtype).endswith("float32")
    n = backend.to_numpy(norms)
    np.testing.assert_allclose(n, [300 * math.sqrt(1000), 0, 300 * math.sqrt(1000)], rtol=1e-6)
    assert str(got.dtype).endswith("float16")
    want = 2 * 300.0 / n[0]  # two clipped examples of 1000 equal entries, norm 1 each
    assert_close(backend, got, want, rtol=1e-3)
    assert int(backend.to_numpy(num)) == 2


def test_nan_example_passes_through_like_optax():
    tree = _per_example_tree(seed=3)
    tree["b"][2, 1] = np.nan
    want, want_num = _optax(tree, 0.8)
    got, norms, num = gc.per_example_clip(tree, 0.8)
    assert int(num) == want_num
    assert np.isnan(norms[2])
    for k in tree:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)


def test_under_jit():
    tree = {k: jnp.asarray(v) for k, v in _per_example_tree(seed=4).items()}
    f = jax.jit(lambda g, c: gc.per_example_clip(g, c))
    got, norms, num = f(tree, jnp.asarray(0.8))
    want, want_num = _optax({k: np.asarray(v) for k, v in tree.items()}, 0.8)
    assert int(num) == want_num
    np.testing.assert_allclose(np.asarray(norms), _ref_norms(tree), rtol=1e-13)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-12, atol=1e-15)


def test_errors():
    with pytest.raises(ValueError, match=r"grads\['b'\] has 2"):
        gc.per_example_clip({"a": np.ones((3, 2)), "b": np.ones((2, 2))}, 1.0)
    with pytest.raises(ValueError, match=r"grads\[1\] is 0-d"):
        gc.per_example_clip([np.ones(3), np.array(1.0)], 1.0)
    with pytest.raises(ValueError, match="reduce"):
        gc.per_example_clip(np.ones((3, 2)), 1.0, reduce="max")
    with pytest.raises(ValueError, match="max_norm"):
        gc.per_example_clip(np.ones((3, 2)), -1.0)
