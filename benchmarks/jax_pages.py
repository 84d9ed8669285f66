"""Where a jitted functional clip's time goes on the CPU: the fresh output's pages.

A jitted clip returns new arrays, and on Linux an allocation as large as a big leaf
is a fresh ``mmap`` on each call, whose pages the kernel hands out and zeroes one
4 KiB page at a time as the output is first written. This script times three jitted
calls on one shape set (the multiply alone, gradclip's clip, optax's clip) with their
user and system CPU time per call, in two child processes taking turns: one as the
environment has it, one with ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1`` (glibc 2.35 or
later), which has ``malloc`` ask for transparent huge pages on its large
allocations, so the kernel hands out the output 2 MiB at a time. Each is timed a
second time with its argument donated (``donate_argnums=0``, a fresh copy of the
gradients made before each call, untimed): the output is written over the input,
no fresh pages at all, so what remains is the clip's own reads and writes. (These
cases run here, in processes of their own, and not in ``bench.py``: their copies'
allocations slowed the case timed after them there.) Run it as
``python benchmarks/jax_pages.py [--set gpt2-small] [--dtype float32]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
HUGE = "glibc.malloc.hugetlb=1"


def child(set_name: str, dtype: str, calls: int, smoke: bool) -> dict[str, list[float]]:
    """Median wall ms and mean user and system ms per call of each case."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax

    sys.path.insert(0, str(HERE))
    import shapes

    import gradclip

    shape_list = shapes.SETS[set_name]()
    if smoke:  # tiny, for the test suite: the same structure, a few elements per tensor
        shape_list = [tuple(min(d, 3) for d in s) for s in shape_list[:12]]
    rng = np.random.default_rng(0)
    grads = [
        jnp.asarray(rng.standard_normal(s, dtype=np.float32), dtype=dtype) for s in shape_list
    ]
    m = jnp.asarray(1.0, jnp.float32)
    tx = optax.clip_by_global_norm(1.0)
    fns = {
        "multiply only": lambda g, m: [x * m.astype(x.dtype) for x in g],
        "gradclip": lambda g, m: gradclip.clip_by_global_norm(g, m),
        "optax": lambda g, m: tx.update(g, None)[0],
    }
    out = {}
    for donate in (False, True):
        # donated: the output is written over the argument, a fresh copy per call
        arg = (lambda: [jnp.copy(x) for x in grads]) if donate else (lambda: grads)
        for name, f in fns.items():
            fn = jax.jit(f, donate_argnums=0 if donate else ())
            key = f"{name} (jit{', donated' if donate else ''})"
            out[key] = _timed(lambda g, fn=fn: fn(g, m), arg, jax.block_until_ready, calls)
            if donate:  # really donated: XLA took the copy (it only warns when it cannot)
                g = arg()
                jax.block_until_ready(fn(g, m))
                assert all(x.is_deleted() for x in g), key
    return out


def _timed(
    call: Callable[[Any], Any], arg: Callable[[], Any], wait: Callable[[Any], Any], calls: int
) -> list[float]:
    """Median wall ms and mean user and system CPU ms of ``call(arg())``, after 3
    calls; ``arg()`` is made (and waited for) before each call, untimed."""
    times, user, system = [], 0.0, 0.0
    for i in range(3 + calls):
        a = arg()
        wait(a)
        r0, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        wait(call(a))
        wall, r1 = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        if i >= 3:
            times.append(wall)
            user += r1.ru_utime - r0.ru_utime
            system += r1.ru_stime - r0.ru_stime
    return [statistics.median(times) * 1e3, user / calls * 1e3, system / calls * 1e3]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--set", default="gpt2-small")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--calls", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2, help="child processes per setting")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, for the test suite")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.set, args.dtype, args.calls, args.smoke)))
        return 0
    thp = Path("/sys/kernel/mm/transparent_hugepage/enabled")
    print(f"transparent huge pages: {thp.read_text().strip() if thp.exists() else '?'}")
    print(f"C library: {' '.join(platform.libc_ver()) or '?'}")
    old = os.environ.get("GLIBC_TUNABLES")
    settings = {"as is": old, HUGE: f"{old}:{HUGE}" if old else HUGE}
    runs: dict[str, list[dict[str, list[float]]]] = {s: [] for s in settings}
    cmd = [sys.executable, __file__, "--child", "--set", args.set, "--dtype", args.dtype]
    cmd += ["--calls", str(args.calls), *(["--smoke"] if args.smoke else [])]
    for _ in range(args.rounds):
        for name, tunables in settings.items():
            env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
            if tunables:
                env["GLIBC_TUNABLES"] = tunables
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            runs[name].append(json.loads(done.stdout.splitlines()[-1]))
    print(f"\n{args.set} {args.dtype}, ms per call: median wall (user, system CPU)")
    for name, results in runs.items():
        print(f"  {name}")
        for case in results[0]:
            cells = ", ".join(
                f"{r[case][0]:.2f} ({r[case][1]:.0f}, {r[case][2]:.0f})" for r in results
            )
            print(f"    {case:<30}{cells}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
