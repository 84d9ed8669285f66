"""Host memory: the norm and the scaling of NumPy arrays, in chunks on threads.

Used by the NumPy backend and, on zero-copy views, by the torch backend's CPU path.
Large arrays are cut into chunks of ``CHUNK`` elements (views, never copies), small
ones grouped into runs, and the threads of :mod:`._native`'s pool take these units
one by one (NumPy releases the GIL).

The 2-norm is a blocked sum: a BLAS dot per ``DOT`` elements (rows of ``ROW`` for
values with few significant bits, see :func:`_dot`), or the C kernel for contiguous
bfloat16 and float32 chunks, the parts added in float64. When the total lies well
inside the accumulation dtype's range, nothing was lost to overflow or underflow and
its root is the norm to a few ulps; otherwise (inf, NaN, huge or tiny values) every
chunk is summed again exactly (float32 as float64, float64 scaled by its largest
magnitude). 16-bit chunks are widened a piece at a time into a small float32 buffer
per thread; the buffers, the only arrays allocated, stay under ``BUFFER_SHARE`` of
the gradients' bytes.
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

__all__ = ["accumulator", "is_safe", "norm_of_arrays", "scale_arrays", "sum_of_squares"]

DOT = 1 << 18  # elements per BLAS dot: a float32 dot drifts past 1e-7 on longer runs
BUFFER_SHARE = 0.008  # the buffers of all threads, as a share of the gradients' bytes
SMALL_SIZE = 1 << 22  # below this many elements, half the share: the call's fixed costs
# (Python objects, NumPy's ufunc buffers: a few KiB) count against the same 1 %
BUFFER_MAX = 1 << 17  # elements of one thread's buffer (larger ones fall out of L2)
# a total sum of squares inside these bounds lost nothing to overflow, and nothing
# that matters to underflow (each square's absolute error is below 2**-149)
_SAFE_TOTAL = {
    np.dtype(np.float32): (2.0**-60, 2.0**120),
    np.dtype(np.float64): (2.0**-900, 2.0**900),
}
# a chunk's sum of squares inside these bounds is accurate on its own
_SAFE = {np.dtype(np.float32): (2.0**-100, 2.0**120), np.dtype(np.float64): (2.0**-960, 2.0**960)}


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
    a few threads that take the units of :func:`._native.units` one by one."""
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
    """:func:`._native.run_native` of the C kernel ``kernel`` (``*args(dtype)``) over
    each group of :func:`._native.native_groups` of ``arrays`` of ``dtypes`` (of the
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
    """True for a chunk the C kernel sums (:mod:`._native`, when built):
    bfloat16 or float32, 1-D and contiguous."""
    return (
        c.dtype in _native.DTYPES
        and c.ndim == 1
        and c.flags.c_contiguous
        and _native.lib is not None
    )


def _packed(
    ts: Iterable[np.ndarray],
    acc: np.dtype,
    nbuf: int,
    reduce: Callable[[np.ndarray], Any],
    exact: Callable[[float], Any],
) -> Iterator[Any]:
    """``reduce`` of every chunk BLAS can take as it is (1-D, of dtype ``acc``), and of
    the others widened into a buffer of ``nbuf`` elements: packed (one concatenation
    per run of 1-D pieces), reduced when full. Nothing is lost: the buffer holds each
    element once, converted exactly. In a float32 accumulation, contiguous bfloat16
    and float32 chunks are summed by the C kernel when it is built, whose exact sum
    ``exact`` puts in ``reduce``'s form."""
    buf = np.empty(0, dtype=acc)
    native = acc == np.float32  # (its float32 lanes: not for float64 accuracy)
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
        return reduce(b)

    for c in ts:
        one_d = c.ndim == 1
        if native and _native_chunk(c):
            yield exact(_native.sumsq(c))
            continue
        if one_d and c.dtype == acc:  # BLAS takes it as it is
            yield reduce(c)
            continue
        if not buf.size:
            buf = np.empty(nbuf, dtype=acc)
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


ROW = 1 << 10  # elements per row of a chunk whose values have few significant bits
SHORT_BITS = 0x3FF  # float32 values with these low bits clear have 14 significant bits
# or fewer (bfloat16 and float16 values, widened or stored as float32)
SAMPLE = 32  # the first elements of a chunk, looked at for those bits
# SHORT_BITS in each of SAMPLE float32 elements (a Python int: one `&` looks at them all)
_SHORT_MASK = int.from_bytes(SHORT_BITS.to_bytes(4, "little") * SAMPLE, "little")


def _dot(c: np.ndarray) -> float:
    """The sum of squares of ``c`` (1-D, float32 or float64): a BLAS dot per ``DOT``
    elements (the fastest read), or :func:`_dot_rows` when the first ``SAMPLE`` float32 elements
    have no bit of ``SHORT_BITS`` set. A dot adds a whole chunk in a few float32
    lanes; the rounding errors of full float32 squares cancel there (a dot over 2^18
    normals is off by ~1e-7, over 2^20 by ~1e-6), but those of values with few
    significant bits do not: over 2^18 of them it is off by up to ~1e-5, by rows of
    ``ROW`` an ulp or two."""
    sampled = c.dtype == np.float32 and c.shape[0] > ROW
    if sampled and not int.from_bytes(c[:SAMPLE].tobytes(), "little") & _SHORT_MASK:
        return _dot_rows(c)
    if c.shape[0] > DOT:  # a dot each (``vecdot`` would hold the GIL)
        return sum(float(np.dot(d, d)) for d in _pieces(c, DOT))
    return float(np.dot(c, c))


