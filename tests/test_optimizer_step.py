"""Clipping inside the optimizer step: ``gradclip.torch.clip_before_step`` with torch's
fused optimizers (the scale handed to the kernel as ``grad_scale``), ``nonfinite="skip"``
(a bad step changes nothing, without a host read on fused optimizers), GradScaler and
gradient accumulation, sharded gradients over gloo ranks, and the optax side (the
multiply fused into the update by XLA, ``skip_nonfinite``).

Every trajectory is compared with the reference order: torch's clip, then the step
(with AMP: ``scaler.unscale_``, torch's clip, ``scaler.step``), the bad steps left out.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from _launch import run_ranks

torch = pytest.importorskip("torch")

import gradclip as gc  # noqa: E402
import gradclip.torch as gct  # noqa: E402
from gradclip import _backends, _clipping, _tree  # noqa: E402

FUSED = {
    "Adam": lambda ps: torch.optim.Adam(ps, lr=1e-2, fused=True),
    "AdamW": lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=0.1, fused=True),
    "SGD": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9, fused=True),
    "Adagrad": lambda ps: torch.optim.Adagrad(ps, lr=1e-2, fused=True),
}
# optimizers that do not read grad_scale/found_inf: a skip costs one host read
UNFUSED = {
    "Adam-foreach": lambda ps: torch.optim.Adam(ps, lr=1e-2, foreach=True),
    "AdamW-for-loop": lambda ps: torch.optim.AdamW(ps, lr=1e-2, foreach=False),
    "SGD-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
    "RMSprop": lambda ps: torch.optim.RMSprop(ps, lr=1e-2),
}
SHAPES = [(32, 16), (32,), (4, 32), (4,)]  # 676 elements: a norm of about 26 * magnitude
MAX_NORM = 26.0  # about half the steps are clipped (magnitudes e**U(-1, 1))
STEPS = 60
BAD = {25: math.nan, 40: math.inf}  # the steps with a non-finite gradient
# (rtol, atol) of parameters and state. float32: the kernel divides by 1 / scale where
# torch multiplies by scale (an ulp a step); bfloat16: torch's multiply rounds the
# clipped gradient to bfloat16 before the kernel reads it, the kernel's division does
# not, which flips the rounding of some parameters and moments: 2 ulps
TOL = {torch.float32: (1e-5, 2e-6), torch.bfloat16: (2**-6, 2**-7)}


def _params(dtype: Any) -> list[Any]:
    gen = torch.Generator().manual_seed(0)
    return [torch.nn.Parameter(torch.randn(s, generator=gen).to(dtype)) for s in SHAPES]


def _grads(k: int, dtype: Any, bad: dict[int, float] = BAD) -> list[Any]:
    """Step ``k``'s gradients: normals times e**U(-1, 1), the same for every run."""
    gen = torch.Generator().manual_seed(1000 + k)
    magnitude = math.exp(float(torch.empty(()).uniform_(-1, 1, generator=gen)))
    gs = [torch.randn(s, generator=gen) * magnitude for s in SHAPES]
    if k in bad:
        gs[0][1, 2] = bad[k]
    return [g.to(dtype) for g in gs]


def _train(
    make: Callable[[list[Any]], Any],
    dtype: Any,
    before: Callable[[Any, list[Any], int], bool],
    steps: int = STEPS,
    bad: dict[int, float] = BAD,
) -> tuple[list[Any], Any]:
    """``steps`` steps on fixed gradients; ``before(opt, params, k)`` runs before each
    step and says whether to take it."""
    params = _params(dtype)
    opt = make(params)
    for k in range(steps):
        for p, g in zip(params, _grads(k, dtype, bad)):
            p.grad = g
        if before(opt, params, k):
            opt.step()
    return params, opt


