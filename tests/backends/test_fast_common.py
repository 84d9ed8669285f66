"""What every backend fast path must do, checked on each (``fast_backend``).

The reference (``fast_paths(False)``, the Array API math of ``gradclip._reference``)
is the specification: each fast path must give the same norm to a few ulps of the
accumulation dtype and the same clipped gradients to an ulp of the leaf's dtype, and
keep the reference's guarantees (no overflow or underflow for finite inputs, inf and
NaN propagate with NaN first). What only one backend does (its chunks, threads,
buffers, kernels, compiled calls) is tested in its own file beside this one; the
1e8-element accuracy bound is tested with fast paths on in test_norms.py.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import (
    ULPS,
    assert_close,
    assert_ulps,
    clip_fast_and_reference,
    fast_and_reference,
    make_backend,
    random_tree,
    ref_norm,
    same_value,
    to_float,
    ulp,
)

import gradclip as gc
from gradclip import _backends, _tree

ORDS = [2, math.inf, 1, 3]


def _check_norm(backend, tree, p, ulps=ULPS):
    """The fast norm of ``tree`` is the reference's, in its dtype, to ``ulps``."""
    fast, core = fast_and_reference(lambda: gc.global_norm(tree, ord=p))
    assert str(fast.dtype) == str(core.dtype)
    f = to_float(backend, fast)
    assert_ulps(f, to_float(backend, core), core.dtype, ulps)
    return f


def test_fast_paths_are_used(fast_backend):
    tree = _tree.flatten([fast_backend.asarray(np.ones(3), "float32")])
    assert _backends.plan(tree).fast is not None
    with _backends.fast_paths(False):
        assert _backends.plan(tree).fast is None  # the reference's norm and scaling


@pytest.mark.parametrize("p", ORDS)
@pytest.mark.parametrize(
    "dtypes",
    [["float32"], ["float64"], ["float16"], ["bfloat16"], ["float32", "bfloat16", "float16"]],
)
def test_norm_matches_core(fast_backend, dtypes, p):
    rng = np.random.default_rng(len(dtypes) + int(min(p, 9)))
    tree = random_tree(fast_backend, dtypes, rng, big=p == 2 and dtypes == ["float32"])
    if not tree:
        pytest.skip(f"{fast_backend.name} has none of {dtypes}")
    f = _check_norm(fast_backend, tree, p)
    leaves = [fast_backend.to_numpy(x) for x in tree.values()]
    assert f == pytest.approx(ref_norm(leaves, p), rel=1e-5 if p in (1, 3) else 2e-6)


