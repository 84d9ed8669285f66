"""Every backend fast path against the Array API core (``fast_paths(False)``).

The core is the reference: each fast path must give the same norm to a few ulps of
the accumulation dtype and the same clipped gradients to an ulp of the leaf's dtype,
keep the core's guarantees (no overflow or underflow for finite inputs, inf and NaN
propagate with NaN first) and, for in-place NumPy calls, allocate no full-size
temporaries (a bound on memory, measured with tracemalloc; no timing here).
The 1e8-element accuracy bound is tested with fast paths on in test_norms.py.
"""

from __future__ import annotations

import itertools
import math
import re
import tracemalloc

import numpy as np
import pytest
from conftest import make_backend, ref_norm

import gradclip as gc
from gradclip import _backends, _reference, _tree

FAST = ["numpy", "torch", "jax", "cupy", "torch_cuda"]
ORDS = [2, math.inf, 1, 3]
ULPS = 4  # a few units in the last place of the accumulation dtype


@pytest.fixture(params=FAST)
def fast_backend(request):
    return make_backend(request.param)


def _eps(dtype_name: str) -> float:
    return {"float64": 2.0**-52}.get(dtype_name, 2.0**-23)


def _random_tree(backend, dtypes, rng, big=False):
    """A dict of leaves of several shapes (0-d, empty, non-contiguous, > one chunk)."""
    shapes = [(), (0,), (7,), (33, 65), (3, 4, 5)] + ([(150_000,)] if big else [])
    tree = {}
    for i, shape in enumerate(shapes):
        dt = dtypes[i % len(dtypes)]
        if dt not in backend.dtypes:
            continue
        a = rng.standard_normal(shape) * 10.0 ** rng.integers(-3, 4)
        tree[f"w{i}"] = backend.asarray(a, dt)
    t = backend.asarray(rng.standard_normal((40, 30)), dtypes[0])
    if backend.name in ("numpy", "torch", "jax", "cupy"):
        tree["t"] = t.T if backend.name != "torch" else t.t()  # non-contiguous
    return tree


def _norms_both(tree, p):
    fast = gc.global_norm(tree, ord=p)
    with _backends.fast_paths(False):
        core = gc.global_norm(tree, ord=p)
    return fast, core


def _check_norm(backend, tree, p, ulps=ULPS):
    fast, core = _norms_both(tree, p)
    assert str(fast.dtype) == str(core.dtype)
    f, c = float(backend.to_numpy(fast)), float(backend.to_numpy(core))
    if math.isnan(c):
        assert math.isnan(f)
    elif math.isinf(c):
        assert f == c
    else:
        name = str(core.dtype).rsplit(".", 1)[-1]
        assert f == pytest.approx(c, rel=ulps * _eps(name), abs=0), (f, c)
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
    tree = _random_tree(fast_backend, dtypes, rng, big=p == 2 and dtypes == ["float32"])
    if not tree:
        pytest.skip(f"{fast_backend.name} has none of {dtypes}")
    f = _check_norm(fast_backend, tree, p)
    leaves = [fast_backend.to_numpy(x) for x in _tree.flatten(tree).leaves]
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
        assert f == pytest.approx(exact, rel=ULPS * 2.0**-23, abs=0)


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
        fast, core = _norms_both(tree, p)
        for v in (fast, core):
            v = float(fast_backend.to_numpy(v))
            assert (math.isnan(v) and math.isnan(want)) or v == want


def _clip_both(backend, make, inplace, **kw):
    a, b = make(), make()
    if inplace:
        n1 = gc.clip_by_global_norm_(a, 1.0, **kw)
        with _backends.fast_paths(False):
            n2 = gc.clip_by_global_norm_(b, 1.0, **kw)
        return a, n1, b, n2
    a, n1 = gc.clip_by_global_norm(a, 1.0, **kw)
    with _backends.fast_paths(False):
        b, n2 = gc.clip_by_global_norm(b, 1.0, **kw)
    return a, n1, b, n2


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dt", ["float32", "float64", "float16", "bfloat16"])
def test_clip_matches_core(fast_backend, dt, inplace):
    if inplace and not fast_backend.writable:
        pytest.skip(f"{fast_backend.name} arrays are immutable")
    if dt not in fast_backend.dtypes:
        pytest.skip(f"{fast_backend.name} has no {dt}")
    seed = np.random.default_rng(3).integers(1 << 30)

    def make():
        return _random_tree(fast_backend, [dt], np.random.default_rng(seed), big=True)

    a, n1, b, n2 = _clip_both(fast_backend, make, inplace, eps=1e-6)
    assert float(fast_backend.to_numpy(n1)) == pytest.approx(
        float(fast_backend.to_numpy(n2)), rel=ULPS * _eps(str(n2.dtype).rsplit(".", 1)[-1])
    )
    assert list(a) == list(b)
    leaf_eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}.get(dt, _eps(dt))
    tiny = {"float16": 2.0**-24, "bfloat16": 2.0**-133, "float32": 2.0**-149}.get(dt, 5e-324)
    for k in a:
        x, y = fast_backend.to_numpy(a[k]), fast_backend.to_numpy(b[k])
        assert a[k].shape == b[k].shape and str(a[k].dtype) == str(b[k].dtype)
        np.testing.assert_allclose(x, y, rtol=2 * leaf_eps, atol=tiny)  # tiny: subnormals


