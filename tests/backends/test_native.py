"""The optional C kernels (``gradclip/_backends/_kernels.c`` via ``_backends._native``).

The kernels against float64 NumPy (``math.fsum``) and NumPy's and ml_dtypes' own
rounding, then the NumPy and torch fast paths, with the kernels and without them (the
BLAS dots and buffered widening they replace), against the Array API core.
"""

from __future__ import annotations

import math
from array import array

import numpy as np
import pytest
from conftest import assert_ulps, fast_and_reference, make_backend, ref_norm, same_value, to_float

import gradclip as gc
from gradclip import _backends
from gradclip._backends import _native

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
F32 = np.dtype(np.float32)
KINDS = {"bfloat16": BF16, "float32": F32}


def test_kernels_are_built():
    """``make test`` builds them (setup.py); a machine with a C compiler must have them."""
    assert _native.lib is not None, "the C kernels are missing: pip install -e . again"


def _as(a, dt) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(dt)


def _exact_sumsq(x: np.ndarray) -> float:
    w = x.astype(np.float64)
    return math.fsum(w * w)


def _every_value(dt: np.dtype) -> np.ndarray:
    """Every bfloat16 value; for float32 every value with the low 16 bits 0x1234."""
    bits = np.arange(1 << 16, dtype=np.uint32)
    if dt == BF16:
        return bits.astype(np.uint16).view(BF16)
    return ((bits << 16) | 0x1234).view(np.float32)


@pytest.mark.parametrize("dt", KINDS)
@pytest.mark.parametrize("n", [0, 1, 15, 16, 1023, 1024, 1025, 5000, 100_003])
@pytest.mark.parametrize("offset", [0, 1])  # an unaligned start
def test_sumsq_matches_float64(dt, n, offset):
    rng = np.random.default_rng(n)
    x = _as(rng.standard_normal(n + offset) * 3, KINDS[dt])[offset:]
    assert _native.sumsq(x) == pytest.approx(_exact_sumsq(x), rel=1e-6, abs=0)


@pytest.mark.parametrize("dt", KINDS)
@pytest.mark.parametrize(
    "values",
    [
        [3e30, 4e30] * 3000,  # squares overflow float32: summed again in double
        [3e-30, 4e-30] * 3000,  # squares underflow float32
        [1e-40] * 2000,  # subnormal values
        [0.0] * 1500,
        [3e38, -3e38, 1.0] * 700,  # the largest values beside small ones
    ],
    ids=["1e30", "1e-30", "subnormal", "zeros", "max"],
)
def test_sumsq_never_overflows_or_underflows(dt, values):
    x = _as(values, KINDS[dt])
    assert _native.sumsq(x) == pytest.approx(_exact_sumsq(x), rel=1e-12, abs=0)


@pytest.mark.parametrize("dt", KINDS)
def test_sumsq_of_every_finite_value(dt):
    x = _every_value(KINDS[dt])
    x = x[np.isfinite(x.astype(np.float32))]
    assert _native.sumsq(x) == pytest.approx(_exact_sumsq(x), rel=1e-12)


@pytest.mark.parametrize("dt", KINDS)
def test_sumsq_propagates_inf_and_nan(dt):
    ones = np.ones(5000, dtype=KINDS[dt])
    inf, nan = _as([np.inf], KINDS[dt]), _as([np.nan], KINDS[dt])
    assert _native.sumsq(np.concatenate([ones, inf])) == math.inf
    assert math.isnan(_native.sumsq(np.concatenate([ones, nan, inf])))


@pytest.mark.parametrize("dt", KINDS)
@pytest.mark.parametrize("s", [0.3, 1.0, 7.5, 1e-30, 2.0**-140, 0.0, 1e38, math.inf, math.nan])
@pytest.mark.parametrize("inplace", [True, False])
def test_scale_is_numpys_rounding_bit_for_bit(dt, s, inplace):
    """Every bfloat16 value (NaN, inf, subnormals; 65536 float32 values) times ``s``
    in float32, rounded once (to nearest even), as NumPy and ml_dtypes (the core)
    round it; NaN stays NaN."""
    x = _every_value(KINDS[dt])[3:]  # an unaligned start and a tail past the 16-wide steps
    s32 = np.float32(s)
    with np.errstate(all="ignore"):
        want = (x.astype(np.float32) * s32).astype(KINDS[dt])
    y = x.copy() if inplace else np.empty_like(x)
    _native.scale(y if inplace else x, y, float(s32))
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(y.astype(np.float32)), nan)
    bits = np.uint16 if dt == "bfloat16" else np.uint32
    assert np.array_equal(y.view(bits)[~nan], want.view(bits)[~nan])


