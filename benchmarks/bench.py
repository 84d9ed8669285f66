"""Benchmark: gradclip against torch, optax, plain NumPy and the memory floor.

``make bench`` (or ``python benchmarks/bench.py``) times, on three shape sets
(GPT-2 small, ResNet-50, 2000 x 256) in float32 and bfloat16, every installed
backend of gradclip and its peers, on the same gradients in one run, and prints
medians, the ratios the project's goals are stated in, and the peak extra memory
of each call. It writes a JSON file and a PNG plot to ``benchmarks/results/``
(``--docs`` also to ``docs/bench.json`` and ``docs/img/bench.png``).

Every in-place call clips: each uses half the gradients' current norm as
``max_norm``, so the gradients are halved each time (no call is a no-op; they are
scaled back exactly between cases). Functional calls leave the data alone and use
``norm0 / 2``.

Memory: NumPy calls are measured with ``tracemalloc`` (NumPy reports its buffers
to it), torch-CUDA calls with torch's peak allocated CUDA memory, every other call
with the growth of the process's peak resident set (``VmHWM`` after resetting it
through ``/proc/self/clear_refs``), which counts
fresh pages only: memory the allocator reuses from earlier frees is not seen,
so those figures are lower bounds.
"""

from __future__ import annotations

import argparse
import contextlib
import gc as _gc
import json
import math
import os
import platform
import statistics
import sys
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes as shape_sets

import gradclip

ROOT = Path(__file__).resolve().parent.parent
Call = Callable[[int], Any]  # call k (0, 1, ...) -> result to wait for


# -- what is measured -------------------------------------------------------------------


def _importable(name: str) -> Any:
    try:
        return __import__(name)
    except ImportError:
        return None


def _cuda(torch: Any) -> bool:
    return torch is not None and torch.cuda.is_available()


def _cupy() -> Any:
    cp = _importable("cupy")
    try:
        return cp if cp is not None and cp.cuda.runtime.getDeviceCount() > 0 else None
    except Exception:
        return None


def _np_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(dtype)


def _make_data(shape_list: list[tuple[int, ...]], dtype: str, seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for s in shape_list:
        x = rng.standard_normal(s, dtype=np.float32)
        out.append(x if dtype == "float32" else x.astype(_np_dtype(dtype)))
    return out


def _torch_view(torch: Any, x: np.ndarray) -> Any:
    """A torch tensor sharing ``x``'s memory (bfloat16 through an int16 view)."""
    if x.dtype.name == "bfloat16":
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(x)


def _plain_numpy(grads: list[np.ndarray], max_norm: float) -> float:
    """The obvious NumPy clip: a dot per leaf, then an in-place multiply."""
    total = 0.0
    for x in grads:
        v = x.reshape(-1)
        if v.dtype.itemsize < 4:
            v = v.astype(np.float32)
        total += float(np.dot(v, v))
    norm = math.sqrt(total)
    scale = min(1.0, max_norm / (norm + 1e-6))
    for x in grads:
        x *= np.asarray(scale, dtype=np.float32)
    return norm


class Halver:
    """``max_norm`` for in-place calls on the shared gradients: half their current norm.

    Every in-place call halves the gradients (NumPy and torch cases share memory), so
    the next call's threshold is half again; :meth:`restore` scales the gradients back
    (by a power of 2: exact) between cases.
    """

    def __init__(self, data: list[Any], norm0: float) -> None:
        self.data, self.norm0, self.n = data, norm0, 0
        self.others: list[Halver] = []  # copies elsewhere (CUDA) halved on their own

    def __call__(self, k: int) -> float:
        self.n += 1
        return self.norm0 / 2.0**self.n

    def restore(self) -> None:
        if self.n:
            for x in self.data:
                x *= 2.0**self.n  # a weak Python scalar: the leaves' own dtype, exact
        self.n = 0
        for h in self.others:
            h.restore()


def cases(data: list[np.ndarray], dtype: str, half: Halver) -> dict[str, tuple[str, Call]]:
    """name -> (library, call) for every installed backend and peer."""
    out: dict[str, tuple[str, Call]] = {}
    norm0 = half.norm0

    out["gradclip numpy (in place)"] = (
        "numpy",
        lambda k: gradclip.clip_by_global_norm_(data, half(k), eps=1e-6),
    )
    out["plain numpy (dot + in place)"] = ("numpy", lambda k: _plain_numpy(data, half(k)))

    torch = _importable("torch")
    if torch is not None:
        ts = [_torch_view(torch, x) for x in data]
        params = []
        for t in ts:
            # a parameter of the gradient's shape on one element of memory
            p = torch.nn.Parameter(torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype))
            p.grad = t
            params.append(p)
        out["gradclip torch (in place)"] = (
            "torch",
            lambda k: gradclip.clip_by_global_norm_(ts, half(k), eps=1e-6),
        )
        for fe in (True, False):
            out[f"torch clip_grad_norm_ (foreach={fe})"] = (
                "torch",
                lambda k, fe=fe: torch.nn.utils.clip_grad_norm_(params, half(k), foreach=fe),
            )
        flat = torch.zeros(sum(x.size for x in data), dtype=ts[0].dtype)
        flat.normal_()

        def floor(k: int) -> Any:
            torch.sum(flat)  # one read of every byte
            return flat.mul_(0.5)  # one read and write in place

        out["floor (sum + mul_, flat)"] = ("floor", floor)
        out.update(_step_cases(torch, ts, half, "cpu"))
        if _cuda(torch):
            out.update(_cuda_cases(torch, data, half))

    jax = _importable("jax")
    if jax is not None:
        out.update(_jax_cases(jax, data, norm0))
        if _importable("optax") is not None:
            out.update(_jax_step_cases(jax, data, norm0))

    cp = _cupy()
    if cp is not None and dtype != "bfloat16":
        cg = [cp.asarray(x) for x in data]
        cu_half = Halver(cg, norm0)
        half.others.append(cu_half)
        out["gradclip cupy (in place)"] = (
            "cupy",
            lambda k: gradclip.clip_by_global_norm_(cg, cu_half(k), eps=1e-6),
        )
        out["floor cupy (copy of 1.5 x bytes)"] = (
            "cupy",
            _copy_floor(lambda n: cp.ones(n, dtype=cp.float32), data),
        )
    return out


