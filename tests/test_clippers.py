"""Stateful clippers against their reference packages (zclip 1.0.0, autoclip 0.2.1) and a
float64 reference of Andrew et al.'s rule; the protocol, jit/scan, checkpoints."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import assert_close, make_backend

import gradclip as gc

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
torch = pytest.importorskip("torch")


TORCH_EPS = 1e-6  # both packages clip with torch's rule, scale = max / (norm + 1e-6)


def spiky_norms(steps=80, seed=0):
    """Norms drifting around 0.8 with noise, and spikes of x3 to x30."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    norms = 0.8 + 0.1 * np.sin(t / 9) + 0.12 * rng.standard_normal(steps)
    for i, f in ((30, 5.0), (31, 3.0), (44, 30.0), (58, 4.0), (59, 8.0), (70, 3.0)):
        if i < steps:
            norms[i] *= f
    return np.abs(norms)


def _model_grads(model, direction, norm):
    """Set the model's gradients to ``direction`` (unit norm overall) times ``norm``."""
    for p, d in zip(model.parameters(), direction):
        p.grad = torch.from_numpy(d * norm)


def _direction(model, seed=0):
    rng = np.random.default_rng(seed)
    d = [rng.standard_normal(tuple(p.shape)) for p in model.parameters()]
    total = math.sqrt(sum(float(np.sum(x * x)) for x in d))
    return [x / total for x in d]


def _total_norm(model):
    return math.sqrt(sum(float(torch.sum(p.grad * p.grad)) for p in model.parameters()))


def package_post_norms(make_clipper, norms):
    """Drive a reference package on a real float64 torch model whose gradient norms are
    ``norms``; return the norms after each of its steps."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    model = model.double()
    step = make_clipper(model)
    direction = _direction(model)
    out = []
    for n in norms:
        _model_grads(model, direction, float(n))
        step(model)
        out.append(_total_norm(model))
    return np.array(out)


def zclip_package(norms, **kw):
    zclip = pytest.importorskip("zclip")

    def make(model):
        zc = zclip.ZClip(**kw)
        return zc.step

    return package_post_norms(make, norms)


def autoclip_package(norms, quantile, history):
    autoclip_torch = pytest.importorskip("autoclip.torch")

    def make(model):
        clipper = autoclip_torch.QuantileClip(
            model.parameters(), quantile=quantile, history_length=history, global_threshold=True
        )
        return lambda m: clipper.step()

    return package_post_norms(make, norms)


def settle(backend, thr, state):
    """For Dask, compute this step so the graph does not grow with the steps."""
    if backend.name != "dask":
        return thr, state
    import dask

    thr, *fields = dask.persist(thr, *state)
    return thr, type(state)(*fields)


def our_post_norms(clipper, norms, backend=None, *, dtype="float64"):
    """Run ``clipper`` through the protocol over ``norms`` on ``backend``; return the
    norms after torch's clipping rule and the thresholds."""
    backend = backend or make_backend("numpy")
    state = clipper.init(backend.asarray(np.array(0.0), dtype))
    step = jax.jit(clipper.threshold) if backend.name == "jax" else clipper.threshold
    thresholds = []
    for n in norms:
        thr, state = settle(backend, *step(state, backend.asarray(np.array(n), dtype)))
        thresholds.append(float(backend.to_numpy(thr)))
    thr = np.array(thresholds)
    scale = np.where(norms + TORCH_EPS <= thr, 1.0, thr / (norms + TORCH_EPS))
    return norms * scale, thr


# -- ZClip ------------------------------------------------------------------------------

ZCLIP_CONFIGS = [
    {},
    {"max_grad_norm": None},
    {"clip_option": "mean", "warmup_steps": 10},
    {"mode": "percentile", "max_grad_norm": 5.0},
    {"skip_update_on_spike": True, "max_grad_norm": None},
    {"alpha": 0.9, "z_thresh": 2.0, "clip_factor": 0.7, "warmup_steps": 5},
]


@pytest.mark.parametrize("kw", ZCLIP_CONFIGS, ids=lambda kw: ",".join(kw) or "defaults")
def test_zclip_equals_the_package(kw):
    norms = spiky_norms()
    want = zclip_package(norms, **kw)
    ours = {("max_norm" if k == "max_grad_norm" else k): v for k, v in kw.items()}
    got, _ = our_post_norms(gc.ZClip(**ours), norms)
    assert np.sum(got < norms * (1 - 1e-9)) >= 3  # it did clip
    np.testing.assert_allclose(got, want, rtol=1e-10)


