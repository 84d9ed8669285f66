"""The CuPy backend (``gradclip._backends._cupy``), without a GPU: its planning, the
arithmetic of its kernels (emulated in NumPy) and their sources.

The kernels themselves run against the reference in test_gpu.py and, where a CUDA
device exists, in test_fast_common.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ULPS, same_value

import gradclip as gc
from gradclip import _backends
from gradclip._backends import _cupy  # plain NumPy until a kernel is launched


def test_cupy_plan_covers_every_element_once():
    sizes = [0, 1, 8191, 8192, 8193, 50_000, 3]
    pl = _cupy.plan(sizes, list(range(len(sizes))), block=8192)
    seen = [np.zeros(n, dtype=int) for n in sizes]
    for leaf, lo in zip(pl.leaf, pl.start):
        seen[leaf][lo : min(lo + 8192, sizes[leaf])] += 1
    assert all((s == 1).all() for s in seen)
    assert pl.leaf.size == sum(-(-n // 8192) for n in sizes)
    g = _cupy.groups(["float32", "float16", "float32"], [5, 6, 7])
    assert [(k, v.indices) for k, v in g.items()] == [("float32", [0, 2]), ("float16", [1])]


@pytest.mark.parametrize("p", [2, math.inf])
@pytest.mark.parametrize(
    "values",
    ["random", [3e30, 4e30], [1.0, np.inf], [np.nan, np.inf], [0.0, 0.0], [3e-30, 1e-30]],
)
def test_cupy_block_terms_combine_to_the_core(values, p):
    """The terms kernel, emulated in NumPy, combined on device-style arrays == the core."""
    rng = np.random.default_rng(9)
    arrays = [rng.standard_normal(n).astype(np.float32) for n in (20_000, 5, 8192)]
    if values != "random":
        arrays.append(np.array(values, dtype=np.float32))
    arrays.append(rng.standard_normal(300).astype(np.float16))
    pl = _cupy.plan([a.size for a in arrays], list(range(len(arrays))))
    ms, ss = _cupy.emulate_terms(arrays, pl)
    got = float(np.float32(_cupy.combine(np, ms, ss, p)))
    with _backends.fast_paths(False):
        want = float(gc.global_norm(arrays, ord=p))
    assert same_value(got, want) or got == pytest.approx(want, rel=ULPS * 2e-7)


def test_cupy_kernel_sources_format():
    for dt, (t, widen, acc) in _cupy._CTYPES.items():
        for src in (_cupy._TERMS_SRC, _cupy._SCALE_SRC, _cupy._FINISH_SRC):
            code = src.format(name=dt, t=t, widen=widen, acc=acc, threads=256, two_sweeps=0)
            assert "gradclip_" in code and "{" in code and "{{" not in code
