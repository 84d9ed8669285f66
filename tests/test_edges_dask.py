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

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))


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


LIMITS = st.one_of(st.just(0.0), st.floats(1e-30, 10.0))  # (subnormal ones round apart)


@given(masked(), LIMITS, st.sampled_from([1.0, 2.0, 3.0, math.inf]))
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


@given(masked(), LIMITS)
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


@st.composite
def selected_examples(draw):
    """Per-example gradients (leaves of shapes (batch, ...)) and the examples one row
    mask selects from all of them (unknown batch size): each chunk of rows keeps at
    least one (Dask's own max fails on empty chunks: dask/dask#10327)."""
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    batch, chunk = draw(st.integers(1, 9)), draw(st.integers(1, 4))
    keep = np.array(draw(st.lists(st.booleans(), min_size=batch, max_size=batch)))
    keep[::chunk] = True
    shapes = draw(st.lists(st.lists(st.integers(1, 3), max_size=2), min_size=1, max_size=3))
    values = [rng.standard_normal((batch, *s)) * 10.0 ** draw(st.integers(-3, 3)) for s in shapes]
    mask = da.from_array(keep, chunks=chunk)
    leaves = [da.from_array(x, chunks=chunk)[mask] for x in values]
    return leaves, [x[keep] for x in values]


@given(selected_examples(), st.floats(0.1, 10.0), st.sampled_from(["sum", "mean", "none"]))
@SETTINGS
def test_per_example_clip_with_an_unknown_batch_size(case, max_norm, reduce):
    leaves, values = case
    assert all(math.isnan(x.shape[0]) for x in leaves)
    with dask.config.set(scheduler=_forbid_compute):
        out, norms, count = gc.per_example_clip(leaves, max_norm, reduce=reduce)
    n = np.sqrt(sum(np.sum(x.reshape(x.shape[0], -1) ** 2, axis=1) for x in values))
    s = np.where(n > max_norm, max_norm / np.where(n > 0, n, 1.0), 1.0)
    np.testing.assert_allclose(norms.compute(), n, rtol=1e-12)
    assert int(count.compute()) == int(np.sum(s < 1))
    for o, x in zip(out, values):
        scaled = x * s.reshape((-1,) + (1,) * (x.ndim - 1))
        want = {"sum": scaled.sum(0), "mean": scaled.sum(0) / len(s), "none": scaled}
        # a sum's rounding is relative to its terms' magnitudes, not to the (cancelling) sum
        size = {"sum": np.abs(scaled).sum(0), "mean": np.abs(scaled).sum(0) / len(s)}
        atol = 1e-12 * np.max(size.get(reduce, 0.0), initial=1e-300)
        np.testing.assert_allclose(o.compute(), want[reduce], rtol=1e-12, atol=atol)


def test_unknown_row_counts_that_cannot_be_flattened_are_named():
    """A leaf of rank 2 or more whose rows were selected lazily: Dask cannot flatten
    it without its size, so the global norm is a ValueError naming it (not Dask's
    "cannot convert float NaN to integer"); a known and an unknown batch size in one
    per-example tree too."""
    m = da.from_array(np.arange(12.0).reshape(4, 3), chunks=2)
    rows = m[m[:, 0] > 2]
    for call in (gc.global_norm, lambda t: gc.clip_by_global_norm(t, 1.0)):
        with pytest.raises(ValueError, match=r"grads\['w'\] has shape \(nan, 3\)"):
            call({"b": m[0], "w": rows})
    with pytest.raises(ValueError, match=r"grads\[0\] has 4 examples.*grads\[1\]"):
        gc.per_example_clip([m, rows], 1.0)
    full = m[m > 2]  # a mask of the full shape: 1-D, fine
    assert float(gc.global_norm(full).compute()) == pytest.approx(ref_norm([np.arange(3, 12)], 2))


def test_the_issue_example_and_a_stateful_clipper():
    x = da.from_array(np.array([-1.0, 3.0, 4.0, -2.0]), chunks=2)
    y = x[x > 0]
    with dask.config.set(scheduler=_forbid_compute):
        clipped, norm = gc.clip_by_global_norm(y, 1.0)
        clipper = gc.ZClip(warmup_steps=1, max_norm=None)
        out, _, info = gc.clip_stateful(y, clipper, clipper.init(da.zeros(())))
    assert float(norm.compute()) == 5.0
    np.testing.assert_allclose(clipped.compute(), [0.6, 0.8])
    np.testing.assert_allclose(out.compute(), [3.0, 4.0])  # warm-up: no clipping
    assert float(info.norm.compute()) == 5.0
