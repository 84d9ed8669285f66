"""Every parallel layout in one call, on 4 gloo processes started once for the module.

tests/_layouts_torch_worker.py builds each layout (DP, ZeRO, TP, EP, PP and DTensors
beside plain tensors on 2 ranks; data x tensor, data x expert and pipeline x data on
a 2 x 2 grid; FSDP2's ``fully_shard`` on 4) from full gradients every rank can make,
and reports each rank's norms, the collectives of each call and its part of the
gradients before and after clipping. Each is checked here against the full model in
one process: the float64 norm (rounded to float32) within 2 float32 ulps, gradclip's
own single-process norm within 1e-6, and the clip as the full model's scale.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from _launch import run_ranks
from conftest import ref_norm

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _layouts_torch_worker as W  # noqa: E402

import gradclip as gc  # noqa: E402

pytestmark = pytest.mark.timeout(240)  # a hang in a collective fails, never blocks
SPAWN_TIMEOUT_S = 120  # 4 processes, torch imported once in the forkserver: ~15 s
RTOL = 1e-6
ULPS = 2


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    """The results of ranks 0..3: every case ran in one launch of 4 processes."""
    preload = ["torch", "torch.distributed.tensor", "torch._dynamo", "gradclip", W.__name__]
    out_dir = str(tmp_path_factory.mktemp("layouts"))
    return run_ranks(W.worker, W.WORLD, out_dir, preload, SPAWN_TIMEOUT_S)


def _case(ranks: list[dict[str, Any]], name: str) -> list[Any]:
    for r, res in enumerate(ranks):
        assert "error" not in res[name], f"rank {r}:\n{res[name]['error']}"
    return [res[name] for res in ranks]


def _single_process(arrays: list[np.ndarray], p: float) -> float:
    """gradclip's norm of the full model in this one process (float32)."""
    return gc.global_norm([torch.from_numpy(a) for a in arrays], ord=p).item()


def _assert_norm(got: list[float], arrays: list[np.ndarray], p: float, what: str) -> None:
    """Every rank the same number, within ``ULPS`` float32 ulps of the norm of the full
    model (float64, rounded to float32) and within ``RTOL`` of gradclip's own norm of
    it in one process (which, for ``ord=1``, is itself up to ~2 ulps off)."""
    assert len(set(got)) == 1, f"{what}, ord={p}: ranks disagree: {got}"
    exact = float(np.float32(ref_norm(arrays, p)))
    tol = ULPS * float(np.spacing(np.float32(exact)))
    assert abs(got[0] - exact) <= tol, f"{what}, ord={p}: {got[0]} vs {exact} (float64)"
    one = _single_process(arrays, p)
    np.testing.assert_allclose(got[0], one, rtol=RTOL, err_msg=f"{what}, ord={p}, 1 process")


def _assert_scaled(before: dict, after: dict, scale: float, what: str) -> None:
    for k in before:
        want = before[k].astype(np.float64) * scale
        np.testing.assert_allclose(after[k], want, rtol=RTOL, atol=1e-7, err_msg=f"{what}: {k}")


def _scale(norm: float, eps: float = 0.0) -> float:
    return min(1.0, W.MAX_NORM / (norm + eps))


# -- what each layout must give ------------------------------------------------------------

# (case, variant): the leaves of the full model, and how many distinct groups one call
# reduces over (one collective each for ord 1, 2 and inf with float32 gradients)
LAYOUTS = {
    ("dp", "replicated_true"): (["w", "b"], 1),
    ("dp", "sharded_false"): (["w", "b"], 1),
    ("dp", "local"): (["w", "b"], 0),  # copies: the local norm is the norm
    ("zero", "process_group"): (["w", "b"], 1),
    ("zero", "sharded"): (["w", "b"], 1),
    ("tp", "replicated"): (["w1", "w2", "b2", "ln"], 1),
    ("tp", "sharded"): (["w1", "w2", "b2", "ln"], 1),
    ("tp", "layout"): (["w1", "w2", "b2", "ln"], 1),
    ("ep", "sharded"): (["experts", "router"], 1),
    ("ep", "replicated"): (["experts", "router"], 1),
    ("pp", "process_group"): (["l0w", "l0b", "l1w"], 1),
    ("pp", "sharded"): (["l0w", "l0b", "l1w"], 1),
    ("mixed", "none"): (["w", "b", "ln"], 1),
    ("two_meshes", "none"): (["a", "b", "c"], 1),  # two meshes over the same two ranks
    ("data_x_tensor", "replicated"): (["w1", "ln", "b", "extra"], 2),
    ("data_x_tensor", "sharded"): (["w1", "ln", "b", "extra"], 2),
    ("data_x_tensor", "layout"): (["w1", "ln", "b", "extra"], 2),
    ("data_x_tensor", "dtensor"): (["w1", "ln", "b", "extra"], 2),
    ("data_x_expert", "dtensor"): (["dense", "experts", "router"], 1),  # the world mesh
    ("data_x_expert", "layout"): (["dense", "experts", "router"], 1),
    ("data_x_expert", "replicated"): (["dense", "experts", "router"], 2),
    ("pipeline_x_data", "plain_sharded"): (["s0w", "s0b", "s1w", "s1b"], 1),
    ("pipeline_x_data", "plain_replicated"): (["s0w", "s0b", "s1w", "s1b"], 2),
}
TWO_RANKS = {"dp", "zero", "tp", "ep", "pp", "mixed", "two_meshes"}


