"""clip_by_global_norm(_), clip_by_norm, clip_by_value: semantics, structure, errors."""

from __future__ import annotations

import collections
import math

import array_api_compat
import numpy as np
import pytest
from conftest import assert_close, ref_clip, ref_norm

import gradclip as gc
from gradclip import _backends, _checks

TUTORIAL = np.array([1, 2, 3, 4, 5])
TUTORIAL_CLIPPED = [0.4045, 0.8090, 1.2136, 1.6181, 2.0226]


def test_tutorial_example_numpy():
    clipped, norm = gc.clip_by_global_norm(TUTORIAL, max_norm=3)
    assert float(norm) == pytest.approx(math.sqrt(55), rel=1e-15)
    assert clipped.dtype == np.float64
    np.testing.assert_allclose(clipped, TUTORIAL * 3 / math.sqrt(55), rtol=1e-15)
    np.testing.assert_allclose(clipped, TUTORIAL_CLIPPED, atol=5e-5)
    assert np.linalg.norm(clipped) == pytest.approx(3.0, rel=1e-15)


def test_tutorial_example_every_backend(backend):
    clipped, norm = gc.clip_by_global_norm(backend.asarray(TUTORIAL), max_norm=3)
    assert backend.is_native(clipped) and backend.is_native(norm)
    assert backend.to_numpy(norm) == pytest.approx(math.sqrt(55), rel=1e-6)
    assert_close(backend, clipped, TUTORIAL_CLIPPED, rtol=1e-7, atol=5e-5)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
@pytest.mark.parametrize("p", [1, 2, math.inf])
@pytest.mark.parametrize("eps", [0.0, 1e-6])
def test_clip_matches_reference(backend, dtype, p, eps):
    if dtype not in backend.dtypes:
        pytest.skip(f"{backend.name} has no {dtype}")
    rng = np.random.default_rng(2)
    arrays = [rng.standard_normal(s) for s in [(4, 3), (7,), ()]]
    leaves = [backend.asarray(a, dtype) for a in arrays]
    stored = [backend.to_numpy(x) for x in leaves]
    max_norm = 0.5 * ref_norm(stored, p)
    clipped, norm = gc.clip_by_global_norm(leaves, max_norm, ord=p, eps=eps)
    ref, rnorm = ref_clip(stored, max_norm, p, eps)
    low = dtype in ("float16", "bfloat16")
    rtol = {"float16": 2e-3, "bfloat16": 1.6e-2, "float32": 1e-6, "float64": 1e-13}[dtype]
    assert backend.to_numpy(norm) == pytest.approx(rnorm, rel=1e-6 if low else rtol)
    for c, r, x in zip(clipped, ref, leaves):
        assert c.dtype == x.dtype and tuple(c.shape) == tuple(x.shape)
        assert_close(backend, c, r, rtol=rtol, atol=1e-30)


def test_no_change_below_threshold(backend):
    x = backend.asarray(np.array([0.1, -0.2, 0.3]), "float32")
    clipped, norm = gc.clip_by_global_norm(x, max_norm=10.0)
    assert np.array_equal(backend.to_numpy(clipped), backend.to_numpy(x))  # bit for bit
    # exactly at the threshold: no change either
    at = float(backend.to_numpy(norm))
    clipped, _ = gc.clip_by_global_norm(x, max_norm=at)
    assert np.array_equal(backend.to_numpy(clipped), backend.to_numpy(x))


def test_zero_gradients_and_zero_max_norm(backend):
    z = backend.asarray(np.zeros(3), "float32")
    for m in (0.0, 1.0):
        clipped, norm = gc.clip_by_global_norm(z, max_norm=m)
        assert backend.to_numpy(norm) == 0.0
        assert np.array_equal(backend.to_numpy(clipped), np.zeros(3))  # optax: NaN for m=0
    x = backend.asarray(np.array([1.0, 2.0]), "float32")
    clipped, _ = gc.clip_by_global_norm(x, max_norm=0.0)
    assert np.array_equal(backend.to_numpy(clipped), np.zeros(2))


