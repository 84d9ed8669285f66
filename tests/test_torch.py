"""gradclip.torch against torch.nn.utils, side by side, and a float64 reference."""

from __future__ import annotations

import math
import warnings
from typing import NamedTuple

import numpy as np
import pytest
from conftest import LIBRARY_CLIPPERS, cuda_graph, make_backend, ref_norm

torch = pytest.importorskip("torch")
tnn = torch.nn.utils

import gradclip as gc  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from gradclip import _backends  # noqa: E402

NORM_TYPES = [1.0, 2.0, math.inf, 3.0]
DTYPES = [torch.float32, torch.float64]
TOL = {torch.float32: {"rtol": 1e-5, "atol": 1e-6}, torch.float64: {"rtol": 1e-12, "atol": 0}}


def _np(t):
    return t.detach().cpu().double().numpy()


def _with_grads(*grads):
    """Parameters whose ``.grad`` is a copy of each of ``grads`` (none for ``None``)."""
    out = []
    for g in grads:
        p = torch.nn.Parameter(torch.zeros(2) if g is None else torch.zeros_like(g))
        if g is not None:
            p.grad = g.clone()
        out.append(p)
    return out


# -- training runs follow torch's trajectory ------------------------------------------


class _Lone(torch.nn.Module):
    """Linear regression on one weight tensor: clipped as a lone Tensor."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.randn(10, 1) * 0.3)

    def forward(self, x):
        return x @ self.w


class _MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(10, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1)
        )
        self.unused = torch.nn.Linear(3, 3)  # never in the graph: its .grad stays None

    def forward(self, x):
        return self.net(x)


MODELS = {
    # name: (model factory, what the clip function is given)
    "tutorial": (lambda: torch.nn.Linear(10, 1), lambda m: m.parameters()),  # a generator
    "mlp": (_MLP, lambda m: list(m.parameters())),
    "lone": (_Lone, lambda m: m.w),
}


def _train(clip, model_name, dtype, norm_type, max_norm=0.5, steps=100, **kw):
    """The tutorial's loop; returns the parameters after training and the norms."""
    make, params_of = MODELS[model_name]
    torch.manual_seed(0)
    model = make().to(dtype)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss_fn = torch.nn.MSELoss()
    gen = torch.Generator().manual_seed(1)
    norms = []
    for _ in range(steps):
        x = torch.randn(8, 10, generator=gen, dtype=dtype)
        y = torch.randn(8, 1, generator=gen, dtype=dtype) * 3
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        norms.append(clip(params_of(model), max_norm, norm_type, **kw))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], torch.stack(norms)


@pytest.mark.parametrize("norm_type", NORM_TYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("model_name", list(MODELS))
def test_training_follows_torch(model_name, dtype, norm_type):
    ref_params, ref_norms = _train(tnn.clip_grad_norm_, model_name, dtype, norm_type)
    params, norms = _train(gct.clip_grad_norm_, model_name, dtype, norm_type)
    assert (ref_norms > 0.5).sum() >= 10  # clipping really acted on many steps
    assert norms.dtype == ref_norms.dtype == dtype
    torch.testing.assert_close(norms, ref_norms, **TOL[dtype])
    assert len(params) == len(ref_params)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, **TOL[dtype])


@pytest.mark.parametrize("foreach", [None, False, True])
def test_training_follows_torch_for_every_foreach(foreach):
    ref, ref_norms = _train(tnn.clip_grad_norm_, "mlp", torch.float32, 2.0, foreach=foreach)
    got, norms = _train(gct.clip_grad_norm_, "mlp", torch.float32, 2.0, foreach=foreach)
    torch.testing.assert_close(norms, ref_norms, **TOL[torch.float32])
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float32])


def test_split_functions_follow_torch():
    """get_total_norm + clip_grads_with_norm_ (the split for all-reducing the norm)."""

    def ours(params, max_norm, norm_type):
        params = list(params)
        norm = gct.get_total_norm([p.grad for p in params if p.grad is not None], norm_type)
        gct.clip_grads_with_norm_(params, max_norm, norm)
        return norm

    ref, ref_norms = _train(tnn.clip_grad_norm_, "mlp", torch.float64, 3.0)
    got, norms = _train(ours, "mlp", torch.float64, 3.0)
    torch.testing.assert_close(norms, ref_norms, **TOL[torch.float64])
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float64])


