"""gradclip's in-place clip against torch's ``clip_grad_norm_`` on CUDA, in long
alternating blocks (``bash benchmarks/gpu.sh ab``).

The benchmark's GPU rows are medians of a few dozen calls per case, each case after
half a second of quiet; calls of a millisecond bound by the host move by tens of
per cent between such runs. Here each set is timed in three blocks of ``N`` calls per
side, the two sides taking turns, and the median block is kept: the steadier figure
for "as fast as torch's clip". To compare two versions of gradclip, run it once with
each on ``PYTHONPATH``.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes
from gpu_profile import timed

import gradclip as gc


def compare(xs: list[torch.Tensor], n: int) -> tuple[float, float]:
    """Median ms of gradclip's and torch's clip of ``xs``: three blocks of ``n`` calls
    each, taking turns (max_norm 1e30: both multiply, by 1, so nothing decays)."""
    params = []
    for x in xs:
        p = torch.nn.Parameter(torch.empty_like(x))
        p.grad = x
        params.append(p)
    ours, theirs = [], []
    for _ in range(3):
        ours.append(timed(lambda: gc.clip_by_global_norm_(xs, 1e30, eps=1e-6), n, 20))
        theirs.append(
            timed(lambda: torch.nn.utils.clip_grad_norm_(params, 1e30, foreach=True), n, 20)
        )
    return statistics.median(ours), statistics.median(theirs)


def main() -> None:
    print("gradclip from", gc.__file__)
    for name, make in shapes.SETS.items():
        n = 60 if name == "2000x256" else 200
        for dtype in (torch.float32, torch.bfloat16):
            xs = [torch.randn(s, device="cuda").to(dtype) for s in make()]
            a, b = compare(xs, n)
            print(f"{name:11s} {dtype!s:15s} gradclip {a:7.3f} ms  torch {b:7.3f} ms  {a / b:.3f}")


if __name__ == "__main__":
    main()