@pytest.mark.parametrize("fast", [True, False])
def test_max_norm_beyond_the_dtype_range_is_no_clip(backend, fast):
    """A threshold past float32's range (1e39, "never clip") rounds to inf, as any
    conversion to float32 does: no change, on the fast paths and in the core (torch's
    ``full`` refused such values)."""
    x = backend.asarray(np.array([3e30, -4e30, 1.0]), "float32")
    with _backends.fast_paths(fast):
        clipped, norm = gc.clip_by_global_norm(x, max_norm=1e39)
        assert np.array_equal(backend.to_numpy(clipped), backend.to_numpy(x))
        assert backend.to_numpy(norm) == pytest.approx(5e30, rel=1e-6)
    # just past the largest float32 rounds to it, not to inf
    top = np.finfo(np.float32).max
    xp, dev = array_api_compat.array_namespace(x), array_api_compat.device(x)
    m = _checks.scalar_or_array(xp, float(top) * (1 + 2.0**-30), x.dtype, dev)
    assert backend.to_numpy(m) == top


def test_eps_matches_torch_formula(backend):
    x = backend.asarray(np.array([3.0, 4.0]), "float64") if "float64" in backend.dtypes else None
    if x is None:
        pytest.skip("needs float64")
    clipped, _ = gc.clip_by_global_norm(x, max_norm=1.0, eps=1e-6)
    assert_close(backend, clipped, np.array([3.0, 4.0]) / (5.0 + 1e-6), rtol=1e-15)


def test_max_norm_as_array(backend):
    x = backend.asarray(np.array([3.0, 4.0]), "float32")
    m = backend.asarray(np.array(1.0), "float32")
    clipped, _ = gc.clip_by_global_norm(x, m)
    assert_close(backend, clipped, [0.6, 0.8], rtol=1e-6)


def test_max_norm_numpy_scalar_with_other_library(backend):
    x = backend.asarray(np.array([3.0, 4.0]), "float32")
    clipped, _ = gc.clip_by_global_norm(x, np.float32(1.0))
    assert_close(backend, clipped, [0.6, 0.8], rtol=1e-6)


# -- non-finite policies ---------------------------------------------------------------


def _with_inf(backend):
    return [
        backend.asarray(np.array([1.0, np.inf]), "float32"),
        backend.asarray(np.array([2.0, 3.0]), "float32"),
    ]


def test_nonfinite_propagate_is_torchs_behaviour(backend):
    clipped, norm = gc.clip_by_global_norm(_with_inf(backend), 1.0)
    assert backend.to_numpy(norm) == np.inf
    a, b = (backend.to_numpy(c) for c in clipped)
    assert np.isnan(a[1]) and a[0] == 0.0 and np.array_equal(b, [0.0, 0.0])


def test_nonfinite_zero_zeroes_every_leaf(backend):
    for leaves in (_with_inf(backend), [backend.asarray(np.array([np.nan, 1.0]), "float32")]):
        clipped, norm = gc.clip_by_global_norm(leaves, 1.0, nonfinite="zero")
        assert not np.isfinite(backend.to_numpy(norm))
        for c in clipped:
            assert np.array_equal(backend.to_numpy(c), np.zeros(2))
    fine = [backend.asarray(np.array([3.0, 4.0]), "float32")]
    clipped, _ = gc.clip_by_global_norm(fine, 1.0, nonfinite="zero")
    assert_close(backend, clipped[0], [0.6, 0.8], rtol=1e-6)


def test_nonfinite_raise(backend):
    if backend.lazy or backend.name == "dask":
        with pytest.raises(ValueError, match="host"):
            gc.clip_by_global_norm(_with_inf(backend), 1.0, nonfinite="raise")
        return
    with pytest.raises(FloatingPointError, match="inf"):
        gc.clip_by_global_norm(_with_inf(backend), 1.0, nonfinite="raise")
    clipped, _ = gc.clip_by_global_norm(
        backend.asarray(np.array([3.0, 4.0]), "float32"), 1.0, nonfinite="raise"
    )
    assert_close(backend, clipped, [0.6, 0.8], rtol=1e-6)


def test_nonfinite_raise_in_place_writes_nothing(writable_backend):
    b = writable_backend
    leaves = _with_inf(b)
    before = [b.to_numpy(x).copy() for x in leaves]
    with pytest.raises(FloatingPointError):
        gc.clip_by_global_norm_(leaves, 1.0, nonfinite="raise")
    for x, y in zip(leaves, before):
        np.testing.assert_array_equal(b.to_numpy(x), y)