def test_no_clip_leaves_values_unchanged(fast_backend):
    if not fast_backend.writable:
        pytest.skip(f"{fast_backend.name} arrays are immutable")
    x = fast_backend.asarray(np.array([0.3, -0.4]), "float32")
    before = fast_backend.to_numpy(x).copy()
    gc.clip_by_global_norm_([x], 1.0)  # norm 0.5: scale exactly 1
    np.testing.assert_array_equal(fast_backend.to_numpy(x), before)


# -- NumPy specifics -------------------------------------------------------------------------


def _numpy_leaves(rng):
    """Large leaves (one strided), runs of small ones and a scalar, for chunks of 4096."""
    return [
        rng.standard_normal((300, 500), dtype=np.float32),
        rng.standard_normal(9, dtype=np.float32),
        *(rng.standard_normal(700, dtype=np.float32) for _ in range(20)),
        rng.standard_normal((90, 300), dtype=np.float32).T,
        rng.standard_normal(70_001, dtype=np.float32),
        np.full((), 2.0, dtype=np.float32),
    ]


def test_numpy_units_cover_every_chunk_once(monkeypatch):
    """The threads' units: the chunks of every large leaf and runs of small leaves of at
    most ``CHUNK`` elements together, in order, each element once."""
    from gradclip._backends import _host, _native

    monkeypatch.setattr(_native, "CHUNK", 4096)
    monkeypatch.setattr(_host, "CHUNK", 4096)
    leaves = _numpy_leaves(np.random.default_rng(5))
    units = _native.units(leaves, _host.chunks, lambda x: x.size)
    for u in units:
        if isinstance(u, range):
            assert sum(leaves[i].size for i in u) <= 4096 or len(u) == 1
    assert len(units) <= 2 * sum(x.size for x in leaves) // 4096 + 2
    got = list(_host._taken(iter(units), leaves, _host.chunks))
    want = [c for x in leaves for c in _host.chunks(x)]
    assert len(got) == len(want)
    for a, b in zip(got, want):
        np.testing.assert_array_equal(a, b)


def test_numpy_threads_agree_with_one_thread(monkeypatch):
    from gradclip._backends import _host, _native

    arrays = _numpy_leaves(np.random.default_rng(5))
    monkeypatch.setattr(_native, "CHUNK", 4096)  # many units of work
    monkeypatch.setattr(_host, "CHUNK", 4096)
    monkeypatch.setattr(_host, "DOT", 1024)
    one = _host.norm_of_arrays(arrays, 2)
    exact = math.sqrt(sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays))
    factors = {np.dtype(np.float32): np.asarray(0.37, dtype=np.float32)}
    outs = [np.empty_like(x, order="C") for x in arrays]
    _host.scale_arrays(arrays, factors, outs)
    monkeypatch.setattr(_native, "PER_THREAD", 1)
    many = _host.norm_of_arrays(arrays, 2)
    assert many == pytest.approx(one, rel=1e-12)
    assert one == pytest.approx(exact, rel=1e-7)  # float32 dots over chunks, float64 sum
    threaded = [np.empty_like(x, order="C") for x in arrays]
    _host.scale_arrays(arrays, factors, threaded)
    copies = [x.copy() for x in arrays]
    _host.scale_arrays(copies, factors)
    for x, a, b, c in zip(arrays, outs, threaded, copies):
        np.testing.assert_array_equal(a, x * np.float32(0.37))
        np.testing.assert_array_equal(b, a)
        np.testing.assert_array_equal(c, a)


