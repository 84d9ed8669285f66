"""The optional C kernels for bfloat16 on the CPU (``gradclip/_kernels.c``).

Built with the package where a C compiler is found (``setup.py``; the build goes on
without them otherwise). ``lib`` is ``None`` when they are missing, or when the
environment sets ``GRADCLIP_NATIVE=0``: the fast paths then widen bfloat16 through
small float32 buffers instead (same results: the norm to an ulp or two, the scaling
bit for bit, several times slower). The kernels release the GIL, so the NumPy path's
threads run them side by side.

* ``sumsq_bf16(x)``: the sum of squares of a 1-D contiguous bfloat16 array, as a
  Python float (float32 lanes per row of 1024, rows added in double, a row that
  could have overflowed or underflowed summed again in double: accurate for any
  finite input; inf and NaN propagate).
* ``scale_bf16(x, y, s)``: ``y = bfloat16(float32(x) * s)``, rounded once to nearest
  even (``x`` and ``y`` 1-D contiguous bfloat16 arrays of one size, ``y`` may be
  ``x``; ``s`` a float32 value).
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np

__all__ = ["BF16", "lib", "scale_bf16", "sumsq_bf16"]


def _load() -> tuple[Any, Any]:
    try:
        import ml_dtypes
    except ImportError:  # no NumPy bfloat16 arrays at all
        return None, None
    if os.environ.get("GRADCLIP_NATIVE", "1") == "0":
        return None, np.dtype(ml_dtypes.bfloat16)
    try:
        from . import _kernels
    except ImportError:  # built without a C compiler
        return None, np.dtype(ml_dtypes.bfloat16)
    return _kernels, np.dtype(ml_dtypes.bfloat16)


lib, BF16 = _load()
_BITS = np.dtype(np.uint16)


def sumsq_bf16(x: np.ndarray) -> float:
    return lib.sumsq_bf16(x.view(_BITS))


def scale_bf16(x: np.ndarray, y: np.ndarray, s: float) -> None:
    lib.scale_bf16(x.view(_BITS), y.view(_BITS), s)
