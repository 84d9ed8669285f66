"""The optional C kernels for bfloat16 (``gradclip/_kernels.c`` via ``gradclip._native``).

The kernels against float64 NumPy and ml_dtypes' own rounding, then the NumPy and
torch fast paths, with the kernels and without them (the pure-Python widening they
replace), against the Array API core.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_backend, ref_norm

import gradclip as gc
from gradclip import _backends, _native

ml_dtypes = pytest.importorskip("ml_dtypes")
BF16 = np.dtype(ml_dtypes.bfloat16)
ALL_BITS = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)  # every bfloat16 value


def test_kernels_are_built():
    """``make test`` builds them (setup.py); a machine with a C compiler must have them."""
    assert _native.lib is not None, "gradclip._kernels is missing: pip install -e . again"


def _bf16(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32).astype(BF16)


def _exact_sumsq(x: np.ndarray) -> float:
    w = x.astype(np.float64)
    return math.fsum(w * w)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 1023, 1024, 1025, 5000, 100_003])
@pytest.mark.parametrize("offset", [0, 1])  # an unaligned start
def test_sumsq_matches_float64(n, offset):
    rng = np.random.default_rng(n)
    x = _bf16(rng.standard_normal(n + offset) * 3)[offset:]
    got = _native.sumsq_bf16(x)
    assert got == pytest.approx(_exact_sumsq(x), rel=1e-6, abs=0)


@pytest.mark.parametrize(
    "values",
    [
        [3e30, 4e30] * 3000,  # squares overflow float32: summed again in double
        [3e-30, 4e-30] * 3000,  # squares underflow float32
        [1e-40] * 2000,  # subnormal bfloat16 values
        [0.0] * 1500,
        [3e38, -3e38, 1.0] * 700,  # the largest bfloat16 values beside small ones
    ],
    ids=["1e30", "1e-30", "subnormal", "zeros", "max"],
)
def test_sumsq_never_overflows_or_underflows(values):
    x = _bf16(values)
    assert _native.sumsq_bf16(x) == pytest.approx(_exact_sumsq(x), rel=1e-12, abs=0)


def test_sumsq_of_every_finite_value():
    x = ALL_BITS.view(BF16)
    x = x[np.isfinite(x.astype(np.float32))]
    assert _native.sumsq_bf16(x) == pytest.approx(_exact_sumsq(x), rel=1e-12)


def test_sumsq_propagates_inf_and_nan():
    ones = np.ones(5000, dtype=BF16)
    inf, nan = _bf16([np.inf]), _bf16([np.nan])
    assert _native.sumsq_bf16(np.concatenate([ones, inf])) == math.inf
    assert math.isnan(_native.sumsq_bf16(np.concatenate([ones, nan, inf])))


@pytest.mark.parametrize("s", [0.3, 1.0, 7.5, 1e-30, 2.0**-140, 0.0, 1e38, math.inf, math.nan])
@pytest.mark.parametrize("inplace", [True, False])
def test_scale_is_ml_dtypes_rounding_bit_for_bit(s, inplace):
    """Every bfloat16 value (NaN, inf, subnormals) times ``s`` in float32, rounded
    once to nearest even, as ml_dtypes (and the core) round it; NaN stays NaN."""
    x = ALL_BITS.view(BF16)[3:]  # an unaligned start and a tail past the 16-wide steps
    s32 = np.float32(s)
    with np.errstate(all="ignore"):
        want = (x.astype(np.float32) * s32).astype(BF16)
    y = x.copy() if inplace else np.empty_like(x)
    _native.scale_bf16(y if inplace else x, y, float(s32))
    nan = np.isnan(want.astype(np.float32))
    assert np.array_equal(np.isnan(y.astype(np.float32)), nan)
    assert np.array_equal(y.view(np.uint16)[~nan], want.view(np.uint16)[~nan])


def test_kernels_reject_what_they_cannot_read():
    x = np.ones(8, dtype=BF16)
    with pytest.raises(TypeError, match="2-byte"):
        _native.lib.sumsq_bf16(np.ones(4, dtype=np.float32))
    with pytest.raises((BufferError, ValueError)):
        _native.lib.sumsq_bf16(x.view(np.uint16)[::2])  # not contiguous
    with pytest.raises(ValueError, match="size"):
        _native.scale_bf16(x, x[:4], 0.5)
    with pytest.raises((BufferError, ValueError, TypeError)):
        _native.lib.scale_bf16(x.view(np.uint16), bytes(16), 0.5)  # read-only output


def test_tables_cover_each_address_once():
    """The table variants (torch tensors' addresses): the same sums and products as
    the kernels over each array, unaligned addresses and counts of every size."""
    from array import array

    rng = np.random.default_rng(5)
    xs = [_bf16(rng.standard_normal(n + 1))[1:] for n in (0, 1, 17, 1024, 3000, 70_001)]
    ptrs = array("q", [x.ctypes.data for x in xs])
    counts = array("q", [x.size for x in xs])
    got = _native.lib.sumsq_bf16_table(ptrs, counts)
    assert got == pytest.approx(sum(_exact_sumsq(x) for x in xs), rel=1e-6)
    want = [(x.astype(np.float32) * np.float32(0.3)).astype(BF16) for x in xs]
    _native.lib.scale_bf16_table(ptrs, counts, float(np.float32(0.3)))
    for x, w in zip(xs, want):
        assert np.array_equal(x.view(np.uint16), w.view(np.uint16))
    with pytest.raises(TypeError, match="int64"):
        _native.lib.sumsq_bf16_table(ptrs, array("i", [1]))


# -- the fast paths, with the kernels and without, against the core ---------------------


@pytest.fixture(params=["numpy", "numpy-pure", "torch", "torch-pure"])
def bf16_backend(request, monkeypatch):
    """A backend with bfloat16 leaves; ``-pure``: the C kernels switched off."""
    name = request.param
    if name.endswith("-pure"):
        monkeypatch.setattr(_native, "lib", None)
        name = name.removesuffix("-pure")
    else:
        assert _native.lib is not None
    return make_backend(name)


def _tree(backend, rng, scale=1.0):
    """Large and small leaves (a model's layout), a strided one and a 0-d one."""
    shapes = [(1 << 21,), (300, 700), (64,), (2048,), (5, 7, 9), ()]
    leaves = [backend.asarray(rng.standard_normal(s) * scale, "bfloat16") for s in shapes]
    t = backend.asarray(rng.standard_normal((50, 40)) * scale, "bfloat16")
    leaves.append(t.T if backend.name == "numpy" else t.t())
    return leaves


@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("scale", [1.0, 1e30, 1e-30])
def test_norm_matches_core_and_float64(bf16_backend, scale, many):
    rng = np.random.default_rng(0)
    leaves = _tree(bf16_backend, rng, scale)
    if many:  # thousands of small leaves (2000 x 256)
        leaves = [bf16_backend.asarray(r * scale, "bfloat16") for r in rng.random((3000, 37))]
    fast = float(bf16_backend.to_numpy(gc.global_norm(leaves)))
    with _backends.fast_paths(False):
        core = float(bf16_backend.to_numpy(gc.global_norm(leaves)))
    exact = ref_norm([bf16_backend.to_numpy(x) for x in leaves], 2)
    assert math.isfinite(fast)
    assert fast == pytest.approx(core, rel=4 * 2.0**-23, abs=0)
    assert fast == pytest.approx(exact, rel=2 * 2.0**-23, abs=0)


def test_inf_and_nan_propagate(bf16_backend):
    rng = np.random.default_rng(1)
    for bad, want in ((np.inf, math.inf), (np.nan, math.nan)):
        leaves = _tree(bf16_backend, rng)
        big = bf16_backend.to_numpy(leaves[0]).astype(np.float64)
        big[12345] = bad
        leaves[0] = bf16_backend.asarray(big, "bfloat16")
        got = float(bf16_backend.to_numpy(gc.global_norm(leaves)))
        assert (math.isnan(got) and math.isnan(want)) or got == want


@pytest.mark.parametrize("many", [False, True])
@pytest.mark.parametrize("inplace", [True, False])
def test_clip_rounds_once_as_the_core(bf16_backend, inplace, many):
    """Each leaf becomes ``bfloat16(float32(x) * s)`` exactly, ``s`` the float32
    ``max_norm / norm`` of the returned norm (the core's scaling); the clipped
    leaves equal the core's to an ulp (the two norms may differ by a few ulps)."""
    rng = np.random.default_rng(2)
    leaves = _tree(bf16_backend, rng)
    if many:
        leaves += [bf16_backend.asarray(r, "bfloat16") for r in rng.standard_normal((3000, 37))]
    before = [bf16_backend.to_numpy(x).astype(BF16) for x in leaves]  # (exact)
    if inplace:
        norm = gc.clip_by_global_norm_(leaves, 3.0)
        out = leaves
    else:
        out, norm = gc.clip_by_global_norm(leaves, 3.0)
    with _backends.fast_paths(False):
        again = [bf16_backend.asarray(x.astype(np.float64), "bfloat16") for x in before]
        core, _ = gc.clip_by_global_norm(again, 3.0)
    s = np.float32(3.0) / np.float32(bf16_backend.to_numpy(norm))
    for x, y, c in zip(before, out, core):
        want = (x.astype(np.float32) * s).astype(BF16)
        assert "bfloat16" in str(y.dtype)
        got = bf16_backend.to_numpy(y).astype(BF16)
        assert got.shape == want.shape
        assert np.array_equal(got.view(np.uint16), want.view(np.uint16))
        np.testing.assert_allclose(
            got.astype(np.float32), bf16_backend.to_numpy(c).astype(np.float32), rtol=2**-7
        )
