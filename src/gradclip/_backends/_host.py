"""Host memory: the norm and the scaling of NumPy arrays, in chunks on threads.

Used by the NumPy backend and, on zero-copy views, by the torch backend's CPU path.
Large arrays are cut into chunks of ``CHUNK`` elements (views, never copies), small
ones grouped into runs, and the threads of ``._native``'s pool take these units
one by one (NumPy releases the GIL).

The 2-norm is a blocked sum, its parts added in double. In a float32 accumulation no
float32 lane adds more than a few squares: the C kernel sums contiguous bfloat16 and
float32 chunks (float32 lanes over short rows, the rows added in double) and a
float32 buffer the others are widened into; without the kernels every chunk is
widened into a float64 buffer, where a float32 value's square is exact, and summed by
a BLAS dot. Either way the sum is accurate for any input and any layout of the
values, and no square overflows or underflows. In a float64 accumulation a BLAS dot
per ``DOT`` elements; when the total may have lost something to overflow or
underflow (inf, NaN, huge or tiny values), every chunk is summed again, scaled by its
largest magnitude. 16-bit and strided chunks are widened a piece at a time into a
small buffer per thread; the buffers, the only arrays allocated, stay under
``BUFFER_SHARE`` of the gradients' bytes.
"""

from __future__ import annotations

import itertools
import math
import operator
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from . import _native
from ._native import CHUNK

__all__ = [
    "accumulator",
    "is_safe",
    "norm_of_arrays",
    "scale_arrays",
    "sum_dtype",
    "sum_of_squares",
    "sumsq",
]

# elements per float64 BLAS dot: OpenBLAS runs a longer ddot (over 10000) on threads of
# its own, 10 to 100 times slower beside the pool's threads or on a busy machine
DOT = 1 << 13
BUFFER_SHARE = 0.008  # the buffers of all threads, as a share of the gradients' bytes
SMALL_SIZE = 1 << 22  # below this many elements, half the share: the call's fixed costs
# (Python objects, NumPy's ufunc buffers: a few KiB) count against the same 1 %
BUFFER_MAX = 1 << 17  # elements of one thread's buffer (larger ones fall out of L2)
# a float64 total sum of squares inside these bounds lost nothing to overflow, and
# nothing that matters to underflow (each square's absolute error is below 2**-1074)
_SAFE_TOTAL = (2.0**-900, 2.0**900)
# a float64 chunk's sum of squares inside these bounds is accurate on its own
_SAFE = (2.0**-960, 2.0**960)


def chunks(x: np.ndarray) -> Iterable[np.ndarray]:
    """Views of ``x`` of at most ``CHUNK`` elements that cover it once; 1-D and
    contiguous when ``x`` is contiguous."""
    if x.ndim == 1 and 0 < x.size <= CHUNK and x.flags.c_contiguous:  # a small leaf
        return (x,)
    return _chunks(x)


