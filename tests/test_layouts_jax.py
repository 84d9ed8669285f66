"""The parallel layouts with JAX: shard_map and pmap with sharded=/replicated=/Layout,
and plain jit on arrays with named shardings, on 8 host devices.

tests/_layouts_jax_script.py runs every case in one subprocess (the device count must
be set before jax is imported); each result is checked here against the full model:
every device the same number, within 2 float32 ulps of the float64 norm, within 1e-6
of gradclip's own norm of the full model in one process, the clip as the full model's
scale, and the collectives in each call's jaxpr counted.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from _launch import run_json_script
from conftest import ref_norm

pytest.importorskip("jax")
pytest.importorskip("optax")

import _layouts_jax_script as S

import gradclip as gc

SCRIPT = Path(__file__).with_name("_layouts_jax_script.py")
TIMEOUT_S = 180  # jax import and some 60 small compilations: ~25 s on 2 busy cores
RTOL = 1e-6
ULPS = 2


@pytest.fixture(scope="module")
def results() -> dict[str, Any]:
    flags = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
    env = {"XLA_FLAGS": flags.strip(), "JAX_PLATFORMS": "cpu"}
    return run_json_script(SCRIPT, env, TIMEOUT_S)


def _case(results: dict[str, Any], name: str) -> Any:
    res = results[name]
    assert "error" not in res, res.get("error")
    return res


def _assert_norm(got: list[float], arrays: list[np.ndarray], p: float, what: str) -> None:
    """Every device the same, within ``ULPS`` float32 ulps of the float64 norm (rounded
    to float32) and within ``RTOL`` of gradclip's single-process norm."""
    assert len(set(got)) == 1, f"{what}, ord={p}: devices disagree: {got}"
    exact = float(np.float32(ref_norm(arrays, p)))
    tol = ULPS * float(np.spacing(np.float32(exact)))
    assert abs(got[0] - exact) <= tol, f"{what}, ord={p}: {got[0]} vs {exact} (float64)"
    one = float(gc.global_norm(list(arrays), ord=p))
    np.testing.assert_allclose(got[0], one, rtol=RTOL, err_msg=f"{what}, ord={p}, 1 process")


def _assert_clip(res: dict[str, Any], full: dict[str, np.ndarray], p: float) -> None:
    norm = ref_norm(list(full.values()), p)
    assert norm > S.MAX_NORM
    np.testing.assert_allclose(res["norm"], norm, rtol=RTOL)
    for k, v in full.items():
        want = v.astype(np.float64) * min(1.0, S.MAX_NORM / norm)
        np.testing.assert_allclose(res["clipped"][k], want, rtol=RTOL, atol=1e-7, err_msg=k)


# (case, variant): the collectives of one call for ord 2 and 1 (float32: a MAX, then a
# SUM, each over every axis at once) and for inf (a MAX)
LAYOUTS = [
    ("data_x_tensor", "specs"),
    ("data_x_tensor", "specs_alone"),
    ("data_x_tensor", "replicated"),
    ("data_x_tensor", "layout"),
    ("data_x_expert", "specs"),
    ("pipeline_x_data", "specs"),
    ("all_three", "specs"),
]
COLLECTIVES = {"2.0": ["pmax", "psum"], "1.0": ["pmax", "psum"], "inf": ["pmax"]}


def _ops(ops: list[str]) -> list[str]:
    return sorted("psum" if "psum" in op else op for op in ops)


@pytest.mark.parametrize(("case", "variant"), LAYOUTS)
def test_layout_gives_the_norm_of_the_whole_model(results: Any, case: str, variant: str) -> None:
    res = _case(results, case)[variant]
    full = S.full_model(case)
    for p in S.ORDS:
        _assert_norm(res["norms"][str(p)], list(full.values()), p, f"{case}/{variant}")
        assert _ops(res["collectives"][str(p)]) == COLLECTIVES[str(p)], res["collectives"]
    if variant in ("replicated", "layout"):
        return  # the same norms as "specs": the clip is checked there
    _assert_clip(res["clip"], full, 2.0)
    _assert_clip(res["clip1"], full, 1.0)