def _full(case: str, rank: int) -> dict[str, np.ndarray]:
    return W.full_model(case, rank // 2 if case in TWO_RANKS else 0)


def _check_layout(ranks: list[dict[str, Any]], case: str, variant: str, arrays: Any) -> None:
    """The norms, the collectives, and both clips of one layout on every rank."""
    res = [r[variant] for r in _case(ranks, case)]
    _, groups = LAYOUTS.get((case, variant), (None, None))
    jobs = [[0, 1], [2, 3]] if case in TWO_RANKS else [[0, 1, 2, 3]]
    for job in jobs:
        full = arrays(job[0])
        for p in W.ORDS:
            _assert_norm([res[r]["norms"][p] for r in job], full, p, f"{case}/{variant}")
        norm2, norm1 = ref_norm(full, 2.0), ref_norm(full, 1.0)
        assert norm1 > W.MAX_NORM  # the clips below do scale
        for r in job:
            _assert_scaled(res[r]["before"], res[r]["after"], _scale(norm2), f"rank {r}")
            _assert_scaled(res[r]["before"], res[r]["after1"], _scale(norm1), f"rank {r} ord 1")
    for r in range(W.WORLD):
        assert res[r]["norm_type"] == "Tensor"  # a plain tensor, also from DTensors
        for key, ops in res[r]["collectives"].items():
            assert len(ops) == groups, f"{case}/{variant} rank {r} {key}: {ops}"


@pytest.mark.parametrize(("case", "variant"), list(LAYOUTS))
def test_layout_gives_the_norm_of_the_whole_model(ranks: Any, case: str, variant: str) -> None:
    names, _ = LAYOUTS[case, variant]
    _check_layout(ranks, case, variant, lambda r: [_full(case, r)[k] for k in names])


def test_dtensor_clip_keeps_dtensors(ranks: Any) -> None:
    for case in ("mixed", "two_meshes", "data_x_expert"):
        for r, res in enumerate(_case(ranks, case)):
            variant = "none" if "none" in res else "dtensor"
            types = res[variant]["types"]
            plain = {"ln", "router"}
            assert all(t == ("Tensor" if k in plain else "DTensor") for k, t in types.items()), (
                case,
                r,
                types,
            )


def test_pipeline_x_fsdp2_sums_the_stages(ranks: Any) -> None:
    """FSDP2 (fully_shard) within each stage, process_group= the pipeline groups: the
    norm of both stages' full gradients (gathered by torch's full_tensor)."""
    res = _case(ranks, "pipeline_x_data")
    full = [*res[0]["full"].values(), *res[2]["full"].values()]  # stage 0, stage 1
    for r in (1, 3):
        assert res[r]["full"].keys() == res[r - 1]["full"].keys()
    fsdp = [r["fsdp"] for r in res]
    for p in W.ORDS:
        _assert_norm([f["norms"][p] for f in fsdp], full, p, "pipeline x FSDP2")
    for r, f in enumerate(fsdp):
        _assert_scaled(f["before"], f["after"], _scale(ref_norm(full, 2.0)), f"rank {r}")
        for key, ops in f["collectives"].items():
            assert len(ops) == 2, (r, key, ops)  # the pp group, then the stage's dp group


def test_fsdp2_gradients_match_one_process(ranks: Any) -> None:
    """The gathered FSDP2 gradients are the model's (so the norms above are of it)."""
    for stage, r in ((0, 0), (1, 2)):
        model = W.stage_module(torch, stage)
        W.stage_input(torch, model, stage).backward()
        full = _case(ranks, "pipeline_x_data")[r]["full"]
        for name, param in model.named_parameters():
            np.testing.assert_allclose(full[name], param.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("how", ["clip_grad_norm_", "clip_before_step"])
def test_fsdp2_world_with_gradclip_torch(ranks: Any, how: str) -> None:
    res = _case(ranks, "fsdp2_world")
    full = list(res[0]["full"].values())
    got = [r[how]["norm"] for r in res]
    _assert_norm(got, full, 2.0, how)
    for r, rr in enumerate(res):
        _assert_scaled(rr["before"], rr[how]["after"], _scale(got[0], 1e-6), f"rank {r}")
        assert len(rr[how]["collectives"]) == 1, rr[how]["collectives"]  # the world mesh


@pytest.mark.parametrize("how", ["clip_grad_norm_", "clip_before_step", "get_total_norm"])
def test_gradclip_torch_takes_sharded_per_parameter(ranks: Any, how: str) -> None:
    res = [r[how] for r in _case(ranks, "dropin_layouts")]
    full = [W.full_model("data_x_expert")[k] for k in ("dense", "experts", "router")]
    _assert_norm([r["norm"] for r in res], full, 2.0, how)
    scale = 1.0 if how == "get_total_norm" else _scale(ref_norm(full, 2.0), 1e-6)
    for r, rr in enumerate(res):
        _assert_scaled(rr["before"], rr["after"], scale, f"rank {r}")


def test_bfloat16_gradients_reduce_in_float32_or_wider(ranks: Any) -> None:
    """bfloat16 tensor-parallel gradients: the norm of their exact values, a float32
    tensor (fairscale #1092: norms all-reduced in bfloat16)."""
    res = [r["bfloat16"] for r in _case(ranks, "tp")]
    for job in ([0, 1], [2, 3]):
        f = _full("tp", job[0])
        exact = [torch.from_numpy(f[k]).bfloat16().float().numpy() for k in f]
        for p in W.ORDS:
            _assert_norm([res[r]["norms"][p] for r in job], exact, p, "bfloat16")
        for r in job:
            assert res[r]["norm_dtype"] == "torch.float32"
            assert len(res[r]["collectives"][2.0]) == 1
            scale = _scale(ref_norm(exact, 2.0))
            for k, v in res[r]["before"].items():  # rounded once to bfloat16
                np.testing.assert_allclose(res[r]["after"][k], v * scale, rtol=2**-8)


# -- the peers' mistakes, reproduced: proof that the layouts above change the result -------


def test_unmarked_replicas_are_counted_once_per_rank(ranks: Any) -> None:
    """process_group= alone takes every leaf as a shard: the tensor-parallel copies of
    b2 and ln are counted twice (NeMo RL #3788), on the 2 x 2 grid w1 twice and ln,
    extra four times."""
    for job in ([0, 1], [2, 3]):
        f = _full("tp", job[0])
        twice = [f["w1"], f["w2"], f["b2"], f["b2"], f["ln"], f["ln"]]
        res = [_case(ranks, "tp")[r]["unmarked"] for r in job]
        _assert_norm([r["norms"][2.0] for r in res], twice, 2.0, "tp unmarked")
    f = _full("data_x_tensor", 0)
    wrong = [f["w1"], f["w1"], *[f["ln"]] * 4, f["b"], *[f["extra"]] * 4]
    res = _case(ranks, "data_x_tensor")
    _assert_norm([r["unmarked"]["norms"][2.0] for r in res], wrong, 2.0, "2x2 unmarked")


def test_each_expert_group_alone_disagrees(ranks: Any) -> None:
    """Each expert-parallel group reducing over itself only (NeMo Automodel #3816):
    the two groups see different halves of the dense weights, so ranks disagree."""
    got = [r["own_ep_norm"]["norms"][2.0] for r in _case(ranks, "data_x_expert")]
    assert got[0] == got[1] and got[2] == got[3]
    assert got[0] != got[2]


# -- a NaN on one rank ---------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["nonfinite_dtensor", "nonfinite_layout"])
def test_nan_on_one_rank_same_decision_everywhere(ranks: Any, variant: str) -> None:
    res = [r[variant] for r in _case(ranks, "data_x_expert")]
    for r, rr in enumerate(res):
        assert math.isnan(rr["propagate"]["norm"]), r
        assert all(np.isnan(v).all() for v in rr["propagate"]["after"].values()), r
        assert math.isnan(rr["zero"]["norm"]), r
        assert all((v == 0).all() for v in rr["zero"]["after"].values()), r
        assert rr["raise"]["raised"] is not None and "nan" in rr["raise"]["raised"], r
    # raise: nothing was scaled, on any rank (the NaN rank keeps its NaN)
    fresh = [r["propagate"]["before"] for r in res]
    for r, rr in enumerate(res):
        for k, v in rr["raise"]["after"].items():
            np.testing.assert_array_equal(v, fresh[r][k])


def test_wrong_layouts_are_errors_on_every_rank(ranks: Any) -> None:
    res = _case(ranks, "errors")
    want = {
        "both_options": "ValueError: pass sharded= or replicated=, not both",
        "sharded_inside_world": "ValueError: grads['b']: sharded= names no part of",
        "layout_missing_dim": "ValueError: grads['b']: its gc.Layout names no part of",
        "same_group_both": "both sharded and replicated over",
        "replicated_beyond": "is replicated over 4 ranks but the call reduces over 2",
    }
    for r, msgs in enumerate(res):
        for label, text in want.items():
            assert msgs[label] is not None and text in msgs[label], (r, label, msgs[label])
