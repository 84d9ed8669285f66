"""gradclip: exact, fast gradient clipping on any Python Array API library.

The clipping math is written once against the Array API standard and runs on the
arrays you pass in (NumPy, CuPy, PyTorch, JAX, Dask, array-api-strict); the library
is chosen from the input's type. Framework integrations live in
``gradclip.torch`` and ``gradclip.optax`` and are imported on demand.

>>> import numpy as np, gradclip as gc
>>> clipped, norm = gc.clip_by_global_norm(np.array([1, 2, 3, 4, 5]), max_norm=3)
>>> round(float(norm), 4)
7.4162
"""

from ._clippers import (
    AutoClip,
    AutoClipState,
    ClipInfo,
    QuantileClip,
    QuantileClipState,
    StatefulClipper,
    ZClip,
    ZClipState,
    clip_stateful,
    clip_stateful_,
)
from ._clipping import (
    clip_by_global_norm,
    clip_by_global_norm_,
    clip_by_norm,
    clip_by_value,
    global_norm,
)
from ._distributed import Layout
from ._per_example import per_example_clip
from ._reference import clip_scale
from ._unitwise import adaptive_grad_clip, clip_by_block_rms

__version__ = "0.2.0"

__all__ = [
    "AutoClip",
    "AutoClipState",
    "ClipInfo",
    "Layout",
    "QuantileClip",
    "QuantileClipState",
    "StatefulClipper",
    "ZClip",
    "ZClipState",
    "adaptive_grad_clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "clip_by_global_norm_",
    "clip_by_norm",
    "clip_by_value",
    "clip_scale",
    "clip_stateful",
    "clip_stateful_",
    "global_norm",
    "per_example_clip",
]
