"""torch.distributed: the global norm over shards held by 2 and 4 gloo processes.

Each world size is spawned once (tests/_dist_torch_worker.py runs every case in every
rank); the tests below compare each rank's result with the float64 NumPy norm of the
full gradients (``ref_norm``), each shard counted once, for ``ord`` 2, 1 and inf.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
from _launch import run_ranks
from conftest import ref_clip, ref_norm

torch = pytest.importorskip("torch")
dist = pytest.importorskip("torch.distributed")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

import _dist_torch_worker as W  # noqa: E402

pytestmark = pytest.mark.timeout(240)  # a hang anywhere (a collective) fails, never blocks

SPAWN_TIMEOUT_S = 90  # per world size; 4 processes importing torch on 2 busy cores: ~15 s
RTOL = 1e-6


def _spawn(world: int, out_dir: str) -> list[dict[str, Any]]:
    """Start ``world`` gloo processes running the worker once (the dynamo modules
    DTensor loads on first use imported once, in the fork server)."""
    preload = ["torch", "torch.distributed.tensor", "torch._dynamo", "gradclip", W.__name__]
    return run_ranks(W.worker, world, out_dir, preload, SPAWN_TIMEOUT_S)


@pytest.fixture(scope="module", params=[2, 4], ids=lambda w: f"world{w}")
def ranks(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """``(world, [results of rank 0, rank 1, ...])``, spawned once per world size."""
    world = request.param
    return world, _spawn(world, str(tmp_path_factory.mktemp(f"world{world}")))


def _case(ranks: Any, name: str) -> list[dict[str, Any]]:
    world, results = ranks
    if name not in results[0]:
        pytest.skip(f"{name} needs 4 ranks")
    for r, res in enumerate(results):
        assert "error" not in res[name], f"rank {r} of {world}:\n{res[name]['error']}"
    return [res[name] for res in results]


def _full(world: int, names: list[str]) -> list[np.ndarray]:
    f = W.full_grads(world)
    return [f[k] for k in names]


def _assert_norms(per_rank: list[dict[float, float]], arrays: list[np.ndarray]) -> None:
    for p in W.ORDS:
        want = ref_norm(arrays, p)
        got = [norms[p] for norms in per_rank]
        assert got == [got[0]] * len(got), f"ranks disagree for ord={p}: {got}"
        np.testing.assert_allclose(got[0], want, rtol=RTOL, err_msg=f"ord={p}")


# The leaves of the full gradients whose norm each case must reproduce.
CASES = {
    "shards_only": ["w", "b"],
    "replicated_tree": ["w", "b", "ln"],
    "replicated_fn": ["w", "b", "ln"],
    "mesh_as_group": ["w", "b", "ln"],
    "grid": ["w", "b", "ln2", "emb"],
    "dtensor_2d": ["w", "b", "ln", "emb"],
}


@pytest.mark.parametrize("name", list(CASES))
def test_norm_counts_each_shard_once(ranks: Any, name: str) -> None:
    world, _ = ranks
    res = _case(ranks, name)
    _assert_norms([r["norms"] for r in res], _full(world, CASES[name]))


def test_unmarked_replicated_leaf_counts_world_times(ranks: Any) -> None:
    """Without replicated=, a leaf present on every rank is summed world-size times
    (the peers' mistake): proof that the markers above change the result."""
    world, _ = ranks
    res = _case(ranks, "unmarked")
    _assert_norms([r["norms"] for r in res], _full(world, ["w", "b", *["ln"] * world]))


def test_grid_without_marker_overcounts(ranks: Any) -> None:
    world, _ = ranks
    res = _case(ranks, "grid")
    f = W.full_grads(world)
    twice = [f["w"], f["b"], f["ln2"], f["ln2"], f["emb"]]  # ln2 on 2 tensor-parallel ranks
    _assert_norms([r["unmarked"] for r in res], twice)


def test_no_overflow_at_1e30(ranks: Any) -> None:
    world, _ = ranks
    res = _case(ranks, "huge")
    f = W.full_grads(world, scale=1e30)
    for r in res:
        assert all(math.isfinite(v) for v in r["norms"].values())
    _assert_norms([r["norms"] for r in res], [f["w"], f["b"], f["ln"]])


def _gathered(world: int, res: list[dict[str, Any]], key: str = "clipped") -> dict[str, Any]:
    """The full clipped gradients from the ranks' shards (w, b by rows; ln replicated)."""
    for r in res[1:]:
        np.testing.assert_array_equal(r[key]["ln"], res[0][key]["ln"])
    return {
        "w": np.concatenate([r[key]["w"] for r in res]),
        "b": np.concatenate([r[key]["b"] for r in res]),
        "ln": res[0][key]["ln"],
    }


@pytest.mark.parametrize(("name", "p"), [("clip_inplace", 2.0), ("clip_functional", 1.0)])
def test_clip_scales_every_shard_by_the_global_scale(ranks: Any, name: str, p: float) -> None:
    world, _ = ranks
    res = _case(ranks, name)
    full = _full(world, ["w", "b", "ln"])
    want, norm = ref_clip(full, W.MAX_NORM, p)
    assert norm > W.MAX_NORM  # the case clips
    got = _gathered(world, res)
    for r in res:
        np.testing.assert_allclose(r["norm"], norm, rtol=RTOL)
    for k, w in zip(["w", "b", "ln"], want):
        np.testing.assert_allclose(got[k], w, rtol=RTOL, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("how", ["clip_grad_norm_", "clip_before_step"])
def test_torch_drop_in_with_process_group(ranks: Any, how: str) -> None:
    """gradclip.torch passes process_group and replicated (as parameters) to the core;
    the result is torch's rule (eps=1e-6) on the full gradients."""
    world, _ = ranks
    res = [r[how] for r in _case(ranks, "torch_dropin")]
    want, norm = ref_clip(_full(world, ["w", "b", "ln"]), W.MAX_NORM, 2.0, eps=1e-6)
    got = _gathered(world, res)
    for r in res:
        np.testing.assert_allclose(r["norm"], norm, rtol=RTOL)
    for k, w in zip(["w", "b", "ln"], want):
        np.testing.assert_allclose(got[k], w, rtol=RTOL, atol=1e-7, err_msg=k)


def test_nonfinite_on_one_rank_reaches_every_rank(ranks: Any) -> None:
    res = _case(ranks, "nonfinite")
    for r in res:
        assert all(math.isnan(v) for v in r["nan"].values())
        assert all(v == math.inf for v in r["inf"].values())


def test_overlapping_groups_are_an_error(ranks: Any) -> None:
    for r in _case(ranks, "overlap_error"):
        assert r["raised"] is not None
        assert "counted twice" in r["raised"]


def test_dtensor_norm_is_a_plain_tensor_and_clips_in_place(ranks: Any) -> None:
    world, _ = ranks
    res = _case(ranks, "dtensor_1d")
    f = W.full_grads(world)
    part = f["part"].astype(np.float64).sum(axis=0)  # a Partial DTensor: the ranks' sum
    full = [f["w"], f["b"], f["ln"], part]
    _assert_norms([r["norms"] for r in res], full)
    want, norm = ref_clip(full, W.MAX_NORM, 2.0)
    for r in res:
        assert r["norm_type"] == "Tensor"
        np.testing.assert_allclose(r["norm"], norm, rtol=RTOL)
        for k, w in zip(["w", "b", "ln", "part"], want):
            np.testing.assert_allclose(r["clipped"][k], w, rtol=1e-5, atol=1e-7, err_msg=k)
    fwant, fnorm = ref_clip(full, W.MAX_NORM, math.inf)
    for r in res:
        np.testing.assert_allclose(r["fnorm"], fnorm, rtol=RTOL)
        for k, w in zip(["w", "b", "ln", "part"], fwant):
            np.testing.assert_allclose(r["fclipped"][k], w, rtol=1e-5, atol=1e-7, err_msg=k)
        assert r["fplacements"]["w"] == "(Shard(dim=0),)"
        assert r["fplacements"]["ln"] == "(Replicate(),)"


def test_dtensor_2d_mesh_clips_in_place(ranks: Any) -> None:
    world, _ = ranks
    res = _case(ranks, "dtensor_2d")
    full = _full(world, ["w", "b", "ln", "emb"])
    want, norm = ref_clip(full, W.MAX_NORM, 2.0)
    for r in res:
        np.testing.assert_allclose(r["norm"], norm, rtol=RTOL)
        for k, w in zip(["w", "b", "ln", "emb"], want):
            np.testing.assert_allclose(r["clipped"][k], w, rtol=RTOL, atol=1e-7, err_msg=k)


# -- single-process checks (no spawn) --------------------------------------------------


def test_process_group_with_numpy_is_a_type_error() -> None:
    import gradclip as gc

    with pytest.raises(TypeError, match="process_group= is for torch"):
        gc.global_norm(np.ones(3), process_group=object())


def test_bad_process_group_is_a_type_error() -> None:
    import gradclip as gc

    with pytest.raises(TypeError, match="process_group must be"):
        gc.global_norm(torch.ones(3), process_group="world")


def test_marker_tree_must_cover_every_leaf() -> None:
    import gradclip as gc

    with pytest.raises(ValueError, match=r"no marker for grads\['b'\]"):
        gc.global_norm({"a": torch.ones(2), "b": torch.ones(2)}, replicated={"a": True})


def test_both_engines_is_a_value_error() -> None:
    import gradclip as gc

    with pytest.raises(ValueError, match="not both"):
        gc.global_norm(torch.ones(2), process_group=object(), axis_name="i")