@pytest.fixture(scope="module")
def zclip_reference():
    norms = spiky_norms(60, seed=1)
    return norms, zclip_package(norms, max_grad_norm=None)


def test_zclip_on_every_backend(backend, zclip_reference):
    norms, want = zclip_reference
    got, _ = our_post_norms(gc.ZClip(max_norm=None), norms, backend)
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_zclip_in_place_on_torch_model_grads():
    """The convenience object on a real model's gradients, next to the package."""
    zclip = pytest.importorskip("zclip")
    norms = spiky_norms(50, seed=2)
    torch.manual_seed(0)
    ours = torch.nn.Linear(5, 3).double()
    theirs = torch.nn.Linear(5, 3).double()
    direction = _direction(ours)
    clipper, pkg = gc.ZClip(), zclip.ZClip()
    clipped = 0
    for n in norms:
        _model_grads(ours, direction, float(n))
        _model_grads(theirs, direction, float(n))
        info = clipper.clip_([p.grad for p in ours.parameters()], eps=TORCH_EPS)
        pkg.step(theirs)
        clipped += int(info.clipped)
        assert isinstance(info.norm, torch.Tensor)
        assert isinstance(info.clipped, torch.Tensor)
        for a, b in zip(ours.parameters(), theirs.parameters()):
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-10, atol=0)
    assert clipped >= 3


def test_zclip_jit_scan_equals_the_package(zclip_reference):
    norms, want = zclip_reference
    clipper = gc.ZClip(max_norm=None)

    @jax.jit
    def run(norms):
        def body(state, n):
            thr, state = clipper.threshold(state, n)
            return state, thr

        return jax.lax.scan(body, clipper.init(jnp.zeros((), jnp.float64)), norms)

    final, thr = run(jnp.asarray(norms))
    thr = np.asarray(thr)
    got = norms * np.where(norms + TORCH_EPS <= thr, 1.0, thr / (norms + TORCH_EPS))
    np.testing.assert_allclose(got, want, rtol=1e-10)
    assert int(final.step) == len(norms)


# -- AutoClip ---------------------------------------------------------------------------


@pytest.mark.parametrize(("quantile", "history"), [(0.9, 1000), (0.1, 7), (0.5, 1)])
def test_autoclip_equals_the_package(quantile, history):
    norms = spiky_norms(40, seed=3)
    want = autoclip_package(norms, quantile, history)
    got, thr = our_post_norms(gc.AutoClip(quantile=quantile, history=history), norms)
    assert thr[0] == math.inf
    assert np.sum(got < norms * (1 - 1e-9)) >= 3
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_autoclip_on_every_backend_and_float32(backend):
    norms = spiky_norms(25, seed=4)
    want = autoclip_package(norms, 0.25, 6)
    got, _ = our_post_norms(gc.AutoClip(quantile=0.25, history=6), norms, backend, dtype="float64")
    np.testing.assert_allclose(got, want, rtol=1e-10)
    if "float32" in backend.dtypes:
        got32, _ = our_post_norms(
            gc.AutoClip(quantile=0.25, history=6), norms, backend, dtype="float32"
        )
        np.testing.assert_allclose(got32, want, rtol=1e-6)


def test_autoclip_jit_scan_equals_numpy_quantile():
    norms = spiky_norms(60, seed=5)
    clipper = gc.AutoClip(quantile=0.8, history=16)

    def body(state, n):
        thr, state = clipper.threshold(state, n)
        return state, thr

    init = clipper.init(jnp.zeros((), jnp.float64))
    _, thr = jax.jit(lambda x: jax.lax.scan(body, init, x))(jnp.asarray(norms))
    want = [math.inf] + [np.quantile(norms[max(0, t - 16) : t], 0.8) for t in range(1, 60)]
    np.testing.assert_allclose(np.asarray(thr), want, rtol=1e-12)


# -- QuantileClip (Andrew et al.) -------------------------------------------------------


