"""The benchmark harness on tiny shapes, one repeat: it must keep running.

No timing is asserted (timings on a shared CI machine mean nothing); this checks that
every installed peer is measured, the ratios the goals are stated in are computed
from the medians, and the JSON and the plot are written.
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _script(name: str, module: str) -> Any:
    """``benchmarks/<name>.py`` loaded as ``module`` (its folder on ``sys.path``, for
    the helper modules it imports)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    spec = importlib.util.spec_from_file_location(module, ROOT / f"benchmarks/{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def bench():
    return _script("bench", "gradclip_bench")


def test_shape_sets_match_the_anchors(bench):
    sets = bench.shape_sets
    assert (len(sets.gpt2_small()), sets.numel(sets.gpt2_small())) == (148, 124_439_808)
    assert (len(sets.resnet50()), sets.numel(sets.resnet50())) == (161, 25_557_032)
    assert (len(sets.many_small()), sets.numel(sets.many_small())) == (2000, 512_000)


def test_smoke_run_writes_table_json_and_plot(bench, tmp_path, capsys):
    pytest.importorskip("matplotlib")
    assert (
        bench.main(
            [
                "--smoke",
                "--sets",
                "resnet-50",
                "--dtypes",
                "float32,bfloat16",
                "--warmup",
                "0",
                "--repeats",
                "1",
                "--rounds",
                "2",
                "--out",
                str(tmp_path),
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "gradclip numpy (in place)" in out and "numpy vs floor" in out
    result = json.loads((tmp_path / "latest.json").read_text())
    assert (tmp_path / "latest.png").stat().st_size > 1000
    assert [(e["set"], e["dtype"]) for e in result["results"]] == [
        ("resnet-50", "float32"),
        ("resnet-50", "bfloat16"),
    ]
    entry = result["results"][0]
    runs = entry["runs"]
    expected = {"gradclip numpy (in place)", "plain numpy (dot + in place)"}
    if importlib.util.find_spec("torch"):
        expected |= {
            "gradclip torch (in place)",
            "torch clip_grad_norm_ (foreach=True)",
            "torch clip_grad_norm_ (foreach=False)",
            "floor (sum + mul_, flat)",
        }
    if importlib.util.find_spec("optax"):
        expected |= {
            "gradclip jax (jit)",
            "gradclip jax (eager)",
            "optax clip_by_global_norm (jit)",
            "optax clip_by_global_norm (eager)",
        }
    assert expected <= set(runs)
    if importlib.util.find_spec("torch"):  # the fused step, and what splits its clip's cost
        parts = runs["fused AdamW step (parts)"]["parts_ms"]
        assert set(parts) == {"alone", "gradclip", "torch", "read", "grad_scale", "norm"}
        assert all(len(ts) == 2 and min(ts) > 0 for ts in parts.values())
    for r in runs.values():  # a call per round, pooled
        assert r["median_ms"] > 0 and len(r["times_ms"]) == 2
        assert r["median_ms"] == pytest.approx(statistics.median(r["times_ms"]))
        assert r["extra_bytes"] is None or r["extra_bytes"] >= 0
    for g in entry["ratios"]:
        num, den = next((n, d) for label, n, d, _ in bench.GOALS if label == g["goal"])
        if den != "bytes":
            assert g["ratio"] == pytest.approx(bench.ratio(runs, num, den))
    # the docs' tables, from the JSON just written: a row per call and per goal
    assert bench.main(["--markdown", str(tmp_path / "latest.json")]) == 0
    md = capsys.readouterr().out.splitlines()
    assert md[0] == "| call (median ms) | resnet-50 float32 | resnet-50 bfloat16 |"
    numpy_ms = runs["gradclip numpy (in place)"]["median_ms"]
    assert md[2].startswith(f"| gradclip numpy (in place) | {numpy_ms:.2f} |")
    goal = entry["ratios"][0]
    assert any(line.startswith(f"| {goal['goal']} | {goal['ratio']:.3f}") for line in md)
    # a finished run plotted again, without timing
    assert bench.main(["--plot", str(tmp_path / "latest.json"), str(tmp_path / "re.png")]) == 0
    assert (tmp_path / "re.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_libraries_keeps_only_those_cases(bench, tmp_path):
    """``--libraries`` (how the GPU script runs only the GPU cases) drops the others."""
    args = ["--smoke", "--sets", "2000x256", "--dtypes", "float32", "--warmup", "0"]
    args += ["--repeats", "1", "--rounds", "1", "--no-plot", "--out", str(tmp_path)]
    args += ["--libraries", "numpy"]
    assert bench.main(args) == 0
    runs = json.loads((tmp_path / "latest.json").read_text())["results"][0]["runs"]
    assert set(runs) == {"gradclip numpy (in place)", "plain numpy (dot + in place)"}


def test_jax_pages_smoke_times_each_case_in_both_settings(capsys):
    """benchmarks/jax_pages.py (the fresh pages of a jitted functional clip) on tiny
    shapes: each case timed in a child process per setting."""
    pytest.importorskip("optax")
    mod = _script("jax_pages", "jax_pages")
    assert mod.main(["--smoke", "--set", "resnet-50", "--calls", "2", "--rounds", "1"]) == 0
    out = capsys.readouterr().out
    settings = out.split("glibc.malloc.hugetlb=1\n")
    assert len(settings) == 2 and "as is" in settings[0]
    for part in settings:
        for name in ("multiply only", "gradclip", "optax"):
            for case in (f"{name} (jit)", f"{name} (jit, donated)"):
                line = next(ln for ln in part.splitlines() if case in ln)
                wall = float(line.split(case)[1].split("(")[0])
                assert wall > 0


def test_gpu_ab_series_and_profile_run_on_the_cpu(monkeypatch, capsys):
    """benchmarks/gpu_ab.py's diagnosis of the calls after a pause (meant for a GPU
    machine), dry on the CPU with tiny shapes: it must not fail there first."""
    torch = pytest.importorskip("torch")
    mod = _script("gpu_ab", "gpu_ab")
    tiny = {"gpt2-small": lambda: [(3, 4), (5,)], "resnet-50": lambda: [(2, 2)]}
    monkeypatch.setattr(mod.shapes, "SETS", tiny)
    mod.diagnose(0.0, "cpu", profile=True)
    out = capsys.readouterr().out
    assert "Self CPU time total" in out
    rows = [ln for ln in out.splitlines() if " float32 " in ln and "median" in ln]
    assert len(rows) == 8  # 2 sets x 2 turns x 2 sides, 30 calls each
    assert all(len(r.split(":", 1)[1].split()) == 30 for r in rows)
    assert torch.is_tensor(mod.sides([torch.ones(3)])["torch"]())