def _dot_rows(c: np.ndarray) -> float:
    """The sum of squares of ``c`` (1-D, float32 or float64): a dot per row of
    ``ROW`` elements (``np.vecdot``, BLAS per row; ``einsum`` before NumPy 2), the
    rows added in float64."""
    r = c.shape[0] // ROW * ROW
    total = 0.0
    if r:
        rows = c[:r].reshape(-1, ROW)
        total = float(_rowdots(rows, rows).sum(dtype=np.float64))
    if r < c.shape[0]:
        tail = c[r:]
        total += float(np.dot(tail, tail))
    return total


def _einsum_rowdots(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.einsum("ij,ij->i", a, b)


_rowdots = getattr(np, "vecdot", _einsum_rowdots)


def _plain_sum(ts: Iterable[np.ndarray], acc: np.dtype, nbuf: int) -> float:
    """The sum of the chunks' sums of squares, in float64 (one read of the memory)."""
    return sum(_packed(ts, acc, nbuf, _dot, float), 0.0)


EXACT_PIECE = 1 << 14  # elements widened or divided at a time in the exact path


def _sumsq(c: np.ndarray) -> tuple[float, float]:
    """``(d, s)`` with ``d**2 * s`` the sum of squares of ``c`` (1-D, float32 or
    float64), computed without overflow or underflow, and without a temporary larger
    than ``EXACT_PIECE`` elements."""
    if _native_chunk(c):  # a float32 chunk (or buffer): the C kernel's sum is exact
        return 1.0, _native.sumsq(c)
    s = _dot_rows(c)
    lo, hi = _SAFE[c.dtype]
    if lo <= s <= hi or (s == 0 and not c.any()):
        return 1.0, s
    pieces = _pieces(c, EXACT_PIECE)
    if c.dtype == np.float32:  # squares of float32 values are exact-range in float64
        return 1.0, sum(_dot_rows(p.astype(np.float64)) for p in pieces)
    m = _maxabs(c)
    d = m if math.isfinite(m) and m > 0 else 1.0
    return d, sum(_dot_rows(p / d) for p in pieces)


def _exact_terms(ts: Iterable[np.ndarray], acc: np.dtype, nbuf: int) -> list[tuple[float, float]]:
    """``(d, s)`` per chunk or buffer, exact (:func:`_sumsq`)."""
    return list(_packed(ts, acc, nbuf, _sumsq, lambda s: (1.0, s)))


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
    accumulated in ``acc`` (default: :func:`accumulator`)."""
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
        # an inf or NaN, huge or tiny values, or zeros: every chunk again, exactly
        nbuf = _buffer_size(size, acc.itemsize)
        parts = _run(arrays, lambda ts: _exact_terms(ts, acc, nbuf), size)
    return _combine2([pair for part in parts for pair in part])


def accumulator(arrays: Iterable[np.ndarray]) -> np.dtype:
    """float64 when any array is a float wider than 32 bits (in any byte order), else
    float32."""
    wide = any(x.dtype.kind == "f" and x.dtype.itemsize > 4 for x in arrays)
    return np.dtype(np.float64 if wide else np.float32)


def sum_of_squares(arrays: Sequence[np.ndarray], acc: np.dtype, size: int) -> float:
    """The blocked sum of squares (a dot per chunk, in ``acc``, the chunks added in
    float64): accurate when :func:`is_safe`; inf or NaN elements make it inf or NaN."""
    acc = np.dtype(acc)
    total = 0.0
    if acc == np.float32:  # the C kernels take the contiguous float32/bfloat16 arrays
        parts, arrays = _native_run_groups(arrays, size, "sumsq_table")
        total = sum(parts)
        if not arrays:
            return total
        size = sum(x.size for x in arrays)
    n_threads = _native.threads_for(size)
    nbuf = _buffer_size(size, acc.itemsize)
    widened = {x.dtype for x in arrays} - {acc}
    if _native.lib is not None and acc == np.float32:  # the C kernel: without the GIL
        widened.discard(_native.BF16)
    if nbuf < BUFFERED_PARALLEL_MIN and widened:
        n_threads, nbuf = 1, _buffer_size(size, acc.itemsize, 1)
    with np.errstate(over="ignore", invalid="ignore"):
        parts = _run(arrays, lambda ts: _plain_sum(ts, acc, nbuf), size, threads=n_threads)
    return total + sum(parts)


def is_safe(total: float, acc: Any) -> bool:
    """True when a sum of squares accumulated in ``acc`` lost nothing that matters to
    overflow or underflow (False for inf and NaN)."""
    lo, hi = _SAFE_TOTAL[np.dtype(acc)]
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
