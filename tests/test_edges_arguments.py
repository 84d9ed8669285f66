"""Arguments at the edges: thresholds given as NumPy scalars and 0-d arrays, odd
scalars (bools, strings, objects, integers past float's range), options given as
arrays, and thresholds given as arrays of the gradients' library, which are never
read on the host (a negative or NaN one makes the results NaN, on every backend).

The same rules hold for the threshold a stateful clipper returns.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ALL_BACKENDS, make_backend, ref_clip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradclip as gc

HUGE = 10**400  # an int no float holds
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
NUMPY_REAL = [np.float16, np.float32, np.float64, np.int8, np.int16, np.int32, np.int64, np.uint8]


def _grads():
    return [np.array([3.0, 4.0]), np.array([[0.0, 0.0]])]


def _params():
    return [np.array([1.0, 1.0]), np.array([[1.0, 1.0]])]


# every public entry point that takes a threshold, as name -> call(value)
def _entry_points():
    torch = pytest.importorskip("torch")
    optax_mod = pytest.importorskip("gradclip.optax")
    gct = pytest.importorskip("gradclip.torch")
    jnp = pytest.importorskip("jax.numpy")

    def torch_params():
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([3.0, 4.0])
        return [p]

    def optax_update(tx):
        g = {"w": jnp.array([3.0, 4.0])}
        return tx.update(g, tx.init(g), g)

    return {
        "max_norm": [
            lambda v: gc.clip_by_global_norm(_grads(), v),
            lambda v: gc.clip_by_global_norm_(_grads(), v),
            lambda v: gc.clip_by_norm(_grads(), v),
            lambda v: gc.clip_scale(np.float32(5.0), max_norm=v),
            lambda v: gc.per_example_clip(_grads()[1], v),
            lambda v: gct.clip_grad_norm_(torch_params(), v),
            lambda v: gct.clip_grads_with_norm_(torch_params(), v, 5.0),
            lambda v: optax_update(optax_mod.clip_by_global_norm(v)),
            lambda v: optax_update(optax_mod.clip_by_norm(v)),
            lambda v: gc.ZClip(max_norm=v),
        ],
        "eps": [
            lambda v: gc.clip_by_global_norm(_grads(), 1.0, eps=v),
            lambda v: gc.clip_by_global_norm_(_grads(), 1.0, eps=v),
            lambda v: gc.clip_by_norm(_grads(), 1.0, eps=v),
            lambda v: gc.clip_scale(np.float32(5.0), max_norm=1.0, eps=v),
            lambda v: gc.per_example_clip(_grads()[1], 1.0, eps=v),
            lambda v: gc.adaptive_grad_clip(_grads(), _params(), 0.1, eps=v),
            lambda v: gct.clip_before_step(torch.optim.SGD(torch_params(), lr=0.1), 1.0, eps=v),
            lambda v: gc.ZClip(eps=v),
        ],
        "clip_value": [
            lambda v: gc.clip_by_value(_grads(), v),
            lambda v: gct.clip_grad_value_(torch_params(), v),
            lambda v: optax_update(optax_mod.clip_by_value(v)),
        ],
        "clipping": [
            lambda v: gc.adaptive_grad_clip(_grads(), _params(), v),
            lambda v: optax_update(optax_mod.adaptive_grad_clip(v)),
        ],
        "max_rms": [lambda v: gc.clip_by_block_rms(_grads(), v)],
        "initial_max_norm": [lambda v: gc.QuantileClip(initial_max_norm=v)],
    }


def _bad_host_values():
    """Values checked on the host that must be refused: (value, error type)."""
    negative = st.one_of(
        st.floats(max_value=-1e-300, allow_infinity=True, allow_nan=False),
        st.integers(max_value=-1),
        st.integers(min_value=2**1100).map(lambda n: -n),  # past float's range
    )
    nan = st.sampled_from([math.nan, float("-nan")])
    in_float16 = st.one_of(st.floats(-6e4, -1e-3), st.just(-math.inf), nan)
    as_numpy = st.tuples(in_float16, st.sampled_from(NUMPY_REAL[:3]))
    numpy_values = as_numpy.flatmap(
        lambda vd: st.sampled_from([vd[1](vd[0]), np.asarray(vd[0], dtype=vd[1])])
    )
    wrong_type = st.sampled_from(
        [
            True,
            False,
            np.bool_(True),
            np.array(False),
            "1.0",
            np.str_("1"),
            np.array("1"),
            np.array(1.0, dtype=object),
            None,
            [1.0],
            1 + 0j,
            np.complex64(1),
            np.array(1j),
            object(),
        ]
    )
    not_scalar = st.sampled_from([np.ones(2), np.ones((1, 1)), np.zeros(0)])
    return st.one_of(
        st.tuples(st.one_of(negative, nan, numpy_values), st.just(ValueError)),
        st.tuples(wrong_type, st.just(TypeError)),
        st.tuples(not_scalar, st.just(ValueError)),
    )


@pytest.mark.parametrize("name", ["max_norm", "eps", "clip_value", "clipping", "max_rms"])
def test_bad_host_thresholds_are_named_errors(name):
    """Negative, NaN, bool, string, object and complex thresholds, as Python values,
    NumPy scalars or 0-d NumPy arrays, at every entry point: an error naming the
    argument, and nothing written."""
    calls = _entry_points()[name]

    @SETTINGS
    @given(_bad_host_values(), st.sampled_from(range(len(calls))))
    def check(bad, k):
        value, error = bad
        with pytest.raises(error, match=name):
            calls[k](value)

    check()


def test_the_issue_example_is_an_error_and_writes_nothing():
    g = np.array([3.0, 4.0])
    with pytest.raises(ValueError, match="max_norm must be >= 0"):
        gc.clip_by_global_norm(g, np.array(-1.0))
    with pytest.raises(ValueError, match="max_norm"):
        gc.clip_by_global_norm_(g, np.array(-1.0))
    np.testing.assert_array_equal(g, [3.0, 4.0])


@pytest.mark.parametrize("name", ["max_norm", "eps", "clip_value", "clipping", "initial_max_norm"])
def test_good_numpy_scalars_act_as_python_numbers(name):
    """A NumPy scalar or 0-d NumPy array of any real dtype is the number it holds."""
    calls = _entry_points()[name]

    @SETTINGS
    @given(
        st.floats(0.0, 100.0, width=16),
        st.sampled_from(NUMPY_REAL),
        st.booleans(),
        st.sampled_from(range(len(calls))),
    )
    def check(v, dtype, zero_d, k):
        if np.issubdtype(dtype, np.integer):
            v = float(int(v))
        value = np.asarray(v, dtype=dtype) if zero_d else dtype(v)
        got, want = calls[k](value), calls[k](float(dtype(v)))
        _assert_same(got, want)

    check()


def _assert_same(got, want):
    """Equal results (arrays, trees of arrays, NaN-aware); objects: the same type."""
    if isinstance(want, (list, tuple)) and not hasattr(want, "_fields"):
        assert len(got) == len(want)
        for a, b in zip(got, want):
            _assert_same(a, b)
    elif isinstance(want, dict):
        for k in want:
            _assert_same(got[k], want[k])
    elif hasattr(want, "shape"):
        np.testing.assert_array_equal(_np(got), _np(want))
    elif want is not None and not hasattr(want, "_fields"):
        assert type(got) is type(want)


def _np(x):
    return x.detach().numpy() if hasattr(x, "detach") else np.asarray(x)


def test_integers_past_float_range():
    """``max_norm`` and other thresholds: inf, no clipping; ``eps`` and ``ord``: a
    ValueError naming them (no OverflowError anywhere)."""
    g = np.array([3.0, 4.0])
    clipped, _ = gc.clip_by_global_norm(g, HUGE)
    np.testing.assert_array_equal(clipped, g)
    np.testing.assert_array_equal(gc.clip_by_value(g, HUGE), g)
    np.testing.assert_array_equal(gc.clip_by_block_rms([g], HUGE)[0], g)
    np.testing.assert_array_equal(gc.adaptive_grad_clip(g, g, HUGE), g)
    assert float(gc.clip_scale(np.float32(5.0), max_norm=HUGE)) == 1.0
    assert gc.ZClip(max_norm=HUGE).max_norm == math.inf
    for call, name in [
        (lambda: gc.clip_by_global_norm(g, 1.0, eps=HUGE), "eps"),
        (lambda: gc.clip_by_global_norm(g, 1.0, eps=math.inf), "eps"),
        (lambda: gc.clip_scale(np.float32(5.0), max_norm=1.0, eps=HUGE), "eps"),
        (lambda: gc.clip_by_global_norm(g, 1.0, ord=HUGE), "ord"),
        (lambda: gc.global_norm(g, ord=HUGE), "ord"),
        (lambda: gc.clip_by_global_norm(g, -HUGE), "max_norm"),
        (lambda: gc.ZClip(z_thresh=-HUGE), "z_thresh"),
    ]:
        with pytest.raises(ValueError, match=name):
            call()
    torch = pytest.importorskip("torch")
    gct = pytest.importorskip("gradclip.torch")
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.tensor([3.0, 4.0])
    assert float(gct.clip_grad_norm_([p], HUGE)) == 5.0
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0]))
    with pytest.raises(ValueError, match="norm_type"):
        gct.clip_grad_norm_([p], 1.0, norm_type=HUGE)


ODD_OPTIONS = [
    np.array(["zero", "zero"]),
    np.array(["sum"]),
    np.array("zero"),
    np.array([2.0, 2.0]),
    np.ones(3),
    ["zero"],
    None,
    b"zero",
    3,
]


@pytest.mark.parametrize(
    ("call", "name", "valid"),
    [
        (lambda v: gc.clip_by_global_norm(_grads(), 1.0, nonfinite=v), "nonfinite", ()),
        (lambda v: gc.clip_by_global_norm(_grads(), 1.0, ord=v), "ord", (3,)),
        (lambda v: gc.per_example_clip(_grads()[1], 1.0, reduce=v), "reduce", ()),
        (lambda v: gc.adaptive_grad_clip(_grads(), _params(), 0.1, layout=v), "layout", (None,)),
        (lambda v: gc.ZClip(mode=v), "mode", ()),
        (lambda v: gc.ZClip(clip_option=v), "clip_option", ()),
        (lambda v: gc.QuantileClip(update=v), "update", ()),
    ],
)
def test_options_given_as_arrays_are_named_value_errors(call, name, valid):
    """Never NumPy's "truth value of an array is ambiguous"."""

    @SETTINGS
    @given(st.sampled_from([v for v in ODD_OPTIONS if not any(v is w for w in valid)]))
    def check(value):
        with pytest.raises(ValueError, match=name):
            call(value)

    check()


