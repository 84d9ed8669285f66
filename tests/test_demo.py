"""python -m gradclip: the tutorial's example on every installed backend."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys

import pytest


def test_demo_runs_and_every_cpu_backend_agrees():
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip"], capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "norm = sqrt(55) = 7.416198" in out
    for name, module in [
        ("numpy", "numpy"),
        ("array-api-strict", "array_api_strict"),
        ("torch", "torch"),
        ("jax", "jax"),
        ("dask", "dask"),
    ]:
        if importlib.util.find_spec(module) is None:
            pytest.fail(f"{module} is a test dependency and must be installed")
        line = next(ln for ln in out.splitlines() if ln.strip().startswith(name + " "))
        assert re.search(
            r"7\.41619\d\s+\[0\.4045, 0\.8090, 1\.2136, 1\.6181, 2\.0226\]\s+ok$", line
        ), line
    assert "MISMATCH" not in out and "FAILED" not in out
    assert "devices found: numpy: cpu" in out


def test_demo_reports_a_mismatch(monkeypatch):
    """The demo's check can fail: a wrong result is reported and the exit code is 1."""
    import io

    import gradclip as gc
    from gradclip import __main__ as demo_main

    real = gc.clip_by_global_norm

    def wrong(grads, /, max_norm, **kw):
        clipped, norm = real(grads, max_norm, **kw)
        return clipped * 2, norm

    monkeypatch.setattr(gc, "clip_by_global_norm", wrong)
    buf = io.StringIO()
    assert demo_main.demo(buf) == 1
    assert "MISMATCH" in buf.getvalue()


def test_help():
    proc = subprocess.run(
        [sys.executable, "-m", "gradclip", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "tutorial" in proc.stdout