@pytest.mark.parametrize("lib", ["numpy", "torch"])
def test_float32_leaves_beside_float64_accumulate_in_float64(lib):
    """With a float64 leaf the accumulator is float64: float32 chunks are widened, so
    the norm has float64 accuracy (a float32 dot would be off by ~1e-8)."""
    rng = np.random.default_rng(5)
    arrays = [rng.random(300_000).astype(np.float32), rng.standard_normal(7)]
    b = make_backend(lib)
    leaves = [b.asarray(a) for a in arrays]
    norm = float(b.to_numpy(gc.global_norm(leaves)))
    with _backends.fast_paths(False):
        core = float(b.to_numpy(gc.global_norm(leaves)))
    assert norm == pytest.approx(ref_norm(arrays, 2), rel=1e-13)
    assert norm == pytest.approx(core, rel=1e-14)


def test_numpy_row_dots_without_vecdot_agree(monkeypatch):
    """Before NumPy 2 (no ``np.vecdot``) the rows of a chunk are dotted by ``einsum``:
    the same sum of squares, to an ulp or two, for full and for short values."""
    from gradclip._backends import _host

    rng = np.random.default_rng(5)
    full = rng.standard_normal(70_001, dtype=np.float32) + 3
    short = ((full.view(np.uint32) + 0x8000) & 0xFFFF0000).view(np.float32)
    monkeypatch.setattr(_host, "_rowdots", _host._einsum_rowdots)
    for c in (full, short):
        want = float(np.sum(c.astype(np.float64) ** 2))
        assert _host._dot_rows(c) == pytest.approx(want, rel=ULPS * 2.0**-23)
        assert _host._dot(c) == pytest.approx(want, rel=ULPS * 2.0**-23)


def test_numpy_chunks_cover_every_element_once():
    from gradclip._backends import _host

    rng = np.random.default_rng(6)
    for x in (
        rng.standard_normal((300, 700)),
        rng.standard_normal((300, 700)).T,
        rng.standard_normal((90_000, 3))[:, 1],
        rng.standard_normal((2, 70_000, 2))[:, :, 0],
        np.float64(3.0) * np.ones(()),
    ):
        pieces = list(_host.chunks(x))
        assert all(c.size <= _host.CHUNK or c.ndim > 1 for c in pieces)
        assert sum(c.size for c in pieces) == x.size
        got = sorted(np.concatenate([c.reshape(-1) for c in pieces]))
        np.testing.assert_array_equal(got, sorted(x.reshape(-1)))


