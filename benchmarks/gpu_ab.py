"""gradclip's in-place clip against torch's ``clip_grad_norm_`` on CUDA, in long
alternating blocks (``bash benchmarks/gpu.sh ab``).

The benchmark's GPU rows are medians of a few dozen calls per case, each case after
half a second of quiet; calls of a millisecond bound by the host move by tens of
per cent between such runs. Here each set is timed in three blocks of ``N`` calls per
side, the two sides taking turns, and the median block is kept: the steadier figure
for "as fast as torch's clip". To compare two versions of gradclip, run it once with
each on ``PYTHONPATH``. ``--pause 0.5`` times each block as the benchmark times a case
instead: 30 calls after half a second of sleep and a quarter of a second of calls.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
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
    time.sleep(pause)
    start = time.perf_counter()
    while time.perf_counter() - start < 0.25:
        fn()
    return timed(fn, 30, 0)


def compare(xs: list[torch.Tensor], n: int, pause: float = 0.0) -> tuple[float, float]:
    """Median ms of gradclip's and torch's clip of ``xs``: three blocks each, taking
    turns (max_norm 1e30: both multiply, by 1, so nothing decays)."""
    params = []
    for x in xs:
        p = torch.nn.Parameter(torch.empty_like(x))
        p.grad = x
        params.append(p)
    ours, theirs = [], []
    for _ in range(3):
        ours.append(block(lambda: gc.clip_by_global_norm_(xs, 1e30, eps=1e-6), n, pause))
        theirs.append(
            block(lambda: torch.nn.utils.clip_grad_norm_(params, 1e30, foreach=True), n, pause)
        )
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pause", type=float, default=0.0, help="seconds of sleep per block")
    pause = ap.parse_args().pause
    print("gradclip from", gc.__file__, f"(pause {pause} s)")
    for name, make in shapes.SETS.items():
        n = 60 if name == "2000x256" else 200
        for dtype in (torch.float32, torch.bfloat16):
            xs = [torch.randn(s, device="cuda").to(dtype) for s in make()]
            a, b = compare(xs, n, pause)
            print(f"{name:11s} {dtype!s:15s} gradclip {a:7.3f} ms  torch {b:7.3f} ms  {a / b:.3f}")


if __name__ == "__main__":
    main()
