"""In-place clipping of NumPy (and CuPy) arrays: views, strides, layouts, dicts.

The reference is conftest's float64 ``ref_clip`` on copies of the same values.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_backend, ref_clip, ref_norm

import gradclip as gc

RTOL = {np.float16: 1e-3, np.float32: 1e-6, np.float64: 1e-13}


@pytest.fixture(params=["numpy", "cupy"])
def xp(request):
    """The array module: NumPy, or CuPy where a CUDA device exists (skipped otherwise)."""
    return make_backend(request.param).mod


def _host(x):
    return x.get() if hasattr(x, "get") else np.asarray(x)


def _check(xp, leaves, before, max_norm, norm, dtype, ord=2):
    """Every leaf equals the float64 reference clip of its values before the call."""
    want, want_norm = ref_clip(before, max_norm, ord)
    assert float(norm) == pytest.approx(want_norm, rel=1e-6)
    for leaf, w in zip(leaves, want):
        assert leaf.dtype == dtype
        np.testing.assert_allclose(_host(leaf), w, rtol=RTOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", [np.float16, np.float32, np.float64])
def test_views_of_one_flat_buffer(xp, dtype):
    """Parameters as views into one flat buffer (how fused optimizers store them):
    clipping the views changes the buffer, and nothing outside them."""
    rng = np.random.default_rng(0)
    buf = xp.asarray(rng.standard_normal(40).astype(dtype) * 5)
    grads = {"w": buf[:12].reshape(3, 4), "b": buf[12:15], "v": buf[20:30]}
    before = [_host(g).copy() for g in grads.values()]
    untouched = [_host(buf[15:20]).copy(), _host(buf[30:]).copy()]
    norm = gc.clip_by_global_norm_(grads, 1.0)
    _check(xp, list(grads.values()), before, 1.0, norm, dtype)
    np.testing.assert_array_equal(_host(buf[:12]).reshape(3, 4), _host(grads["w"]))
    np.testing.assert_array_equal(_host(buf[15:20]), untouched[0])
    np.testing.assert_array_equal(_host(buf[30:]), untouched[1])


@pytest.mark.parametrize("ord", [1, 2, np.inf])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_non_contiguous_layouts(xp, dtype, ord):
    rng = np.random.default_rng(1)
    base = xp.asarray(rng.standard_normal((6, 8)).astype(dtype) * 3)
    fortran = xp.asfortranarray(xp.asarray(rng.standard_normal((5, 7)).astype(dtype)))
    back = xp.asarray(rng.standard_normal(9).astype(dtype))
    leaves = [
        base[::2, 1::3],  # strided slice
        xp.asarray(rng.standard_normal((4, 3)).astype(dtype)).T,  # transpose
        fortran,  # Fortran order
        back[::-1],  # negative stride
        base[5],  # a row of the same base, disjoint from the slice
    ]
    assert not leaves[0].flags.c_contiguous
    assert fortran.flags.f_contiguous
    assert not fortran.flags.c_contiguous
    before = [_host(x).copy() for x in leaves]
    norm = gc.clip_by_global_norm_(leaves, 0.5, ord=ord)
    _check(xp, leaves, before, 0.5, norm, dtype, ord)
    assert fortran.flags.f_contiguous  # written in place, layout kept
    np.testing.assert_array_equal(_host(back)[::-1], _host(leaves[3]))


def test_nested_dict_of_model_parameters(xp):
    rng = np.random.default_rng(2)

    def arr(*shape):
        return xp.asarray(rng.standard_normal(shape).astype(np.float32))

    grads = {
        "encoder": {"layer0": {"w": arr(8, 4), "b": arr(8)}, "layer1": {"w": arr(4, 8)}},
        "head": [arr(4), None],
        "scale": arr(),  # a 0-d leaf
    }
    leaves = [
        grads["encoder"]["layer0"]["w"],
        grads["encoder"]["layer0"]["b"],
        grads["encoder"]["layer1"]["w"],
        grads["head"][0],
        grads["scale"],
    ]
    ids = [id(x) for x in leaves]
    before = [_host(x).copy() for x in leaves]
    norm = gc.clip_by_global_norm_(grads, 2.0, eps=1e-6)
    want, _ = ref_clip(before, 2.0, 2, eps=1e-6)
    for leaf, w in zip(leaves, want):
        np.testing.assert_allclose(_host(leaf), w, rtol=1e-6)
    assert [id(x) for x in leaves] == ids  # the same objects, changed in place
    assert grads["head"][1] is None
    assert float(norm) == pytest.approx(ref_norm(before, 2), rel=1e-6)


def test_no_clipping_below_the_threshold_leaves_values_bit_identical(xp):
    g = [xp.asarray(np.array([0.1, -0.2, 0.3], dtype=np.float32))]
    before = _host(g[0]).copy()
    gc.clip_by_global_norm_(g, 10.0)
    np.testing.assert_array_equal(_host(g[0]), before)


def test_huge_float32_gradients_are_clipped_not_zeroed(xp):
    g = xp.asarray(np.array([3e30, 4e30], dtype=np.float32))
    norm = gc.clip_by_global_norm_(g, 1.0)
    assert float(norm) == pytest.approx(5e30, rel=1e-6)
    np.testing.assert_allclose(_host(g), [0.6, 0.8], rtol=1e-6)


# -- errors leave every leaf unchanged (NumPy: CuPy has no read-only arrays) ----------


def _readonly(a):
    a = np.array(a, dtype=np.float32)
    a.flags.writeable = False
    return a


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        (_readonly([1.0, 2.0]), "read-only"),
        (np.broadcast_to(np.float32(7.0), (3,)), "read-only"),  # a read-only view
        (np.frombuffer(b"\0" * 16, dtype=np.float32), "read-only"),  # immutable bytes
        (np.array([1, 2, 3]), "integer"),
    ],
)
@pytest.mark.parametrize("position", [0, 2, 4])
def test_unwritable_leaf_raises_before_any_leaf_is_written(bad, match, position):
    rng = np.random.default_rng(3)
    leaves = [rng.standard_normal(5).astype(np.float32) * 100 for _ in range(4)]
    leaves.insert(position, bad)
    grads = {f"p{i}": x for i, x in enumerate(leaves)}
    before = {k: v.copy() for k, v in grads.items()}
    with pytest.raises(TypeError, match=match) as info:
        gc.clip_by_global_norm_(grads, 1.0)
    assert f"p{position}" in str(info.value)  # the message names the leaf
    for k in grads:
        np.testing.assert_array_equal(grads[k], before[k])


def test_value_errors_leave_every_leaf_unchanged():
    grads = [np.array([30.0, 40.0]), np.array([1.0])]
    before = [g.copy() for g in grads]
    for kwargs in ({"max_norm": -1.0}, {"max_norm": 1.0, "ord": 0}, {"max_norm": np.nan}):
        with pytest.raises(ValueError):
            gc.clip_by_global_norm_(grads, **kwargs)
    for g, b in zip(grads, before):
        np.testing.assert_array_equal(g, b)