def _peak(f):
    """The peak memory (tracemalloc) of ``f()`` above what was allocated before."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        base = tracemalloc.get_traced_memory()[0]
        f()
        return tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()


def _assert_extra_memory_below_one_percent(grads):
    """The peak memory (tracemalloc) of an in-place clip that really scales."""
    nbytes = sum(x.nbytes for x in grads)
    gc.clip_by_global_norm_(grads, 1.0)  # warm: the thread pool, imports
    peak = _peak(lambda: gc.clip_by_global_norm_(grads, 0.5))
    assert peak <= 0.01 * nbytes, (peak, nbytes)


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize(("dt", "big"), [("float32", 1e30), ("float64", 1e200)])
def test_numpy_exact_path_extra_memory_below_one_percent(dt, big, native, monkeypatch):
    """Values whose squares overflow the fast sum take the exact path: it works on
    pieces of ``EXACT_PIECE`` elements, never on a float64 copy of a whole chunk."""
    from gradclip._backends import _native

    if not native:
        monkeypatch.setattr(_native, "lib", None)
    grads = _grads_of_18m_bytes_or_more(dt)
    grads[0][:5] = big
    exact = ref_norm([np.asarray(g) for g in grads], 2)
    assert float(gc.global_norm(grads)) == pytest.approx(exact, rel=1e-6)
    peak = _peak(lambda: gc.global_norm(grads))
    assert peak <= 0.01 * sum(x.nbytes for x in grads), peak


def _grads_of_18m_bytes_or_more(dt):
    b = make_backend("numpy")
    rng = np.random.default_rng(7)
    grads = [b.asarray(rng.standard_normal(n), dt) for n in (7_000_000, 1_000_000, 300)]
    grads.append(b.asarray(rng.standard_normal((900, 1100)), dt).T)  # non-contiguous
    return grads


@pytest.mark.parametrize("dt", ["float32", "bfloat16", "float64"])
def test_numpy_in_place_extra_memory_below_one_percent(dt):
    """An in-place call allocates no full-size temporary: peak < 1 % of the bytes.

    What it does allocate is fixed: one chunk buffer per thread (0.8 % in all) and,
    for bfloat16, NumPy's ufunc cast buffers (16 KiB per thread), so the gradients
    here are >= 16 MiB.
    """
    _assert_extra_memory_below_one_percent(_grads_of_18m_bytes_or_more(dt))


@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_numpy_in_place_extra_memory_below_one_percent_on_16_cores(dt, monkeypatch):
    """The same bound on 16 cores (forced here): every thread pays fixed costs (NumPy's
    cast buffers in the 16-bit multiply, 64 KiB at NumPy's default size; its frames),
    so the input's size bounds the threads (16 of them took 640 KB over 18 MB of
    bfloat16). Checked in the worst case, every thread at its peak at once (what a
    machine with fewer cores rarely shows): the peak of one thread's norm and scaling
    of one chunk times the threads, and by a call on a pool of 16 threads."""
    from gradclip._backends import _host, _native

    monkeypatch.setattr(_native, "threads", lambda: 16)
    monkeypatch.setattr(_native, "_pool", None)  # a pool of 16 threads
    grads = _grads_of_18m_bytes_or_more(dt)
    nbytes, size = sum(x.nbytes for x in grads), sum(x.size for x in grads)
    acc = np.dtype(np.float32)
    nbuf = _host._buffer_size(size, acc.itemsize)
    chunk = grads[0][: _host.CHUNK]
    factors = {chunk.dtype: np.asarray(1.0, dtype=np.float32)}  # x * 1 is x
    one_thread = max(
        _peak(lambda: _host._plain_sum([chunk], acc, nbuf)),
        _peak(lambda: _host._scale_work([(chunk, chunk)], factors)),
    )
    n = _native.threads_for(size)
    try:
        assert n * one_thread <= 0.01 * nbytes, (n, one_thread, nbytes)
        _assert_extra_memory_below_one_percent(grads)
    finally:
        if _native._pool is not None:
            _native._pool[1].shutdown()


@pytest.mark.parametrize("dt", ["float32", "bfloat16"])
def test_numpy_many_small_leaves_extra_memory_below_one_percent(dt):
    """2000 leaves of 256 elements (the benchmark's third set): the call keeps no
    per-leaf objects (no copy of the list, no paths, no list of views), so its peak
    stays under 1 % of the gradients' bytes, Python objects included."""
    b = make_backend("numpy")
    rng = np.random.default_rng(9)
    grads = [b.asarray(rng.standard_normal(256), dt) for _ in range(2000)]
    _assert_extra_memory_below_one_percent(grads)


def test_flat_list_paths_name_the_leaf():
    grads = [np.ones(3), np.ones(2), np.ones(4)]
    grads[1].flags.writeable = False
    with pytest.raises(TypeError, match=r"grads\[1\] cannot be clipped in place"):
        gc.clip_by_global_norm_(grads, 1.0)
    assert grads[0][0] == 1.0  # nothing written
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype int64"):
        gc.clip_by_global_norm_([np.ones(2), np.ones(2), np.ones(2, dtype=np.int64)], 1.0)


# -- torch: the CPU paths (blocked rows, concatenated small tensors, NumPy views) -------------


@pytest.mark.parametrize("inplace", [True, False])
def test_torch_cpu_many_small_and_large_tensors_match_core(inplace):
    """Hundreds of small tensors of two dtypes (concatenated in batches), large ones
    (blocked rows; bfloat16 widened through the buffer), a strided one (NumPy views):
    the same norm as the core to a few ulps, the same clipped values."""
    torch = pytest.importorskip("torch")
    g = torch.Generator().manual_seed(0)

    def make():
        g.manual_seed(0)
        xs = [
            torch.randn(int(n), generator=g) * 3
            for n in torch.randint(1, 300, (400,), generator=g)
        ]
        xs += [torch.randn(5, 7, generator=g).to(torch.bfloat16) for _ in range(50)]
        xs += [
            torch.randn(70_001, generator=g),
            torch.randn(300, 257, generator=g).to(torch.bfloat16),
        ]
        xs.append(torch.randn(600, 500, generator=g).t())  # strided
        return xs

    a, n1, b, n2 = _clip_both(make_backend("torch"), make, inplace, eps=1e-6)
    assert float(n1) == pytest.approx(float(n2), rel=ULPS * 2.0**-23)
    exact = ref_norm([x.double().numpy() for x in make()], 2)
    assert float(n1) == pytest.approx(exact, rel=ULPS * 2.0**-23)
    for x, y in zip(a, b):
        assert x.dtype == y.dtype and x.shape == y.shape
        eps = 2.0**-7 if x.dtype == torch.bfloat16 else 2.0**-23
        np.testing.assert_allclose(x.double().numpy(), y.double().numpy(), rtol=2 * eps)


@pytest.mark.parametrize("widen", [True, False])
@pytest.mark.parametrize("dt", ["bfloat16", "float16"])
def test_torch_cpu_widened_multiply_is_torchs_own_bit_for_bit(dt, widen, monkeypatch):
    """16-bit tensors scaled through the float32 buffer (large contiguous ones, in
    pieces, when there are enough of them) or by ``_foreach_mul_`` (the others) round
    exactly as torch's own ``mul_`` by a float32 scale: once, from the float32
    product."""
    torch = pytest.importorskip("torch")
    from gradclip._backends import _torch

    if widen:
        monkeypatch.setattr(_torch, "WIDE_MIN_BYTES", 0)
    g = torch.Generator().manual_seed(3)
    dtype = getattr(torch, dt)
    xs = [torch.randn(n, generator=g).to(dtype) for n in (100_003, 4096, 17, 1)]
    xs.append(torch.randn(300, 200, generator=g).to(dtype).t())  # strided
    s = torch.tensor(0.7071067, dtype=torch.float32)
    want = [x.clone().mul_(s) for x in xs]
    _torch._widened_mul_(xs, s, 4096, [x.numel() for x in xs])
    for x, w in zip(xs, want):
        assert torch.equal(x, w)


def test_torch_cpu_extreme_values_take_the_exact_path():
    torch = pytest.importorskip("torch")
    for values, dt in (([3e30, 4e30], torch.float32), ([3e-30, 4e-30], torch.float32),
                       ([1e30] * 2000, torch.bfloat16)):  # fmt: skip
        xs = [torch.tensor(values, dtype=dt)] + [torch.tensor(values[:1], dtype=dt)] * 300
        exact = ref_norm([x.double().numpy() for x in xs], 2)
        got = float(gc.global_norm(xs))
        assert math.isfinite(got) and got == pytest.approx(exact, rel=1e-6)


# -- torch: the device path, run on the CPU --------------------------------------------------


@pytest.mark.parametrize("p", [2, math.inf])
@pytest.mark.parametrize("dt", ["float32", "float16", "bfloat16", "float64"])
def test_torch_foreach_terms_match_core(dt, p):
    """The foreach (non-CPU) path's per-leaf terms, combined by the core, on CPU tensors.

    torch's CPU norm kernel is less accurate than CUDA's, hence 1e-6 here.
    """
    from gradclip._backends import _torch

    b = make_backend("torch")
    rng = np.random.default_rng(8)
    tree = _tree.flatten(_random_tree(b, [dt, "float32"], rng))
    got = float(
        _reference.combine(tree, _torch.leaf_terms(_torch.TorchPath(tree, "device"), p), p)
    )
    with _backends.fast_paths(False):
        want = float(_reference.tree_norm(tree, p))
    assert got == pytest.approx(want, rel=1e-6)
    for values in ([3e30, 4e30], [np.inf, 1.0], [np.nan, np.inf]):
        if dt == "float16" and abs(values[0]) > 1e5:
            continue
        t = _tree.flatten([b.asarray(np.array(values), dt)])
        got = float(_reference.combine(t, _torch.leaf_terms(_torch.TorchPath(t, "device"), p), p))
        want = ref_norm([np.array(values, dtype=np.float64)], p)
        assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=1e-2)


