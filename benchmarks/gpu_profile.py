"""Where the time of one in-place clip goes on a GPU (``bash benchmarks/gpu.sh profile``).

For the GPT-2 float32 and ResNet-50 bfloat16 sets: the wall time (host and device,
synchronised) of torch's ``_foreach_norm`` variants, gradclip's norm and clip, and
torch's ``clip_grad_norm_``; then torch.profiler's table of one gradclip call (which
kernels ran, how long the host spent in each op).
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import shapes

import gradclip as gc


def timed(fn, n=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    ts = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts) * 1e3


def main() -> None:
    for name, dtype in (("gpt2-small", torch.float32), ("resnet-50", torch.bfloat16)):
        profile(name, dtype)


def profile(name: str, dtype: torch.dtype) -> None:
    xs = [torch.randn(s, device="cuda").to(dtype) for s in shapes.SETS[name]()]
    params = []
    for x in xs:
        p = torch.nn.Parameter(torch.empty_like(x))
        p.grad = x
        params.append(p)
    rows = {
        "_foreach_norm(xs, 2)": lambda: torch._foreach_norm(xs, 2),
        "_foreach_norm(xs, 2, float32)": lambda: torch._foreach_norm(xs, 2, dtype=torch.float32),
        "_foreach_norm(xs, 2, float64)": lambda: torch._foreach_norm(xs, 2, dtype=torch.float64),
        "_foreach_norm(xs, inf)": lambda: torch._foreach_norm(xs, float("inf")),
        "_foreach_mul_(xs, 0-d same dtype)": lambda: torch._foreach_mul_(
            xs, torch.ones((), device="cuda", dtype=dtype)
        ),
        "gradclip global_norm": lambda: gc.global_norm(xs),
        "gradclip clip_by_global_norm_ (1e30: no clip)": lambda: gc.clip_by_global_norm_(xs, 1e30),
        "torch clip_grad_norm_ (1e30)": lambda: torch.nn.utils.clip_grad_norm_(params, 1e30),
    }
    print(f"\n{name} {dtype}: {len(xs)} tensors")
    for label, fn in rows.items():
        print(f"  {label:<48}{timed(fn):8.3f} ms")
    with torch.profiler.profile(
        activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    ) as prof:
        gc.clip_by_global_norm_(xs, 1e30)
        torch.cuda.synchronize()
    print(
        prof.key_averages().table(sort_by="cpu_time_total", row_limit=25, max_name_column_width=60)
    )


if __name__ == "__main__":
    main()
