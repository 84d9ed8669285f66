"""Backend fast paths behind the public functions.

The Array API core (``_norms``, ``_clipping``) is the reference; a fast path for a
library may replace a step when it computes the same result to a few ulps. Each hook
returns ``None`` when no fast path applies, and the core runs.
"""

from __future__ import annotations

from typing import Any

__all__ = ["global_norm_impl", "scale_impl"]


def global_norm_impl(tree: Any) -> Any:
    """A function ``(tree, p) -> norm`` for the tree's library, or ``None``."""
    return None


def scale_impl(tree: Any, *, inplace: bool) -> Any:
    """A function ``(tree, scale) -> leaves`` that multiplies every leaf by the 0-d
    ``scale`` (in place when ``inplace``), or ``None``."""
    return None
