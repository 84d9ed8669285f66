"""One rank of the torch.distributed tests: gloo on localhost, started by
tests/test_distributed_torch.py with ``torch.multiprocessing`` (spawn).

Every rank builds the same full gradients (``full_grads``), keeps its shard, runs
gradclip on it and pickles what it got (norms, clipped shards, errors) to
``out_dir/rank{r}.pkl``; the test compares them with the float64 NumPy norm of the
full gradients. Nothing here is a pytest test.
"""

from __future__ import annotations

import math
import os
import pickle
import traceback
from datetime import timedelta
from typing import Any

import numpy as np

ORDS = (2.0, 1.0, math.inf)
MAX_NORM = 1.0


def full_grads(world: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """The full float32 gradients every rank starts from (the same on every rank)."""
    rng = np.random.default_rng(100 + world)
    shapes = {
        "w": (3 * world, 5),  # rows sharded over all ranks
        "b": (2 * world,),  # sharded over all ranks
        "ln": (4,),  # replicated on every rank
        "ln2": (2, 3),  # row i on the ranks of data-parallel index i (grid only)
        "emb": (6, 3),  # tied: on the first and last rank only (grid only)
        "part": (world, 7),  # row r is rank r's pending-sum part (DTensor Partial)
    }
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def local_rows(full: np.ndarray, world: int, rank: int) -> np.ndarray:
    """Rank ``rank``'s block of rows of ``full`` (even split)."""
    n = full.shape[0] // world
    return full[rank * n : (rank + 1) * n]


# -- the cases ------------------------------------------------------------------------------


def _norms(gc: Any, grads: Any, **kw: Any) -> dict[float, float]:
    return {p: gc.global_norm(grads, ord=p, **kw).item() for p in ORDS}


def _plain(torch: Any, world: int, rank: int, scale: float = 1.0) -> dict[str, Any]:
    f = full_grads(world, scale)
    return {
        "w": torch.from_numpy(local_rows(f["w"], world, rank).copy()),
        "b": torch.from_numpy(local_rows(f["b"], world, rank).copy()),
        "ln": torch.from_numpy(f["ln"].copy()),
    }


def run_cases(world: int, rank: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    import gradclip as gc

    out: dict[str, Any] = {}
    world_group = dist.group.WORLD

    def case(name: str, fn: Any) -> None:
        try:
            out[name] = fn()
        except Exception:
            out[name] = {"error": traceback.format_exc()}

    def shards_only() -> Any:
        g = _plain(torch, world, rank)
        del g["ln"]
        return {"norms": _norms(gc, g, process_group=world_group)}

    def replicated_tree() -> Any:
        g = _plain(torch, world, rank)
        marks = {"w": False, "b": None, "ln": True}
        return {"norms": _norms(gc, g, process_group=world_group, replicated=marks)}

    def replicated_fn() -> Any:
        g = _plain(torch, world, rank)
        return {
            "norms": _norms(gc, g, process_group=[world_group], replicated=lambda p: "ln" in p)
        }

    def unmarked() -> Any:  # ln counted world times: what peers get wrong
        return {"norms": _norms(gc, _plain(torch, world, rank), process_group=world_group)}

    def huge() -> Any:
        g = _plain(torch, world, rank, scale=1e30)
        return {"norms": _norms(gc, g, process_group=world_group, replicated=lambda p: "ln" in p)}

    def mesh_as_group() -> Any:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (world,))
        g = _plain(torch, world, rank)
        return {"norms": _norms(gc, g, process_group=mesh, replicated=lambda p: "ln" in p)}

    def clip_inplace() -> Any:
        g = _plain(torch, world, rank)
        norm = gc.clip_by_global_norm_(
            g, MAX_NORM, process_group=world_group, replicated={"w": False, "b": False, "ln": True}
        )
        return {"norm": norm.item(), "clipped": {k: v.numpy() for k, v in g.items()}}

    def clip_functional() -> Any:
        g = _plain(torch, world, rank)
        clipped, norm = gc.clip_by_global_norm(
            g, MAX_NORM, ord=1, process_group=world_group, replicated=lambda p: "ln" in p
        )
        return {"norm": norm.item(), "clipped": {k: v.numpy() for k, v in clipped.items()}}

    def torch_dropin() -> Any:
        """gradclip.torch.clip_grad_norm_ and clip_before_step with the replicated
        parameter given as a parameter, not a path."""
        import gradclip.torch as gct

        out = {}
        for how in ("clip_grad_norm_", "clip_before_step"):
            params = {
                k: torch.nn.Parameter(torch.zeros_like(v))
                for k, v in _plain(torch, world, rank).items()
            }
            for k, v in _plain(torch, world, rank).items():
                params[k].grad = v
            if how == "clip_grad_norm_":
                norm = gct.clip_grad_norm_(
                    params.values(), MAX_NORM, process_group=world_group, replicated=[params["ln"]]
                )
            else:
                opt = torch.optim.SGD(params.values(), lr=0.0)
                handle = gct.clip_before_step(
                    opt, MAX_NORM, process_group=world_group, replicated={params["ln"]: True}
                )
                opt.step()
                norm = handle.last_norm
            out[how] = {
                "norm": norm.item(),
                "clipped": {k: v.grad.numpy() for k, v in params.items()},
            }
        return out

    def nonfinite() -> Any:
        res = {}
        for bad, where in ((math.nan, 1), (math.inf, 0)):
            g = _plain(torch, world, rank)
            if rank == where:
                g["w"][0, 0] = bad
            res[str(bad)] = _norms(
                gc, g, process_group=world_group, replicated=lambda p: "ln" in p
            )
        return res

    def overlap_error() -> Any:
        try:
            gc.global_norm(_plain(torch, world, rank), process_group=[world_group, world_group])
        except ValueError as e:
            return {"raised": str(e)}
        return {"raised": None}

    def dtensor_1d() -> Any:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor

        mesh = init_device_mesh("cpu", (world,))
        f = full_grads(world)

        def make() -> dict[str, Any]:
            return {
                "w": distribute_tensor(torch.tensor(f["w"]), mesh, [Shard(0)]),
                "b": distribute_tensor(torch.tensor(f["b"]), mesh, [Shard(0)]),
                "ln": distribute_tensor(torch.tensor(f["ln"]), mesh, [Replicate()]),
                "part": DTensor.from_local(
                    torch.from_numpy(f["part"][rank].copy()), mesh, [Partial()]
                ),
            }

        g = make()
        norms = _norms(gc, g)
        norm_type = type(gc.global_norm(g)).__name__
        norm = gc.clip_by_global_norm_(g, MAX_NORM)
        clipped = {k: v.full_tensor().numpy() for k, v in g.items()}
        fclipped, fnorm = gc.clip_by_global_norm(make(), MAX_NORM, ord=math.inf)
        return {
            "norms": norms,
            "norm_type": norm_type,
            "norm": norm.item(),
            "clipped": clipped,
            "fnorm": fnorm.item(),
            "fclipped": {k: v.full_tensor().numpy() for k, v in fclipped.items()},
            "fplacements": {k: str(v.placements) for k, v in fclipped.items()},
        }

    case("shards_only", shards_only)
    case("replicated_tree", replicated_tree)
    case("replicated_fn", replicated_fn)
    case("unmarked", unmarked)
    case("huge", huge)
    case("mesh_as_group", mesh_as_group)
    case("clip_inplace", clip_inplace)
    case("clip_functional", clip_functional)
    case("torch_dropin", torch_dropin)
    case("nonfinite", nonfinite)
    case("overlap_error", overlap_error)
    case("dtensor_1d", dtensor_1d)
    if world == 4:
        case("grid", lambda: _grid(torch, dist, gc, rank))
        case("dtensor_2d", lambda: _dtensor_2d(torch, gc, rank))
    return out


def _grid(torch: Any, dist: Any, gc: Any, rank: int) -> Any:
    """A 2 x 2 grid: tensor-parallel groups {0,1},{2,3} and data-parallel groups
    {0,2},{1,3}; w and b sharded over all four ranks, ln2 sharded over the data-parallel
    index and replicated over tensor parallelism, emb tied between ranks 0 and 3."""
    tp = [dist.new_group([0, 1]), dist.new_group([2, 3])][rank // 2]
    dp = [dist.new_group([0, 2]), dist.new_group([1, 3])][rank % 2]
    emb_group = dist.new_group([0, 3])
    f = full_grads(4)
    g = _plain(torch, 4, rank)
    del g["ln"]
    g["ln2"] = torch.from_numpy(f["ln2"][rank // 2].copy())
    marks = {"w": False, "b": False, "ln2": tp}
    if rank in (0, 3):
        g["emb"] = torch.from_numpy(f["emb"].copy())
        marks["emb"] = emb_group
    wrong = dict(marks, ln2=False)
    return {
        "norms": _norms(gc, g, process_group=[tp, dp], replicated=marks),
        "unmarked": _norms(gc, g, process_group=[tp, dp], replicated=wrong),
    }


def _dtensor_2d(torch: Any, gc: Any, rank: int) -> Any:
    """A (2, 2) mesh: w sharded on both dimensions (5 columns: an uneven split), b
    sharded on one and replicated on the other, ln replicated, plus a plain tensor."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))
    f = full_grads(4)

    def dt(k: str, placements: list[Any]) -> Any:
        return distribute_tensor(torch.tensor(f[k]), mesh, placements)

    g = {
        "w": dt("w", [Shard(0), Shard(1)]),
        "b": dt("b", [Shard(0), Replicate()]),
        "ln": dt("ln", [Replicate(), Replicate()]),
        "emb": torch.from_numpy(f["emb"].copy()),  # plain: the same on every rank
    }
    norms = _norms(gc, g)
    norm = gc.clip_by_global_norm_(g, MAX_NORM)
    clipped = {
        k: (v.full_tensor() if hasattr(v, "full_tensor") else v).numpy() for k, v in g.items()
    }
    return {"norms": norms, "norm": norm.item(), "clipped": clipped}


def worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """``torch.multiprocessing.spawn`` target: run every case, pickle the results."""
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=init_method,
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        results = run_cases(world, rank)
    finally:
        dist.destroy_process_group()
    with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as fh:
        pickle.dump(results, fh)