def test_kernels_reject_what_they_cannot_read():
    x = np.ones(8, dtype=BF16)
    with pytest.raises(TypeError, match="format 'e'"):  # float16 is not bfloat16
        _native.lib.sumsq(np.ones(4, dtype=np.float16))
    with pytest.raises(TypeError, match="float32"):
        _native.lib.sumsq(np.ones(4, dtype=np.float64))
    with pytest.raises((BufferError, ValueError)):
        _native.lib.sumsq(np.ones(8, dtype=np.float32)[::2])  # not contiguous
    with pytest.raises(ValueError, match="size"):
        _native.scale(x, x[:4], 0.5)
    with pytest.raises(ValueError, match="dtype"):
        _native.lib.scale(np.ones(4, dtype=np.uint16), np.ones(2, dtype=np.float32), 0.5)
    with pytest.raises((BufferError, ValueError, TypeError)):
        _native.lib.scale(x.view(np.uint16), bytes(16), 0.5)  # read-only output


@pytest.mark.parametrize("dt", KINDS)
def test_tables_cover_each_address_once(dt):
    """The table variants (torch tensors' addresses): the same sums and products as
    the kernels over each array, unaligned addresses and counts of every size."""
    rng = np.random.default_rng(5)
    sizes = (0, 1, 17, 1024, 3000, 70_001)
    xs = [_as(rng.standard_normal(n + 1), KINDS[dt])[1:] for n in sizes]
    # lib.address takes the buffer without its format: bfloat16 arrays need no view
    assert [_native.lib.address(x) for x in xs] == [x.ctypes.data for x in xs]
    ptrs = array("q", [x.ctypes.data for x in xs])
    counts = array("q", [x.size for x in xs])
    itemsize = KINDS[dt].itemsize
    got = _native.lib.sumsq_table(ptrs, counts, itemsize)
    assert got == pytest.approx(sum(_exact_sumsq(x) for x in xs), rel=1e-6)
    want = [(x.astype(np.float32) * np.float32(0.3)).astype(KINDS[dt]) for x in xs]
    _native.lib.scale_table(ptrs, counts, itemsize, float(np.float32(0.3)))
    for x, w in zip(xs, want):
        assert np.array_equal(x, w)
    with pytest.raises(TypeError, match="int64"):
        _native.lib.sumsq_table(ptrs, array("i", [1]), itemsize)
    with pytest.raises(ValueError, match="itemsize"):
        _native.lib.sumsq_table(ptrs, counts, 8)


@pytest.mark.parametrize("dt", KINDS)
@pytest.mark.parametrize("threads", [1, 2])
def test_run_native_covers_every_element_once(dt, threads, monkeypatch):
    """``run_native`` on one thread (tables of ``TABLE_ROWS`` items, large ones whole)
    and on two (chunks of large items, runs of small ones past ``TABLE_ROWS`` items):
    every element summed and scaled once."""
    monkeypatch.setattr(_native, "CHUNK", 4096)
    monkeypatch.setattr(_native, "PER_THREAD", 1)
    monkeypatch.setattr(_native, "threads", lambda: threads)
    rng = np.random.default_rng(9)
    sizes = [10_000, *([7] * 150), 4096, 4097, 0, *([30] * 70), 9000, 1]
    xs = [_as(rng.standard_normal(n), KINDS[dt]) for n in sizes]
    lib, size, itemsize = _native.lib, sum(sizes), KINDS[dt].itemsize
    parts = _native.run_native(xs, lib.address, size, lib.sumsq_table, itemsize)
    assert len(parts) > 2
    assert math.fsum(parts) == pytest.approx(math.fsum(map(_exact_sumsq, xs)), rel=1e-6)
    s = float(np.float32(0.3))
    want = [(x.astype(np.float32) * np.float32(s)).astype(KINDS[dt]) for x in xs]
    _native.run_native(xs, lib.address, size, lib.scale_table, itemsize, s)
    for x, w in zip(xs, want):
        np.testing.assert_array_equal(x, w)