def torch_order(opt: Any, params: list[Any], k: int) -> bool:
    """torch's clip, then the step; a step with a non-finite norm left out. For
    bfloat16 torch's own norm is a bfloat16 sum (0.4 % off), so its clip gets the
    float64 norm."""
    if params[0].dtype == torch.float32:
        norm = torch.nn.utils.clip_grad_norm_(params, MAX_NORM)
    else:
        norm = torch.nn.utils.get_total_norm([p.grad.double() for p in params])
        torch.nn.utils.clip_grads_with_norm_(params, MAX_NORM, norm)
    return bool(torch.isfinite(norm))


def hooked(**options: Any) -> Callable[[Any, list[Any], int], bool]:
    """``clip_before_step`` registered before the first step; every step is taken."""

    def before(opt: Any, params: list[Any], k: int) -> bool:
        if k == 0:
            opt.handle = gct.clip_before_step(opt, MAX_NORM, **options)
        return True

    return before


def _state(opt: Any) -> list[Any]:
    """Every state tensor of the optimizer, in parameter order."""
    return [
        v for group in opt.param_groups for p in group["params"] for v in opt.state[p].values()
    ]


def _bits(x: Any) -> Any:
    """A tensor's bits, so that NaN equals NaN and -0 differs from 0."""
    x = x.detach()
    ints = {2: torch.int16, 4: torch.int32, 8: torch.int64}
    return x.view(ints[x.element_size()]) if x.is_floating_point() else x


def _same_bits(a: list[Any], b: list[Any]) -> bool:
    return len(a) == len(b) and all(torch.equal(_bits(x), _bits(y)) for x, y in zip(a, b))


def _within(a: list[Any], b: list[Any], rtol: float, atol: float) -> bool:
    return all(
        bool(
            (
                (x.detach().double() - y.detach().double()).abs()
                <= atol + rtol * y.detach().double().abs()
            ).all()
        )
        for x, y in zip(a, b)
    )


def _max_diff(a: list[Any], b: list[Any]) -> float:
    return max(
        float((x.detach().double() - y.detach().double()).abs().max()) for x, y in zip(a, b)
    )


# -- trajectories ---------------------------------------------------------------------


