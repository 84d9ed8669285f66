"""global_norm against a float64 reference, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close, ref_norm

import gradclip as gc

ORDS = [1, 2, 3, 0.5, 1.5, math.inf]
RTOL = {"float16": 1e-6, "bfloat16": 1e-6, "float32": 1e-6, "float64": 1e-13}


def _tree(rng, backend, dtype):
    shapes = [(3, 4), (5,), (), (2, 3, 2), (0,)]
    arrays = [rng.standard_normal(s) * 10 for s in shapes]
    if dtype != "float64":  # the reference sees the values the backend stores
        arrays = [backend.to_numpy(backend.asarray(a, dtype)) for a in arrays]
    return arrays, {"w": [backend.asarray(a, dtype) for a in arrays[:2]], "rest": arrays[2:]}


@pytest.mark.parametrize("p", ORDS)
@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_global_norm_matches_float64_reference(backend, dtype, p):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(0)
    ref_arrays, tree = _tree(rng, backend, dtype)
    tree["rest"] = [backend.asarray(a, dtype) for a in tree["rest"]]
    norm = gc.global_norm(tree, ord=p)
    assert backend.is_native(norm)
    assert norm.shape == ()
    acc = "float64" if dtype == "float64" else "float32"
    assert str(norm.dtype).endswith(acc)
    assert_close(backend, norm, ref_norm(ref_arrays, p), rtol=RTOL[dtype])


def test_global_norm_of_single_array_and_tuple(backend):
    x = backend.asarray(np.array([3.0, 4.0]), "float32")
    assert float(backend.to_numpy(gc.global_norm(x))) == pytest.approx(5.0, rel=1e-7)
    y = (backend.asarray(np.array([3.0]), "float32"), None, backend.asarray(np.array([4.0])))
    assert float(backend.to_numpy(gc.global_norm(y))) == pytest.approx(5.0, rel=1e-7)


def test_mixed_precision_accumulates_in_float64(backend):
    if "float64" not in backend.dtypes or "float32" not in backend.dtypes:
        pytest.skip("needs float32 and float64")
    tree = [backend.asarray(np.ones(3), "float32"), backend.asarray(np.ones(1), "float64")]
    norm = gc.global_norm(tree)
    assert str(norm.dtype).endswith("float64")
    assert backend.to_numpy(norm) == pytest.approx(2.0, rel=1e-15)


# -- the overflow and precision failures of the peers (../shared/ANCHORS.md) ----------


def test_float16_squares_do_not_overflow(backend):
    if "float16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no float16")
    x = backend.asarray(np.full(1000, 300.0), "float16")  # 300**2 * 1000 > float16 max
    norm = backend.to_numpy(gc.global_norm(x))
    assert norm == pytest.approx(300.0 * math.sqrt(1000), rel=1e-6)  # optax: inf


def test_bfloat16_accumulates_in_float32(backend):
    if "bfloat16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no bfloat16")
    x = backend.asarray(np.ones((300, 4096)), "bfloat16")
    norm = backend.to_numpy(gc.global_norm(x))
    assert norm == pytest.approx(math.sqrt(300 * 4096), rel=1e-6)  # optax: 1024


def test_float32_values_of_1e30_do_not_overflow(backend):
    x = backend.asarray(np.array([3e30, 4e30]), "float32")
    norm = gc.global_norm(x)
    assert str(norm.dtype).endswith("float32")
    assert backend.to_numpy(norm) == pytest.approx(5e30, rel=1e-6)  # torch, optax: inf
    for p in (1, 3, math.inf):
        assert np.isfinite(backend.to_numpy(gc.global_norm([x, x], ord=p)))


def test_bfloat16_large_values_do_not_overflow(backend):
    if "bfloat16" not in backend.dtypes:
        pytest.skip(f"{backend.name} has no bfloat16")
    x = backend.asarray(np.full(4, 1e30), "bfloat16")
    ref = backend.to_numpy(x)[0] * 2
    assert backend.to_numpy(gc.global_norm(x)) == pytest.approx(ref, rel=1e-6)


def test_tiny_values_do_not_underflow(backend):
    x = backend.asarray(np.array([3e-30, 4e-30]), "float32")
    assert backend.to_numpy(gc.global_norm(x)) == pytest.approx(5e-30, rel=1e-6)


@pytest.mark.parametrize("p", [1, 2, 3, math.inf])
def test_nonfinite_propagates(backend, p):
    f = backend.asarray(np.ones(3), "float32")
    inf = backend.asarray(np.array([1.0, np.inf]), "float32")
    nan = backend.asarray(np.array([np.nan, 1.0]), "float32")
    assert backend.to_numpy(gc.global_norm([f, inf], ord=p)) == np.inf
    assert np.isnan(backend.to_numpy(gc.global_norm([f, nan], ord=p)))
    assert np.isnan(backend.to_numpy(gc.global_norm([inf, nan], ord=p)))


def test_zero_and_empty(backend):
    z = backend.asarray(np.zeros(4), "float32")
    e = backend.asarray(np.zeros(0), "float32")
    assert backend.to_numpy(gc.global_norm([z, e])) == 0.0
    assert backend.to_numpy(gc.global_norm(e)) == 0.0


@pytest.fixture(scope="module")
def big_leaf():
    rng = np.random.default_rng(1)
    a = rng.random(100_000_000, dtype=np.float32)  # all positive: naive float32 sums drift
    return a, math.sqrt(np.dot(a.astype(np.float64), a.astype(np.float64)))


@pytest.mark.parametrize("lib", ["numpy", "torch", "jax", "dask"])
def test_one_leaf_of_1e8_elements_is_accurate(lib, big_leaf):
    """Relative error <= 1e-6 for 10^8 float32 elements (torch's own norm: ~1e-3)."""
    a, ref = big_leaf
    if lib == "torch":
        x = pytest.importorskip("torch").from_numpy(a)
    elif lib == "jax":
        x = pytest.importorskip("jax.numpy").asarray(a)
    elif lib == "dask":
        x = pytest.importorskip("dask.array").from_array(a, chunks=20_000_000)
    else:
        x = a
    norm = gc.global_norm(x)
    norm = float(norm.compute() if lib == "dask" else norm)
    assert abs(norm - ref) / ref <= 1e-6


@pytest.mark.parametrize("bad", [0, -1, -math.inf, math.nan, "fro", "2", None, True, 1j])
def test_bad_ord_is_a_value_error(bad):
    with pytest.raises(ValueError, match="ord"):
        gc.global_norm(np.ones(3), ord=bad)


def test_integer_leaves_are_promoted_to_default_float(backend):
    x = backend.asarray(np.array([3, 4]))
    norm = gc.global_norm(x)
    assert backend.to_numpy(norm) == pytest.approx(5.0)
