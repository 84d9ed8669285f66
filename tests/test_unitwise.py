"""adaptive_grad_clip (AGC) against optax and timm, clip_by_block_rms against optax."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close

import gradclip as gc

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")
torch = pytest.importorskip("torch")


# Reproduced from timm/utils/agc.py (pytorch-image-models, Apache-2.0): timm cannot be
# installed here (it needs torchvision). This is the reference for the PyTorch layout.
def timm_unitwise_norm(x, norm_type=2.0):
    if x.ndim <= 1:
        return x.norm(norm_type)
    # works for nn.ConvNd and nn,Linear where output dim is first in the kernel/weight tensor
    return x.norm(norm_type, dim=tuple(range(1, x.ndim)), keepdim=True)


def timm_adaptive_clip_grad(parameters, clip_factor=0.01, eps=1e-3, norm_type=2.0):
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    for p in parameters:
        if p.grad is None:
            continue
        p_data = p.detach()
        g_data = p.grad.detach()
        max_norm = (
            timm_unitwise_norm(p_data, norm_type=norm_type).clamp_(min=eps).mul_(clip_factor)
        )
        grad_norm = timm_unitwise_norm(g_data, norm_type=norm_type)
        clipped_grad = g_data * (max_norm / grad_norm.clamp(min=1e-6))
        new_grads = torch.where(grad_norm < max_norm, g_data, clipped_grad)
        p.grad.detach().copy_(new_grads)


# optax's layout: a scalar, a bias, a dense (in, out), a multi-head (3-d), HWIO and DHWIO
# kernels, and a (1, n) leaf that squeezes to a vector; one zero-initialised kernel.
OPTAX_SHAPES = {
    "s": (),
    "b": (5,),
    "dense": (4, 6),
    "heads": (4, 2, 3),
    "conv": (3, 3, 2, 4),
    "conv3d": (2, 2, 2, 3, 4),
    "row": (1, 7),
    "zero": (3, 5),
}
# PyTorch's layout: (out, in), (out, in, kh, kw), biases
TORCH_SHAPES = {"fc": (6, 4), "conv": (4, 2, 3, 3), "bias": (4,), "s": (), "col": (5, 1)}


def _params_grads(shapes, seed=0):
    rng = np.random.default_rng(seed)
    params, grads = {}, {}
    for k, s in shapes.items():
        params[k] = np.asarray(rng.standard_normal(s) * (0.0 if k == "zero" else 1.0))
        # unit gradient norms spread from well below to well above 0.1 * unit norm
        grads[k] = np.asarray(rng.standard_normal(s) * np.exp(rng.uniform(-5, 1, s)))
    return params, grads


_CACHE: dict = {}


def _optax_agc(params, grads, clipping, eps=1e-3, axis=None):
    """optax's transform on float64 JAX arrays (cached: each backend reuses it)."""
    key = tuple((k, v.shape, v.tobytes(), grads[k].tobytes()) for k, v in params.items())
    key += (clipping, eps, axis)
    if key not in _CACHE:
        tx = optax.adaptive_grad_clip(clipping, eps=eps, axis=axis)
        jp = {k: jnp.asarray(v) for k, v in params.items()}
        jg = {k: jnp.asarray(v) for k, v in grads.items()}
        out, _ = jax.jit(tx.update)(jg, tx.init(jp), jp)
        _CACHE[key] = {k: np.asarray(v) for k, v in out.items()}
    return _CACHE[key]


def _timm_agc(params, grads, clipping, eps=1e-3):
    out = {}
    for k in params:
        p = torch.nn.Parameter(torch.from_numpy(params[k].copy()))
        p.grad = torch.from_numpy(grads[k].copy())
        timm_adaptive_clip_grad([p], clip_factor=clipping, eps=eps)
        out[k] = p.grad.numpy()
    return out


def _ours(backend, params, grads, clipping, **options):
    """gc.adaptive_grad_clip on ``backend`` arrays made from NumPy trees."""
    g = {k: backend.asarray(v) for k, v in grads.items()}
    p = {k: backend.asarray(v) for k, v in params.items()}
    return backend.call(gc.adaptive_grad_clip, g, p, clipping, **options)


