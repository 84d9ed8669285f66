"""gradclip's in-place clip against torch's ``clip_grad_norm_`` on CUDA, in long
alternating blocks (``bash benchmarks/gpu.sh ab``).

The benchmark's GPU rows are medians of a few dozen calls per case, each case after
half a second of quiet; calls of a millisecond bound by the host move by tens of
per cent between such runs. Here each set is timed in three blocks of ``N`` calls per
side, the two sides taking turns, and the median block is kept: the steadier figure
for "as fast as torch's clip". To compare two versions of gradclip, run it once with
each on ``PYTHONPATH``. ``--pause 0.5`` times each block as the benchmark times a case
instead: 30 calls after half a second of sleep and a quarter of a second of calls.

Why are the first calls after a pause slow for gradclip on GPT-2 float32 and not for
torch? ``--series`` prints the time of each of those 30 calls, both sides, on GPT-2
and ResNet-50 float32 (a ramp, or slow throughout?); ``--profile`` adds
torch.profiler's table of the 30 calls (host time per op, kernels' device time).
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes
from gpu_profile import timed

import gradclip as gc


def block(fn, n: int, pause: float) -> float:
    """Median ms of ``n`` calls after 20 untimed ones, or, with a ``pause``, of 30
    calls after that many seconds of sleep and 0.25 s of untimed calls."""
    if not pause:
        return timed(fn, n, 20)
    return statistics.median(after_pause(fn, pause))


def sides(xs: list[torch.Tensor]) -> dict[str, Callable[[], object]]:
    """gradclip's in-place clip of ``xs`` and torch's (of parameters whose grads are
    ``xs``), max_norm 1e30: both multiply, by 1, so nothing decays."""
    params = [torch.nn.Parameter(torch.empty_like(x)) for x in xs]
    for p, x in zip(params, xs):
        p.grad = x
    return {
        "gradclip": lambda: gc.clip_by_global_norm_(xs, 1e30, eps=1e-6),
        "torch": lambda: torch.nn.utils.clip_grad_norm_(params, 1e30, foreach=True),
    }


def compare(xs: list[torch.Tensor], n: int, pause: float = 0.0) -> tuple[float, float]:
    """Median ms of gradclip's and torch's clip of ``xs``: three blocks each, taking
    turns."""
    ours, theirs = sides(xs).values()
    a, b = [], []
    for _ in range(3):
        a.append(block(ours, n, pause))
        b.append(block(theirs, n, pause))
    return statistics.median(a), statistics.median(b)


def after_pause(
    fn, pause: float, device: str = "cuda", profile: bool = False, n: int = 30
) -> list[float]:
    """The ms of each of ``n`` calls (synchronised) after ``pause`` seconds of sleep and
    0.25 s of untimed calls, as the benchmark times a case; with ``profile``, under
    torch.profiler, whose table is printed."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    time.sleep(pause)
    start = time.perf_counter()
    while time.perf_counter() - start < 0.25:
        fn()
    sync()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    ctx = torch.profiler.profile(activities=activities) if profile else contextlib.nullcontext()
    out = []
    with ctx as prof:
        for _ in range(n):
            t0 = time.perf_counter()
            fn()
            sync()
            out.append((time.perf_counter() - t0) * 1e3)
    if profile:
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
    return out


def diagnose(pause: float, device: str, profile: bool) -> None:
    """``--series``/``--profile``: each call after the pause, both sides."""
    for name in ("gpt2-small", "resnet-50"):
        xs = [torch.randn(s, device=device) for s in shapes.SETS[name]()]
        calls = sides(xs)
        for _ in range(2):  # taking turns
            for side, fn in calls.items():
                ms = after_pause(fn, pause, device, profile)
                print(
                    f"{name} float32 {side:8s} median {statistics.median(ms):7.3f} ms:",
                    " ".join(f"{v:.2f}" for v in ms),
                )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pause", type=float, default=0.0, help="seconds of sleep per block")
    ap.add_argument("--series", action="store_true", help="each call after the pause")
    ap.add_argument("--profile", action="store_true", help="--series under torch.profiler")
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # cpu: a dry run
    args = ap.parse_args()
    pause = args.pause
    print("gradclip from", gc.__file__, f"(pause {pause} s)")
    if args.series or args.profile:
        diagnose(pause, args.device, args.profile)
        return
    for name, make in shapes.SETS.items():
        n = 60 if name == "2000x256" else 200
        for dtype in (torch.float32, torch.bfloat16):
            xs = [torch.randn(s, device="cuda").to(dtype) for s in make()]
            a, b = compare(xs, n, pause)
            print(f"{name:11s} {dtype!s:15s} gradclip {a:7.3f} ms  torch {b:7.3f} ms  {a / b:.3f}")


if __name__ == "__main__":
    main()