# -- in place ----------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float16", "bfloat16", "float32", "float64"])
def test_in_place_matches_functional(writable_backend, dtype):
    b = writable_backend
    if dtype not in b.dtypes:
        pytest.skip(f"{b.name} has no {dtype}")
    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s) * 5 for s in [(6, 2), (3,), ()]]
    leaves = [b.asarray(a, dtype) for a in arrays]
    expected, enorm = gc.clip_by_global_norm(leaves, 1.0)
    ids = [id(x) for x in leaves]
    norm = gc.clip_by_global_norm_(leaves, 1.0)
    assert [id(x) for x in leaves] == ids
    assert b.to_numpy(norm) == b.to_numpy(enorm)
    for x, e in zip(leaves, expected):
        assert x.dtype == e.dtype
        np.testing.assert_array_equal(b.to_numpy(x), b.to_numpy(e))


def test_in_place_nonfinite_zero(writable_backend):
    leaves = _with_inf(writable_backend)
    gc.clip_by_global_norm_(leaves, 1.0, nonfinite="zero")
    for x in leaves:
        assert np.array_equal(writable_backend.to_numpy(x), np.zeros(2))


def test_in_place_on_numpy_views():
    base = np.arange(12, dtype=np.float64).reshape(3, 4)
    view = base[:, ::2]  # non-contiguous
    other = base.T[1]  # another view of the same buffer
    norm = gc.clip_by_global_norm_({"v": view}, 1.0)
    assert float(norm) == pytest.approx(ref_norm([np.arange(12).reshape(3, 4)[:, ::2]], 2))
    assert np.linalg.norm(base[:, ::2]) == pytest.approx(1.0)
    np.testing.assert_array_equal(base[:, 1::2], np.arange(12).reshape(3, 4)[:, 1::2])
    assert other.base is not None


@pytest.mark.parametrize("kind", ["jax", "readonly", "int", "dask"])
def test_in_place_refuses_and_writes_nothing(kind):
    good = np.array([3.0, 4.0])
    if kind == "jax":
        jnp = pytest.importorskip("jax.numpy")
        bad, good = jnp.ones(3), jnp.array([3.0, 4.0])
        tree = {"a": good, "b": bad}
    elif kind == "dask":
        da = pytest.importorskip("dask.array")
        tree = {"a": da.ones(3), "b": da.ones(2)}
    else:
        bad = np.ones(3) if kind == "readonly" else np.ones(3, dtype=np.int64)
        if kind == "readonly":
            bad.flags.writeable = False
        tree = {"a": good, "b": bad}
    with pytest.raises(TypeError, match=r"grads\['(a|b)'\].*functional") as info:
        gc.clip_by_global_norm_(tree, 1.0)
    assert "in place" in str(info.value) or "functional" in str(info.value)
    if kind in ("readonly", "int"):
        np.testing.assert_array_equal(good, [3.0, 4.0])  # checked before anything is written


def test_in_place_refuses_torch_leaf_requiring_grad():
    torch = pytest.importorskip("torch")
    g = torch.tensor([3.0, 4.0])
    w = torch.ones(2, requires_grad=True)
    with pytest.raises(TypeError, match=r"grads\[1\].*requires grad"):
        gc.clip_by_global_norm_([g, w], 1.0)
    assert g.tolist() == [3.0, 4.0]


# -- structure ---------------------------------------------------------------------------

Pair = collections.namedtuple("Pair", "w b")


def test_structure_is_preserved(backend):
    def a(v):
        return backend.asarray(np.asarray(v, dtype=np.float64), "float32")

    tree = {
        "z": [a([1.0, 2.0]), None, (a([3.0]),)],
        "a": Pair(w=a([[1.0]]), b=None),
        "od": collections.OrderedDict([("y", a([2.0])), ("x", a([0.5]))]),
        "m": a(1.0),
    }
    clipped, _ = gc.clip_by_global_norm(tree, 1.0)
    assert list(clipped) == ["z", "a", "od", "m"]
    assert type(clipped["z"]) is list and clipped["z"][1] is None
    assert type(clipped["z"][2]) is tuple
    assert type(clipped["a"]) is Pair and clipped["a"].b is None
    assert type(clipped["od"]) is collections.OrderedDict and list(clipped["od"]) == ["y", "x"]
    assert tuple(clipped["m"].shape) == ()
    assert tuple(clipped["a"].w.shape) == (1, 1)
    for leaf in (clipped["z"][0], clipped["a"].w, clipped["m"]):
        assert backend.is_native(leaf)
        assert str(leaf.dtype).endswith("float32")


