"""Dask arrays whose chunk sizes are unknown until computed (``x[x > 0]``): every
function works on them lazily (no graph is computed inside gradclip) and agrees
with the float64 NumPy reference on the computed values, empty selections
included.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import ref_clip, ref_norm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradclip as gc

da = pytest.importorskip("dask.array")
dask = pytest.importorskip("dask")

SETTINGS = settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))


def _forbid_compute(*args, **kwargs):
    raise AssertionError("a Dask graph was computed inside gradclip")


@st.composite
def masked(draw, ndim=1):
    """Leaves of which some are ``x[mask]`` (unknown size along axis 0, maybe empty)
    and some plain: (dask leaves, their NumPy values)."""
    n = draw(st.integers(1, 4))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    cols = draw(st.integers(1, 3))
    leaves, values = [], []
    for _ in range(n):
        rows = draw(st.integers(0, 9))
        shape = (rows,) if ndim == 1 else (rows, cols)
        x = rng.standard_normal(shape) * 10.0 ** draw(st.integers(-3, 3))
        threshold = draw(st.sampled_from([-np.inf, -0.5, 0.0, 0.5, np.inf]))
        keep = x if ndim == 1 else x[:, 0]
        d = da.from_array(x, chunks=max(1, rows // 2 or 1))
        if draw(st.booleans()):  # unknown chunk sizes
            dk = d if ndim == 1 else d[:, 0]
            d, x = d[dk > threshold], x[keep > threshold]
            assert math.isnan(d.shape[0])
        leaves.append(d)
        values.append(x)
    return leaves, values


@given(masked(), st.floats(0.0, 10.0), st.sampled_from([1.0, 2.0, 3.0, math.inf]))
@SETTINGS
def test_global_norm_and_clip_by_global_norm(case, max_norm, p):
    leaves, values = case
    with dask.config.set(scheduler=_forbid_compute):
        norm = gc.global_norm(leaves, ord=p)
        clipped, n2 = gc.clip_by_global_norm(leaves, max_norm, ord=p)
        zeroed, _ = gc.clip_by_global_norm(leaves, max_norm, ord=p, nonfinite="zero")
    want, want_norm = ref_clip(values, max_norm, p)
    assert float(norm.compute()) == pytest.approx(want_norm, rel=1e-12, abs=1e-300)
    assert float(n2.compute()) == pytest.approx(want_norm, rel=1e-12, abs=1e-300)
    for out in (clipped, zeroed):
        for c, w in zip(out, want):
            np.testing.assert_allclose(c.compute(), w, rtol=1e-12)


@given(masked(), st.floats(0.0, 10.0))
@SETTINGS
def test_per_leaf_functions(case, limit):
    leaves, values = case
    with dask.config.set(scheduler=_forbid_compute):
        by_norm = gc.clip_by_norm(leaves, limit)
        by_value = gc.clip_by_value(leaves, limit)
        by_rms = gc.clip_by_block_rms(leaves, limit)
        agc = gc.adaptive_grad_clip(leaves, [x + 1 for x in leaves], 0.1)
    for x, n, v, r in zip(values, by_norm, by_value, by_rms):
        norm = ref_norm([x], 2)
        want = x * (1.0 if norm <= limit else limit / norm)
        np.testing.assert_allclose(n.compute(), want, rtol=1e-12)
        np.testing.assert_allclose(v.compute(), np.clip(x, -limit, limit))
        rms = norm / math.sqrt(x.size) if x.size else 0.0
        want = x * (1.0 if rms <= limit else limit / rms)
        np.testing.assert_allclose(r.compute(), want, rtol=1e-12)
    for x, a in zip(values, agc):  # a leaf of rank 0 or 1 is one unit
        g, w = ref_norm([x], 2), ref_norm([x + 1], 2)
        top = 0.1 * max(w, 1e-3)
        want = x * (top / max(g, 1e-6) if g > top else 1.0)
        np.testing.assert_allclose(a.compute(), want, rtol=1e-12)


@given(masked(ndim=2), st.floats(0.1, 10.0), st.sampled_from(["sum", "mean", "none"]))
@SETTINGS
def test_per_example_clip_with_an_unknown_batch_size(case, max_norm, reduce):
    leaves, values = case
    rows = [x for x in values if x.shape[0] == values[0].shape[0]]
    if len(rows) < len(values):  # one batch for every leaf: the first one's selection
        leaves, values = leaves[:1], values[:1]
    with dask.config.set(scheduler=_forbid_compute):
        out, norms, count = gc.per_example_clip(leaves, max_norm, reduce=reduce)
    n = np.sqrt(sum(np.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) for x in values))
    s = np.where(n > max_norm, max_norm / np.where(n > 0, n, 1.0), 1.0)
    np.testing.assert_allclose(norms.compute(), n, rtol=1e-12)
    assert int(count.compute()) == int(np.sum(s < 1))
    for o, x in zip(out, values):
        scaled = x * s[:, None]
        want = {"sum": scaled.sum(0), "mean": scaled.sum(0) / max(len(s), 1), "none": scaled}
        np.testing.assert_allclose(o.compute(), want[reduce], rtol=1e-12, atol=1e-300)


def test_the_issue_example_and_a_stateful_clipper():
    x = da.from_array(np.array([-1.0, 3.0, 4.0, -2.0]), chunks=2)
    y = x[x > 0]
    with dask.config.set(scheduler=_forbid_compute):
        clipped, norm = gc.clip_by_global_norm(y, 1.0)
        clipper = gc.ZClip(warmup_steps=1, max_norm=None)
        out, _, info = gc.clip_stateful(y, clipper, clipper.init(np.float64(0)))
    assert float(norm.compute()) == 5.0
    np.testing.assert_allclose(clipped.compute(), [0.6, 0.8])
    np.testing.assert_allclose(out.compute(), [3.0, 4.0])  # warm-up: no clipping
    assert float(info.norm.compute()) == 5.0
