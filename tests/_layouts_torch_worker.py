"""One rank of the parallel-layout tests: 4 gloo processes on localhost, started once
by tests/test_layouts_torch.py.

Every layout of docs/parallel_layouts.md is built here from full float32 gradients
that every rank can make (``full_model``; for FSDP2 those of a real ``fully_shard``
model, gathered with torch's own ``full_tensor``): each rank keeps its part, calls
gradclip, and pickles the norms, the collectives each call issued, and its part before
and after clipping. The 2-rank layouts run on the pairs of ranks {0, 1} and {2, 3} (two
independent 2-rank jobs, different gradients); the 2 x 2 layouts on all four. Nothing
here is a pytest test.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from _launch import gloo_rank, record

ORDS = (2.0, 1.0, math.inf)
MAX_NORM = 1.0
WORLD = 4

# The collectives of torch.distributed and of DTensor (functional collectives), as the
# dispatcher sees them; waits and autograd wrappers are not collectives.
_NOT_COLLECTIVES = ("wait_tensor", "_wrap_tensor_autograd")


def full_model(case: str, seed: int = 0) -> dict[str, np.ndarray]:
    """The full float32 gradients of a case (``seed``: the pair, for 2-rank cases)."""
    shapes = {
        "dp": {"w": (4, 3), "b": (3,)},
        "zero": {"w": (6, 3), "b": (4,)},
        "tp": {"w1": (6, 5), "w2": (3, 4), "b2": (3,), "ln": (5,)},
        "ep": {"experts": (4, 3, 2), "router": (3, 4)},
        "pp": {"l0w": (3, 5), "l0b": (5,), "l1w": (5, 2)},
        "mixed": {"w": (4, 3), "b": (3,), "ln": (5,)},
        "two_meshes": {"a": (4, 3), "b": (2, 5), "c": (3,)},
        "data_x_tensor": {"w1": (8, 3), "ln": (5,), "b": (8,), "extra": (2, 2)},
        "data_x_expert": {"dense": (8, 3), "experts": (4, 3, 2), "router": (3, 4)},
        "pipeline_x_data": {"s0w": (6, 4), "s0b": (4,), "s1w": (4, 3), "s1b": (3,)},
    }[case]
    rng = np.random.default_rng([len(case), seed, 23])
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


def split(x: np.ndarray, parts: int, index: int, axis: int = 0) -> np.ndarray:
    """Block ``index`` of ``parts`` along ``axis`` (as ``torch.chunk``, even here)."""
    return np.array_split(x, parts, axis=axis)[index].copy()


# -- counting collectives ------------------------------------------------------------------


def _counter(torch: Any) -> Any:
    from torch.utils._python_dispatch import TorchDispatchMode

    class Collectives(TorchDispatchMode):
        """Records every collective the dispatcher sees inside ``with``."""

        def __init__(self) -> None:
            super().__init__()
            self.ops: list[str] = []

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None):
            if func.namespace in ("c10d", "_c10d_functional") and not any(
                n in str(func) for n in _NOT_COLLECTIVES
            ):
                self.ops.append(str(func))
            return func(*args, **(kwargs or {}))

    return Collectives


# -- one layout, every call ----------------------------------------------------------------


def _local(x: Any) -> np.ndarray:
    x = x.to_local() if hasattr(x, "to_local") else x
    return x.detach().float().numpy().copy()  # bfloat16 exactly, as float32


def _calls(torch: Any, gc: Any, make: Any, **options: Any) -> dict[str, Any]:
    """The norms (``ord`` 2, 1, inf) and the collectives of each call, then an in-place
    clip (``ord`` 2) and a functional one (``ord`` 1) of fresh gradients."""
    count = _counter(torch)
    out: dict[str, Any] = {"norms": {}, "collectives": {}}
    for p in ORDS:
        grads = make()
        with count() as c:
            norm = gc.global_norm(grads, ord=p, **options)
        out["norms"][p] = norm.item()
        out["collectives"][p] = c.ops
        out["norm_type"] = type(norm).__name__
        out["norm_dtype"] = str(norm.dtype)
    grads = make()
    out["before"] = {k: _local(v) for k, v in grads.items()}
    with count() as c:
        norm = gc.clip_by_global_norm_(grads, MAX_NORM, **options)
    out["collectives"]["clip_"] = c.ops
    out["clip_norm"] = norm.item()
    out["after"] = {k: _local(v) for k, v in grads.items()}
    clipped, norm1 = gc.clip_by_global_norm(make(), MAX_NORM, ord=1, **options)
    out["clip1_norm"] = norm1.item()
    out["after1"] = {k: _local(v) for k, v in clipped.items()}
    out["types"] = {k: type(v).__name__ for k, v in clipped.items()}
    return out


def _nonfinite(torch: Any, gc: Any, make: Any, bad_rank: int, rank: int, **options: Any):
    """NaN in one element of one rank's gradients, under each ``nonfinite`` policy."""
    out = {}
    for policy in ("propagate", "zero", "raise"):
        grads = make()
        first = next(iter(grads.values()))
        if rank == bad_rank:
            (first.to_local() if hasattr(first, "to_local") else first).view(-1)[0] = math.nan
        before = {k: _local(v) for k, v in grads.items()}
        try:
            norm = gc.clip_by_global_norm_(grads, MAX_NORM, nonfinite=policy, **options)
            out[policy] = {"norm": norm.item(), "raised": None}
        except FloatingPointError as e:
            out[policy] = {"norm": None, "raised": str(e)}
        out[policy]["before"] = before
        out[policy]["after"] = {k: _local(v) for k, v in grads.items()}
    return out


