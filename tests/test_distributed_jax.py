"""JAX: sharded arrays under jit, and axis_name= inside shard_map, pmap and vmap.

The 8-device cases run in a subprocess (tests/_dist_jax_script.py) because
``--xla_force_host_platform_device_count`` must be set before jax is imported and
this pytest process has imported it already. Every result is compared with the
float64 NumPy norm of the full gradients (``ref_norm``/``ref_clip``), each shard
counted once, for ``ord`` 2, 1 and inf.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _launch import run_json_script
from conftest import ref_clip, ref_norm

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")

import _dist_jax_script as S  # noqa: E402

import gradclip as gc  # noqa: E402

SCRIPT = Path(__file__).with_name("_dist_jax_script.py")
TIMEOUT_S = 120  # jax import and a dozen small compilations: ~10 s on 2 busy cores
RTOL = 1e-6


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    flags = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8").strip()
    return run_json_script(SCRIPT, {"XLA_FLAGS": flags, "JAX_PLATFORMS": "cpu"}, TIMEOUT_S)


def _case(results: dict[str, Any], name: str) -> dict[str, Any]:
    res = results[name]
    assert "error" not in res, res.get("error")
    return res


def _assert_norms(norms: dict[str, float], arrays: list[np.ndarray]) -> None:
    for p in S.ORDS:
        np.testing.assert_allclose(norms[str(p)], ref_norm(arrays, p), rtol=RTOL, err_msg=p)


def _all(f: dict[str, np.ndarray]) -> list[np.ndarray]:
    return [f["w"], f["b"], f["ln"]]


@pytest.mark.parametrize("name", ["jit_sharded", "shard_map_marked", "shard_map_predicate"])
def test_sharded_norm_counts_each_shard_once(results: dict[str, Any], name: str) -> None:
    _assert_norms(_case(results, name)["norms"], _all(S.full_grads()))


def test_shard_map_unmarked_counts_replicas(results: dict[str, Any]) -> None:
    """Without replicated=, b (on the 2 devices of each y row) counts twice and ln (on
    all 8) counts 8 times: the markers above are what make the norm right."""
    f = S.full_grads()
    _assert_norms(
        _case(results, "shard_map_unmarked")["norms"], [f["w"], f["b"], f["b"], *[f["ln"]] * 8]
    )


def test_shard_map_no_overflow_at_1e30(results: dict[str, Any]) -> None:
    norms = _case(results, "shard_map_huge")["norms"]
    assert all(math.isfinite(v) for v in norms.values())
    _assert_norms(norms, _all(S.full_grads(1e30)))


@pytest.mark.parametrize(("name", "p"), [("jit_sharded", 2.0), ("shard_map_clip", 1.0)])
def test_clip_matches_the_full_gradients(results: dict[str, Any], name: str, p: float) -> None:
    res = _case(results, name)
    f = S.full_grads()
    want, norm = ref_clip(_all(f), S.MAX_NORM, p)
    assert norm > S.MAX_NORM
    np.testing.assert_allclose(res["norm"], norm, rtol=RTOL)
    for k, w in zip(["w", "b", "ln"], want):
        np.testing.assert_allclose(res["clipped"][k], w, rtol=RTOL, atol=1e-7, err_msg=k)


def test_jit_keeps_the_input_sharding(results: dict[str, Any]) -> None:
    assert _case(results, "jit_sharded")["sharding_kept"] is True


def test_shard_map_nonfinite_reaches_every_device(results: dict[str, Any]) -> None:
    res = _case(results, "shard_map_nonfinite")
    assert all(math.isnan(v) for v in res["nan"].values())
    assert all(v == math.inf for v in res["inf"].values())


def test_pmap_replicated_leaf_counts_once(results: dict[str, Any]) -> None:
    res = _case(results, "pmap_replicated")
    f = S.full_grads()
    for label, arrays in (
        ("marked", [f["w"], f["ln"]]),
        ("unmarked", [f["w"], *[f["ln"]] * 8]),
    ):
        for p in S.ORDS:
            got = res[label][str(p)]
            assert got == [got[0]] * 8, got  # every device has the same norm
            np.testing.assert_allclose(got[0], ref_norm(arrays, p), rtol=RTOL, err_msg=label)


# -- in this process: vmap binds an axis name on one device --------------------------------


@pytest.mark.parametrize("p", S.ORDS)
@pytest.mark.parametrize("mark", [True, False])
def test_vmap_axis_name(p: float, mark: bool) -> None:
    """vmap over 4 shards of w, with the norms unbatched (the same for every shard);
    the markers are a prefix tree: one marker for the whole "norms" list."""
    rng = np.random.default_rng(3)
    w = rng.standard_normal((4, 3, 2)).astype(np.float32)
    ln = rng.standard_normal(5).astype(np.float32)
    ln2 = rng.standard_normal(2).astype(np.float32)

    def norm(w_shard: Any, ln: Any, ln2: Any) -> Any:
        rep = {"enc": {"w": False}, "norms": True} if mark else None
        g = {"enc": {"w": w_shard}, "norms": [ln, ln2]}
        return gc.global_norm(g, ord=p, axis_name="i", replicated=rep)

    f = jax.jit(jax.vmap(norm, in_axes=(0, None, None), axis_name="i"))
    got = f(jnp.asarray(w), jnp.asarray(ln), jnp.asarray(ln2))
    want = ref_norm([w, ln, ln2] if mark else [w, *[ln, ln2] * 4], p)
    np.testing.assert_allclose(np.asarray(got), want, rtol=RTOL)


@pytest.mark.parametrize("p", S.ORDS)
def test_two_axes_leaf_replicated_over_one(p: float) -> None:
    """Axes i (3) x j (2): w split over both, b split over i and the same along j
    (marked "j" by a function of the path), c the same everywhere."""
    rng = np.random.default_rng(4)
    w = rng.standard_normal((3, 2, 4)).astype(np.float32)
    b = rng.standard_normal((3, 5)).astype(np.float32)
    c = rng.standard_normal(6).astype(np.float32)
    marks = {"grads[0]": False, "grads[1]": frozenset({"j"}), "grads[2]": True}

    def norm(w: Any, b: Any, c: Any) -> Any:
        return gc.global_norm([w, b, c], ord=p, axis_name=("i", "j"), replicated=marks.get)

    inner = jax.vmap(norm, in_axes=(0, None, None), axis_name="j")
    f = jax.jit(jax.vmap(inner, in_axes=(0, 0, None), axis_name="i"))
    got = np.asarray(f(jnp.asarray(w), jnp.asarray(b), jnp.asarray(c)))
    assert got.shape == (3, 2)
    np.testing.assert_allclose(got, ref_norm([w, b, c], p), rtol=RTOL)


def test_axis_name_errors() -> None:
    with pytest.raises(TypeError, match="axis_name= is for JAX"):
        gc.global_norm(np.ones(3), axis_name="i")
    with pytest.raises(TypeError, match="axis_name must be"):
        gc.global_norm(jnp.ones(3), axis_name=3)
    with pytest.raises(ValueError, match="names an axis twice"):
        gc.global_norm(jnp.ones(3), axis_name=("i", "i"))
    with pytest.raises(TypeError, match=r"replicated= marks grads\[0\] with 3"):
        jax.vmap(lambda x: gc.global_norm([x], axis_name="i", replicated=[3]), axis_name="i")(
            jnp.ones((2, 3))
        )
