"""NumPy fast path: the global norm and the scaling in cache-sized chunks on threads.

NumPy's ufuncs run on one thread but release the GIL, so large leaves are cut into
chunks of ``CHUNK`` elements (views, never copies) spread over a small thread pool.

The 2-norm of a chunk is one BLAS dot (``sdot``/``ddot``, one read of the memory)
whose result is checked on the host, which is free here: when it is finite and far
from the dtype's overflow and underflow thresholds it is accurate to a few ulps (the
chunk is short, and chunks are combined in float64). Only when it is not (an inf or
NaN element, values near 1e19 in float32, tiny values) is the chunk recomputed
exactly: float32 and 16-bit chunks as float64, whose squares can neither overflow nor
underflow, float64 chunks scaled by their largest magnitude as in the core. So every
finite input gives a finite, accurate norm, inf and NaN propagate (NaN first), and the
result is the core's to a few ulps. 16-bit leaves are converted chunk by chunk into a
small float32 buffer. The only extra memory is one chunk buffer per thread.
"""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from . import _clipping, _tree

__all__ = ["global_norm_impl", "norm_of_arrays", "scale_arrays", "scale_impl"]

CHUNK = 1 << 17  # elements per task: a float32 chunk is 512 KiB, it stays in L2
PARALLEL_MIN = 1 << 19  # below this many elements one thread is faster than a pool
# sums of squares inside these bounds lost nothing to overflow or underflow
_SAFE = {np.dtype(np.float32): (2.0**-100, 2.0**120), np.dtype(np.float64): (2.0**-960, 2.0**960)}

_pool: tuple[int, ThreadPoolExecutor] | None = None
_pool_lock = threading.Lock()


def threads() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - macOS, Windows
        return max(1, os.cpu_count() or 1)


def _executor() -> ThreadPoolExecutor:
    global _pool
    with _pool_lock:
        if _pool is None or _pool[0] != os.getpid():  # a forked child needs its own
            _pool = (os.getpid(), ThreadPoolExecutor(threads(), "gradclip"))
        return _pool[1]


def _supported(x: Any) -> bool:
    dt = x.dtype
    return dt in _SAFE or (dt.kind == "f" and dt.itemsize == 2) or dt.name == "bfloat16"


def chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    """Views of ``x`` of at most ``CHUNK`` elements that cover it once."""
    if x.ndim == 1 and 0 < x.size <= CHUNK and x.flags.c_contiguous:  # a small leaf
        yield x
    elif x.ndim == 0:
        yield x.reshape(1)
    elif x.flags.c_contiguous or x.flags.f_contiguous:
        flat = x.ravel(order="K")  # a view in memory order
        for i in range(0, flat.size, CHUNK):
            yield flat[i : i + CHUNK]
    else:
        row = x[0].size if x.shape[0] else 0
        if row > CHUNK and x.ndim > 1:
            for r in x:
                yield from chunks(r)
        else:
            step = max(1, CHUNK // max(row, 1))
            for i in range(0, x.shape[0], step):
                yield x[i : i + step]


def _all_chunks(arrays: Sequence[np.ndarray]) -> Iterator[np.ndarray]:
    for x in arrays:
        yield from chunks(x)


def _run(tasks: Iterable[Any], work: Callable[[Iterable[Any]], Any], size: int) -> list[Any]:
    """``work`` over contiguous slices of ``tasks``, one per thread when ``size`` is large
    (the tasks are listed only then: one small thread consumes them lazily)."""
    n = threads() if size >= PARALLEL_MIN else 1
    if n == 1:
        return [work(tasks)]
    tasks = list(tasks)
    cut = [len(tasks) * i // n for i in range(n + 1)]
    parts = [tasks[cut[i] : cut[i + 1]] for i in range(n)]
    return list(_executor().map(work, parts))


# -- the norm -------------------------------------------------------------------------


def _sumsq(c: np.ndarray, buf: np.ndarray | None, acc: np.dtype) -> tuple[float, float]:
    """``(d, s)`` with ``d**2 * s`` the chunk's sum of squares, computed without loss;
    chunks not of the accumulation dtype ``acc`` are widened into ``buf`` first."""
    if c.dtype != acc or not (c.flags.c_contiguous and c.ndim == 1):
        assert buf is not None
        b = buf[: c.size]
        np.copyto(b.reshape(c.shape), c, casting="unsafe")
        c = b
    s = float(np.dot(c, c))
    lo, hi = _SAFE[c.dtype]
    if lo <= s <= hi or (s == 0 and not c.any()):
        return 1.0, s
    if c.dtype == np.float32:  # squares of float32 values are exact-range in float64
        w = c.astype(np.float64)
        return 1.0, float(np.dot(w, w))
    m = float(np.max(np.abs(c)))
    d = m if math.isfinite(m) and m > 0 else 1.0
    w = c / d
    return d, float(np.dot(w, w))


def _combine2(pairs: list[tuple[float, float]]) -> float:
    """``sqrt(sum d**2 * s)`` with the largest ``d`` as the common scale."""
    pairs = [(d, s) for d, s in pairs if s != 0]  # NaN != 0: kept
    if not pairs:
        return 0.0
    if any(math.isnan(s) for _, s in pairs):
        return math.nan
    big = max(d for d, _ in pairs)
    return big * math.sqrt(math.fsum((d / big) ** 2 * s for d, s in pairs))


def _maxabs(c: np.ndarray) -> float:
    hi, lo = float(np.max(c)), float(np.min(c))
    if math.isnan(hi) or math.isnan(lo):
        return math.nan
    return max(hi, -lo)


def _buffer_size(total_bytes: int, n_threads: int, itemsize: int) -> int:
    # at most 0.25 % of the gradients' bytes for all buffers together (>= 1024 elements);
    # larger pieces convert faster (16-bit leaves), so take all of that
    return int(min(CHUNK, max(1024, total_bytes // 400 // n_threads // itemsize)))


def norm_of_arrays(arrays: Sequence[np.ndarray], p: float) -> float:
    """The global ``p``-norm (``p`` 2 or inf) of NumPy arrays, as a Python float."""
    size = sum(x.size for x in arrays)
    if math.isinf(p):

        def maxabs(ts: Iterable[np.ndarray]) -> float:
            big = 0.0
            for c in ts:
                v = _maxabs(c)
                if math.isnan(v):  # max() would drop it
                    return v
                big = max(big, v)
            return big

        vals = _run(_all_chunks(arrays), maxabs, size)
        return math.nan if any(math.isnan(v) for v in vals) else max(vals)

    acc = np.dtype(np.float64 if any(x.dtype == np.float64 for x in arrays) else np.float32)
    needs_buf = any(
        x.dtype != acc or not (x.flags.c_contiguous or x.flags.f_contiguous) for x in arrays
    )
    nbuf = _buffer_size(sum(x.nbytes for x in arrays), threads(), np.dtype(acc).itemsize)
    nbuf = nbuf if needs_buf else 0

    def work(ts: Iterable[np.ndarray]) -> list[tuple[float, float]]:
        buf = np.empty(nbuf, dtype=acc) if nbuf else None
        plain = 0.0  # the sums of chunks that needed no scaling (d = 1)
        scaled = []
        dot, f32 = np.dot, np.dtype(np.float32)
        lo, hi = _SAFE[f32]
        with np.errstate(over="ignore", invalid="ignore"):  # checked in _sumsq
            for c in ts:
                if acc == f32 and c.dtype == f32 and c.ndim == 1 and c.flags.c_contiguous:
                    v = float(dot(c, c))  # the common case, inlined: _sumsq's first step
                    if lo <= v <= hi:
                        plain += v
                        continue
                pieces = _split(c, buf.size) if buf is not None and c.size > buf.size else (c,)
                for piece in pieces:
                    d, v = _sumsq(piece, buf, acc)
                    if d == 1.0:
                        plain += v
                    else:
                        scaled.append((d, v))
        return [(1.0, plain), *scaled]

    return _combine2([pair for part in _run(_all_chunks(arrays), work, size) for pair in part])


def _split(c: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """``c`` (a chunk of a non-contiguous leaf) in pieces of at most ``n`` elements."""
    if c.ndim <= 1:
        for i in range(0, c.shape[0] if c.ndim else 1, n):
            yield c[i : i + n] if c.ndim else c.reshape(1)
        return
    for r in c:
        yield from _split(r, n)


def global_norm_impl(tree: _tree.Tree) -> Callable[[_tree.Tree, float], Any] | None:
    if not all(_supported(x) for x in tree.leaves):
        return None  # complex or exotic dtypes: the core

    def norm(tree: _tree.Tree, p: float) -> Any:
        if p != 2 and not math.isinf(p):
            from . import _backends, _norms

            with _backends.fast_paths(False):
                return _norms.tree_norm(tree, p)
        return np.asarray(norm_of_arrays(tree.leaves, p), dtype=tree.acc_dtype)

    return norm


# -- the scaling ----------------------------------------------------------------------


def scale_arrays(pairs: Sequence[tuple[np.ndarray, np.ndarray, Any]]) -> None:
    """``np.multiply(src, s, out=dst)`` for each ``(src, dst, s)``, chunked on threads."""

    def tasks() -> Iterator[tuple[np.ndarray, np.ndarray, Any]]:
        for src, dst, s in pairs:
            if src is dst:
                for c in chunks(src):
                    yield c, c, s
            elif src.flags.c_contiguous and dst.flags.c_contiguous:
                a, b = src.reshape(-1), dst.reshape(-1)
                for i in range(0, a.size, CHUNK):
                    yield a[i : i + CHUNK], b[i : i + CHUNK], s
            else:
                yield src, dst, s

    def work(ts: Iterable[tuple[np.ndarray, np.ndarray, Any]]) -> None:
        for a, b, s in ts:
            np.multiply(a, s, out=b)

    _run(tasks(), work, sum(src.size for src, _, _ in pairs))


def scale_impl(tree: _tree.Tree, *, inplace: bool) -> Callable[[_tree.Tree, Any], Any] | None:
    if not all(_supported(x) for x in tree.leaves):
        return None

    def scale(tree: _tree.Tree, scale: Any) -> list[Any]:
        casts: dict[Any, Any] = {}
        by_dtype = {x.dtype: x for x in tree.leaves}
        per_dtype = {dt: _clipping._cast(tree, casts, scale, x) for dt, x in by_dtype.items()}
        factors = [per_dtype[x.dtype] for x in tree.leaves]
        if inplace:
            if float(scale) != 1.0:  # x * 1 is x bit for bit: skip the write
                scale_arrays([(x, x, s) for x, s in zip(tree.leaves, factors)])
            return tree.leaves
        outs = [np.empty_like(x, order="C") for x in tree.leaves]
        scale_arrays([(x, y, s) for x, y, s in zip(tree.leaves, outs, factors)])
        return outs

    return scale
