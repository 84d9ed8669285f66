"""Backend fast paths behind the public functions.

The Array API core (``_norms``, ``_clipping``) is the reference; a fast path for a
library may replace a step when it computes the same result to a few ulps. Each hook
returns ``None`` when no fast path applies (or fast paths are switched off with
:func:`fast_paths`), and the core runs.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

from . import _compat

__all__ = [
    "barrier",
    "clip_impl",
    "clip_scale_impl",
    "enabled",
    "fast_paths",
    "global_norm_impl",
    "scale_impl",
]

# Per thread; not a ContextVar, whose get/set torch.compile cannot trace (graph breaks).
_STATE = threading.local()


@contextlib.contextmanager
def fast_paths(on: bool) -> Iterator[None]:
    """Switch the backend fast paths on or off inside a ``with`` block.

    ``with fast_paths(False):`` runs the pure Array API core, the reference that
    every fast path must agree with (and what ``foreach=False`` selects in
    :mod:`gradclip.torch`).
    """
    old = enabled()
    _STATE.on = on
    try:
        yield
    finally:
        _STATE.on = old


def enabled() -> bool:
    return getattr(_STATE, "on", True)


# the fast-path module by the type of a tree's first leaf (a call asks a few times)
_MODULES: dict[type, Any] = {}


def _module(tree: Any) -> Any:
    """The fast-path module for the tree's library (imported on first use), or ``None``."""
    if not enabled() or not tree.leaves:
        return None
    x = tree.leaves[0]
    mod = _MODULES.get(type(x), False)
    if mod is False:
        mod = _MODULES[type(x)] = _find_module(x)
    return mod


def _find_module(x: Any) -> Any:
    if _compat.is_numpy_array(x):
        from . import _fast_numpy as mod
    elif _compat.is_torch_array(x):
        from . import _fast_torch as mod
    elif _compat.is_jax_array(x):
        from . import _fast_jax as mod
    elif _compat.is_cupy_array(x):
        from . import _fast_cupy as mod
    else:
        return None
    return mod


def global_norm_impl(tree: Any) -> Any:
    """A function ``(tree, p) -> norm`` for the tree's library, or ``None``."""
    mod = _module(tree)
    return None if mod is None else mod.global_norm_impl(tree)


def scale_impl(tree: Any, *, inplace: bool) -> Any:
    """A function ``(tree, scale) -> leaves`` that multiplies every leaf by the 0-d
    ``scale`` (in place when ``inplace``), or ``None``."""
    mod = _module(tree)
    return None if mod is None else mod.scale_impl(tree, inplace=inplace)


def clip_scale_impl(tree: Any) -> Any:
    """A function ``(norm, max_norm, eps) -> scale`` computing the core's
    :func:`gradclip._clipping.clip_scale` in fewer device operations, or ``None``."""
    impl = getattr(_module(tree), "clip_scale_impl", None)
    return None if impl is None else impl(tree)


def clip_impl(tree: Any, *, nonfinite: str) -> Any:
    """A function ``(tree, p, max_norm, eps) -> (leaves, norm)`` doing the whole
    functional clip at once (one compiled call for eager JAX), or ``None``."""
    mod = _module(tree)
    impl = getattr(mod, "clip_impl", None)
    return None if impl is None else impl(tree, nonfinite=nonfinite)


def barrier(tree: Any) -> Any:
    """The tree as the multiply should read it: the same values, kept by the
    library's compiler from being fused with the norm (JAX under a trace), or the
    tree itself."""
    impl = getattr(_module(tree), "barrier", None)
    return tree if impl is None else impl(tree)