@pytest.mark.parametrize("dt", ["float32", "float64"])
def test_torch_clip_scale_matches_core_bit_for_bit(dt):
    """torch's three-kernel scale (a CPU scalar for ``max_norm``, the quotient
    overwritten where it is not used) against the core's, at the edges: zero and
    infinite norms and thresholds, 0/0 and inf/inf, NaN, a threshold that overflows
    float32, 0-d thresholds of torch and NumPy."""
    torch = pytest.importorskip("torch")
    from gradclip._backends import _torch

    dtype = getattr(torch, dt)
    three = math.nextafter(3.0, 4.0)
    norms = [0.0, 1.0, 2.5, 3.0, three, 1e30, 1e300, math.inf, math.nan]
    limits = [0.0, 3.0, 1e39, math.inf, np.float64(3.0), torch.tensor(3.0, dtype=torch.float64)]
    for n, m, eps in itertools.product(norms, limits, [0.0, 1e-6]):
        norm = torch.tensor(n, dtype=dtype)
        got = _torch.select(_tree.flatten(norm)).clip_scale(norm, m, eps)
        want = gc.clip_scale(norm, m, eps=eps)  # the reference's
        assert got.dtype == want.dtype and got.shape == ()
        assert got.numpy().tobytes() == want.numpy().tobytes(), (n, m, eps, got, want)