# -- the fast paths, with the kernels and without, against the reference ----------------------


@pytest.fixture(params=["numpy", "numpy-pure", "torch", "torch-pure"])
def kernel_backend(request, monkeypatch):
    """NumPy or torch; ``-pure``: the C kernels switched off."""
    name = request.param
    if name.endswith("-pure"):
        monkeypatch.setattr(_native, "lib", None)
        name = name.removesuffix("-pure")
    else:
        assert _native.lib is not None
    return make_backend(name)


def _tree(backend, dt, rng, scale=1.0, many=False):
    """Large and small leaves (a model's layout), a strided one and a 0-d one; or
    thousands of small ones (2000 x 256)."""
    if many:
        return [backend.asarray(r * scale, dt) for r in rng.standard_normal((3000, 37))]
    shapes = [(1 << 21,), (300, 700), (64,), (2048,), (5, 7, 9), ()]
    leaves = [backend.asarray(rng.standard_normal(s) * scale, dt) for s in shapes]
    t = backend.asarray(rng.standard_normal((50, 40)) * scale, dt)
    leaves.append(t.T if backend.name == "numpy" else t.t())
    return leaves


@pytest.mark.parametrize("dt", KINDS)
@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_norm_matches_core_and_float64(kernel_backend, dt, scale, many):
    leaves = _tree(kernel_backend, dt, np.random.default_rng(0), scale, many)
    norms = fast_and_reference(lambda: gc.global_norm(leaves))
    fast, core = (to_float(kernel_backend, n) for n in norms)
    exact = ref_norm([kernel_backend.to_numpy(x) for x in leaves], 2)
    assert math.isfinite(fast)
    assert_ulps(fast, core, "float32")
    assert_ulps(fast, exact, "float32")


@pytest.mark.parametrize("dt", KINDS)
def test_inf_and_nan_propagate(kernel_backend, dt):
    rng = np.random.default_rng(1)
    for bad, want in ((np.inf, math.inf), (np.nan, math.nan)):
        leaves = _tree(kernel_backend, dt, rng)
        big = kernel_backend.to_numpy(leaves[0]).astype(np.float64)
        big[12345] = bad
        leaves[0] = kernel_backend.asarray(big, dt)
        assert same_value(to_float(kernel_backend, gc.global_norm(leaves)), want)


@pytest.mark.parametrize("dt", KINDS)
@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("inplace", [True, False])
def test_clip_rounds_once_as_the_core(kernel_backend, dt, inplace, many):
    """Each leaf becomes ``dtype(float32(x) * s)`` exactly, ``s`` the float32
    ``max_norm / norm`` of the returned norm (the core's scaling); the clipped
    leaves equal the core's to an ulp (the two norms may differ by a few ulps)."""
    rng = np.random.default_rng(2)
    leaves = _tree(kernel_backend, dt, rng)
    leaves += _tree(kernel_backend, dt, rng, many=True) if many else []
    before = [kernel_backend.to_numpy(x).astype(KINDS[dt]) for x in leaves]  # (exact)
    if inplace:
        norm = gc.clip_by_global_norm_(leaves, 3.0)
        out = leaves
    else:
        out, norm = gc.clip_by_global_norm(leaves, 3.0)
    with _backends.fast_paths(False):
        again = [kernel_backend.asarray(x.astype(np.float64), dt) for x in before]
        core, _ = gc.clip_by_global_norm(again, 3.0)
    s = np.float32(3.0) / np.float32(kernel_backend.to_numpy(norm))
    for x, y, c in zip(before, out, core):
        want = (x.astype(np.float32) * s).astype(KINDS[dt])
        assert dt in str(y.dtype)
        got = kernel_backend.to_numpy(y).astype(KINDS[dt])
        assert got.shape == want.shape
        assert np.array_equal(got, want)
        np.testing.assert_allclose(
            got.astype(np.float32), kernel_backend.to_numpy(c).astype(np.float32), rtol=2**-7
        )
