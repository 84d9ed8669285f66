"""One rank of the distributed optimizer-step test (tests/test_optimizer_step.py): gloo
on localhost, started with ``torch.multiprocessing``.

Every rank builds the same full parameters and gradients, keeps its rows of the weight
and the whole (replicated) bias, clips with ``clip_before_step(...,
nonfinite="skip", process_group=..., replicated=...)`` before each step of a fused
and a non-fused optimizer, and pickles its parameters and which steps were skipped
to ``out_dir/rank{r}.pkl``; the test compares them with :func:`reference`, torch's
clip and step on the full gradients in one process. Nothing here is a pytest test.
"""

from __future__ import annotations

import pickle
import traceback
from datetime import timedelta
from typing import Any

import numpy as np

WORLD = 2
STEPS = 8
BAD = {4}  # the steps where rank 1's rows of the weight's gradient hold a NaN
ROWS, COLS, BIAS = 3, 5, 4  # rows of the weight per rank
MAX_NORM = 1.0
OPTIMIZERS = ("AdamW-fused", "Adam-foreach")


def full_params() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    return {
        "w": rng.standard_normal((ROWS * WORLD, COLS)).astype(np.float32),
        "b": rng.standard_normal(BIAS).astype(np.float32),
    }


def full_grads(k: int) -> dict[str, np.ndarray]:
    """Step ``k``'s full gradients (norms from about 1 to 12: some steps clipped)."""
    rng = np.random.default_rng(200 + k)
    g = {
        "w": (rng.standard_normal((ROWS * WORLD, COLS)) * (0.2 + k % 3)).astype(np.float32),
        "b": (rng.standard_normal(BIAS) * (0.2 + k % 3)).astype(np.float32),
    }
    if k in BAD:
        g["w"][ROWS + 1, 2] = np.nan  # on rank 1 only
    return g


def rows(full: np.ndarray, rank: int) -> np.ndarray:
    return full[rank * ROWS : (rank + 1) * ROWS]


def make(name: str, params: list[Any]) -> Any:
    import torch

    if name == "AdamW-fused":
        return torch.optim.AdamW(params, lr=0.05, fused=True)
    return torch.optim.Adam(params, lr=0.05, foreach=True)


def reference(name: str) -> tuple[np.ndarray, np.ndarray]:
    """torch's clip on the full gradients, then the step; the bad steps left out."""
    import torch

    fp = full_params()
    w, b = (torch.nn.Parameter(torch.from_numpy(fp[k].copy())) for k in ("w", "b"))
    opt = make(name, [w, b])
    for k in range(STEPS):
        g = full_grads(k)
        w.grad, b.grad = torch.from_numpy(g["w"]), torch.from_numpy(g["b"])
        if bool(torch.isfinite(torch.nn.utils.clip_grad_norm_([w, b], MAX_NORM))):
            opt.step()
    return w.detach().numpy(), b.detach().numpy()


def worker(rank: int, world: int, init: str, out_dir: str) -> None:
    import torch
    import torch.distributed as dist

    import gradclip.torch as gct

    dist.init_process_group(
        "gloo", init_method=init, rank=rank, world_size=world, timeout=timedelta(seconds=60)
    )
    out: dict[str, Any] = {}
    try:
        for name in OPTIMIZERS:
            fp = full_params()
            w = torch.nn.Parameter(torch.from_numpy(rows(fp["w"], rank).copy()))
            b = torch.nn.Parameter(torch.from_numpy(fp["b"].copy()))
            opt = make(name, [w, b])
            handle = gct.clip_before_step(
                opt, MAX_NORM, nonfinite="skip", process_group=dist.group.WORLD, replicated=[b]
            )
            skipped = []
            for k in range(STEPS):
                g = full_grads(k)
                w.grad = torch.from_numpy(rows(g["w"], rank).copy())
                b.grad = torch.from_numpy(g["b"].copy())
                opt.step()
                skipped.append(bool(handle.last_skipped))
            out[name] = {
                "w": w.detach().numpy(),
                "b": b.detach().numpy(),
                "skipped": skipped,
                "step": float(opt.state[w]["step"]),
            }
    except Exception:
        out["error"] = traceback.format_exc()
    finally:
        with open(f"{out_dir}/rank{rank}.pkl", "wb") as fh:
            pickle.dump(out, fh)
        dist.destroy_process_group()