@pytest.mark.parametrize("fuse", [True, False], ids=["in-kernel", "separate"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_trajectory_follows_torch_clip_then_step(name: str, dtype: Any, fuse: bool):
    """60 steps with a NaN and an inf gradient under nonfinite="skip": parameters and
    optimizer state follow torch's clip + step with the bad steps left out, the step
    counts exactly; the hook reports the skipped steps and clipped about half."""
    make = FUSED[name]
    if name == "SGD" and dtype == torch.bfloat16:
        # torch 2.13's CPU fused SGD with momentum leaves 16-bit momentum buffers
        # uninitialised on its first step, clip or no clip: without momentum here
        make = lambda ps: torch.optim.SGD(ps, lr=1e-2, fused=True)  # noqa: E731
    ref, ref_opt = _train(make, dtype, torch_order)
    skipped, clipped = [], []

    def before(opt: Any, params: list[Any], k: int) -> bool:
        hooked(nonfinite="skip", fuse=fuse)(opt, params, k)
        if k:  # the previous step's report
            skipped.append(bool(opt.handle.last_skipped))
            clipped.append(bool(opt.handle.last_clipped))
        return True

    got, opt = _train(make, dtype, before)
    assert opt.handle.fused is fuse
    assert [k for k, s in enumerate(skipped) if s] == sorted(BAD)
    assert 15 < sum(clipped) < 45  # the threshold matters on some steps, not all
    for s, r in zip(_state(opt), _state(ref_opt)):
        if s.dim() == 0:  # the step counts
            assert float(s) == float(r) == STEPS - len(BAD)
    rtol, atol = TOL[dtype]

    def tensors(params: list[Any], opt: Any) -> list[Any]:
        return params + [s for s in _state(opt) if s.dim()]

    assert _within(tensors(got, opt), tensors(ref, ref_opt), rtol, atol)
    # the tolerance tells a clipped run from an unclipped one (float32: by far)
    free, free_opt = _train(make, dtype, lambda o, ps, k: k not in BAD)
    factor = 2 if dtype == torch.bfloat16 else 1000
    assert not _within(
        tensors(free, free_opt), tensors(ref, ref_opt), factor * rtol, factor * atol
    )
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


@pytest.mark.parametrize("name", list(FUSED) + list(UNFUSED))
def test_skipped_step_is_as_if_it_never_happened(name: str):
    """A run whose bad steps are skipped by the hook equals, bit for bit, the same run
    with those steps not taken at all: parameters, every state tensor, step counts;
    the gradients of a skipped step are left as they were."""
    make = {**FUSED, **UNFUSED}[name]
    snapshots: dict[int, Any] = {}

    def before(opt: Any, params: list[Any], k: int) -> bool:
        hooked(nonfinite="skip")(opt, params, k)
        if k in BAD:  # the tensors themselves, to be seen after the step
            snapshots[k] = [p.grad for p in params]
        return True

    got, opt = _train(make, torch.float32, before, steps=45)

    def without_bad_steps(opt: Any, params: list[Any], k: int) -> bool:
        hooked()(opt, params, k)
        return k not in BAD

    ref, ref_opt = _train(make, torch.float32, without_bad_steps, steps=45)
    assert _same_bits(got, ref)
    assert _same_bits(_state(opt), _state(ref_opt))
    for k, grads in snapshots.items():  # the bad step's gradients, as they were
        assert _same_bits(grads, _grads(k, torch.float32))


@pytest.mark.parametrize("name", ["Adam", "SGD"])
def test_zeroed_gradients_still_move_adam(name: str):
    """Why "skip": under nonfinite="zero" a bad step's zero gradients still move Adam
    (its moments and bias correction go on) and SGD with momentum, where "skip"
    moves nothing."""
    moved = {}
    for mode in ("zero", "skip"):
        params = _params(torch.float32)
        opt = FUSED[name](params)
        gct.clip_before_step(opt, MAX_NORM, nonfinite=mode)
        for k in (0, 25):  # a good step, then a NaN one
            for p, g in zip(params, _grads(k, torch.float32)):
                p.grad = g
            before = [p.detach().clone() for p in params]
            opt.step()
        moved[mode] = not _same_bits(before, list(params))
    assert moved == {"zero": True, "skip": False}


def test_first_step_of_fused_sgd_with_momentum_is_skipped_whole():
    """torch's fused SGD makes its momentum buffers with empty_like on the first step
    and fills them in the kernel, so a first step skipped through found_inf would
    leave garbage for the second; the hook skips that step on the host instead."""
    params = _params(torch.float32)
    opt = FUSED["SGD"](params)
    gct.clip_before_step(opt, MAX_NORM, nonfinite="skip")
    for k in (25, 1):  # a NaN step first
        for p, g in zip(params, _grads(k, torch.float32)):
            p.grad = g
        opt.step()

    def second_only(opt: Any, params: list[Any], k: int) -> bool:
        hooked()(opt, params, k)
        return k == 1

    ref, ref_opt = _train(FUSED["SGD"], torch.float32, second_only, steps=2)
    assert _same_bits(params, ref) and _same_bits(_state(opt), _state(ref_opt))


# -- no host reads --------------------------------------------------------------------

_READS = ("item", "__bool__", "__float__", "__int__", "__index__", "tolist", "cpu", "numpy")


@contextlib.contextmanager
def no_host_reads() -> Iterator[None]:
    """Every way Python reads a tensor's value raises ``AssertionError``."""
    saved = {n: getattr(torch.Tensor, n) for n in _READS}

    def refuse(name: str) -> Callable[..., Any]:
        def read(self: Any, *args: Any, **kwargs: Any) -> Any:
            raise AssertionError(f"a host read: Tensor.{name}")

        return read

    for n in _READS:
        setattr(torch.Tensor, n, refuse(n))
    try:
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)


@pytest.mark.parametrize("clipper", [None, "ZClip"])
@pytest.mark.parametrize("name", list(FUSED))
def test_fused_skip_reads_nothing_on_the_host(name: str, clipper: str | None):
    """The hook and the fused step, good and bad steps alike, with every host read
    refused. Run on the reference math: the CPU fast path reads host memory by design
    (a CPU tensor's value is already there; on CUDA see the sync-debug test)."""

    def threshold() -> Any:
        return MAX_NORM if clipper is None else gc.ZClip(alpha=0.9, z_thresh=1.0)

    def run(guard: Callable[[], Any]) -> tuple[list[Any], Any, Any]:
        params = _params(torch.float32)
        opt = FUSED[name](params)
        handle = gct.clip_before_step(opt, threshold(), nonfinite="skip")
        for i, k in enumerate((0, 1, 25, 2, 40, 3)):  # two bad steps among good ones
            for p, g in zip(params, _grads(k, torch.float32)):
                p.grad = g
            # (the first step of fused SGD with momentum reads one flag, by design)
            with guard() if i else contextlib.nullcontext():
                opt.step()
        return params, opt, handle

    with _backends.fast_paths(False):
        got, opt, handle = run(no_host_reads)
        ref, ref_opt, _ = run(contextlib.nullcontext)
    assert _same_bits(got, ref) and _same_bits(_state(opt), _state(ref_opt))
    assert not bool(handle.last_skipped)
    # the guard does catch a read: another optimizer's skip reads one flag
    unfused = UNFUSED["Adam-foreach"](_params(torch.float32))
    gct.clip_before_step(unfused, MAX_NORM, nonfinite="skip")
    for p in unfused.param_groups[0]["params"]:
        p.grad = torch.ones_like(p)
    with _backends.fast_paths(False), no_host_reads(), pytest.raises(AssertionError, match="host"):
        unfused.step()


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@contextlib.contextmanager
def _sync_errors() -> Iterator[None]:
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


@cuda
@pytest.mark.parametrize("name", list(FUSED))
def test_cuda_fused_skip_without_a_sync(name: str):
    """On CUDA, with torch's sync debug mode raising on any synchronization, the fast
    path's hook and the fused step run good and bad steps; the result is the CPU run's."""

    def run(device: str, guard: Callable[[], Any]) -> tuple[list[Any], Any]:
        params = [torch.nn.Parameter(p.detach().to(device)) for p in _params(torch.float32)]
        opt = FUSED[name](params)
        gct.clip_before_step(opt, MAX_NORM, nonfinite="skip")
        for i, k in enumerate((0, 1, 25, 2, 40, 3)):
            for p, g in zip(params, _grads(k, torch.float32)):
                p.grad = g.to(device)
            with guard() if i else contextlib.nullcontext():  # the first step makes the state
                opt.step()
        return [p.detach().cpu() for p in params], opt

    got, opt = run("cuda", _sync_errors)
    ref, ref_opt = run("cpu", contextlib.nullcontext)
    assert _max_diff(got, ref) <= 1e-5
    assert _max_diff([s.cpu() for s in _state(opt)], _state(ref_opt)) <= 1e-5
    steps = [float(s) for s in _state(opt) if s.dim() == 0]
    assert all(s == 4 for s in steps)  # six steps, two skipped (SGD counts none)


@cuda
def test_cuda_grad_scaler_fused_adamw_without_a_sync():
    """GradScaler on CUDA with a fused AdamW and the hook: scale, clip and skip reach
    the kernel with no synchronization (the scaler's own update included)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    model = model.cuda()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    handle = gct.clip_before_step(opt, 0.5, nonfinite="skip")
    scaler = torch.amp.GradScaler("cuda", init_scale=2.0**10)
    x, y = torch.randn(64, 16, device="cuda"), torch.randn(64, 4, device="cuda")
    for k in range(6):
        with _sync_errors() if k else contextlib.nullcontext():
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x), y)
            scaler.scale(loss * (math.nan if k == 3 else 1.0)).backward()
            scaler.step(opt)
            scaler.update()
    assert not bool(handle.last_skipped)
    assert float(opt.state[next(model.parameters())]["step"]) == 5


# -- GradScaler and gradient accumulation -----------------------------------------------


AMP_MAX_NORM = 1.8  # about the median norm of the AMP runs: half the steps clipped
AMP_TOL = 2e-4  # an ulp of the norm flips fp16 roundings in the next forward pass


def _amp_model() -> Any:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def _amp_run(
    make: Callable[[list[Any]], Any],
    ours: bool,
    steps: int = 50,
    micro: int = 1,
    nan_at: int = 20,
    unscale_first: bool = False,
    max_norm: float = AMP_MAX_NORM,
) -> tuple[list[Any], Any, list[float]]:
    """fp16 autocast on the CPU with a GradScaler (growth every 5 good steps): the
    reference (``unscale_``, torch's clip, ``scaler.step``) or the hook alone;
    ``micro`` micro-batches accumulated per step, one NaN micro-batch at ``nan_at``."""
    model = _amp_model()
    opt = make(list(model.parameters()))
    if ours:
        gct.clip_before_step(opt, max_norm, nonfinite="skip")
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12, growth_interval=5)
    gen = torch.Generator().manual_seed(1)
    scales = []
    for k in range(steps):
        opt.zero_grad()
        for _ in range(micro):
            x = torch.randn(32, 16, generator=gen)
            y = torch.randn(32, 4, generator=gen) * 3
            with torch.autocast("cpu", dtype=torch.float16):
                loss = torch.nn.functional.mse_loss(model(x), y) / micro
            scaler.scale(loss * (math.nan if k == nan_at else 1.0)).backward()
        if not ours:
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        elif unscale_first:
            scaler.unscale_(opt)
        scaler.step(opt)
        scaler.update()
        scales.append(scaler.get_scale())
    return list(model.parameters()), opt, scales


@pytest.mark.parametrize("name", [*FUSED, "Adam-foreach"])
def test_grad_scaler_trajectory_follows_unscale_clip_step(name: str):
    """50 fp16 AMP steps with a NaN step: the hook under GradScaler (the clip sees the
    unscaled gradients, the scaler's inf check and the skip agree) follows
    unscale_ + torch's clip + scaler.step: the same loss scales step by step."""
    make = {**FUSED, **UNFUSED}[name]
    ref, ref_opt, ref_scales = _amp_run(make, ours=False)
    got, opt, scales = _amp_run(make, ours=True)
    assert scales == ref_scales
    assert ref_scales[20] < ref_scales[19]  # the NaN step backed the scale off
    assert len(set(ref_scales)) > 3  # and it grew in between
    assert _max_diff(got, ref) <= AMP_TOL
    other, _, _ = _amp_run(make, ours=False, max_norm=1.6)  # a threshold 11 % lower
    assert _max_diff(other, ref) > 4 * AMP_TOL
    assert _max_diff(_state(opt), _state(ref_opt)) <= AMP_TOL  # step counts equal
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")


def test_grad_scaler_after_an_explicit_unscale():
    """scaler.unscale_ before scaler.step (the scaler then gives the fused optimizer no
    loss scale): the hook clips the unscaled gradients all the same."""
    ref, _, ref_scales = _amp_run(FUSED["AdamW"], ours=False, steps=20, nan_at=8)
    got, _, scales = _amp_run(FUSED["AdamW"], ours=True, steps=20, nan_at=8, unscale_first=True)
    assert scales == ref_scales
    assert _max_diff(got, ref) <= AMP_TOL


@pytest.mark.parametrize("name", ["AdamW", "Adam-foreach"])
def test_gradient_accumulation_clips_once_per_step(name: str, monkeypatch: Any):
    """Three micro-batches per optimizer step under GradScaler: one clip per step (not
    per backward), on the accumulated gradients, as the reference."""
    make = {**FUSED, **UNFUSED}[name]
    ref, _, ref_scales = _amp_run(make, ours=False, steps=20, micro=3, nan_at=7)
    calls = []
    real = _clipping.clip_step
    monkeypatch.setattr(_clipping, "clip_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    got, _, scales = _amp_run(make, ours=True, steps=20, micro=3, nan_at=7)
    # the fused optimizer's hook runs on every step; elsewhere the scaler skips the
    # NaN step before the optimizer (and its hook) is called
    assert len(calls) == (20 if name == "AdamW" else 19)
    assert scales == ref_scales
    assert _max_diff(got, ref) <= AMP_TOL


# -- the hook's bookkeeping ---------------------------------------------------------------


def test_optimizer_attributes_are_put_back():
    """grad_scale/found_inf are set for the step only; a step that raised after the
    hook leaves nothing that the next step would take for a loss scale."""
    params = _params(torch.float32)
    opt = FUSED["AdamW"](params)
    handle = gct.clip_before_step(opt, MAX_NORM, nonfinite="skip")
    assert handle.fused
    fail = {"now": True}

    def boom(opt: Any, args: Any, kwargs: Any) -> None:
        if fail.pop("now", False):
            raise RuntimeError("boom")

    opt.register_step_pre_hook(boom)  # after the clip's hook
    for p, g in zip(params, _grads(25, torch.float32)):
        p.grad = g
    with pytest.raises(RuntimeError, match="boom"):
        opt.step()
    assert hasattr(opt, "grad_scale")  # left by the step that raised
    for p, g in zip(params, _grads(0, torch.float32)):
        p.grad = g
    opt.step()
    assert not hasattr(opt, "grad_scale") and not hasattr(opt, "found_inf")

    def first_only(opt: Any, params: list[Any], k: int) -> bool:
        hooked()(opt, params, k)
        return k == 0

    ref, _ = _train(FUSED["AdamW"], torch.float32, first_only, steps=1)
    assert _same_bits(params, ref)
    handle.remove()
    opt.grad_scale = torch.tensor(2.0)  # someone else's, kept
    for p, g in zip(params, _grads(1, torch.float32)):
        p.grad = g
    opt.step()
    assert float(opt.grad_scale) == 2.0


def test_in_the_kernel_no_separate_multiply(monkeypatch: Any):
    """In the kernel, the gradients are not multiplied separately: the fused step
    divides them by grad_scale and writes them back, so after the step .grad holds the
    clipped gradients as after torch's clip. fuse=False, and nonfinite="zero" (zeros
    the kernel cannot make), multiply them first, once."""
    grads, max_norm = _grads(0, torch.float32), 5.0
    norm = float(gc.global_norm(grads))
    assert norm > max_norm
    multiplies = []
    real = _backends.Plan.scale
    monkeypatch.setattr(
        _backends.Plan, "scale", lambda *a, **k: multiplies.append(1) or real(*a, **k)
    )
    for options, fused in (({}, True), ({"fuse": False}, False), ({"nonfinite": "zero"}, False)):
        params = _params(torch.float32)
        opt = FUSED["Adam"](params)
        handle = gct.clip_before_step(opt, max_norm, **options)
        for p, g in zip(params, grads):
            p.grad = g.clone()
        multiplies.clear()
        opt.step()
        assert handle.fused is fused
        assert len(multiplies) == (0 if fused else 1)
        for p, g in zip(params, grads):
            torch.testing.assert_close(p.grad, g * (max_norm / (norm + 1e-6)))
    # an optimizer that is not fused never takes the kernel path
    assert not gct.clip_before_step(UNFUSED["Adam-foreach"](_params(torch.float32)), 1.0).fused


@pytest.mark.parametrize("clipper", ["AutoClip", "ZClip"])
def test_stateful_clippers_in_the_kernel(clipper: str):
    """A stateful clipper in the fused path: the run of the separate multiply, and a
    NaN step skipped leaves the clipper's state as if it never happened."""
    make = {
        "AutoClip": lambda: gc.AutoClip(quantile=0.5, history=20),
        "ZClip": lambda: gc.ZClip(alpha=0.9, z_thresh=1.0),
    }[clipper]
    runs = {}
    for fuse in (True, False):
        handles = []

        def before(
            opt: Any, params: list[Any], k: int, fuse: bool = fuse, handles=handles
        ) -> bool:
            if k == 0:
                handles.append(gct.clip_before_step(opt, make(), nonfinite="skip", fuse=fuse))
            return True

        params, _ = _train(FUSED["AdamW"], torch.float32, before, steps=30, bad={25: math.nan})
        runs[fuse] = params, handles[0]
    (got, h), (ref, h_ref) = runs[True], runs[False]
    assert _max_diff(got, ref) <= 1e-6
    torch.testing.assert_close(h.last_threshold, h_ref.last_threshold)
    handles = []

    def without(opt: Any, params: list[Any], k: int) -> bool:
        if k == 0:
            handles.append(gct.clip_before_step(opt, make(), nonfinite="skip"))
        return k != 25

    _train(FUSED["AdamW"], torch.float32, without, steps=30, bad={25: math.nan})
    assert _same_bits(list(h.state), list(handles[0].state))


def test_skip_is_an_option_of_the_optimizer_hook_only():
    x = np.array([3.0, 4.0])
    for call in (
        lambda: gc.clip_by_global_norm(x, 1.0, nonfinite="skip"),
        lambda: gc.clip_by_global_norm_(x, 1.0, nonfinite="skip"),
        lambda: gc.clip_stateful(x, gc.AutoClip(), gc.AutoClip().init(x), nonfinite="skip"),
        lambda: _clipping.clip_step(_tree.flatten(x), 1.0, nonfinite="skip"),
    ):
        with pytest.raises(ValueError, match="clip_before_step"):
            call()
    opt = FUSED["AdamW"](_params(torch.float32))
    with pytest.raises(ValueError, match="nonfinite must be one of"):
        gct.clip_before_step(opt, 1.0, nonfinite="ignore")


def test_optax_rejects_skip_and_points_to_skip_nonfinite():
    gco = pytest.importorskip("gradclip.optax")
    with pytest.raises(ValueError, match="skip_nonfinite"):
        gco.clip_by_global_norm(1.0, nonfinite="skip")


# -- sharded gradients over gloo ranks ---------------------------------------------------


SPAWN_TIMEOUT_S = 120


@pytest.mark.timeout(240)
def test_distributed_every_rank_skips_or_none(tmp_path: Any):
    """Two gloo ranks, each with a shard of a weight and a replicated bias: the hook
    with process_group and replicated follows the single-process reference on the full
    gradients (the bias counted once), fused (found_inf) and not (a host read); a NaN
    on one rank's shard is skipped by both."""
    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("torch.distributed with gloo is not available")
    import _dist_optimizer_worker as W

    preload = ["torch", "gradclip", W.__name__]
    res = run_ranks(W.worker, W.WORLD, str(tmp_path), preload, SPAWN_TIMEOUT_S)
    for r in res:
        assert "error" not in r, r["error"]
    for name in W.OPTIMIZERS:
        ref_w, ref_b = W.reference(name)
        for rank, r in enumerate(res):
            got = r[name]
            assert got["skipped"] == [k in W.BAD for k in range(W.STEPS)], (name, rank)
            np.testing.assert_allclose(got["w"], W.rows(ref_w, rank), rtol=1e-5, atol=1e-6)
            np.testing.assert_allclose(got["b"], ref_b, rtol=1e-5, atol=1e-6)
            assert got["step"] == W.STEPS - len(W.BAD)


# -- optax: the multiply fused by XLA, and skip_nonfinite ----------------------------------


def _entry_outputs(compiled_text: str, shapes: list[tuple[int, ...]]) -> int:
    """How many instructions of the compiled ENTRY computation write an array of one
    of ``shapes`` (a leaf-sized buffer written to memory)."""
    import re

    entry = compiled_text[compiled_text.index("ENTRY") :]
    dims = {",".join(map(str, s)) for s in shapes}
    found = re.findall(r"= [a-z0-9]+\[([0-9,]+)\]\{[^}]*\} (\w+)\(", entry)
    return sum(1 for d, op in found if d in dims and op != "parameter")


def test_optax_chain_fuses_the_multiply_into_adamw():
    """jax.jit of optax.chain(gradclip's clip, optax.adamw) writes no buffer of
    clipped gradients: the compiled program writes as many leaf-sized arrays as adamw
    alone (its moments and the parameters), the scale applied where the gradients
    are read. (float32: XLA on the CPU writes bfloat16 clipped gradients once, see
    docs/optimizer_step.md.)"""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    optax = pytest.importorskip("optax")
    import gradclip.optax as gco

    shapes = [(512, 256), (256,), (64, 3, 3, 3)]
    rng = np.random.default_rng(0)
    params = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]
    grads = [jnp.asarray(rng.standard_normal(s, dtype=np.float32)) for s in shapes]

    clip = gco.clip_by_global_norm(1.0)

    def written(tx: Any, also_clipped: bool = False) -> int:
        def step(g: Any, state: Any, p: Any) -> Any:
            updates, state = tx.update(g, state, p)
            out = optax.apply_updates(p, updates), state
            return (*out, clip.update(g, None)[0]) if also_clipped else out

        text = jax.jit(step).lower(grads, tx.init(params), params).compile().as_text()
        return _entry_outputs(text, shapes)

    alone = written(optax.adamw(1e-3))
    assert alone >= 3 * len(shapes)  # the two moments and the parameters, per leaf
    chained = optax.chain(clip, optax.adamw(1e-3))
    assert written(chained) == alone
    # the count sees clipped gradients that are written: here returned as well
    assert written(chained, also_clipped=True) >= alone + len(shapes)


def test_optax_skip_nonfinite_keeps_the_inner_state_bit_for_bit():
    """skip_nonfinite around chain(gradclip's clip, adamw), jitted: a NaN step returns
    the inner state bit for bit and a zero update, and the run goes on as if the step
    had not happened."""
    jax = pytest.importorskip("jax")
    jnp = jax.numpy
    optax = pytest.importorskip("optax")
    import gradclip.optax as gco

    tx = gco.skip_nonfinite(optax.chain(gco.clip_by_global_norm(1.0), optax.adamw(1e-2)))
    inner = optax.chain(gco.clip_by_global_norm(1.0), optax.adamw(1e-2))

    @jax.jit
    def step(g: Any, state: Any, p: Any) -> Any:
        updates, state = tx.update(g, state, p)
        return optax.apply_updates(p, updates), state, updates

    rng = np.random.default_rng(0)
    params = {"w": jnp.asarray(rng.standard_normal((8, 4), dtype=np.float32))}
    state = tx.init(params)
    ref_params, ref_state = params, inner.init(params)
    for k in range(8):
        g = {"w": jnp.asarray(rng.standard_normal((8, 4), dtype=np.float32) * 3)}
        if k == 4:
            bad = {"w": g["w"].at[1, 1].set(jnp.nan)}
            new_params, new_state, updates = step(bad, state, params)
            assert all(
                np.array_equal(np.asarray(a), np.asarray(b))
                for a, b in zip(
                    jax.tree.leaves(new_state.inner_state), jax.tree.leaves(state.inner_state)
                )
            )
            assert not np.any(np.asarray(updates["w"]))
            assert np.array_equal(np.asarray(new_params["w"]), np.asarray(params["w"]))
            params, state = new_params, new_state
        params, state, _ = step(g, state, params)
        u, ref_state = inner.update(g, ref_state, ref_params)
        ref_params = optax.apply_updates(ref_params, u)
    np.testing.assert_allclose(np.asarray(params["w"]), np.asarray(ref_params["w"]), rtol=1e-6)
    assert int(state.skipped) == 1