# -- thresholds on the device: never read, NaN results when negative or NaN ------------


def _device_backends():
    """Every library whose 0-d arrays are not read on the host (all but NumPy)."""
    return [b for b in ALL_BACKENDS if b != "numpy"]


def _is_nan(backend, x):
    return bool(np.all(np.isnan(backend.to_numpy(x))))


def _calls(backend):
    """The public functions, as call(grads, threshold) -> the clipped leaves."""
    xp_grads = [backend.asarray(np.array([3.0, 4.0]), "float32")]
    rows = [backend.asarray(np.array([[3.0, 4.0], [0.3, 0.4]]), "float32")]
    return (
        xp_grads,
        rows,
        {
            "clip_by_global_norm": lambda g, v: gc.clip_by_global_norm(g, v)[0],
            "eps of clip_by_global_norm": lambda g, v: gc.clip_by_global_norm(g, 1.0, eps=v)[0],
            "clip_by_norm": lambda g, v: gc.clip_by_norm(g, v),
            "eps of clip_by_norm": lambda g, v: gc.clip_by_norm(g, 1.0, eps=v),
            "clip_by_value": lambda g, v: gc.clip_by_value(g, v),
            "clip_by_block_rms": lambda g, v: gc.clip_by_block_rms(g, v),
            "adaptive_grad_clip": lambda g, v: gc.adaptive_grad_clip(g, g, v),
            "eps of adaptive_grad_clip": lambda g, v: gc.adaptive_grad_clip(g, g, 0.1, eps=v),
            "per_example_clip": lambda g, v: [gc.per_example_clip(g[0], v, reduce="none")[0]],
            "eps of per_example_clip": lambda g, v: [
                gc.per_example_clip(g[0], 1.0, eps=v, reduce="none")[0]
            ],
        },
    )