@pytest.mark.parametrize("inplace", [True, False])
@pytest.mark.parametrize("dts", [["float32"], ["bfloat16"], ["float16", "float32"]])
def test_torch_device_path_on_cpu_matches_core(dts, inplace, monkeypatch):
    """The path of CUDA tensors (float64 foreach norms, their norm, the three-kernel
    scale, one foreach multiply per group), run on CPU tensors, against the core."""
    torch = pytest.importorskip("torch")
    from gradclip._backends import _torch

    monkeypatch.setattr(_torch, "_kind", lambda tree: "device")
    monkeypatch.setattr(_torch.TorchPath, "on_cuda", property(lambda self: True))
    b = make_backend("torch")
    rng = np.random.default_rng(9)
    grads = _random_tree(b, dts, rng, big=True)
    core = {k: v.clone() for k, v in grads.items()}
    with _backends.fast_paths(False):
        want_norm = gc.clip_by_global_norm_(core, 1.0, eps=1e-6)
    if inplace:
        norm = gc.clip_by_global_norm_(grads, 1.0, eps=1e-6)
        got = grads
    else:
        got, norm = gc.clip_by_global_norm(grads, 1.0, eps=1e-6)
    assert float(norm) == pytest.approx(float(want_norm), rel=ULPS * 2.0**-23)
    for k in core:
        tol = 2.0**-7 if got[k].dtype == torch.bfloat16 else 2.0**-10  # an ulp of the leaf
        torch.testing.assert_close(got[k], core[k], rtol=tol, atol=0)


def test_torch_traced_and_autograd_use_the_core():
    torch = pytest.importorskip("torch")
    x = torch.ones(3, requires_grad=True)
    assert _backends.plan(_tree.flatten([x])).fast is None
    n = gc.global_norm([x * 2.0])
    n.backward()
    np.testing.assert_allclose(x.grad.numpy(), np.full(3, 2 / math.sqrt(3)), rtol=1e-6)


def test_torch_func_transforms_use_the_core():
    """Inside ``torch.func.vmap`` and ``grad`` the leaves are functorch wrappers:
    the core runs (per example, differentiably), not the host path."""
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    norms = torch.func.vmap(lambda r: gc.global_norm([r, r[:2]]))(x)
    want = torch.sqrt((x**2).sum(1) + (x[:, :2] ** 2).sum(1))
    torch.testing.assert_close(norms, want)
    g = torch.func.grad(lambda r: gc.global_norm([r]))(x[0])
    torch.testing.assert_close(g, x[0] / torch.linalg.vector_norm(x[0]))


# -- JAX: compiled eager calls ----------------------------------------------------------------


def test_jax_eager_call_is_compiled_once(monkeypatch):
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from gradclip._backends import _jax

    made = []  # the compiled clip steps the calls run (cached per step and options)

    def jitted_step(step, static):
        made.append(_jitted_step(step, static))
        return made[-1]

    _jitted_step = _jax._jitted_step
    monkeypatch.setattr(_jax, "_jitted_step", jitted_step)
    g = {"a": jnp.ones((4, 5), jnp.float32), "b": jnp.arange(3.0, dtype=jnp.float32)}
    _, n1 = gc.clip_by_global_norm(g, 1.0)
    fn = made[-1]
    size = fn._cache_size()
    out2, n2 = gc.clip_by_global_norm(g, 0.5)  # another max_norm: no recompile
    assert made[-1] is fn
    assert fn._cache_size() == size
    assert float(n1) == float(n2) == pytest.approx(math.sqrt(25.0))
    np.testing.assert_allclose(np.asarray(out2["b"]), np.arange(3.0) * 0.5 / 5.0, rtol=1e-6)
    jitted, n3 = jax.jit(lambda g: gc.clip_by_global_norm(g, 0.5))(g)
    assert float(n3) == float(n2)
    np.testing.assert_array_equal(np.asarray(jitted["a"]), np.asarray(out2["a"]))


