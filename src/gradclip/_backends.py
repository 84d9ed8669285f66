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

__all__ = ["enabled", "fast_paths", "global_norm_impl", "scale_impl"]

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


def global_norm_impl(tree: Any) -> Any:
    """A function ``(tree, p) -> norm`` for the tree's library, or ``None``."""
    return None


def scale_impl(tree: Any, *, inplace: bool) -> Any:
    """A function ``(tree, scale) -> leaves`` that multiplies every leaf by the 0-d
    ``scale`` (in place when ``inplace``), or ``None``."""
    return None