@pytest.fixture(params=_device_backends())
def device_backend(request):
    return make_backend(request.param)


def test_device_thresholds_negative_or_nan_make_nan_results(device_backend):
    """A 0-d array threshold of the gradients' library is not read: negative or NaN,
    every result is NaN (never a sign flip, never a silent no-op); >= 0, the same
    result as the Python number. Under jax.jit the thresholds are traced."""
    b = device_backend
    grads, rows, calls = _calls(b)

    @settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
    @given(
        st.one_of(st.floats(-3e38, -1e-30), st.sampled_from([-math.inf, math.nan])),
        st.floats(0.0, 10.0),
        st.sampled_from(sorted(calls)),
    )
    def check(bad, good, which):
        call = calls[which]
        g = rows if "per_example" in which else grads
        out = b.call(call, g, b.asarray(np.array(bad), "float32"))
        assert all(_is_nan(b, x) for x in out), (which, bad)
        got = b.call(call, g, b.asarray(np.array(good), "float32"))
        want = call(g, float(np.float32(good)))
        for x, y in zip(got, want):
            np.testing.assert_allclose(b.to_numpy(x), b.to_numpy(y), rtol=1e-6, atol=1e-30)

    check()


def test_device_threshold_scale_and_norm(device_backend):
    """gc.clip_scale with a device threshold (NaN when negative); the returned norm
    stays right when the clipped values are NaN."""
    b = device_backend
    norm = b.asarray(np.array(5.0), "float32")
    assert _is_nan(b, gc.clip_scale(norm, max_norm=b.asarray(np.array(-1.0), "float32")))
    assert _is_nan(b, gc.clip_scale(norm, max_norm=1.0, eps=b.asarray(np.array(-1.0))))
    s = gc.clip_scale(norm, max_norm=b.asarray(np.array(1.0), "float32"))
    assert float(b.to_numpy(s)) == pytest.approx(0.2)
    _, n = b.call(gc.clip_by_global_norm, [b.asarray(np.array([3.0, 4.0]))], b.asarray(-1.0))
    assert float(b.to_numpy(n)) == pytest.approx(5.0)