# -- the same semantics as torch, call by call ------------------------------------------


def _both(fn_name, make_params, *args, **kwargs):
    """Call torch's and our function on equal copies; return (torch's, ours) results
    and parameter lists."""
    out = []
    for mod in (tnn, gct):
        params = make_params()
        out.append((getattr(mod, fn_name)(params, *args, **kwargs), params))
    return out


def _grads_of(params):
    return [p.grad for p in params if p.grad is not None]


@pytest.mark.parametrize("norm_type", [2.0, 1, "inf", math.inf, 0.5, 0, -1.0, -math.inf])
def test_norm_types_like_torch(norm_type):
    def make():
        g = torch.Generator().manual_seed(3)
        return _with_grads(torch.randn(4, 3, generator=g), None, torch.randn(5, generator=g))

    (rn, rp), (n, p) = _both("clip_grad_norm_", make, 0.7, norm_type)
    torch.testing.assert_close(n, rn, rtol=1e-6, atol=0)
    for a, b in zip(_grads_of(p), _grads_of(rp)):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    if isinstance(norm_type, str) or norm_type > 0:  # a real norm: also the float64 truth
        p_ = float(norm_type)
        want = ref_norm([_np(g) for g in _grads_of(make())], p_)
        assert float(n) == pytest.approx(want, rel=1e-6)


def test_no_gradients_gives_zero_like_torch():
    for params in ([], [torch.nn.Parameter(torch.ones(3))]):  # empty, or none with .grad
        ref = tnn.clip_grad_norm_(params, 1.0)
        got = gct.clip_grad_norm_(params, 1.0)
        assert got.dtype == ref.dtype
        assert got.device == ref.device
        assert float(got) == 0.0
    assert float(gct.get_total_norm([])) == 0.0
    gct.clip_grads_with_norm_([], 1.0, torch.tensor(0.0))
    gct.clip_grad_value_([torch.nn.Parameter(torch.ones(3))], 1.0)