def _assert_tree_close(backend, got, want, rtol):
    assert sorted(got) == sorted(want)
    for k in want:
        assert backend.is_native(got[k]), k
        assert_close(backend, got[k], want[k], rtol=rtol, err_msg=k)


def _some_clipped(grads, want):
    changed = sum(not np.array_equal(grads[k], want[k]) for k in grads)
    assert 0 < changed < len(grads), "the test case must clip some leaves and not others"


def test_agc_equals_optax_on_every_backend(backend):
    params, grads = _params_grads(OPTAX_SHAPES)
    want = _optax_agc(params, grads, 0.1)
    _some_clipped(grads, want)
    got = _ours(backend, params, grads, 0.1, layout="optax")
    _assert_tree_close(backend, got, want, rtol=1e-12)


def test_agc_under_jit_with_jax_default_layout():
    """JAX arrays default to optax's layout; a traced ``clipping`` works."""
    params, grads = _params_grads(OPTAX_SHAPES, seed=1)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    jg = {k: jnp.asarray(v) for k, v in grads.items()}
    got = jax.jit(lambda g, p, c: gc.adaptive_grad_clip(g, p, c))(jg, jp, jnp.asarray(0.1))
    want = _optax_agc(params, grads, 0.1)
    for k in want:
        np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=1e-12)


@pytest.mark.parametrize("axis", [1, (0, 1), -1])
def test_agc_explicit_axis_equals_optax(backend, axis):
    shapes = {"w": (4, 6), "k": (3, 4, 5), "b": (5,)}
    params, grads = _params_grads(shapes, seed=2)
    # optax applies axis to every leaf; here leaves of rank 0 and 1 are one unit always
    want = _optax_agc({k: params[k] for k in "wk"}, {k: grads[k] for k in "wk"}, 0.1, axis=axis)
    want["b"] = _optax_agc({"b": params["b"]}, {"b": grads["b"]}, 0.1)["b"]
    got = _ours(backend, params, grads, 0.1, axis=axis)
    _assert_tree_close(backend, got, want, rtol=1e-12)


def test_agc_default_layout_for_torch_is_timms():
    params, grads = _params_grads(TORCH_SHAPES, seed=3)
    want = _timm_agc(params, grads, 0.05)
    _some_clipped(grads, want)
    g = {k: torch.from_numpy(v.copy()) for k, v in grads.items()}
    p = {k: torch.from_numpy(v.copy()) for k, v in params.items()}
    got = gc.adaptive_grad_clip(g, p, 0.05)
    for k in want:
        np.testing.assert_allclose(got[k].numpy(), want[k], rtol=1e-12, err_msg=k)


def test_agc_torch_layout_on_every_backend(backend):
    params, grads = _params_grads(TORCH_SHAPES, seed=4)
    want = _timm_agc(params, grads, 0.05, eps=1e-2)
    got = _ours(backend, params, grads, 0.05, eps=1e-2, layout="torch")
    _assert_tree_close(backend, got, want, rtol=1e-12)


def test_agc_float32_and_float16_keep_dtype(backend):
    params, grads = _params_grads({"w": (8, 16), "b": (16,)}, seed=5)
    for dtype, rtol in (("float32", 1e-6), ("float16", 1e-3)):
        if dtype not in backend.dtypes:
            continue
        p = {k: backend.asarray(v, dtype) for k, v in params.items()}
        g = {k: backend.asarray(v, dtype) for k, v in grads.items()}
        # the float64 reference sees the values the backend stores
        want = _optax_agc(
            {k: backend.to_numpy(v) for k, v in p.items()},
            {k: backend.to_numpy(v) for k, v in g.items()},
            0.1,
        )
        got = backend.call(gc.adaptive_grad_clip, g, p, 0.1, layout="optax")
        for k in want:
            assert str(got[k].dtype).endswith(dtype)
            assert_close(backend, got[k], want[k], rtol=rtol)