def test_device_thresholds_of_wrong_dtype_are_type_errors(device_backend):
    """A bool or complex 0-d array is a TypeError naming the argument (its dtype is
    checked; its value is not read)."""
    b = device_backend
    g = [b.asarray(np.array([3.0, 4.0]), "float32")]
    for bad in (np.array(True), np.array(1 + 1j)):
        if b.name == "array_api_strict" and bad.dtype.kind == "c":
            x = b.mod.asarray(complex(bad))
        else:
            x = b.asarray(bad)
        for call, name in [
            (lambda v: gc.clip_by_global_norm(g, v), "max_norm"),
            (lambda v: gc.clip_by_global_norm(g, 1.0, eps=v), "eps"),
            (lambda v: gc.clip_by_value(g, v), "clip_value"),
        ]:
            with pytest.raises(TypeError, match=name):
                call(x)
    with pytest.raises(ValueError, match="max_norm"):
        gc.clip_by_global_norm(g, b.asarray(np.ones(2)))


def test_device_threshold_in_place(device_backend):
    """In place, a negative device threshold makes the leaves NaN (documented); a
    valid one clips as the number does."""
    b = device_backend
    if not b.writable:
        pytest.skip(f"{b.name} arrays are not written in place")
    g = [b.asarray(np.array([3.0, 4.0]), "float32")]
    gc.clip_by_global_norm_(g, b.asarray(np.array(-2.0), "float32"))
    assert _is_nan(b, g[0])
    g = [b.asarray(np.array([3.0, 4.0]), "float32")]
    gc.clip_by_global_norm_(g, b.asarray(np.array(1.0), "float32"), eps=b.asarray(0.0))
    np.testing.assert_allclose(b.to_numpy(g[0]), [0.6, 0.8], rtol=1e-6)