def test_float64_sums_take_one_collective(results: Any) -> None:
    res = _case(results, "x64")
    full = S.full_model("data_x_tensor")
    for p in S.ORDS:
        _assert_norm(res["norms"][str(p)], list(full.values()), p, "x64")
        want = ["pmax"] if math.isinf(p) else ["psum"]
        assert _ops(res["collectives"][str(p)]) == want, res["collectives"]


def test_unmarked_copies_are_counted_per_device(results: Any) -> None:
    """axis_name= alone takes every leaf as a shard: w (copies over data) twice, ln
    four times: proof that the markers above change the result."""
    res = _case(results, "data_x_tensor")["unmarked"]
    f = S.full_model("data_x_tensor")
    wrong = [f["w"], f["w"], *[f["ln"]] * 4, f["b"]]
    _assert_norm(res["norms"]["2.0"], wrong, 2.0, "unmarked")


def test_no_overflow_at_1e30(results: Any) -> None:
    res = _case(results, "all_three")["huge"]
    full = list(S.full_model("all_three", 1e30).values())
    for p in S.ORDS:
        assert all(math.isfinite(v) for v in res["norms"][str(p)])
        _assert_norm(res["norms"][str(p)], full, p, "1e30")


@pytest.mark.parametrize("case", list(S.LAYOUTS))
def test_jit_on_named_shardings_needs_nothing(results: Any, case: str) -> None:
    res = _case(results, "jit_named")[case]
    full = S.full_model(case)
    for p in S.ORDS:
        _assert_norm([res["norms"][str(p)]], list(full.values()), p, f"jit {case}")
    _assert_clip(res, full, 2.0)
    assert res["sharding_kept"] is True


def test_optax_transform_with_in_specs(results: Any) -> None:
    res = _case(results, "optax")
    for k, want in res["optax"].items():
        np.testing.assert_allclose(res["updates"][k], want, rtol=RTOL, atol=1e-7, err_msg=k)


@pytest.mark.parametrize("label", ["sharded", "axis_and_sharded"])
def test_pmap_with_sharded(results: Any, label: str) -> None:
    res = _case(results, "pmap")
    full = [np.asarray(res["full"]["w"], np.float32), np.asarray(res["full"]["ln"], np.float32)]
    for p in S.ORDS:
        got = res[label][str(p)]
        assert len(got) == 8
        _assert_norm(got, full, p, f"pmap {label}")


def test_nan_on_one_device_same_decision_everywhere(results: Any) -> None:
    res = _case(results, "nonfinite")
    for policy in ("propagate", "zero"):
        assert all(math.isnan(v) for v in res[policy]["norms"]), policy
        assert len(res[policy]["norms"]) == 4
    assert all(
        np.isnan(np.asarray(v, dtype=float)).all() for v in res["propagate"]["clipped"].values()
    )
    assert all((np.asarray(v) == 0).all() for v in res["zero"]["clipped"].values())


# -- in this process: errors at trace time ---------------------------------------------------


def test_replicated_over_an_axis_outside_axis_name_is_an_error() -> None:
    import jax
    import jax.numpy as jnp

    def fn(x: Any) -> Any:
        return gc.global_norm({"a": x, "b": x}, axis_name="i", replicated={"a": "j", "b": True})

    inner = jax.vmap(fn, axis_name="j")
    with pytest.raises(ValueError, match="which the call does not reduce over"):
        jax.vmap(inner, axis_name="i")(jnp.ones((2, 2, 3)))


def test_layout_must_name_every_axis() -> None:
    import jax
    import jax.numpy as jnp

    def fn(x: Any) -> Any:
        lay = {"a": gc.Layout(sharded="i"), "b": gc.Layout(replicated=True)}
        return gc.global_norm({"a": x, "b": x}, axis_name=("i", "j"), sharded=lay)

    inner = jax.vmap(fn, axis_name="j")
    with pytest.raises(ValueError, match=r"grads\['a'\]: its gc.Layout names no part of axis 'j'"):
        jax.vmap(inner, axis_name="i")(jnp.ones((2, 2, 3)))


def test_both_options_is_an_error() -> None:
    import jax.numpy as jnp

    with pytest.raises(ValueError, match="not both"):
        gc.global_norm(jnp.ones(2), sharded="i", replicated=True)
    with pytest.raises(ValueError, match="sharded and replicated over every"):
        gc.Layout(sharded=True, replicated=True)
