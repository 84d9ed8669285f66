"""The NumPy backend: the host paths of ``gradclip._backends._host`` on the pool of
``gradclip._backends._native``.

Large arrays are cut into chunks (views) and small ones grouped into runs that the
pool's threads take one by one; every element must be read once, the threads must
agree with one thread, and an in-place call must allocate no full-size temporary (a
bound on memory, measured with tracemalloc; no timing here). That the NumPy path
matches the reference is checked with every backend in test_fast_common.py.
"""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
from conftest import make_backend, ref_norm

import gradclip as gc
from gradclip._backends import _host, _native

# -- the pool's units of work: chunks of large arrays, runs of small ones ---------------------


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


def test_numpy_chunks_cover_every_element_once():
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


# -- memory: an in-place call allocates no full-size temporary --------------------------------


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


# -- a flat list of leaves: no walk per leaf, paths made only for messages --------------------


def test_flat_list_paths_name_the_leaf():
    grads = [np.ones(3), np.ones(2), np.ones(4)]
    grads[1].flags.writeable = False
    with pytest.raises(TypeError, match=r"grads\[1\] cannot be clipped in place"):
        gc.clip_by_global_norm_(grads, 1.0)
    assert grads[0][0] == 1.0  # nothing written
    with pytest.raises(TypeError, match=r"grads\[2\] has dtype int64"):
        gc.clip_by_global_norm_([np.ones(2), np.ones(2), np.ones(2, dtype=np.int64)], 1.0)