def _copy_floor(ones: Callable[[int], Any], data: list[np.ndarray]) -> Call:
    """The GPU floor, 3 x bytes / copy bandwidth, measured: a device-to-device copy of
    1.5 x the gradients' bytes (read once and written once); ``ones(n)``: n float32
    ones on the device."""
    src = ones((3 * sum(x.nbytes for x in data) // 2 + 3) // 4)
    dst = src * 0
    if hasattr(dst, "copy_"):  # torch
        return lambda k: dst.copy_(src)
    import cupy as cp

    return lambda k: cp.copyto(dst, src)


def _jax_cases(jax: Any, data: list[np.ndarray], norm0: float) -> dict[str, tuple[str, Call]]:
    """JAX and optax, jitted and eager, on JAX's default device: ``jax`` on the CPU,
    ``jax-gpu`` on a GPU (the cases' names say which)."""
    import jax.numpy as jnp

    lib = "jax" if jax.default_backend() == "cpu" else f"jax-{jax.default_backend()}"
    jg = [jnp.asarray(x) for x in data]
    m = jnp.asarray(norm0 / 2, dtype=jnp.float32)
    clip = jax.jit(lambda g, m: gradclip.clip_by_global_norm(g, m))
    out = {f"gradclip {lib} (jit)": (lib, lambda k: clip(jg, m))}
    # what any jitted functional clip must do at least: read every leaf and write a
    # fresh output (no norm at all); the bound on how far under optax a jit can go
    mul = jax.jit(lambda g, m: [x * m.astype(x.dtype) for x in g])
    out[f"floor {lib} (jit, multiply only)"] = (lib, lambda k: mul(jg, m))
    out[f"gradclip {lib} (eager)"] = (lib, lambda k: gradclip.clip_by_global_norm(jg, m))
    optax = _importable("optax")
    if optax is not None:
        tx = optax.clip_by_global_norm(norm0 / 2)
        upd = jax.jit(lambda g: tx.update(g, None)[0])
        tag = "" if lib == "jax" else f" {lib}"
        out[f"optax{tag} clip_by_global_norm (jit)"] = (lib, lambda k: upd(jg))
        if lib == "jax":  # (on a GPU eager optax is dispatch alone: 0.07 to 1.2 s a call)
            out["optax clip_by_global_norm (eager)"] = ("jax", lambda k: tx.update(jg, None)[0])
    return out


def _cuda_cases(torch: Any, data: list[np.ndarray], half: Halver) -> dict[str, tuple[str, Call]]:
    ts = [_torch_view(torch, x).cuda() for x in data]
    params = []
    for t in ts:
        p = torch.nn.Parameter(
            torch.empty_strided(t.shape, (0,) * t.dim(), dtype=t.dtype, device="cuda")
        )
        p.grad = t
        params.append(p)
    cuda_half = Halver(ts, half.norm0)
    half.others.append(cuda_half)
    return {
        **_step_cases(torch, ts, cuda_half, "cuda"),
        "floor torch-cuda (copy of 1.5 x bytes)": (
            "cuda",
            _copy_floor(lambda n: torch.ones(n, device="cuda"), data),
        ),
        "gradclip torch-cuda (in place)": (
            "cuda",
            lambda k: gradclip.clip_by_global_norm_(ts, cuda_half(k), eps=1e-6),
        ),
        "torch-cuda clip_grad_norm_ (foreach=True)": (
            "cuda",
            lambda k: torch.nn.utils.clip_grad_norm_(params, cuda_half(k), foreach=True),
        ),
    }


STEP_LR = 1e-6  # the optimizer cases' learning rate: the parameters barely move


class Parts(dict):
    """What a case of several parts returns from a call: its own timing (seconds) of
    each part, run back to back in an order that rotates from call to call, so that a
    slow spell of the shared machine falls on every part alike. What a clip adds to
    an optimizer step is a few percent of the step: two separate medians cannot
    resolve it, the difference within one call can."""


def _parts(parts: dict[str, Callable[[], Any]], wait: Callable[[], Any]) -> Call:
    names = list(parts)

    def call(k: int) -> Parts:
        times = Parts()
        r = k % len(names)
        for name in names[r:] + names[:r]:
            t0 = time.perf_counter()
            parts[name]()
            wait()
            times[name] = time.perf_counter() - t0
        return times

    return call


def _step_cases(
    torch: Any, ts: list[Any], half: Halver, device: str
) -> dict[str, tuple[str, Call]]:
    """One case of six parts on ``device``: a fused AdamW step over parameters whose
    ``.grad`` are ``ts`` ("alone"), the same step clipped by gradclip's hook in its
    kernel ("gradclip": ``grad_scale``, the gradients read once for the norm and
    written back clipped by the kernel), the same step after torch's
    ``clip_grad_norm_`` ("torch"), and one read of the same bytes, ``torch.sum`` over
    one flat buffer ("read"). Each clip halves the gradients. Two more parts split
    what the hook adds: the step handed ``grad_scale = 1`` by hand ("grad_scale":
    what torch's kernel adds to divide and write back the gradients, the least any
    clip through ``grad_scale`` adds) and gradclip's norm alone ("norm"). Library
    ``step`` (``step-cuda``)."""
    import gradclip.torch as gct

    params = []
    for t in ts:
        p = torch.nn.Parameter(torch.zeros_like(t))
        p.grad = t
        params.append(p)
    opt = torch.optim.AdamW(params, lr=STEP_LR, fused=True)
    opt.step()  # the state exists before any case is timed
    hooked = torch.optim.AdamW(params, lr=STEP_LR, fused=True)
    hooked.state = opt.state  # the same parameters and moments, with the hook
    handle = gct.clip_before_step(hooked, half.norm0)
    flat = torch.zeros(sum(t.numel() for t in ts), dtype=ts[0].dtype, device=device)
    flat.normal_()
    wait = torch.cuda.synchronize if device == "cuda" else lambda: None

    def gradclip_step() -> None:
        handle.max_norm = half(0)
        hooked.step()

    def torch_step() -> None:
        torch.nn.utils.clip_grad_norm_(params, half(0))
        opt.step()

    one = torch.ones((), device=device)

    def scaled_step() -> None:
        opt.grad_scale = one  # what GradScaler sets: the kernel divides by it
        opt.step()
        del opt.grad_scale

    parts = {"alone": opt.step, "gradclip": gradclip_step, "torch": torch_step}
    parts["read"] = lambda: torch.sum(flat)
    parts["grad_scale"] = scaled_step
    parts["norm"] = lambda: gradclip.global_norm(ts)
    tag = "" if device == "cpu" else "-cuda"
    lib = f"step{tag}"
    return {f"fused AdamW{tag} step (parts)": (lib, _parts(parts, wait))}


def _jax_step_cases(jax: Any, data: list[np.ndarray], norm0: float) -> dict[str, tuple[str, Call]]:
    """One case of four parts: ``optax.adamw`` jitted with the parameters and the state
    donated, as in training ("alone"), chained after gradclip's ("gradclip") and
    after optax's ("optax") ``clip_by_global_norm``, and one read of the same bytes,
    ``jnp.sum`` over one flat buffer ("read"). Library ``step-jax``."""
    import jax.numpy as jnp
    import optax

    import gradclip.optax as gco

    grads = [jnp.asarray(x) for x in data]
    flat = jnp.asarray(np.concatenate([x.reshape(-1) for x in data]))
    total = jax.jit(jnp.sum)
    parts = {"alone": _jax_train_step(jax, optax.adamw(STEP_LR), grads)}
    for name, clip in (
        ("gradclip", gco.clip_by_global_norm),
        ("optax", optax.clip_by_global_norm),
    ):
        chained = optax.chain(clip(norm0 / 2), optax.adamw(STEP_LR))
        parts[name] = _jax_train_step(jax, chained, grads)
    parts["read"] = lambda: jax.block_until_ready(total(flat))
    return {"optax adamw step (jit, parts)": ("step-jax", _parts(parts, lambda: None))}


def _jax_train_step(jax: Any, tx: Any, grads: list[Any]) -> Callable[[], Any]:
    """One jitted ``update`` + ``apply_updates`` with the parameters and the state
    donated and carried from call to call; returns the new parameters, computed."""
    import jax.numpy as jnp
    import optax

    def step(g: Any, state: Any, params: Any) -> Any:
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state

    fn = jax.jit(step, donate_argnums=(1, 2))
    params = [jnp.zeros_like(g) for g in grads]
    box = [tx.init(params), params]

    def call() -> Any:
        box[1], box[0] = fn(grads, box[0], box[1])
        return jax.block_until_ready(box[1])

    return call


# -- timing and memory -------------------------------------------------------------------


def _wait(result: Any) -> None:
    mods = sys.modules
    if "jax" in mods:
        mods["jax"].block_until_ready(result)
    torch = mods.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.synchronize()
    cp = mods.get("cupy")
    if cp is not None:
        with contextlib.suppress(Exception):
            cp.cuda.Device().synchronize()


def _rss_peak_delta(call: Callable[[], Any]) -> int | None:
    """Growth of the peak resident set during ``call`` (fresh pages only), or None."""
    try:
        before = _status("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to VmRSS
        _wait(call())
        return max(0, _status("VmHWM") - before)
    except OSError:
        return None


def _status(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise OSError(key)


def _cuda_peak(call: Callable[[], Any]) -> int:
    """Growth of torch's peak allocated CUDA memory during ``call``."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    _wait(call())
    return max(0, torch.cuda.max_memory_allocated() - before)


def _tracemalloc_peak(call: Callable[[], Any]) -> int:
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        tracemalloc.reset_peak()
        result = call()
        _wait(result)
        return max(0, tracemalloc.get_traced_memory()[1] - base)
    finally:
        tracemalloc.stop()


SETTLE = 0.5  # seconds of quiet before each case: the previous case's worker threads
# (torch's OpenMP, XLA's, NumPy's pool) stop spinning and leave the cores to it


WARM_S = 0.25  # seconds of warm-up calls at least (a few milliseconds' call needs more
# than 5 calls to reach its steady speed after the quiet)


def measure(
    call: Call,
    library: str,
    warmup: int,
    repeats: int,
    reset: Callable[[], None] | None = None,
    warm_s: float = WARM_S,
    memory: bool = True,
) -> dict[str, Any]:
    """Median time of ``repeats`` calls after ``warmup`` calls and ``warm_s`` seconds of
    them (``reset`` after each warm-up call: the in-place cases' gradients scaled back,
    untimed, so that they are never halved more than ``repeats`` times in a row)."""
    time.sleep(SETTLE)
    k = 0
    start = time.perf_counter()
    while k < warmup or time.perf_counter() - start < warm_s:
        _wait(call(k))
        k += 1
        if reset is not None:
            reset()
    times: list[float] = []
    parts: dict[str, list[float]] = {}
    _gc.collect()
    _gc.disable()  # as timeit does: no collection inside a timed call
    try:
        for _ in range(repeats):
            t0 = time.perf_counter()
            result = call(k)
            _wait(result)
            times.append(time.perf_counter() - t0)
            if isinstance(result, Parts):  # the call's own timings of its parts
                for part, t in result.items():
                    parts.setdefault(part, []).append(t * 1e3)
            k += 1
    finally:
        _gc.enable()
    if not memory:
        mem, how = None, None
    elif library == "numpy":
        mem, how = _tracemalloc_peak(lambda: call(k)), "tracemalloc"
    elif library == "cuda":
        mem, how = _cuda_peak(lambda: call(k)), "cuda-peak"
    else:
        mem, how = _rss_peak_delta(lambda: call(k)), "rss-hwm"
    out = {
        "median_ms": statistics.median(times) * 1e3,
        "times_ms": [t * 1e3 for t in times],
        "extra_bytes": mem,
        "memory_method": how,
    }
    if parts:
        out["parts_ms"] = parts
    return out


# -- goals -------------------------------------------------------------------------------


def _every(bound: float) -> dict[str, float]:
    return dict.fromkeys(shape_sets.SETS, bound)


Spec = str | tuple[str, str, str]


def _step_goals(tag: str) -> list[tuple[str, Spec, Spec, dict[str, float]]]:
    """The fused AdamW step's goals on the CPU (``tag`` "") or CUDA ("-cuda"): what
    the hook's clip adds against one read and against torch's clip, and the two
    parts that split it (torch's kernel handed ``grad_scale``; gradclip's norm)."""
    case = f"fused AdamW{tag} step (parts)"
    read = ("part", case, "read")
    return [
        (
            f"fused AdamW{tag}: clip added vs one read",
            ("added", case, "gradclip"),
            read,
            {"gpt2-small": 1.2, "resnet-50": 1.2},
        ),
        (
            f"fused AdamW{tag}: clip added vs torch's added",
            ("added", case, "gradclip"),
            ("added", case, "torch"),
            {"gpt2-small": 0.5, "resnet-50": 0.5},
        ),
        (
            f"fused AdamW{tag}: grad_scale alone added vs one read",
            ("added", case, "grad_scale"),
            read,
            {},
        ),
        (f"fused AdamW{tag}: gradclip norm vs one read", ("part", case, "norm"), read, {}),
    ]


# (label, numerator, denominator, {set: bound}) ; "bytes" as denominator means the
# numerator's extra memory over the gradients' bytes; ("part", case, part) is one part
# of a case of parts, ("added", case, part) what it adds to the case's "alone" part
GOALS = [
    (
        "torch vs torch foreach",
        "gradclip torch (in place)",
        "torch clip_grad_norm_ (foreach=True)",
        {"gpt2-small": 0.85, "resnet-50": 0.85, "2000x256": 0.8},
    ),
    (
        "numpy vs floor",
        "gradclip numpy (in place)",
        "floor (sum + mul_, flat)",
        {"gpt2-small": 1.25, "resnet-50": 1.25},
    ),
    (
        "numpy vs torch foreach",
        "gradclip numpy (in place)",
        "torch clip_grad_norm_ (foreach=True)",
        _every(1.10),
    ),
    (
        "jax jit vs optax jit",
        "gradclip jax (jit)",
        "optax clip_by_global_norm (jit)",
        {"gpt2-small": 0.70, "resnet-50": 0.70, "2000x256": 1.0},
    ),
    (
        "jax multiply-only floor vs optax jit",
        "floor jax (jit, multiply only)",
        "optax clip_by_global_norm (jit)",
        {},
    ),
    (
        "jax eager vs jax jit",
        "gradclip jax (eager)",
        "gradclip jax (jit)",
        _every(1.30),
    ),
    (
        "numpy extra memory / grads",
        "gradclip numpy (in place)",
        "bytes",
        _every(0.01),
    ),
    (
        "torch extra memory / grads",
        "gradclip torch (in place)",
        "bytes",
        _every(0.01),
    ),
    (
        "torch-cuda vs torch-cuda foreach",
        "gradclip torch-cuda (in place)",
        "torch-cuda clip_grad_norm_ (foreach=True)",
        _every(1.0),
    ),
    (
        "torch-cuda extra memory / grads",
        "gradclip torch-cuda (in place)",
        "bytes",
        _every(0.01),
    ),
    (
        "cupy vs cupy floor",
        "gradclip cupy (in place)",
        "floor cupy (copy of 1.5 x bytes)",
        _every(1.2),
    ),
    (
        "jax-gpu jit vs optax jit",
        "gradclip jax-gpu (jit)",
        "optax jax-gpu clip_by_global_norm (jit)",
        _every(1.0),
    ),
    (
        "jax-gpu eager vs jax-gpu jit",
        "gradclip jax-gpu (eager)",
        "gradclip jax-gpu (jit)",
        _every(1.30),
    ),
    *_step_goals(""),
    *_step_goals("-cuda"),
    (
        "optax adamw jit: gradclip clip added vs one read",
        ("added", "optax adamw step (jit, parts)", "gradclip"),
        ("part", "optax adamw step (jit, parts)", "read"),
        {},
    ),
    (
        "optax adamw jit: optax clip added vs one read",
        ("added", "optax adamw step (jit, parts)", "optax"),
        ("part", "optax adamw step (jit, parts)", "read"),
        {},
    ),
]


def per_call(runs: dict[str, dict[str, Any]], spec: tuple[str, str, str]) -> list[float]:
    """A part's times, call by call (ms): ``("part", case, part)``, or ``("added",
    case, part)``: what the part adds to the case's ``"alone"`` part in the same call."""
    kind, case, part = spec
    parts = runs[case]["parts_ms"]
    if kind == "part":
        return parts[part]
    return [t - a for t, a in zip(parts[part], parts["alone"])]


def median_ms(runs: dict[str, dict[str, Any]], spec: Spec) -> float:
    """A case's median time, or the median of a part spec's per-call times."""
    if isinstance(spec, tuple):
        return statistics.median(per_call(runs, spec))
    return runs[spec]["median_ms"]


def ratio(runs: dict[str, dict[str, Any]], num: Spec, den: Spec) -> float:
    """``num / den``: of the medians, or for two parts of one case the median of the
    ratios call by call (a slow spell of the machine falls on both alike)."""
    if isinstance(num, tuple) and isinstance(den, tuple) and num[1] == den[1]:
        return statistics.median(a / b for a, b in zip(per_call(runs, num), per_call(runs, den)))
    return median_ms(runs, num) / median_ms(runs, den)


def _measured(runs: dict[str, dict[str, Any]], spec: Spec) -> bool:
    return (spec[1] if isinstance(spec, tuple) else spec) in runs


def ratios(runs: dict[str, dict[str, Any]], nbytes: int, set_name: str) -> list[dict[str, Any]]:
    out = []
    for label, num, den, bounds in GOALS:
        if not _measured(runs, num) or (den != "bytes" and not _measured(runs, den)):
            continue
        if den == "bytes":
            extra = runs[num]["extra_bytes"]
            if extra is None:
                continue
            value = extra / nbytes
        else:
            value = ratio(runs, num, den)
        goal = bounds.get(set_name)
        out.append(
            {
                "goal": label,
                "ratio": value,
                "bound": goal,
                "met": None if goal is None else bool(value <= goal),
            }
        )
    return out


# -- the run -----------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info: dict[str, Any] = {
        "cpu": cpu,
        "cores": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "gradclip": gradclip.__version__,
        "platform": platform.platform(),
    }
    for name in ("torch", "jax", "jaxlib", "optax", "cupy"):
        mod = sys.modules.get(name) or _importable(name)
        if mod is not None:
            info[name] = getattr(mod, "__version__", "?")
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
    with contextlib.suppress(OSError):
        info["load_before"] = os.getloadavg()
    return info


def run(
    sets: list[str],
    dtypes: list[str],
    warmup: int,
    repeats: int,
    smoke: bool = False,
    log: Callable[[str], None] = print,
    libraries: set[str] | None = None,
    rounds: int = 1,
) -> dict[str, Any]:
    """Every case of every set and dtype; ``rounds`` > 1 measures each case in turn
    that many times (``repeats`` timed calls each round, the median of all of them),
    so that a slow spell of a shared machine falls on every case alike."""
    result: dict[str, Any] = {
        "machine": machine(),
        "warmup": warmup,
        "repeats": repeats,
        "rounds": rounds,
        "smoke": smoke,
        "results": [],
    }
    for set_name in sets:
        shape_list = shape_sets.SETS[set_name]()
        if smoke:  # tiny: the same structure, a few elements per tensor
            shape_list = [tuple(min(d, 3) for d in s) for s in shape_list[:12]]
        for dtype in dtypes:
            data = _make_data(shape_list, dtype)
            nbytes = sum(x.nbytes for x in data)
            half = Halver(data, float(gradclip.global_norm(data)))
            runs = {}
            calls = cases(data, dtype, half)
            if libraries is not None:
                calls = {k: v for k, v in calls.items() if v[0] in libraries}
            for _, call in calls.values():  # one untimed round first: the one-time costs
                _wait(call(0))  # of each library's runtime (compilation, thread and
                half.restore()  # memory pools) fall on no case
            warm_s = 0.0 if smoke else WARM_S
            for r in range(rounds):
                for name, (library, call) in calls.items():
                    m = measure(call, library, warmup, repeats, half.restore, warm_s, r == 0)
                    half.restore()
                    if r == 0:
                        runs[name] = {**m, "library": library}
                    else:
                        runs[name]["times_ms"] += m["times_ms"]
                        runs[name]["median_ms"] = statistics.median(runs[name]["times_ms"])
                        for part, ts in m.get("parts_ms", {}).items():
                            runs[name]["parts_ms"][part] += ts
            entry = {
                "set": set_name,
                "dtype": dtype,
                "tensors": len(data),
                "elements": sum(x.size for x in data),
                "bytes": nbytes,
                "runs": runs,
                "ratios": ratios(runs, nbytes, set_name),
            }
            result["results"].append(entry)
            log(table(entry))
            del data, runs
            _gc.collect()
    with contextlib.suppress(OSError):
        result["machine"]["load_after"] = os.getloadavg()
    return result


def table(entry: dict[str, Any]) -> str:
    lines = [
        f"\n{entry['set']}  {entry['dtype']}  ({entry['tensors']} tensors, "
        f"{entry['elements'] / 1e6:.2f} M elements, {entry['bytes'] / 2**20:.1f} MiB)",
        f"  {'call':<52}{'median ms':>11}{'extra memory':>16}  method",
    ]
    for name, r in entry["runs"].items():
        mem = "-" if r["extra_bytes"] is None else f"{r['extra_bytes'] / 2**10:,.0f} KiB"
        lines.append(f"  {name:<52}{r['median_ms']:>11.2f}{mem:>16}  {r['memory_method']}")
        for part in r.get("parts_ms", {}):
            t = median_ms(entry["runs"], ("part", name, part))
            lines.append(f"  {'  part: ' + part:<52}{t:>11.2f}")
    lines.append(f"  {'goal (lower is better)':<52}{'ratio':>11}{'bound':>16}  met")
    for g in entry["ratios"]:
        bound = "-" if g["bound"] is None else f"<= {g['bound']:g}"
        met = {True: "yes", False: "NO", None: "-"}[g["met"]]
        lines.append(f"  {g['goal']:<52}{g['ratio']:>11.3f}{bound:>16}  {met}")
    return "\n".join(lines)


def markdown(result: dict[str, Any]) -> str:
    """The medians and the goals of a run as two Markdown tables (as in the docs)."""
    entries = result["results"]
    heads = [f"{e['set']} {e['dtype']}" for e in entries]
    names = list(dict.fromkeys(name for e in entries for name in e["runs"]))
    lines = [
        "| call (median ms) | " + " | ".join(heads) + " |",
        "| --- |" + " ---: |" * len(heads),
    ]
    for name in names:
        cells = [
            f"{e['runs'][name]['median_ms']:.2f}" if name in e["runs"] else "-" for e in entries
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
        parts = dict.fromkeys(
            p for e in entries for p in e["runs"].get(name, {}).get("parts_ms", {})
        )
        for part in parts:
            cells = [
                f"{median_ms(e['runs'], ('part', name, part)):.2f}" if name in e["runs"] else "-"
                for e in entries
            ]
            lines.append(f"| ... part: {part} | " + " | ".join(cells) + " |")
    lines += ["", "| goal: ratio (bound) | " + " | ".join(heads) + " |"]
    lines.append("| --- |" + " :---: |" * len(heads))
    goals = list(dict.fromkeys(g["goal"] for e in entries for g in e["ratios"]))
    for goal in goals:
        cells = []
        for e in entries:
            g = next((g for g in e["ratios"] if g["goal"] == goal), None)
            if g is None:
                cells.append("-")
            elif g["bound"] is None:
                cells.append(f"{g['ratio']:.3f}")
            else:
                cells.append(f"{g['ratio']:.3f} (≤ {g['bound']:g}) {'✓' if g['met'] else '✗'}")
        lines.append(f"| {goal} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    entries = result["results"]
    labels = sorted(
        {g["goal"] for e in entries for g in e["ratios"]}, key=[g[0] for g in GOALS].index
    )
    ncols = min(3, len(labels))  # wide enough panels to read on a docs page
    nrows = -(-len(labels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 4.0 * nrows), squeeze=False)
    for ax in axes.flat[len(labels) :]:
        ax.axis("off")
    for ax, label in zip(axes.flat, labels):
        names, values, bounds = [], [], []
        for e in entries:
            for g in e["ratios"]:
                if g["goal"] == label:
                    names.append(f"{e['set']}\n{e['dtype']}")
                    values.append(g["ratio"])
                    bounds.append(g["bound"])
        colors = [
            "tab:green" if b is None or v <= b else "tab:red" for v, b in zip(values, bounds)
        ]
        ax.bar(range(len(values)), values, color=colors)
        for i, b in enumerate(bounds):
            if b is not None:
                ax.hlines(b, i - 0.4, i + 0.4, colors="black", linestyles="dashed")
        ax.set_xticks(range(len(values)), names, fontsize=9, rotation=90)
        ax.set_title(label, fontsize=11)
        # a log scale for a wide spread, unless a value is not above 0 (what a step
        # adds can come out below 0 in the noise), which a log scale would drop
        if min(values) > 0 and max(values) > 20 * min(values):
            ax.set_yscale("log")
        else:
            ax.axhline(0, color="black", linewidth=0.5)
        ax.tick_params(axis="y", labelsize=9)
    m = result["machine"]
    where = f"{m['cpu']}, {m['cores']} cores" + (f", {m['gpu']}" if "gpu" in m else "")
    fig.suptitle(f"gradclip: ratios (lower is better; dashed: goal) - {where}", fontsize=12)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.3 / fig.get_figheight()))  # room for the title
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sets", default=",".join(shape_sets.SETS))
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeats", type=int, default=3, help="timed calls per case and round")
    ap.add_argument(
        "--rounds", type=int, default=3, help="each case measured in turn, this many times"
    )
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for the test suite")
    ap.add_argument(
        "--libraries",
        help="only these cases, e.g. cuda,cupy,jax-gpu on a GPU machine (of: numpy, "
        "torch, floor, jax, cuda, cupy, jax-gpu, and the optimizer steps: step, "
        "step-jax, step-cuda)",
    )
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    ap.add_argument("--no-plot", action="store_true")
    ap.add_argument("--docs", action="store_true", help="also write docs/bench.json and the plot")
    ap.add_argument(
        "--markdown", metavar="JSON", help="print the tables of a finished run (no timing)"
    )
    ap.add_argument(
        "--plot", nargs=2, metavar=("JSON", "PNG"), help="plot a finished run (no timing)"
    )
    args = ap.parse_args(argv)
    if args.markdown:
        print(markdown(json.loads(Path(args.markdown).read_text())))
        return 0
    if args.plot:
        plot(json.loads(Path(args.plot[0]).read_text()), Path(args.plot[1]))
        return 0
    result = run(
        args.sets.split(","),
        args.dtypes.split(","),
        args.warmup,
        args.repeats,
        smoke=args.smoke,
        libraries=set(args.libraries.split(",")) if args.libraries else None,
        rounds=args.rounds,
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    targets = [out / f"bench-{stamp}.json", out / "latest.json"]
    pngs = [out / f"bench-{stamp}.png", out / "latest.png"]
    if args.docs:
        targets.append(ROOT / "docs" / "bench.json")
        pngs.append(ROOT / "docs" / "img" / "bench.png")
    for t in targets:
        t.parent.mkdir(parents=True, exist_ok=True)
        t.write_text(json.dumps(result, indent=1))
    if not args.no_plot:
        for p in pngs:
            plot(result, p)
    print(f"\nwritten: {', '.join(str(t) for t in targets + ([] if args.no_plot else pngs))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