@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float16"])
def test_norm_of_values_with_few_significant_bits_is_accurate(fast_backend, dt):
    """Squares of values with a short significand (bfloat16, widened or not) leave
    remainders that do not cancel: one float32 dot over a long run of them drifts by
    up to ~1e-5, so the fast paths add short runs. A leaf of 32 chunks and two
    thousand small ones (concatenated by the torch path), all positive."""
    if dt not in fast_backend.dtypes:
        pytest.skip(f"{fast_backend.name} has no {dt}")
    rng = np.random.default_rng(7)
    big = rng.standard_normal(1 << 23, dtype=np.float32) + 3
    small = rng.standard_normal((2000, 256), dtype=np.float32) + 3

    def cast(a):  # to 8 significant bits (bfloat16's), then to the leaf's dtype
        short = ((a.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)
        return fast_backend.asarray(short.astype(np.float64), dt)

    for tree in ([cast(big)], [cast(row) for row in small]):
        f = _check_norm(fast_backend, tree, 2)
        exact = ref_norm([fast_backend.to_numpy(x) for x in tree], 2)
        assert_ulps(f, exact, "float32")


EXTREMES = {
    "float32 1e30": ([3e30, 4e30], "float32"),
    "bfloat16 1e30": ([3e30, 4e30], "bfloat16"),
    "float16 squares": ([300.0] * 1000, "float16"),
    "float64 1e200": ([3e200, 4e200], "float64"),
    "float64 1e-200": ([3e-200, 4e-200], "float64"),
    "float32 1e-30": ([3e-30, 4e-30, 0.0], "float32"),
    "float32 1e19": ([2e19] * 100, "float32"),
    "zeros": ([0.0] * 5, "float32"),
}


@pytest.mark.parametrize("p", [2, math.inf])
@pytest.mark.parametrize("case", list(EXTREMES))
def test_no_overflow_or_underflow(fast_backend, case, p):
    values, dt = EXTREMES[case]
    if dt not in fast_backend.dtypes:
        pytest.skip(f"{fast_backend.name} has no {dt}")
    a = np.array(values)
    tree = [fast_backend.asarray(a, dt), fast_backend.asarray(a[:1], dt)]
    f = _check_norm(fast_backend, tree, p)
    exact = ref_norm([fast_backend.to_numpy(x) for x in tree], p)
    assert math.isfinite(f)
    assert f == pytest.approx(exact, rel=1e-6, abs=0)


@pytest.mark.parametrize("p", [2, math.inf, 1])
@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16", "float64"])
def test_inf_and_nan_propagate(fast_backend, dt, p):
    if dt not in fast_backend.dtypes:
        pytest.skip(f"{fast_backend.name} has no {dt}")
    ok = fast_backend.asarray(np.ones(70_000), dt)  # more than one chunk
    inf = fast_backend.asarray(np.array([1.0, -np.inf]), dt)
    nan = fast_backend.asarray(np.array([np.nan, 1.0]), dt)
    for tree, want in (([ok, inf], math.inf), ([ok, nan], math.nan), ([inf, ok, nan], math.nan)):
        for v in fast_and_reference(lambda: gc.global_norm(tree, ord=p)):  # noqa: B023
            assert same_value(to_float(fast_backend, v), want)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dt", ["float32", "float64", "float16", "bfloat16"])
def test_clip_matches_core(fast_backend, dt, inplace):
    if inplace and not fast_backend.writable:
        pytest.skip(f"{fast_backend.name} arrays are immutable")
    if dt not in fast_backend.dtypes:
        pytest.skip(f"{fast_backend.name} has no {dt}")
    seed = np.random.default_rng(3).integers(1 << 30)

    def make():
        return random_tree(fast_backend, [dt], np.random.default_rng(seed), big=True)

    a, n1, b, n2 = clip_fast_and_reference(make, inplace, eps=1e-6)
    assert_ulps(to_float(fast_backend, n1), to_float(fast_backend, n2), n2.dtype)
    assert list(a) == list(b)
    tiny = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}.get(dt, 5e-324)
    for k in a:
        assert a[k].shape == b[k].shape and str(a[k].dtype) == str(b[k].dtype)
        assert_close(fast_backend, a[k], b[k], rtol=2 * ulp(dt), atol=tiny)  # tiny: subnormals


def test_no_clip_leaves_values_unchanged(fast_backend):
    if not fast_backend.writable:
        pytest.skip(f"{fast_backend.name} arrays are immutable")
    x = fast_backend.asarray(np.array([0.3, -0.4]), "float32")
    before = fast_backend.to_numpy(x).copy()
    gc.clip_by_global_norm_([x], 1.0)  # norm 0.5: scale exactly 1
    np.testing.assert_array_equal(fast_backend.to_numpy(x), before)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float32_leaves_beside_float64_accumulate_in_float64(lib):
    """With a float64 leaf the accumulator is float64: float32 chunks are widened, so
    the norm has float64 accuracy (a float32 dot would be off by ~1e-8)."""
    rng = np.random.default_rng(5)
    arrays = [rng.random(300_000).astype(np.float32), rng.standard_normal(7)]
    b = make_backend(lib)
    leaves = [b.asarray(a) for a in arrays]
    norm, core = (to_float(b, n) for n in fast_and_reference(lambda: gc.global_norm(leaves)))
    assert norm == pytest.approx(ref_norm(arrays, 2), rel=1e-13)
    assert norm == pytest.approx(core, rel=1e-14)
