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


def timed(fn, n=20, warmup=3):
    """Median wall time (ms) of ``n`` synchronised calls, after ``warmup`` untimed ones."""
    for _ in range(warmup):
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
    for name, dtype in (
        ("gpt2-small", "float32"),
        ("resnet-50", "bfloat16"),
        ("2000x256", "float32"),
    ):
        profile_jax(name, dtype)
    for name in ("gpt2-small", "2000x256"):
        profile_cupy(name)


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


def profile_jax(name: str, dtype: str) -> None:
    """Jitted norms and clips on the GPU: the ladder (what gradclip runs there) against
    the ``lax.cond`` guard (what it runs on the CPU), one variadic reduction instead of
    one reduction per rung, the plain sum, and optax."""
    import jax
    import jax.numpy as jnp
    import optax

    from gradclip import _tree
    from gradclip._backends import _jax

    g = [jnp.asarray(torch.randn(s).numpy()).astype(dtype) for s in shapes.SETS[name]()]

    def variadic(parts):
        acc = _jax._acc(parts)
        _, ks = _jax._LADDER[acc]
        zero = jnp.zeros((), acc)

        def one(x):
            x = x.reshape(-1).astype(acc)
            ops = tuple(jnp.square(x * acc.type(2.0**k)) for k in ks)
            return jax.lax.reduce(
                ops, (zero,) * len(ks), lambda a, b: tuple(u + v for u, v in zip(a, b)), (0,)
            )

        return _jax.ladder_root([sum(t) for t in zip(*map(one, parts))], acc)

    def on_parts(fn):
        return jax.jit(lambda g: fn(_jax.parts(_tree.flatten(g))))

    clip = optax.clip_by_global_norm(1.0)
    rows = {
        "gradclip global_norm (ladder)": jax.jit(gc.global_norm),
        "guarded_norm (lax.cond)": on_parts(_jax.guarded_norm),
        "ladder, one variadic reduce per part": on_parts(variadic),
        "plain sum of squares": jax.jit(
            lambda g: jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in g))
        ),
        "optax.global_norm": jax.jit(optax.global_norm),
        "gradclip clip_by_global_norm": jax.jit(lambda g: gc.clip_by_global_norm(g, 1.0)),
        "optax clip_by_global_norm": jax.jit(lambda g: clip.update(g, None)[0]),
        "multiply only": jax.jit(lambda g: [x * jnp.asarray(0.5, x.dtype) for x in g]),
    }
    print(f"\njax {name} {dtype}: {len(g)} leaves")
    for label, fn in rows.items():
        print(f"  {label:<48}{timed(lambda fn=fn: jax.block_until_ready(fn(g))):8.3f} ms")


def profile_cupy(name: str) -> None:
    """Where the host time of a CuPy in-place clip goes (cProfile, 50 calls)."""
    import cProfile
    import pstats

    import cupy as cp

    xs = [cp.asarray(torch.randn(s).numpy()) for s in shapes.SETS[name]()]
    call = lambda: gc.clip_by_global_norm_(xs, 1e30)  # noqa: E731
    print(f"\ncupy {name}: {timed(call):.3f} ms a call")
    with cProfile.Profile() as prof:
        for _ in range(50):
            call()
        cp.cuda.Device().synchronize()
    pstats.Stats(prof).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