def quantile_reference(batches, c0, gamma, eta, sigma=0.0, noises=None, update="geometric"):
    """The paper's rule in float64: clip to C, then C <- C exp(-eta (b - gamma))."""
    c, out = c0, []
    for t, norms in enumerate(batches):
        out.append(c)
        norms = np.atleast_1d(norms)
        b = (np.sum(norms <= c) + (sigma * noises[t] if sigma else 0.0)) / norms.size
        c = (
            c * math.exp(-eta * (b - gamma))
            if update == "geometric"
            else max(0.0, c - eta * (b - gamma))
        )
    return np.array(out)


def test_quantile_clip_equals_float64_reference(backend):
    rng = np.random.default_rng(6)
    batches = rng.lognormal(0.0, 0.5, (30, 8))
    noises = rng.standard_normal(30)
    for kw, update in (
        ({}, "geometric"),
        ({"noise_multiplier": 2.0}, "geometric"),
        ({}, "linear"),
    ):
        clipper = gc.QuantileClip(
            initial_max_norm=0.3, target_quantile=0.6, learning_rate=0.25, update=update, **kw
        )
        state = clipper.init(backend.asarray(np.array(0.0)))
        got = []
        for t, norms in enumerate(batches):
            extra = {"noise": backend.asarray(np.array(noises[t]))} if kw else {}
            c, state = settle(backend, *clipper.threshold(state, backend.asarray(norms), **extra))
            got.append(float(backend.to_numpy(c)))
        want = quantile_reference(
            batches, 0.3, 0.6, 0.25, kw.get("noise_multiplier", 0.0), noises, update
        )
        np.testing.assert_allclose(got, want, rtol=1e-12)


def test_quantile_clip_converges_to_the_target_quantile_under_jit():
    rng = np.random.default_rng(7)
    batches = jnp.asarray(rng.lognormal(0.0, 1.0, (1500, 64)))  # median exp(0) = 1
    clipper = gc.QuantileClip(initial_max_norm=0.1, target_quantile=0.5, learning_rate=0.2)

    def body(state, norms):
        c, state = clipper.threshold(state, norms)
        return state, c

    _, cs = jax.jit(lambda b: jax.lax.scan(body, clipper.init(jnp.zeros(())), b))(batches)
    assert abs(float(np.mean(np.asarray(cs)[-500:])) - 1.0) < 0.05
    np.testing.assert_allclose(
        np.asarray(cs), quantile_reference(np.asarray(batches), 0.1, 0.5, 0.2), rtol=1e-9
    )


def test_quantile_clip_noise_is_explicit():
    clipper = gc.QuantileClip(noise_multiplier=1.0)
    state = clipper.init(np.float64(0))
    with pytest.raises(ValueError, match="noise="):
        clipper.threshold(state, np.array([1.0]))

    def run(seed):
        c = gc.QuantileClip(initial_max_norm=1.0, noise_multiplier=5.0, seed=seed)
        return [float(c.clip_(np.array([0.5, 2.0])).threshold) for _ in range(5)]

    assert run(1) == run(1)
    assert run(1) != run(2)


# -- the protocol, the one-call helpers, checkpoints ------------------------------------

CLIPPERS = [
    lambda: gc.ZClip(warmup_steps=5, max_norm=None),
    lambda: gc.AutoClip(quantile=0.5, history=8),
    lambda: gc.QuantileClip(initial_max_norm=1.0),
]


@pytest.mark.parametrize("make", CLIPPERS, ids=["zclip", "autoclip", "quantile"])
def test_protocol_state_is_arrays_of_the_like(backend, make):
    clipper = make()
    assert isinstance(clipper, gc.StatefulClipper)
    dtype = "float32"
    state = clipper.init(backend.asarray(np.array(0.0), dtype))
    assert isinstance(state, tuple)
    assert hasattr(state, "_fields")
    assert all(backend.is_native(x) for x in state)
    grads = [backend.asarray(np.array([3.0, 4.0]), dtype), backend.asarray(np.ones((2, 2)), dtype)]
    for _ in range(3):
        step = lambda g, s: gc.clip_stateful(g, clipper, s)  # noqa: E731
        clipped, state, info = backend.call(step, grads, state)
    assert all(backend.is_native(x) for x in (*state, *info, *clipped))
    assert [x.shape for x in info] == [(), (), ()]
    assert str(info.norm.dtype).endswith("float32")
    assert_close(backend, info.norm, math.sqrt(29), rtol=1e-6)