def test_integer_leaves_promote_to_default_float(backend):
    clipped, norm = gc.clip_by_global_norm([backend.asarray(np.array([3, 4]))], 10.0)
    xp = array_api_compat.array_namespace(clipped[0])
    default = xp.__array_namespace_info__().default_dtypes()["real floating"]
    assert clipped[0].dtype == default
    assert backend.to_numpy(norm) == pytest.approx(5.0)


def test_leaf_keeps_torch_device_and_dtype():
    torch = pytest.importorskip("torch")
    g = torch.ones(3, dtype=torch.float16)
    clipped, norm = gc.clip_by_global_norm({"g": g}, 1.0)
    assert clipped["g"].dtype == torch.float16 and clipped["g"].device == g.device
    assert norm.dtype == torch.float32 and norm.device == g.device


# -- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [-1.0, math.nan, -math.inf])
@pytest.mark.parametrize("fn", [gc.clip_by_global_norm, gc.clip_by_global_norm_, gc.clip_by_norm])
def test_bad_max_norm(fn, bad):
    with pytest.raises(ValueError, match="max_norm"):
        fn(np.ones(3), bad)


@pytest.mark.parametrize("bad", ["1", None, [1.0], True])
def test_max_norm_of_wrong_type(bad):
    with pytest.raises(TypeError, match="max_norm"):
        gc.clip_by_global_norm(np.ones(3), bad)


def test_max_norm_must_be_scalar():
    with pytest.raises(ValueError, match="max_norm"):
        gc.clip_by_global_norm(np.ones(3), np.ones(2))


def test_bad_eps_ord_nonfinite():
    with pytest.raises(ValueError, match="eps"):
        gc.clip_by_global_norm(np.ones(3), 1.0, eps=-1e-6)
    with pytest.raises(ValueError, match="ord"):
        gc.clip_by_global_norm(np.ones(3), 1.0, ord=0)
    with pytest.raises(ValueError, match="nonfinite"):
        gc.clip_by_global_norm(np.ones(3), 1.0, nonfinite="ignore")


def test_non_array_leaf_is_named():
    with pytest.raises(TypeError, match=r"grads\['b'\]\[1\] is a builtins.float, not an array"):
        gc.clip_by_global_norm({"a": np.ones(2), "b": [np.ones(1), 2.0]}, 1.0)
    with pytest.raises(TypeError, match=r"grads\[0\] is a builtins.str"):
        gc.global_norm(["x"])


def test_leaves_from_two_libraries_are_named():
    torch = pytest.importorskip("torch")
    with pytest.raises(TypeError, match=r"grads\['a'\] is a numpy.*grads\['b'\] is a torch"):
        gc.clip_by_global_norm({"a": np.ones(2), "b": torch.ones(2)}, 1.0)


def test_bool_leaves_and_empty_trees():
    with pytest.raises(TypeError, match=r"grads\[0\] has dtype bool"):
        gc.global_norm([np.ones(2, dtype=bool)])
    with pytest.raises(ValueError, match="no array leaves"):
        gc.clip_by_global_norm({"a": None, "b": []}, 1.0)


# -- per-leaf norm and value ---------------------------------------------------------------


@pytest.mark.parametrize("p", [1, 2, math.inf])
def test_clip_by_norm_is_per_leaf(backend, p):
    arrays = [np.array([3.0, 4.0]), np.array([0.1, 0.2]), np.array([[6.0, 8.0]])]
    out = gc.clip_by_norm([backend.asarray(a, "float32") for a in arrays], 1.0, ord=p)
    for a, o in zip(arrays, out):
        n = ref_norm([a], p)
        assert_close(backend, o, a * min(1.0, 1.0 / n), rtol=1e-6)


def test_clip_by_norm_matches_tf_formula_with_overflow_free_norm(backend):
    x = backend.asarray(np.array([3e30, 4e30]), "float32")
    out = gc.clip_by_norm(x, 1.0)
    assert_close(backend, out, [0.6, 0.8], rtol=1e-6)


def test_clip_by_value(backend):
    a = np.array([-3.0, -0.5, 0.0, 0.5, 2.0])
    out = gc.clip_by_value({"g": backend.asarray(a, "float32")}, 1.0)
    assert backend.is_native(out["g"])
    np.testing.assert_array_equal(backend.to_numpy(out["g"]), np.clip(a, -1, 1))
    with pytest.raises(ValueError, match="clip_value"):
        gc.clip_by_value(backend.asarray(a, "float32"), -1.0)
