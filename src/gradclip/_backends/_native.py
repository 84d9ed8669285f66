"""The optional C kernels for bfloat16 and float32 on the CPU, and their thread pool.

The kernels (``_kernels.c``) are built with the package where a C compiler is found;
``lib`` is ``None`` when they are missing or ``GRADCLIP_NATIVE=0`` is set, and the
host paths use BLAS dots and NumPy's multiply instead (the same results to an ulp or
two). They release the GIL, so the pool's threads run them side by side.

* ``sumsq(x)``: the sum of squares of a 1-D contiguous bfloat16 or float32 array,
  accurate for any finite input (float32 lanes per row, rows added in double, a row
  that could have overflowed or underflowed summed again in double).
* ``scale(x, y, s)``: ``y = x * s`` in float32, rounded once to the arrays' dtype.
* ``lib.sumsq_table`` and ``lib.scale_table``: the same over a table of addresses,
  many arrays or tensors in one call (``run_native``).

The pool: large inputs are cut into units of ``CHUNK`` elements (a chunk of a large
array, or a run of small ones) that a few threads take one by one, so a thread that
runs slower (memory further away, a core shared with another tenant) takes fewer.
"""

from __future__ import annotations

import importlib
import operator
import os
import threading
from array import array
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

__all__ = [
    "BF16",
    "CHUNK",
    "DTYPES",
    "lib",
    "native_groups",
    "on_threads",
    "run_native",
    "scale",
    "sumsq",
    "threads_for",
    "units",
]


def _load() -> Any:
    if os.environ.get("GRADCLIP_NATIVE", "1") == "0":
        return None
    try:  # by name: a compiled module, which the import contracts' scanner cannot see
        return importlib.import_module(f"{__package__}._kernels")
    except ImportError:  # built without a C compiler
        return None


def _bf16() -> np.dtype | None:
    try:
        import ml_dtypes
    except ImportError:  # then there are no NumPy bfloat16 arrays at all
        return None
    return np.dtype(ml_dtypes.bfloat16)


lib = _load()
BF16 = _bf16()
DTYPES = frozenset(dt for dt in (BF16, np.dtype(np.float32)) if dt is not None)
_BITS = np.dtype(np.uint16)


def _buffer(x: np.ndarray) -> np.ndarray:
    return x.view(_BITS) if x.dtype == BF16 else x


def sumsq(x: np.ndarray) -> float:
    return lib.sumsq(_buffer(x))


def scale(x: np.ndarray, y: np.ndarray, s: float) -> None:
    lib.scale(_buffer(x), _buffer(y), s)


# -- the pool -------------------------------------------------------------------------

CHUNK = 1 << 20  # elements per unit of work: 4 MiB of float32, long enough to hide a hand-off
# elements per thread, at least: a thread's fixed cost (frames, a future, NumPy's
# cast buffers) must stay a small share of what it reads
PER_THREAD = 1 << 21
TABLE_ROWS = 64  # addresses in one call of a C kernel at most (a 1 KiB table)

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


def threads_for(size: int) -> int:
    """Threads for ``size`` elements: one per core, but at most one per ``PER_THREAD``
    elements, so the threads' own memory stays under 1 % of the gradients' bytes."""
    return max(1, min(threads(), size // PER_THREAD))


def units(items: Sequence[Any], split: Callable, size: Callable[[Any], int]) -> list[Any]:
    """The units of work over ``items``: the chunks (``split``) of each item larger than
    ``CHUNK``, and runs of the smaller ones, up to ``CHUNK`` elements together, as
    ranges of their indices. One thread takes a run of small leaves (a model's
    batch-norm vectors) rather than both taking turns at the GIL between tiny calls,
    and the list has one entry per ``CHUNK`` elements at most (a few bytes per MiB),
    however many leaves there are."""
    out: list[Any] = []
    start = run = 0
    for i, x in enumerate(items):
        n = size(x)
        if n > CHUNK:
            if start < i:
                out.append(range(start, i))
            out.extend(split(x))
            start, run = i + 1, 0
        elif run + n > CHUNK:
            out.append(range(start, i))
            start, run = i, n
        else:
            run += n
    if start < len(items):
        out.append(range(start, len(items)))
    return out


def on_threads(n: int, task: Callable[[], Any]) -> list[Any]:
    """``task()`` on ``n`` threads at once, the calling thread one of them (one fewer
    thread to wake: a sleeping thread can take a while to wake on a virtual machine
    whose core was left idle): the results, the caller's first."""
    others = [_executor().submit(task) for _ in range(n - 1)]
    try:
        mine = task()
    finally:
        results = [f.result() for f in others]
    return [mine, *results]


def run_native(
    items: Sequence[Any],
    address: Callable[[Any], int],
    size: int,
    kernel: Callable,
    itemsize: int,
    *args: Any,
    size_of: Callable[[Any], int] = operator.attrgetter("size"),
) -> list[Any]:
    """``kernel(addresses, counts, itemsize, *args)`` over the memory of ``items``
    (``size`` elements in all: C-contiguous arrays or tensors of one dtype of the C
    kernels, ``address(x)`` where each starts), a table of at most ``TABLE_ROWS``
    items at a time: thousands of tensors cost an address each, not a call each, and
    no table outlives its call (the 1 % bound). On one thread for small inputs; else
    on the threads of ``on_threads``, which take the units of ``units`` one
    by one (a chunk of ``CHUNK`` elements of a large item, a run of small ones), so a
    thread that runs slower takes fewer. The units' results, in no fixed order."""

    def call(part: Sequence[Any]) -> Any:
        ptrs, counts = array("q", map(address, part)), array("q", map(size_of, part))
        return kernel(ptrs, counts, itemsize, *args)

    n = threads_for(size)
    if n == 1:
        return [call(items[i : i + TABLE_ROWS]) for i in range(0, len(items), TABLE_ROWS)]

    def split(x: Any) -> Sequence[tuple[int, int]]:
        start, k = address(x), size_of(x)
        return [(start + itemsize * i, min(CHUNK, k - i)) for i in range(0, k, CHUNK)]

    todo = iter(units(items, split, size_of))

    def task() -> list[Any]:
        out = []
        for u in todo:  # (a list's iterator: ``next`` is atomic under the GIL)
            if isinstance(u, range):
                stop = u.stop
                out += [call(items[i : min(i + TABLE_ROWS, stop)]) for i in u[::TABLE_ROWS]]
            else:  # a chunk of a large item
                out.append(kernel(array("q", u[:1]), array("q", u[1:]), itemsize, *args))
        return out

    return [r for part in on_threads(n, task) for r in part]


def native_groups(
    items: Sequence[Any], kinds: Any, contiguous: Callable[[Any], bool]
) -> tuple[dict[Any, Sequence[Any]], Sequence[int]]:
    """The ``contiguous`` items (arrays or tensors) whose dtype is in ``kinds`` (of the
    C kernels' dtypes) by dtype, for ``run_native``, and the indices of the
    others. Items that all go (the common case) stay the sequence they are: no list
    with an entry per item."""
    first = items[0].dtype
    if first in kinds and all(x.dtype == first for x in items) and all(map(contiguous, items)):
        return {first: items}, ()
    found: dict[Any, list[Any]] = {}
    rest: list[int] = []
    for i, x in enumerate(items):
        if x.dtype in kinds and contiguous(x):
            found.setdefault(x.dtype, []).append(x)
        else:
            rest.append(i)
    return found, rest
