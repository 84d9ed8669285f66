"""Launching the multi-process tests: gloo ranks started once per test module, and
scripts run in a fresh interpreter (JAX's device count is set before jax is imported).

Nothing here imports torch or jax at import time: the JAX script imports this module.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import pickle
import socket
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest


def record(out: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
    """``out[name] = fn()``, or the traceback: one failing case fails its tests only."""
    try:
        out[name] = fn()
    except Exception:
        out[name] = {"error": traceback.format_exc()}


def run_ranks(
    target: Callable[..., None], world: int, out_dir: str, preload: list[str], timeout_s: float
) -> list[Any]:
    """Start ``world`` processes running ``target(rank, world, init_method, out_dir)``,
    wait at most ``timeout_s``, and load what each rank pickled (``rank{r}.pkl``).

    The start method is ``forkserver``: no child inherits pytest's threads, and the
    modules in ``preload`` (torch, DTensor) are imported once in the server, not once
    per rank.
    """
    mp = pytest.importorskip("torch.multiprocessing")
    multiprocessing.set_forkserver_preload(preload)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        init = f"tcp://127.0.0.1:{s.getsockname()[1]}"
    ctx = mp.start_processes(
        target, args=(world, init, out_dir), nprocs=world, join=False, start_method="forkserver"
    )
    deadline = time.monotonic() + timeout_s
    try:
        while not ctx.join(timeout=max(0.1, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(f"{world} gloo processes did not finish in {timeout_s} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    out = []
    for r in range(world):
        with open(f"{out_dir}/rank{r}.pkl", "rb") as fh:
            out.append(pickle.load(fh))
    return out


def gloo_rank(
    rank: int, world: int, init_method: str, out_dir: str, run: Callable[[int], Any]
) -> None:
    """One rank: join the gloo group, ``run(rank)``, pickle its result."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=init_method, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    try:
        results = run(rank)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(results, fh)


def run_json_script(script: Path, env: dict[str, str], timeout_s: float) -> Any:
    """Run ``script`` in a fresh interpreter with ``env`` added to this process's
    environment (and its import path); the JSON on the last line of its stdout."""
    full = {**os.environ, **env, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            env=full,
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"{script.name} did not finish in {timeout_s} s")
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