def test_empty_generator_warns_like_torch():
    for fn in (tnn.clip_grad_norm_, gct.clip_grad_norm_):
        with pytest.warns(UserWarning, match="empty generator"):
            fn((p for p in []), 1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        gct.clip_grad_norm_([], 1.0)  # an empty list is not a mistake


def test_lone_tensor_and_generator():
    p = _with_grads(torch.tensor([3.0, 4.0]))[0]
    assert float(gct.clip_grad_norm_(p, 1.0)) == pytest.approx(5.0)
    torch.testing.assert_close(p.grad, torch.tensor([0.6, 0.8]))
    params = _with_grads(torch.tensor([3.0]), None, torch.tensor([4.0]))
    n = gct.clip_grad_norm_((q for q in params), 2.5)  # generator read once
    assert float(n) == pytest.approx(5.0)
    torch.testing.assert_close(params[0].grad, torch.tensor([1.5]))
    torch.testing.assert_close(params[2].grad, torch.tensor([2.0]))
    assert params[1].grad is None


def test_error_if_nonfinite_raises_like_torch_before_writing():
    for bad in (math.nan, math.inf):

        def make(bad=bad):
            return _with_grads(torch.tensor([1.0, bad]), torch.tensor([5.0]))

        for mod in (tnn, gct):
            params = make()
            with pytest.raises(RuntimeError, match="non-finite"):
                mod.clip_grad_norm_(params, 1.0, error_if_nonfinite=True)
            torch.testing.assert_close(params[1].grad, torch.tensor([5.0]))  # unchanged
        with pytest.raises(RuntimeError, match="non-finite"):
            gct.get_total_norm([torch.tensor([bad])], error_if_nonfinite=True)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_nonfinite_propagates_like_torch(bad):
    def make():
        return _with_grads(torch.tensor([1.0, bad]), torch.tensor([5.0, -2.0]))

    (rn, rp), (n, p) = _both("clip_grad_norm_", make, 1.0)
    torch.testing.assert_close(n, rn, equal_nan=True)
    for a, b in zip(_grads_of(p), _grads_of(rp)):
        torch.testing.assert_close(a, b, equal_nan=True)


def test_foreach_true_on_a_device_without_foreach_kernels_raises_like_torch():
    def make():
        return _with_grads(torch.randn(3, device="meta"))

    for mod in (tnn, gct):
        for call in (
            lambda m: m.clip_grad_norm_(make(), 1.0, foreach=True),
            lambda m: m.clip_grad_value_(make(), 1.0, foreach=True),
            lambda m: m.get_total_norm(_grads_of(make()), foreach=True),
            lambda m: m.clip_grads_with_norm_(make(), 1.0, torch.tensor(2.0), foreach=True),
        ):
            with pytest.raises(RuntimeError, match="foreach=True was passed"):
                call(mod)


def test_foreach_false_runs_the_pure_array_api_core(monkeypatch):
    """A fast path is offered for foreach=None and True, and never used for False."""
    from gradclip._backends import _torch as torch_backend

    used = []

    class Fake:
        def norm(self, p):
            return torch.tensor(123.0)

    def fake_select(tree):
        used.append(len(tree.leaves))
        return Fake()

    monkeypatch.setattr(torch_backend, "select", fake_select)
    grads = [torch.ones(3), torch.ones(2)]
    assert float(gct.get_total_norm(grads, foreach=False)) == pytest.approx(math.sqrt(5))
    assert used == []
    assert float(gct.get_total_norm(grads)) == 123.0
    assert float(gct.get_total_norm(grads, foreach=True)) == 123.0
    assert used == [2, 2]
    assert _backends.enabled()  # the switch is restored


@pytest.mark.parametrize("foreach", [None, False, True])
@pytest.mark.parametrize("clip_value", [0.3, 2])
def test_clip_grad_value_like_torch(foreach, clip_value):
    def make():
        g = torch.Generator().manual_seed(5)
        return _with_grads(
            torch.randn(4, 3, generator=g),
            None,
            torch.randn(6, generator=g, dtype=torch.float64),
            torch.tensor([math.nan, 5.0, -5.0]),
            torch.randn(7, generator=g).to(torch.bfloat16),
        )

    (r, rp), (o, p) = _both("clip_grad_value_", make, clip_value, foreach=foreach)
    assert r is None
    assert o is None
    for a, b in zip(_grads_of(p), _grads_of(rp)):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_clip_grad_value_tensor_threshold_and_complex():
    p = _with_grads(torch.tensor([-3.0, 0.5, 2.0]))
    gct.clip_grad_value_(p, torch.tensor(1.0))
    torch.testing.assert_close(p[0].grad, torch.tensor([-1.0, 0.5, 1.0]))
    z = _with_grads(torch.tensor([3 + 4j, 0.3 - 0.4j], dtype=torch.complex64))
    gct.clip_grad_value_(z, 1.0)  # torch raises for complex; the magnitude is clipped here
    torch.testing.assert_close(z[0].grad, torch.tensor([0.6 + 0.8j, 0.3 - 0.4j]))


def test_invalid_thresholds_are_value_errors_before_writing():
    params = _with_grads(torch.tensor([3.0, 4.0]))
    for call in (
        lambda: gct.clip_grad_norm_(params, -1.0),  # torch would flip the signs
        lambda: gct.clip_grad_norm_(params, math.nan),
        lambda: gct.clip_grad_value_(params, -0.5),
        lambda: gct.clip_grads_with_norm_(params, 1.0, -2.0),
    ):
        with pytest.raises(ValueError, match="must be >= 0"):
            call()
    torch.testing.assert_close(params[0].grad, torch.tensor([3.0, 4.0]))


def test_tensor_max_norm_and_float_total_norm():
    params = _with_grads(torch.tensor([3.0, 4.0]))
    n = gct.clip_grad_norm_(params, torch.tensor(1.0))
    assert float(n) == pytest.approx(5.0)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.8]))
    params = _with_grads(torch.tensor([3.0, 4.0]))
    gct.clip_grads_with_norm_(params, 1.0, 5.0)  # a Python norm (torch needs a tensor)
    torch.testing.assert_close(params[0].grad, torch.tensor([0.6, 0.8]))


def test_gradients_that_cannot_be_written_raise_before_any_is_written():
    good = torch.nn.Parameter(torch.zeros(2))
    good.grad = torch.tensor([30.0, 40.0])
    with torch.inference_mode():
        frozen = torch.tensor([1.0])
    bad = torch.nn.Parameter(torch.zeros(1))
    bad.grad = frozen
    with pytest.raises(TypeError, match="inference tensor"):
        gct.clip_grad_norm_([good, bad], 1.0)
    torch.testing.assert_close(good.grad, torch.tensor([30.0, 40.0]))