@pytest.mark.parametrize("nonfinite", ["propagate", "zero"])
def test_jax_traced_multiply_reads_the_leaves_behind_a_barrier(nonfinite):
    """Under jit the multiply reads each leaf through ``optimization_barrier`` (else XLA
    shares a float32 copy of every bfloat16 leaf between the norm and the multiply,
    3x slower), and the values are the core's."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    g = [jnp.linspace(-3, 3, 64, dtype=jnp.bfloat16), jnp.arange(8, dtype=jnp.bfloat16)]

    def clip(g):
        return gc.clip_by_global_norm(g, 1.0, nonfinite=nonfinite)

    # one per leaf, and one for the scales of the norm's branch for accelerators
    assert str(jax.make_jaxpr(clip)(g)).count("optimization_barrier") == len(g) + 1
    out, n = jax.jit(clip)(g)
    with _backends.fast_paths(False):
        ref, rn = clip(g)
        # a new function: make_jaxpr caches its traces by function
        assert "optimization_barrier" not in str(jax.make_jaxpr(lambda g: clip(g))(g))
    assert float(n) == pytest.approx(float(rn), rel=ULPS * 2.0**-23)
    for a, b in zip(out, ref):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


# -- JAX: the branch-free norm of accelerators, run on the CPU --------------------------------

LADDER_CASES = {
    "normal": [np.linspace(-3, 3, 1001), np.arange(70_000) / 7e4],
    "1e30": [np.full(100, 1e30), np.ones(10)],  # squares overflow float32
    "3e38": [np.full(100, 3e38)],  # the norm itself overflows: inf
    "1e19 and 1": [np.array([1e19, -2e19]), np.ones(5000)],
    "1e-30": [np.full(100, 1e-30), np.full(3, 2e-31)],  # squares underflow
    "1e-20": [np.full(100, 1e-20)],
    "1e-36 and 1e-44": [np.array([1e-36, -3e-37]), np.full(7, 1e-44)],
    "1e20 alone": [np.array(1e20)],  # one element: XLA simplifies scalar expressions
    "1.3e-21 alone": [np.array([1.257e-21])],
    "zero": [np.zeros(10)],
    "inf": [np.array([1.0, -np.inf])],
    "nan": [np.array([1.0, np.nan, np.inf])],
}


def _ladder_ref(leaves):
    """math.fsum in float64, then rounded to float32 (inf where it overflows), with
    the subnormals that XLA's CPU flushes to zero left out."""
    xs = np.concatenate([np.asarray(x, np.float64).ravel() for x in leaves])
    if not np.isfinite(xs).all():
        return float(np.sqrt(np.sum(xs * xs)))
    xs = xs[np.abs(xs) >= np.finfo(np.float32).tiny]
    with np.errstate(over="ignore"):
        return float(np.float32(math.sqrt(math.fsum(xs * xs))))


@pytest.mark.parametrize("case", list(LADDER_CASES))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_jax_ladder_norm_matches_the_exact_norm(case, dtype):
    """The GPU's branch-free norm (every rung of the ladder is used by some case)
    against the float64 sum, and against the core: to a few float32 ulps."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from gradclip._backends import _jax

    leaves = [jnp.asarray(np.asarray(x, np.float32)).astype(dtype) for x in LADDER_CASES[case]]
    parts = [x.astype(jnp.float32).reshape(-1) for x in leaves]
    got = float(jax.jit(_jax.ladder_norm)(parts))
    want = _ladder_ref(leaves)
    with _backends.fast_paths(False):
        core = float(gc.global_norm(leaves))
    for ref in (want, core):
        if math.isfinite(ref) and ref > 0:
            assert got == pytest.approx(ref, rel=ULPS * 2.0**-23, abs=0)
        else:
            assert got == ref or (math.isnan(got) and math.isnan(ref))


@pytest.mark.parametrize("value", [1.5, 1e200, 1e-200, 1e300, 1e-300])
def test_jax_ladder_norm_in_float64(value):
    """The float64 rungs (0, -640, 640): squares that overflow or underflow float64."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from gradclip._backends import _jax

    x = np.array([value, -2 * value, value / 3])
    got = float(jax.jit(_jax.ladder_norm)([jnp.asarray(x, jnp.float64)]))
    want = value * math.sqrt(1 + 4 + 1 / 9)  # |x| = value * |[1, -2, 1/3]|
    assert got == pytest.approx(want, rel=4 * 2.0**-52)