# -- the layouts ---------------------------------------------------------------------------


def run_cases(rank: int) -> dict[str, Any]:
    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    import gradclip as gc

    out: dict[str, Any] = {}

    def case(name: str, fn: Any) -> None:
        record(out, name, fn)

    def t(a: np.ndarray) -> Any:
        return torch.from_numpy(a.copy())

    # every rank creates every group, in the same order
    pairs = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    pair, i = rank // 2, rank % 2  # this rank's 2-rank job and its index in it
    pg = pairs[pair]
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("outer", "inner"))
    outer, inner = mesh.get_group("outer"), mesh.get_group("inner")  # {0,2},{1,3} / {0,1},{2,3}
    world_mesh = init_device_mesh("cpu", (WORLD,), mesh_dim_names=("world",))
    world = world_mesh.get_group("world")
    pair_mesh = mesh["inner"]  # the 1-D mesh of this rank's pair

    # -- 2 ranks ---------------------------------------------------------------------------

    def dp() -> Any:
        f = full_model("dp", pair)

        def make() -> Any:
            return {k: t(v) for k, v in f.items()}  # every rank holds every gradient

        return {
            "replicated_true": _calls(torch, gc, make, process_group=pg, replicated=True),
            "sharded_false": _calls(torch, gc, make, process_group=pg, sharded=False),
            "local": _calls(torch, gc, make),
        }

    def zero() -> Any:
        f = full_model("zero", pair)

        def make() -> Any:
            return {k: t(split(v, 2, i)) for k, v in f.items()}

        return {
            "process_group": _calls(torch, gc, make, process_group=pg),
            "sharded": _calls(torch, gc, make, sharded=pg),
        }

    def tp() -> Any:
        f = full_model("tp", pair)

        def make() -> Any:
            return {
                "w1": t(split(f["w1"], 2, i, axis=0)),  # column-parallel: output rows
                "w2": t(split(f["w2"], 2, i, axis=1)),  # row-parallel: input columns
                "b2": t(f["b2"]),  # the row-parallel bias: the same on both ranks
                "ln": t(f["ln"]),
            }

        reps = {"w1": False, "w2": False, "b2": True, "ln": True}
        shs = {"w1": pg, "w2": pg, "b2": None, "ln": None}
        lays = {
            "w1": gc.Layout(sharded=pg),
            "w2": gc.Layout(sharded=pg),
            "b2": gc.Layout(replicated=pg),
            "ln": gc.Layout(replicated=True),
        }
        return {
            "replicated": _calls(torch, gc, make, process_group=pg, replicated=reps),
            "sharded": _calls(torch, gc, make, sharded=shs),
            "layout": _calls(torch, gc, make, sharded=lays),
            "unmarked": _calls(torch, gc, make, process_group=pg),  # b2, ln counted twice
            "bfloat16": _calls(
                torch, gc, lambda: {k: v.bfloat16() for k, v in make().items()}, sharded=shs
            ),
        }

    def ep() -> Any:
        f = full_model("ep", pair)

        def make() -> Any:
            return {"experts": t(split(f["experts"], 2, i)), "router": t(f["router"])}

        return {
            "sharded": _calls(torch, gc, make, sharded={"experts": pg, "router": None}),
            "replicated": _calls(
                torch, gc, make, process_group=pg, replicated={"experts": False, "router": True}
            ),
        }

    def pp() -> Any:
        f = full_model("pp", pair)
        stage = [["l0w", "l0b"], ["l1w"]][i]  # each stage holds its own layers

        def make() -> Any:
            return {k: t(f[k]) for k in stage}

        return {
            "process_group": _calls(torch, gc, make, process_group=pg),
            "sharded": _calls(torch, gc, make, sharded=pg),
        }

    def mixed() -> Any:
        """DTensors and plain tensors in one call (an FSDP2 model with a parameter left
        out of fully_shard)."""
        f = full_model("mixed", pair)

        def make() -> Any:
            return {
                "w": distribute_tensor(t(f["w"]), pair_mesh, [Shard(0)]),
                "b": distribute_tensor(t(f["b"]), pair_mesh, [Replicate()]),
                "ln": t(f["ln"]),  # plain: the same on both ranks
            }

        return {"none": _calls(torch, gc, make)}

    def two_meshes() -> Any:
        """DTensors of two meshes over the same two ranks (torch.stack of their norms
        fails in torch's own clip_grad_norm_)."""
        f = full_model("two_meshes", pair)
        other = init_device_mesh("cpu", (2, 2), mesh_dim_names=("x", "y"))["y"]

        def make() -> Any:
            return {
                "a": distribute_tensor(t(f["a"]), pair_mesh, [Shard(0)]),
                "b": distribute_tensor(t(f["b"]), other, [Shard(1)]),
                "c": distribute_tensor(t(f["c"]), other, [Replicate()]),
            }

        return {"none": _calls(torch, gc, make)}

    # -- 2 x 2 -----------------------------------------------------------------------------

    def data_x_tensor() -> Any:
        """dp = outer ({0,2}, {1,3}), tp = inner ({0,1}, {2,3}): w1 split over tp and
        the same over dp; ln the same everywhere; b split over both (ZeRO beside TP)."""
        f = full_model("data_x_tensor")
        d, k = rank // 2, rank % 2  # dp index (which tp pair), tp index
        dp_g, tp_g = outer, inner

        def make() -> Any:
            return {
                "w1": t(split(f["w1"], 2, k)),
                "ln": t(f["ln"]),
                "b": t(split(f["b"], 4, 2 * d + k)),
                "extra": t(f["extra"]),
            }

        reps = {"w1": dp_g, "ln": True, "b": False, "extra": True}
        shs = {"w1": tp_g, "ln": None, "b": [dp_g, tp_g], "extra": None}
        lays = {
            "w1": gc.Layout(sharded=tp_g, replicated=dp_g),
            "ln": gc.Layout(replicated=True),
            "b": gc.Layout(sharded=True),
            "extra": gc.Layout(replicated=[dp_g, tp_g]),
        }
        dmesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "tp"))

        def make_dtensor() -> Any:
            return {
                "w1": distribute_tensor(t(f["w1"]), dmesh, [Replicate(), Shard(0)]),
                "ln": distribute_tensor(t(f["ln"]), dmesh, [Replicate(), Replicate()]),
                "b": distribute_tensor(t(f["b"]), dmesh, [Shard(0), Shard(0)]),
                "extra": t(f["extra"]),  # plain beside DTensors: the same everywhere
            }

        return {
            "replicated": _calls(torch, gc, make, process_group=[dp_g, tp_g], replicated=reps),
            "sharded": _calls(torch, gc, make, sharded=shs),
            "layout": _calls(torch, gc, make, sharded=lays),
            "dtensor": _calls(torch, gc, make_dtensor),
            "unmarked": _calls(torch, gc, make, process_group=[dp_g, tp_g]),
        }

    def data_x_expert() -> Any:
        """Dense weights split over all four ranks (FSDP over the world mesh), experts
        split over ep = inner and the same over edp = outer (their own 2-D mesh), a
        router the same everywhere: DTensors of two meshes and a plain tensor."""
        f = full_model("data_x_expert")
        e_idx = rank % 2
        emesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))
        edp, ep_g = emesh.get_group("edp"), emesh.get_group("ep")

        def make_dtensor() -> Any:
            return {
                "dense": distribute_tensor(t(f["dense"]), world_mesh, [Shard(0)]),
                "experts": distribute_tensor(t(f["experts"]), emesh, [Replicate(), Shard(0)]),
                "router": t(f["router"]),
            }

        def make() -> Any:
            return {
                "dense": t(split(f["dense"], 4, rank)),
                "experts": t(split(f["experts"], 2, e_idx)),
                "router": t(f["router"]),
            }

        lays = {
            "dense": world,
            "experts": gc.Layout(sharded=ep_g, replicated=edp),
            "router": None,
        }
        reps = {"dense": False, "experts": edp, "router": True}
        return {
            "dtensor": _calls(torch, gc, make_dtensor),
            "layout": _calls(torch, gc, make, sharded=lays),
            "replicated": _calls(torch, gc, make, process_group=[edp, ep_g], replicated=reps),
            "own_ep_norm": _calls(torch, gc, make, process_group=ep_g),  # NeMo's mistake
            "nonfinite_dtensor": _nonfinite(torch, gc, make_dtensor, 1, rank),
            "nonfinite_layout": _nonfinite(torch, gc, make, 2, rank, sharded=lays),
        }

    def pipeline_x_data() -> Any:
        """Stage = outer index ({0,1} stage 0, {2,3} stage 1) as pp = outer groups
        ({0,2}, {1,3}); within a stage, FSDP2 (fully_shard) over dp = inner."""
        from torch.distributed.fsdp import fully_shard

        stage = rank // 2
        pmesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("pp", "dp"))
        pp_g = pmesh.get_group("pp")

        def module() -> Any:
            return stage_module(torch, stage)

        model = module()
        fully_shard(model, mesh=pmesh["dp"])
        stage_input(torch, model, stage).backward()
        grads = {k: v.grad for k, v in model.named_parameters()}
        full = {k: v.full_tensor().numpy().copy() for k, v in grads.items()}
        snapshot = {k: v.to_local().clone() for k, v in grads.items()}

        def make_fsdp() -> Any:
            from torch.distributed.tensor import DTensor

            return {
                k: DTensor.from_local(
                    snapshot[k].clone(),
                    g.device_mesh,
                    g.placements,
                    shape=g.shape,
                    stride=g.stride(),
                )
                for k, g in grads.items()
            }

        f = full_model("pipeline_x_data")
        names = [["s0w", "s0b"], ["s1w", "s1b"]][stage]

        def make_plain() -> Any:
            return {k: t(f[k]) for k in names}  # DDP within the stage: the same on dp

        return {
            "fsdp": _calls(torch, gc, make_fsdp, process_group=pp_g),
            "full": full,
            "plain_sharded": _calls(torch, gc, make_plain, sharded=pp_g),
            "plain_replicated": _calls(
                torch,
                gc,
                make_plain,
                process_group=[pp_g, pmesh.get_group("dp")],
                replicated=pmesh.get_group("dp"),
            ),
        }

    def fsdp2_world() -> Any:
        """A real fully_shard model over the four ranks, clipped by gradclip.torch's
        clip_grad_norm_ and by the optimizer hook (torch's eps)."""
        from torch.distributed.fsdp import fully_shard

        import gradclip.torch as gct

        res: dict[str, Any] = {}
        for how in ("clip_grad_norm_", "clip_before_step"):
            model = stage_module(torch, 0)
            fully_shard(model, mesh=world_mesh)
            stage_input(torch, model, 0).backward()
            params = list(model.parameters())
            res["full"] = {
                n: p.grad.full_tensor().numpy().copy() for n, p in model.named_parameters()
            }
            res["before"] = {n: _local(p.grad) for n, p in model.named_parameters()}
            count = _counter(torch)
            with count() as c:
                if how == "clip_grad_norm_":
                    norm = gct.clip_grad_norm_(params, MAX_NORM)
                else:
                    opt = torch.optim.SGD(params, lr=0.0)
                    handle = gct.clip_before_step(opt, MAX_NORM)
                    opt.step()
                    norm = handle.last_norm
            res[how] = {
                "norm": norm.item(),
                "collectives": c.ops,
                "after": {n: _local(p.grad) for n, p in model.named_parameters()},
            }
        return res

    def dropin_layouts() -> Any:
        """gradclip.torch with sharded= given as parameters -> markers (the
        data x expert layout of plain tensors)."""
        import gradclip.torch as gct

        f = full_model("data_x_expert")
        emesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))
        edp, ep_g = emesh.get_group("edp"), emesh.get_group("ep")
        res: dict[str, Any] = {}
        for how in ("clip_grad_norm_", "clip_before_step", "get_total_norm"):
            local = {
                "dense": split(f["dense"], 4, rank),
                "experts": split(f["experts"], 2, rank % 2),
                "router": f["router"],
            }
            params = {k: torch.nn.Parameter(torch.zeros(v.shape)) for k, v in local.items()}
            for k, v in local.items():
                params[k].grad = t(v)
            marks = {
                params["dense"]: world,
                params["experts"]: gc.Layout(sharded=ep_g, replicated=edp),
                params["router"]: None,
            }
            if how == "clip_grad_norm_":
                norm = gct.clip_grad_norm_(params.values(), MAX_NORM, sharded=marks)
            elif how == "get_total_norm":
                grads = {params[k].grad: m for k, m in zip(params, marks.values())}
                norm = gct.get_total_norm([p.grad for p in params.values()], sharded=grads)
            else:
                opt = torch.optim.SGD(params.values(), lr=0.0)
                handle = gct.clip_before_step(opt, MAX_NORM, sharded=marks)
                opt.step()
                norm = handle.last_norm
            res[how] = {
                "norm": norm.item(),
                "before": local,
                "after": {k: _local(p.grad) for k, p in params.items()},
            }
        return res

    def errors() -> Any:
        """What a wrong layout gets: a clear error on every rank, before any collective."""
        msgs = {}
        g = {"w": torch.ones(2), "b": torch.ones(2)}
        emesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("edp", "ep"))
        for label, kw in {
            "both_options": {"sharded": pg, "replicated": True},
            "sharded_inside_world": {"sharded": {"w": world, "b": emesh.get_group("ep")}},
            "layout_missing_dim": {
                "sharded": {"w": world, "b": gc.Layout(sharded=emesh.get_group("ep"))}
            },
            "same_group_both": {"sharded": gc.Layout(sharded=pg, replicated=pg)},
            "replicated_beyond": {"process_group": pg, "replicated": {"w": world, "b": False}},
        }.items():
            try:
                gc.global_norm(g, **kw)
                msgs[label] = None
            except (ValueError, TypeError) as e:
                msgs[label] = f"{type(e).__name__}: {e}"
        return msgs

    case("dp", dp)
    case("zero", zero)
    case("tp", tp)
    case("ep", ep)
    case("pp", pp)
    case("mixed", mixed)
    case("two_meshes", two_meshes)
    case("data_x_tensor", data_x_tensor)
    case("data_x_expert", data_x_expert)
    case("pipeline_x_data", pipeline_x_data)
    case("fsdp2_world", fsdp2_world)
    case("dropin_layouts", dropin_layouts)
    case("errors", errors)
    return out


def stage_module(torch: Any, stage: int) -> Any:
    """A small model for one pipeline stage (or the whole model), the same weights on
    every rank."""
    torch.manual_seed(10 + stage)
    if stage == 0:
        return torch.nn.Sequential(torch.nn.Linear(6, 4), torch.nn.Tanh(), torch.nn.Linear(4, 6))
    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.LayerNorm(3))


def stage_input(torch: Any, model: Any, stage: int) -> Any:
    """The loss of one stage on an input the same on every rank."""
    torch.manual_seed(20 + stage)
    x = torch.randn(5, 6 if stage == 0 else 4)
    return (model(x) ** 2).sum() * 3.0


def worker(rank: int, world: int, init_method: str, out_dir: str) -> None:
    """``torch.multiprocessing`` target: run every case, pickle the results."""
    gloo_rank(rank, world, init_method, out_dir, run_cases)