def _chunks(x: np.ndarray) -> Iterator[np.ndarray]:
    if x.ndim == 0:
        yield x.reshape(1)
    elif x.flags.c_contiguous or x.flags.f_contiguous:
        flat = x.ravel(order="K")  # a view in memory order
        for i in range(0, flat.size, CHUNK):
            yield flat[i : i + CHUNK]
    else:
        row = x[0].size if x.shape[0] else 0
        if row > CHUNK and x.ndim > 1:
            for r in x:
                yield from _chunks(r)
        else:
            step = max(1, CHUNK // max(row, 1))
            for i in range(0, x.shape[0], step):
                yield x[i : i + step]


def _taken(units: Iterator[Any], items: Sequence[Any], split: Callable) -> Iterator[Any]:
    """The chunks of the units this thread takes from the shared ``units`` (a list's
    iterator: ``next`` is atomic under the GIL), each when the last is done, so a
    thread that runs slower (memory further away, a core shared with another tenant)
    takes fewer."""
    for u in units:
        if isinstance(u, range):
            for i in u:
                yield from split(items[i])
        else:
            yield u


def _run(
    items: Sequence[Any],
    work: Callable[[Iterable[Any]], Any],
    size: int,
    *,
    split: Callable[[Any], Iterable[Any]] = chunks,
    threads: int | None = None,
    item_size: Callable[[Any], int] = operator.attrgetter("size"),
) -> list[Any]:
    """``work`` over the chunks of ``items``: on one thread for small inputs, else on
    a few threads that take the units of ``._native.units`` one by one."""
    n = _native.threads_for(size) if threads is None else threads
    if n == 1:
        return [work(itertools.chain.from_iterable(map(split, items)))]
    todo = iter(_native.units(items, split, item_size))
    return _native.on_threads(n, lambda: work(_taken(todo, items, split)))


def _c_contiguous(x: np.ndarray) -> bool:
    return x.flags.c_contiguous


def _native_run_groups(
    arrays: Sequence[np.ndarray],
    size: int,
    kernel: str,
    args: Callable[[np.dtype], tuple[Any, ...]] = lambda dt: (),
    dtypes: Iterable[Any] | None = None,
) -> tuple[list[Any], Sequence[np.ndarray]]:
    """``._native.run_native`` of the C kernel ``kernel`` (``*args(dtype)``) over
    each group of ``._native.native_groups`` of ``arrays`` of ``dtypes`` (of the
    kernels' dtypes; all of them by default; ``size``: the elements of ``arrays``):
    the results, and the arrays left to the other paths (all of them when the
    kernels are not built)."""
    kinds = _native.DTYPES if dtypes is None else set(dtypes) & _native.DTYPES
    if _native.lib is None or not kinds or not arrays:
        return [], arrays
    groups, rest = _native.native_groups(arrays, kinds, _c_contiguous)
    out: list[Any] = []
    for dt, xs in groups.items():
        n = size if not rest and len(groups) == 1 else sum(x.size for x in xs)
        call = getattr(_native.lib, kernel)
        out += _native.run_native(xs, _native.lib.address, n, call, dt.itemsize, *args(dt))
    return out, [arrays[i] for i in rest]


def _pieces(c: np.ndarray, n: int) -> Iterator[np.ndarray]:
    """``c`` (a chunk) in pieces of at most ``n`` elements (1-D where ``c`` is)."""
    if c.size <= n:
        yield c
    elif c.ndim <= 1:
        for i in range(0, c.shape[0], n):
            yield c[i : i + n]
    else:
        for r in c:
            yield from _pieces(r, n)


def _buffer_size(size: int, itemsize: int, n_threads: int | None = None) -> int:
    """Elements of each thread's buffer for ``size`` elements of gradients (each of at
    least 2 bytes): all buffers together stay within ``BUFFER_SHARE`` of their bytes."""
    n = _native.threads_for(size) if n_threads is None else n_threads
    share = BUFFER_SHARE if size >= SMALL_SIZE else BUFFER_SHARE / 2
    return min(BUFFER_MAX, max(1024, int(2 * size * share) // n // itemsize))


# threads pay for buffered (widened) chunks only when the pieces are this large:
# each piece is a few NumPy calls that take the GIL between them
BUFFERED_PARALLEL_MIN = 1 << 17


# -- the norm -------------------------------------------------------------------------


def _native_chunk(c: np.ndarray) -> bool:
    """True for a chunk the C kernel sums (``._native``, when built):
    bfloat16 or float32, 1-D and contiguous."""
    return (
        c.dtype in _native.DTYPES
        and c.ndim == 1
        and c.flags.c_contiguous
        and _native.lib is not None
    )


def sum_dtype(acc: Any) -> np.dtype:
    """The dtype the squares of an ``acc`` accumulation are summed in: float32 (the C
    kernel, whose rows are added in double) where the kernels are built, else float64,
    whose squares of float32 values are exact and whose BLAS dot is accurate to
    ``n * 2**-53`` in any order of addition. A float32 BLAS dot is not: it adds
    thousands of squares in each of a few float32 lanes, and where one lane holds a
    large square, the small ones after it are lost (1e-4 of the norm, or worse)."""
    if np.dtype(acc) == np.float32 and _native.lib is not None:
        return np.dtype(np.float32)
    return np.dtype(np.float64)


def _packed(
    ts: Iterable[np.ndarray],
    dtype: np.dtype,
    nbuf: int,
    reduce: Callable[[np.ndarray], Any],
    exact: Callable[[float], Any],
) -> Iterator[Any]:
    """``reduce`` of every chunk, summed in ``dtype`` (``sum_dtype``): float64
    chunks that are 1-D as they are, the others widened into a buffer of ``nbuf``
    elements: packed (one concatenation per run of 1-D pieces), reduced when full.
    Nothing is lost: the buffer holds each element once, converted exactly. In float32,
    contiguous bfloat16 and float32 chunks are summed by the C kernel as they are, and
    the buffer by the kernel too; ``exact`` puts the kernel's sum in ``reduce``'s form."""
    buf = np.empty(0, dtype=dtype)
    native = dtype == np.float32
    batch: list[np.ndarray] = []  # 1-D pieces to be written at buf[fill:used]
    fill = used = 0

    def write_batch() -> None:
        nonlocal batch, fill
        if batch:
            np.concatenate(batch, out=buf[fill:used], casting="unsafe")
            batch = []
        fill = used

    def flush() -> Any:
        nonlocal fill, used
        write_batch()
        b = buf[:used]
        fill = used = 0
        return exact(_native.sumsq(b)) if native else reduce(b)

    for c in ts:
        one_d = c.ndim == 1
        if native and _native_chunk(c):
            yield exact(_native.sumsq(c))
            continue
        if one_d and c.dtype == dtype and not native:  # BLAS takes it as it is
            yield reduce(c)
            continue
        if not buf.size:
            buf = np.empty(nbuf, dtype=dtype)
        n = c.size
        if one_d and n <= nbuf:  # a small leaf (thousands of them): no generator
            if used + n > nbuf:
                yield flush()
            batch.append(c)
            used += n
            continue
        for piece in _pieces(c, nbuf):
            n = piece.size
            if used + n > nbuf:
                yield flush()
            if piece.ndim == 1:
                batch.append(piece)
            else:
                write_batch()
                np.copyto(buf[used : used + n].reshape(piece.shape), piece, casting="unsafe")
                fill = used + n
            used += n
    if used:
        yield flush()


def _dot(c: np.ndarray) -> float:
    """The sum of squares of ``c`` (1-D, float64): a BLAS dot per ``DOT`` elements,
    each accurate to ``DOT * 2**-53``."""
    if c.shape[0] > DOT:  # a dot each (``vecdot`` would hold the GIL)
        return sum(float(np.dot(d, d)) for d in _pieces(c, DOT))
    return float(np.dot(c, c))


def _plain_sum(ts: Iterable[np.ndarray], acc: np.dtype, nbuf: int) -> float:
    """The sum of the chunks' sums of squares (in ``sum_dtype`` of ``acc``), in
    float64: one read of the memory."""
    return sum(_packed(ts, sum_dtype(acc), nbuf, _dot, float), 0.0)


def sumsq(b: np.ndarray, acc: Any) -> float:
    """The sum of squares of a 1-D array ``b`` (of any float dtype) for an ``acc``
    accumulation, accurate for any values: the C kernel (``sum_dtype`` float32,
    ``b`` contiguous bfloat16 or float32), else a float64 BLAS dot, ``b`` widened to
    float64 ``EXACT_PIECE`` elements at a time when it is not float64."""
    if sum_dtype(acc) == np.float32 and _native_chunk(b):
        return _native.sumsq(b)
    if b.dtype == np.float64:
        return _dot(b)
    wide = np.empty(min(b.shape[0], EXACT_PIECE), dtype=np.float64)
    total = 0.0
    for piece in _pieces(b, EXACT_PIECE):
        w = wide[: piece.shape[0]]
        np.copyto(w, piece, casting="unsafe")
        total += _dot(w)
    return total


EXACT_PIECE = 1 << 14  # elements widened or divided at a time (128 KiB of float64)


def _sumsq(c: np.ndarray) -> tuple[float, float]:
    """``(d, s)`` with ``d**2 * s`` the sum of squares of ``c`` (1-D, float64),
    computed without overflow or underflow, and without a temporary larger than
    ``EXACT_PIECE`` elements."""
    s = _dot(c)
    lo, hi = _SAFE
    if lo <= s <= hi or (s == 0 and not c.any()):
        return 1.0, s
    m = _maxabs(c)
    d = m if math.isfinite(m) and m > 0 else 1.0
    return d, sum(_dot(p / d) for p in _pieces(c, EXACT_PIECE))


def _exact_terms(ts: Iterable[np.ndarray], nbuf: int) -> list[tuple[float, float]]:
    """``(d, s)`` per chunk or buffer of a float64 accumulation, exact (``_sumsq``)."""
    return list(_packed(ts, np.dtype(np.float64), nbuf, _sumsq, lambda s: (1.0, s)))


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


def norm_of_arrays(arrays: Sequence[np.ndarray], p: float, acc: Any = None) -> float:
    """The global ``p``-norm (``p`` 2 or inf) of NumPy arrays, as a Python float,
    accumulated in ``acc`` (default: ``accumulator``)."""
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

        vals = _run(arrays, maxabs, size)
        return math.nan if any(math.isnan(v) for v in vals) else max(vals)

    acc = accumulator(arrays) if acc is None else np.dtype(acc)
    with np.errstate(over="ignore", invalid="ignore"):  # checked: is_safe, _sumsq
        total = sum_of_squares(arrays, acc, size)
        if is_safe(total, acc):
            return math.sqrt(total)
        # float64: an inf or NaN, huge or tiny values, or zeros: every chunk again,
        # each scaled by its largest magnitude
        nbuf = _buffer_size(size, 8)
        parts = _run(arrays, lambda ts: _exact_terms(ts, nbuf), size)
    return _combine2([pair for part in parts for pair in part])


def accumulator(arrays: Iterable[np.ndarray]) -> np.dtype:
    """float64 when any array is a float wider than 32 bits (in any byte order), else
    float32."""
    wide = any(x.dtype.kind == "f" and x.dtype.itemsize > 4 for x in arrays)
    return np.dtype(np.float64 if wide else np.float32)


def sum_of_squares(arrays: Sequence[np.ndarray], acc: np.dtype, size: int) -> float:
    """The blocked sum of squares of ``arrays`` (``size`` elements), in float64: for a
    float32 accumulation ``acc`` accurate for any input (inf and NaN propagate); for
    float64 a dot per chunk, accurate when ``is_safe``."""
    acc = np.dtype(acc)
    dtype = sum_dtype(acc)
    total = 0.0
    if dtype == np.float32:  # the C kernels take the contiguous float32/bfloat16 arrays
        parts, arrays = _native_run_groups(arrays, size, "sumsq_table")
        total = sum(parts)
        if not arrays:
            return total
        size = sum(x.size for x in arrays)
    n_threads = _native.threads_for(size)
    nbuf = _buffer_size(size, dtype.itemsize)
    widened = {x.dtype for x in arrays} - {dtype, _native.BF16 if dtype == np.float32 else None}
    if nbuf < BUFFERED_PARALLEL_MIN and widened:
        n_threads, nbuf = 1, _buffer_size(size, dtype.itemsize, 1)
    with np.errstate(over="ignore", invalid="ignore"):
        parts = _run(arrays, lambda ts: _plain_sum(ts, acc, nbuf), size, threads=n_threads)
    return total + sum(parts)


def is_safe(total: float, acc: Any) -> bool:
    """True when a sum of squares of ``sum_of_squares`` is the norm's square to
    the accumulation's accuracy: any float32 one (its squares are summed in double,
    where none of a float32 value overflows or underflows); a float64 one that lies
    well inside float64's range (False for inf and NaN, which the exact path sorts)."""
    if np.dtype(acc) == np.float32:
        return True
    lo, hi = _SAFE_TOTAL
    return lo <= total <= hi


# -- the scaling ----------------------------------------------------------------------


# elements of NumPy's ufunc buffers in the scaling, a quarter of its default: a 16-bit
# leaf's casts then hold 16 KiB per thread, not 64 (the 1 % memory bound), as fast
UFUNC_BUFFER = 1 << 11


def _scale_work(ts: Iterable[tuple[np.ndarray, np.ndarray]], factors: dict) -> None:
    """``b[...] = a * s`` for each pair, ``s`` the factor of ``b``'s dtype: in ``s``'s
    dtype (float32 for 16-bit leaves), rounded once to ``b``'s, with ufunc buffers of
    ``UFUNC_BUFFER`` elements (the setting is the thread's: restored for the caller)."""
    multiply = np.multiply
    # the C kernel multiplies in float32: for float32 factors (of 16-bit and float32
    # leaves), where NumPy's product is the same float32 product rounded once
    use = _native.lib is not None
    native = {
        dt: float(s) if use and s.dtype == np.float32 and dt in _native.DTYPES else None
        for dt, s in factors.items()
    }
    old = np.setbufsize(UFUNC_BUFFER)
    try:
        for a, b in ts:
            s = native[b.dtype]
            if s is not None and _contiguous_1d(a, b):
                _native.scale(a, b, s)
            else:
                multiply(a, factors[b.dtype], out=b, casting="unsafe")
    finally:
        np.setbufsize(old)


def _contiguous_1d(a: np.ndarray, b: np.ndarray) -> bool:
    return a.ndim == 1 and a.flags.c_contiguous and b.flags.c_contiguous and a.dtype == b.dtype


def scale_arrays(arrays: Sequence[np.ndarray], factors: dict, outs: Sequence[Any] = ()) -> None:
    """Each array times the factor of its dtype (``factors[dtype]``, a 0-d array),
    into the matching C-contiguous array of ``outs``, or in place when none are given;
    chunked on threads."""
    size = sum(x.size for x in arrays)
    if not outs:
        # the C kernels multiply in float32: the arrays whose factor is float32
        f32 = [dt for dt, f in factors.items() if f.dtype == np.float32]
        _, arrays = _native_run_groups(
            arrays, size, "scale_table", lambda dt: (float(factors[dt]),), f32
        )
        if arrays:
            size = sum(x.size for x in arrays)
            _run(arrays, lambda ts: _scale_work(((c, c) for c in ts), factors), size)
        return

    def split(pair: tuple[np.ndarray, np.ndarray]) -> Iterable[tuple[np.ndarray, np.ndarray]]:
        src, dst = pair
        if not src.flags.c_contiguous:
            return (pair,)
        a, b = src.reshape(-1), dst.reshape(-1)
        return ((a[i : i + CHUNK], b[i : i + CHUNK]) for i in range(0, a.size, CHUNK))

    work = lambda ts: _scale_work(ts, factors)  # noqa: E731
    _run(list(zip(arrays, outs)), work, size, split=split, item_size=lambda p: p[0].size)