@pytest.mark.parametrize("make", CLIPPERS, ids=["zclip", "autoclip", "quantile"])
def test_functional_in_place_and_object_agree(make):
    rng = np.random.default_rng(8)
    steps = [rng.standard_normal((3, 4)) * f for f in spiky_norms(20, seed=8)]
    functional, obj = make(), make()
    state = functional.init(np.float64(0))
    state_ip = state
    for g in steps:
        out, state, info = gc.clip_stateful(g, functional, state)
        g_ip = g.copy()
        state_ip, info_ip = gc.clip_stateful_(g_ip, functional, state_ip)
        g_obj = torch.from_numpy(g.copy())
        info_obj = obj.clip_(g_obj)
        np.testing.assert_array_equal(g_ip, out)
        np.testing.assert_allclose(g_obj.numpy(), out, rtol=1e-12)
        np.testing.assert_allclose(float(info_obj.threshold), float(info.threshold), rtol=1e-12)
        assert (
            bool(info_ip.clipped)
            == bool(info.clipped)
            == (float(info.norm) > float(info.threshold))
        )
        # the result's norm is the threshold when clipped
        if bool(info.clipped):
            np.testing.assert_allclose(np.linalg.norm(out), float(info.threshold), rtol=1e-12)
    with pytest.raises(TypeError, match="functional form"):
        gc.clip_stateful_(jnp.ones(3), functional, state)


def test_checkpoint_and_resume_under_jit():
    norms = jnp.asarray(spiky_norms(60, seed=9))
    clipper = gc.ZClip(warmup_steps=10)
    step = jax.jit(clipper.threshold)
    state = clipper.init(jnp.zeros((), jnp.float64))
    straight = []
    for n in norms:
        thr, state = step(state, n)
        straight.append(float(thr))
    state = clipper.init(jnp.zeros((), jnp.float64))
    resumed = []
    for i, n in enumerate(norms):
        if i == 30:  # save to NumPy (a checkpoint) and restore as new arrays
            saved = [np.asarray(x) for x in state]
            state = type(state)(*(jnp.asarray(x) for x in saved))
        thr, state = step(state, n)
        resumed.append(float(thr))
    assert resumed == straight


@pytest.mark.parametrize("make", CLIPPERS, ids=["zclip", "autoclip", "quantile"])
def test_nonfinite_norm_leaves_state_unchanged(make):
    clipper = make()
    state = clipper.init(np.float64(0))
    for n in (1.0, 1.2, 0.9):
        _, state = clipper.threshold(state, np.float64(n))
    _, after = clipper.threshold(state, np.float64(np.nan))
    for a, b in zip(state, after):
        np.testing.assert_array_equal(a, b)


def test_bad_arguments():
    with pytest.raises(ValueError, match="quantile"):
        gc.AutoClip(quantile=90)
    with pytest.raises(ValueError, match="history"):
        gc.AutoClip(history=0)
    with pytest.raises(ValueError, match="mode"):
        gc.ZClip(mode="ema")
    with pytest.raises(ValueError, match="clip_option"):
        gc.ZClip(clip_option="max")
    with pytest.raises(ValueError, match="warmup_steps"):
        gc.ZClip(warmup_steps=0)
    with pytest.raises(ValueError, match="update"):
        gc.QuantileClip(update="cubic")
    with pytest.raises(TypeError, match="like must be a 0-d array"):
        gc.ZClip().init(0.0)


def test_plot_script_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    import runpy
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "examples" / "plot_thresholds.py"
    ns = runpy.run_path(str(script))
    out = ns["main"](["--steps", "60", "--out", str(tmp_path / "img" / "t.png")])
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    norms = ns["spiky_norms"](60)
    thr, _ = ns["thresholds"](gc.AutoClip(quantile=0.9), norms)
    assert thr[0] == math.inf
    assert np.isfinite(thr[1:]).all()


@pytest.mark.parametrize("make", CLIPPERS[:2], ids=["zclip", "autoclip"])
def test_step_counters_saturate(make):
    clipper = make()
    state = clipper.init(np.float64(0))
    for n in (1.0, 1.2, 0.9, 1.1, 1.0, 0.95):
        _, state = clipper.threshold(state, np.float64(n))
    top = np.asarray(2**31 - 1, dtype=np.int32)
    state = state._replace(**{state._fields[0]: top})
    _, after = clipper.threshold(state, np.float64(1.0))
    assert after[0] == top  # no wrap to a negative count (which would restart warm-up)