def test_agc_huge_values_do_not_overflow():
    # float32 units of norm ~1e30: a plain sum of squares overflows (optax gives NaN)
    w = np.array([[3e30, 1.0], [4e30, 1.0]], dtype=np.float32)
    g = np.array([[6e29, 1e-3], [8e29, 0.0]], dtype=np.float32)
    got = gc.adaptive_grad_clip(g, w, 0.1)  # optax layout: columns are units
    want = _optax_agc({"w": w.astype(np.float64)}, {"w": g.astype(np.float64)}, 0.1)["w"]
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_agc_exclude_leaves_by_path():
    params, grads = _params_grads({"body": (4, 6), "head": (6, 3)}, seed=6)
    g = {k: np.asarray(v) for k, v in grads.items()}
    got = gc.adaptive_grad_clip(g, params, 0.01, exclude=lambda path: "head" in path)
    want = _optax_agc(params, grads, 0.01)
    np.testing.assert_array_equal(got["head"], grads["head"])
    assert not np.array_equal(want["head"], grads["head"])  # it would have been clipped
    np.testing.assert_allclose(got["body"], want["body"], rtol=1e-12)


def test_agc_errors():
    w = {"a": np.ones((2, 3)), "b": np.ones(3)}
    with pytest.raises(TypeError, match=r"grads are numpy arrays and params are torch"):
        gc.adaptive_grad_clip(w, {k: torch.from_numpy(v) for k, v in w.items()}, 0.1)
    with pytest.raises(ValueError, match=r"grads\['b'\] vs params\['c'\]"):
        gc.adaptive_grad_clip(w, {"a": w["a"], "c": w["b"]}, 0.1)
    with pytest.raises(ValueError, match=r"grads has 2 array leaves but params has 1"):
        gc.adaptive_grad_clip(w, {"a": w["a"]}, 0.1)
    with pytest.raises(ValueError, match=r"grads\['a'\] has shape \(2, 3\)"):
        gc.adaptive_grad_clip(w, {"a": np.ones((3, 2)), "b": w["b"]}, 0.1)
    with pytest.raises(ValueError, match=r"rank 6.*axis="):
        gc.adaptive_grad_clip(np.ones((2,) * 6), np.ones((2,) * 6), 0.1)
    with pytest.raises(ValueError, match="out of range"):
        gc.adaptive_grad_clip(w, w, 0.1, axis=2)
    with pytest.raises(ValueError, match="layout"):
        gc.adaptive_grad_clip(w, w, 0.1, layout="tf")
    with pytest.raises(ValueError, match="clipping"):
        gc.adaptive_grad_clip(w, w, -1.0)
    with pytest.raises(TypeError, match=r"grads\['a'\] is a builtins.str"):
        gc.adaptive_grad_clip({"a": "x"}, {"a": np.ones(2)}, 0.1)


# -- block RMS --------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 1.0])
def test_block_rms_equals_optax_on_every_backend(backend, threshold):
    rng = np.random.default_rng(8)
    arrays = {
        "w": rng.standard_normal((4, 5)) * 2,
        "b": rng.standard_normal(5) * 0.1,
        "s": np.array(3.0),
        "z": np.zeros((2, 2)),
    }
    tx = optax.clip_by_block_rms(threshold)
    ref, _ = tx.update({k: jnp.asarray(v) for k, v in arrays.items()}, tx.init(None))
    want = {k: np.asarray(v) for k, v in ref.items()}
    got = backend.call(
        gc.clip_by_block_rms,
        {k: backend.asarray(v) for k, v in arrays.items()},
        threshold,
    )
    _assert_tree_close(backend, got, want, rtol=1e-12)


def test_block_rms_float16_overflow_free_and_jit():
    x = np.full(1000, 300.0, dtype=np.float16)  # its sum of squares overflows float16
    got = gc.clip_by_block_rms(x, 100.0)
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float64), 100.0, rtol=1e-3)
    jx = jnp.asarray(np.arange(6.0).reshape(2, 3))
    got = jax.jit(lambda g, t: gc.clip_by_block_rms(g, t))(jx, jnp.asarray(0.5))
    tx = optax.clip_by_block_rms(0.5)
    np.testing.assert_allclose(np.asarray(got), np.asarray(tx.update(jx, tx.init(None))[0]))