def test_traced_eps_under_jit():
    """A traced eps works under jax.jit, as a number does; negative, NaN results."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    g = {"w": jnp.array([3.0, 4.0])}
    f = jax.jit(lambda g, e: gc.clip_by_global_norm(g, 1.0, eps=e))
    (got, _), (want, _) = f(g, 0.25), gc.clip_by_global_norm(g, 1.0, eps=0.25)
    np.testing.assert_allclose(got["w"], want["w"], rtol=1e-6)
    assert bool(jnp.all(jnp.isnan(f(g, -0.25)[0]["w"])))
    # eager, an array eps of the grads' library too (not a compile-time constant)
    np.testing.assert_allclose(
        gc.clip_by_global_norm(g, 1.0, eps=jnp.asarray(0.25))[0]["w"], want["w"], rtol=1e-6
    )


def test_torch_drop_ins_with_device_thresholds():
    torch = pytest.importorskip("torch")
    gct = pytest.importorskip("gradclip.torch")

    def params():
        p = torch.nn.Parameter(torch.zeros(2))
        p.grad = torch.tensor([3.0, -4.0])
        return [p]

    for bad in (-1.0, math.nan):
        ps = params()
        assert float(gct.clip_grad_norm_(ps, torch.tensor(bad))) == 5.0
        assert torch.isnan(ps[0].grad).all()
        ps = params()
        gct.clip_grad_value_(ps, torch.tensor(bad))
        assert torch.isnan(ps[0].grad).all()
        ps = params()
        for foreach in (None, False):
            ps = params()
            gct.clip_grad_norm_(ps, torch.tensor(bad), foreach=foreach)
            assert torch.isnan(ps[0].grad).all()
    ps = params()
    gct.clip_grad_value_(ps, torch.tensor(2.5))
    torch.testing.assert_close(ps[0].grad, torch.tensor([2.5, -2.5]))


def test_torch_fast_clip_scale_matches_the_reference_with_tensor_thresholds():
    """The torch fast path's scale against the reference's, bit for bit, with
    thresholds and eps given as tensors, negative and NaN ones included."""
    torch = pytest.importorskip("torch")
    from gradclip import _backends, _reference, _tree

    path = _backends.plan(_tree.flatten([torch.ones(2)])).fast
    assert path is not None
    values = [-1.0, -0.0, 0.0, 1.0, 5.0, math.inf, math.nan]
    for n in [0.0, 1.0, 5.0, math.inf, math.nan]:
        norm = torch.tensor(n)
        for m in values:
            for e in [0.0, 1e-6, torch.tensor(1e-6), torch.tensor(-1.0)]:
                limit = torch.tensor(m)
                got = path.clip_scale(norm, limit, e)
                want = _reference.clip_scale(norm, limit, eps=e)
                assert got.numpy().tobytes() == want.numpy().tobytes(), (n, m, e, got, want)


# -- a stateful clipper's threshold -----------------------------------------------------


class _Fixed:
    """A clipper whose threshold is whatever it was given."""

    def __init__(self, value):
        self.value = value

    def init(self, like):
        return ()

    def threshold(self, state, norm):
        return self.value, state


@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "array_api_strict", "dask"])
def test_clipper_thresholds_follow_the_same_rules(name):
    b = make_backend(name)
    g = [b.asarray(np.array([3.0, 4.0]), "float32")]
    for value, error in [
        (None, TypeError),
        ("1", TypeError),
        (True, TypeError),
        (-1.0, ValueError),
        (math.nan, ValueError),
        (np.array(-1.0), ValueError),
        (np.float32(math.nan), ValueError),
        (-HUGE, ValueError),
    ]:
        with pytest.raises(error, match="threshold"):
            gc.clip_stateful(g, _Fixed(value), ())
    want, _ = ref_clip([np.array([3.0, 4.0])], 1.0, 2)
    for value in (1.0, 1, np.float16(1.0), np.array(1.0), b.asarray(np.array(1.0), "float32")):
        out, _, info = gc.clip_stateful(g, _Fixed(value), ())
        np.testing.assert_allclose(b.to_numpy(out[0]), want[0], rtol=1e-6)
        assert float(b.to_numpy(info.threshold)) == 1.0
    out, _, _ = gc.clip_stateful(g, _Fixed(HUGE), ())
    np.testing.assert_array_equal(b.to_numpy(out[0]), [3.0, 4.0])
    if name != "numpy":  # an array of the library: not read, NaN results
        out, _, info = gc.clip_stateful(g, _Fixed(b.asarray(np.array(-1.0), "float32")), ())
        assert _is_nan(b, out[0])
        assert not bool(b.to_numpy(info.clipped))


def test_clipper_thresholds_in_the_integrations():
    torch = pytest.importorskip("torch")
    gct = pytest.importorskip("gradclip.torch")
    p = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([p], lr=1.0)
    handle = gct.clip_before_step(opt, _Fixed(-1.0))
    p.grad = torch.tensor([3.0, 4.0])
    with pytest.raises(ValueError, match="threshold"):
        opt.step()
    torch.testing.assert_close(p.grad, torch.tensor([3.0, 4.0]))
    handle.remove()
    handle = gct.clip_before_step(opt, _Fixed(1.0))  # a Python float on torch
    opt.step()
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    assert float(handle.last_threshold) == 1.0
    handle.remove()
    handle = gct.clip_before_step(opt, 2.0)  # a fixed float: last_threshold a tensor
    p.grad = torch.tensor([3.0, 4.0])
    opt.step()
    assert isinstance(handle.last_threshold, torch.Tensor)
    assert float(handle.last_threshold) == 2.0
    handle.remove()
    jnp = pytest.importorskip("jax.numpy")
    gco = pytest.importorskip("gradclip.optax")
    tx = gco.clip_by_global_norm(_Fixed(jnp.asarray(-1.0)))
    grads = {"w": jnp.array([3.0, 4.0])}
    updates, _ = tx.update(grads, tx.init(grads))
    assert bool(jnp.all(jnp.isnan(updates["w"])))