@pytest.mark.parametrize("fast", [True, False])
def test_jax_divisions_by_huge_values(fast):
    """XLA multiplies by ``1 / d``, which flushes to 0 beyond 2**126 in float32: the
    core's norm of 3e38s was 0, and a clip by a norm of 2e38 zeroed the gradients."""
    jnp = pytest.importorskip("jax.numpy")

    with _backends.fast_paths(fast):
        assert float(gc.global_norm([jnp.full(100, 3e38, jnp.float32)])) == math.inf
        g = [jnp.full(4, 1e38, jnp.float32)]
        assert float(gc.global_norm(g)) == pytest.approx(2e38, rel=1e-6)
        out, _ = gc.clip_by_global_norm(g, 1000.0)
        np.testing.assert_allclose(np.asarray(out[0]), np.full(4, 500.0), rtol=1e-6)
        (u,) = gc.adaptive_grad_clip(g, [jnp.full(4, 1e4, jnp.float32)], 0.01)
        np.testing.assert_allclose(np.asarray(u), np.full(4, 100.0), rtol=1e-6)


def test_jax_ladder_norm_derivatives():
    """``x / |x|``, also where unused rungs overflow (1e30) or underflow (1), 0 at 0;
    ``vmap`` gives each row's norm."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    from gradclip._backends import _jax

    for x in (jnp.linspace(-2.0, 3.0, 50), jnp.full(4, 1e30), jnp.full(4, 1e-30)):
        (g,) = jax.grad(_jax.ladder_norm)([x])
        ref = np.asarray(x, np.float64) / np.linalg.norm(np.asarray(x, np.float64))
        np.testing.assert_allclose(np.asarray(g), ref, rtol=1e-6)
    (g,) = jax.grad(_jax.ladder_norm)([jnp.zeros(3)])
    np.testing.assert_array_equal(np.asarray(g), np.zeros(3))
    rows = np.random.default_rng(0).standard_normal((5, 9)).astype(np.float32)
    got = jax.vmap(lambda r: _jax.ladder_norm([r]))(jnp.asarray(rows))
    np.testing.assert_allclose(np.asarray(got), np.linalg.norm(rows, axis=1), rtol=1e-6)


def test_jax_traced_norm_is_branch_free_off_the_cpu():
    """Lowered for CUDA (no GPU needed), a jitted clip holds the ladder and not the
    ``lax.cond`` guard, whose predicate XLA's GPU backend would read on the host; for
    the CPU, the guard."""
    jax = pytest.importorskip("jax")
    import jax.numpy as jnp

    g = [jnp.ones((300, 300), jnp.float32), jnp.ones(10, jnp.bfloat16)]
    fn = jax.jit(lambda g: gc.clip_by_global_norm(g, 1.0))

    def constants(platform):
        text = jax.export.export(fn, platforms=[platform])(g).mlir_module()
        found = re.findall(r"dense<([-+.0-9Ee]+)> : tensor<f32>", text)
        return {float(np.float32(v)) for v in found}  # printed with 9 digits

    rung, guard = 2.0**80, 2.0**120  # a factor of the ladder, the guard's upper bound
    assert rung in constants("cuda") and guard not in constants("cuda")
    assert guard in constants("cpu") and rung not in constants("cpu")


# -- CuPy: the planning and the kernel's arithmetic, on the CPU --------------------------------


def test_cupy_plan_covers_every_element_once():
    from gradclip._backends import _cupy

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
    from gradclip._backends import _cupy

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
    assert (math.isnan(got) and math.isnan(want)) or got == pytest.approx(want, rel=ULPS * 2e-7)


def test_cupy_kernel_sources_format():
    from gradclip._backends import _cupy

    for dt, (t, widen, acc) in _cupy._CTYPES.items():
        for src in (_cupy._TERMS_SRC, _cupy._SCALE_SRC, _cupy._FINISH_SRC):
            code = src.format(name=dt, t=t, widen=widen, acc=acc, threads=256, two_sweeps=0)
            assert "gradclip_" in code and "{" in code and "{{" not in code