# -- better numerics than torch -------------------------------------------------------


@pytest.mark.parametrize(
    ("dtype", "grad", "want"),
    [
        (torch.bfloat16, torch.ones(300, 4096), math.sqrt(300 * 4096)),  # torch: 1112
        (torch.float16, torch.full((1000,), 300.0), 300 * math.sqrt(1000)),
        (torch.float32, torch.tensor([3e30, 4e30]), 5e30),  # torch: inf, grads zeroed
    ],
)
def test_low_precision_and_huge_gradients(dtype, grad, want):
    p = _with_grads(grad.to(dtype))
    n = gct.clip_grad_norm_(p, 1.0)
    assert n.dtype == torch.float32
    assert float(n) == pytest.approx(want, rel=1e-6)
    g = p[0].grad
    assert g.dtype == dtype
    ref = _np(grad.to(dtype)) / want
    np.testing.assert_allclose(_np(g), ref, rtol=2 ** -(8 if dtype == torch.bfloat16 else 10))
    assert float(gct.get_total_norm(g)) == pytest.approx(1.0, rel=1e-2)  # clipped, not zeroed


def test_mixed_dtypes_are_grouped_and_accumulate_in_float64():
    gen = torch.Generator().manual_seed(7)
    dtypes = [torch.float16, torch.bfloat16, torch.float32, torch.float64, torch.float32]
    grads = [torch.randn(50, generator=gen).mul(30).to(dt) for dt in dtypes]

    def make():
        return _with_grads(*grads)

    (rn, rp), (n, p) = _both("clip_grad_norm_", make, 2.0)
    want = ref_norm([_np(g) for g in grads], 2.0)
    assert n.dtype == torch.float64
    assert float(n) == pytest.approx(want, rel=1e-12)
    assert float(rn) == pytest.approx(want, rel=1e-2)  # torch's low-precision groups
    scale = 2.0 / (want + 1e-6)
    for a, b, g in zip(_grads_of(p), _grads_of(rp), grads):
        assert a.dtype == b.dtype == g.dtype
        tol = {"rtol": 2e-2, "atol": 1e-3} if g.dtype in (torch.float16, torch.bfloat16) else {}
        np.testing.assert_allclose(_np(a), _np(g) * scale, **(tol or {"rtol": 1e-6}))


@pytest.mark.skipif(
    not torch.cuda.is_available() or torch.cuda.device_count() < 2,
    reason="needs 2 CUDA devices",
)
def test_several_devices_like_torch():
    def make():
        gen = torch.Generator().manual_seed(8)
        return _with_grads(
            torch.randn(5, generator=gen).cuda(0),
            torch.randn(3, generator=gen).cuda(1),
            torch.randn(4, generator=gen).to(torch.bfloat16).cuda(1),
            torch.randn(2, generator=gen),
        )

    (rn, rp), (n, p) = _both("clip_grad_norm_", make, 0.5)
    assert n.device == rn.device == torch.device("cuda", 0)
    torch.testing.assert_close(n, rn.float(), rtol=1e-2, atol=0)
    for a, b in zip(_grads_of(p), _grads_of(rp)):
        assert a.device == b.device
        torch.testing.assert_close(a, b, rtol=1e-2, atol=1e-3)


# -- torch.compile and CUDA graphs ------------------------------------------------------


