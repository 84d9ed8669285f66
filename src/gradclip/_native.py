"""The optional C kernels for bfloat16 and float32 on the CPU (``gradclip/_kernels.c``).

Built with the package where a C compiler is found (``setup.py``; the build goes on
without them otherwise). ``lib`` is ``None`` when they are missing, or when the
environment sets ``GRADCLIP_NATIVE=0``: the fast paths then use BLAS dots and NumPy's
multiply, and widen bfloat16 through small float32 buffers (the same results: the
norm to an ulp or two, the scaling bit for bit; bfloat16 several times slower). The
kernels release the GIL, so the NumPy path's threads run them side by side.

* ``sumsq(x)``: the sum of squares of a 1-D contiguous bfloat16 or float32 array, as
  a Python float (float32 lanes per row of 1024, rows added in double, a row that
  could have overflowed or underflowed summed again in double: accurate for any
  finite input; inf and NaN propagate).
* ``scale(x, y, s)``: ``y = x * s`` in float32, rounded once to the arrays' dtype (to
  nearest even for bfloat16); ``x`` and ``y`` 1-D contiguous arrays of one dtype and
  size, ``y`` may be ``x``; ``s`` a float32 value.
* ``lib.sumsq_table(addresses, counts, itemsize)`` and ``lib.scale_table(addresses,
  counts, itemsize, s)``: the same over a table of raw addresses (int64 arrays) of
  bfloat16 (``itemsize`` 2) or float32 (4) memory: many arrays or tensors in a call
  (``gradclip._fast_numpy.run_native`` makes them, a bounded table at a time);
  ``lib.address(x)``, the data address of a C-contiguous array (its buffer taken
  without a format: ml_dtypes' bfloat16 arrays too, with no view).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["BF16", "DTYPES", "lib", "scale", "sumsq"]


def _load() -> Any:
    if os.environ.get("GRADCLIP_NATIVE", "1") == "0":
        return None
    try:
        from . import _kernels
    except ImportError:  # built without a C compiler
        return None
    return _kernels


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