@pytest.mark.filterwarnings("ignore:Dynamo detected a call to a `functools.lru_cache`")
@pytest.mark.parametrize("foreach", [None, False])
def test_compiled_training_step_has_no_graph_break(foreach):
    """fullgraph=True fails on any graph break; the step must equal eager torch."""

    def make():
        torch.manual_seed(0)
        return torch.nn.Sequential(torch.nn.Linear(10, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def clip_and_update(model, clip):
        norm = clip(model.parameters(), 0.3, foreach=foreach)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(p.grad, alpha=-0.1)
        return norm

    # eager calls first, so gradclip's caches hold entries of several libraries when
    # dynamo traces them, as in a real program (a module-keyed cache broke the graph)
    for name in ("numpy", "jax", "array_api_strict", "dask"):
        gc.global_norm(make_backend(name).asarray(np.ones(2)))
    gct.clip_grad_norm_(_with_grads(torch.ones(2)), 1.0, foreach=foreach)
    ours, ref = make(), make()
    step = torch.compile(
        lambda m: clip_and_update(m, gct.clip_grad_norm_), fullgraph=True, backend="aot_eager"
    )
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        x, y = torch.randn(8, 10, generator=gen), torch.randn(8, 1, generator=gen)
        for m in (ours, ref):
            m.zero_grad()
            torch.nn.functional.mse_loss(m(x), y).backward()
        torch.testing.assert_close(step(ours), clip_and_update(ref, tnn.clip_grad_norm_))
    for p, r in zip(ours.parameters(), ref.parameters()):
        torch.testing.assert_close(p, r)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_graph_capture_and_replay():
    grads = [torch.zeros(1000, device="cuda"), torch.zeros(10, 10, device="cuda")]
    params = _with_grads(*grads)
    static = [p.grad for p in params]
    graph, norm = cuda_graph(lambda: gct.clip_grad_norm_(params, 1.0))
    for seed in (0, 1):
        gen = torch.Generator().manual_seed(seed)
        new = [torch.randn(g.shape, generator=gen) * 0.1 * (seed + 1) for g in static]
        for g, v in zip(static, new):
            g.copy_(v)
        graph.replay()
        ref = _with_grads(*new)
        ref_norm_ = tnn.clip_grad_norm_(ref, 1.0)
        torch.testing.assert_close(norm.cpu(), ref_norm_, rtol=1e-5, atol=0)
        for g, r in zip(static, _grads_of(ref)):
            torch.testing.assert_close(g.cpu(), r, rtol=1e-5, atol=1e-7)


# -- the optimizer hook -----------------------------------------------------------------


def _hooked_run(setup, steps=20, seed=0):
    """Train the MLP with SGD; ``setup(opt)`` installs clipping; returns the
    parameters and the per-step values ``record(handle)`` saw."""
    torch.manual_seed(seed)
    model = _MLP()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    clip_in_loop = setup(opt)
    gen = torch.Generator().manual_seed(1)
    seen = []
    for _ in range(steps):
        x, y = torch.randn(8, 10, generator=gen), torch.randn(8, 1, generator=gen) * 3
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        seen.append(clip_in_loop(model))
        opt.step()
    return [p.detach().clone() for p in model.parameters()], seen


def test_hook_equals_clipping_before_each_step():
    ref, ref_norms = _hooked_run(lambda opt: lambda m: tnn.clip_grad_norm_(m.parameters(), 0.5))
    handles = []

    def setup(opt):
        handles.append(gct.clip_before_step(opt, 0.5))
        return lambda m: handles[0].last_norm  # the previous step's norm

    got, seen = _hooked_run(setup)
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float32])
    h = handles[0]
    torch.testing.assert_close(torch.stack(seen[1:]), torch.stack(ref_norms[:-1]))
    torch.testing.assert_close(h.last_norm, ref_norms[-1])
    assert h.last_clipped.dtype == torch.bool
    assert bool(h.last_clipped) == bool(ref_norms[-1] + 1e-6 > 0.5)
    assert float(h.last_threshold) == 0.5


def test_hook_remove_stops_clipping():
    def setup(opt):
        gct.clip_before_step(opt, 1e-3).remove()
        return lambda m: None

    got, _ = _hooked_run(setup, steps=5)
    ref, _ = _hooked_run(lambda opt: lambda m: None, steps=5)
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=0)


class _HalvingState(NamedTuple):
    limit: torch.Tensor
    steps: torch.Tensor


class _Halving:
    """A tiny stateful clipper: the threshold starts at ``start`` and halves each step."""

    def __init__(self, start):
        self.start = start

    def init(self, like):
        return _HalvingState(like + self.start, torch.zeros_like(like))

    def threshold(self, state, norm):
        return state.limit, _HalvingState(state.limit / 2, state.steps + 1)


def test_hook_with_a_stateful_clipper():
    limits = [4.0 / 2**k for k in range(12)]
    clipper = _Halving(4.0)

    def reference_setup(opt):
        it = iter(limits)
        return lambda m: tnn.clip_grad_norm_(m.parameters(), next(it))

    ref, ref_norms = _hooked_run(reference_setup, steps=12)
    handles = []

    def setup(opt):
        handles.append(gct.clip_before_step(opt, clipper))
        return lambda m: None

    got, _ = _hooked_run(setup, steps=12)
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float32])
    h = handles[0]
    assert float(h.state.steps) == 12
    assert float(h.last_threshold) == limits[-1]
    assert isinstance(h.last_threshold, torch.Tensor)
    assert bool(h.last_clipped)
    torch.testing.assert_close(h.last_norm, ref_norms[-1])


@pytest.mark.parametrize("name", list(LIBRARY_CLIPPERS))
def test_hook_with_library_clippers_equals_clip_stateful_(name):
    """AutoClip, ZClip and QuantileClip in the hook give the training run of calling
    gc.clip_stateful_ (eps 1e-6, as the hook) before each step."""
    clipper = LIBRARY_CLIPPERS[name]()
    box = {}

    def reference_setup(opt):
        def clip(m):
            grads = [p.grad for p in m.parameters()]
            if "state" not in box:
                box["state"] = clipper.init(torch.zeros(()))
            box["state"], info = gc.clip_stateful_(grads, clipper, box["state"], eps=1e-6)
            return info

        return clip

    ref, infos = _hooked_run(reference_setup, steps=15)
    handles = []

    def setup(opt):
        handles.append(gct.clip_before_step(opt, LIBRARY_CLIPPERS[name]()))
        return lambda m: None

    got, _ = _hooked_run(setup, steps=15)
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, **TOL[torch.float32])
    h = handles[0]
    torch.testing.assert_close(h.last_threshold, infos[-1].threshold)
    torch.testing.assert_close(h.last_norm, infos[-1].norm)
    assert 0 < sum(bool(i.clipped) for i in infos) < len(infos)  # it acted on some steps


def test_hook_infinite_threshold_does_not_clip():
    class Never:
        def init(self, like):
            return ()

        def threshold(self, state, norm):
            return torch.full_like(norm, math.inf), state

    handles = []

    def setup(opt):
        handles.append(gct.clip_before_step(opt, Never()))
        return lambda m: None

    got, _ = _hooked_run(setup, steps=5)
    ref, _ = _hooked_run(lambda opt: lambda m: None, steps=5)
    for p, r in zip(got, ref):
        torch.testing.assert_close(p, r, rtol=0, atol=0)
    assert not bool(handles[0].last_clipped)


def test_hook_nonfinite_zero_skips_the_step_and_raise_raises():
    w = torch.nn.Parameter(torch.ones(3))
    opt = torch.optim.SGD([w], lr=1.0)
    h = gct.clip_before_step(opt, 1.0, nonfinite="zero")
    w.grad = torch.tensor([1.0, math.nan, 2.0])
    opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(3))
    assert not bool(h.last_clipped)  # a non-finite norm is reported as such, not as clipped
    assert math.isnan(float(h.last_norm))
    h.remove()
    gct.clip_before_step(opt, 1.0, nonfinite="raise")
    w.grad = torch.tensor([1.0, math.inf, 2.0])
    with pytest.raises(FloatingPointError):
        opt.step()
    torch.testing.assert_close(w.detach(), torch.ones(3))


def test_hook_rejects_bad_options():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.ones(1))], lr=1.0)
    with pytest.raises(ValueError, match="max_norm"):
        gct.clip_before_step(opt, -1.0)
    with pytest.raises(ValueError, match="ord"):
        gct.clip_before_step(opt, 1.0, norm_type=0)
    with pytest.raises(ValueError, match="nonfinite"):
        gct.clip_before_step(opt, 1.0, nonfinite="ignore")
    with pytest.raises(TypeError, match="max_norm"):
        gct.clip_before_step(opt, "1.0")


def test_hook_with_a_tensor_threshold_and_two_param_groups():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    unused = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a, unused]}, {"params": [b], "lr": 2.0}], lr=1.0)
    h = gct.clip_before_step(opt, torch.tensor(1.0, dtype=torch.float64))
    a.grad, b.grad = torch.tensor([3.0]), torch.tensor([4.0])
    opt.step()
    torch.testing.assert_close(a.detach(), torch.tensor([-0.6]))
    torch.testing.assert_close(b.detach(), torch.tensor([-1.6]))
    assert float(h.last_norm) == pytest.approx(5.0)
    assert h.last_threshold.dtype == torch.float32  # the norm's dtype
