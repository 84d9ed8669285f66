"""Gradient trees: flatten to leaves with their positions, check them, rebuild.

A tree is a single array, a nested ``list``/``tuple``/``dict`` of arrays (``None``
leaves are kept), or, when JAX is imported, any node registered with
``jax.tree_util`` (flax structs, equinox modules, ...). Dicts keep their key order
and namedtuples their type, which ``jax.tree_util`` alone would not guarantee. Trees
are walked with a stack of their own, so any depth works; one that contains itself
is an error.
"""

from __future__ import annotations

import copy
import functools
import itertools
import math
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from . import _compat

__all__ = ["Tree", "check_same_structure", "flatten", "known", "size", "walk"]

Rebuild = Callable[[Any], Any]


@dataclass(frozen=True)
class Tree:
    """The array leaves of a gradient tree, in order, and how to rebuild it."""

    leaves: Sequence[Any]
    paths: Sequence[str]
    xp: Any
    acc_dtype: Any
    device: Any
    _rebuild: Rebuild
    dtypes: frozenset[Any] | None = None  # the leaves' dtypes, where hashable

    def unflatten(self, leaves: Sequence[Any]) -> Any:
        """The tree with the same structure and ``leaves`` in place of the old ones."""
        return self._rebuild(iter(leaves))

    @functools.cached_property
    def requires_grad(self) -> bool:
        """True when a leaf is a torch tensor that requires grad (one C-level pass,
        shared by the checks of one call)."""
        torch = self.xp is not None and _compat.is_torch_namespace(self.xp)
        return torch and _compat.any_requires_grad(self.leaves)


def known(n: Any) -> bool:
    """Whether a dimension's size is known: Dask gives NaN (or ``None``) for one known
    only once computed (after boolean indexing)."""
    return n is not None and n == n  # (NaN != NaN)


def size(x: Any) -> int | None:
    """The number of elements of array ``x``; ``None`` when its shape is not known
    until it is computed (a Dask array after boolean indexing: NaN or ``None``)."""
    try:
        return math.prod([int(s) for s in x.shape]) if x.shape else 1
    except (TypeError, ValueError):  # int(None), int(nan)
        return None


class _IndexPaths(Sequence[str]):
    """``name[0]``, ``name[1]``, ...: the paths of a flat list, made only when read."""

    def __init__(self, name: str, n: int) -> None:
        self.name, self.n = name, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(self.n))]
        if not -self.n <= i < self.n:
            raise IndexError(i)
        return f"{self.name}[{i % self.n}]"

    def __iter__(self) -> Iterator[str]:
        return (f"{self.name}[{i}]" for i in range(self.n))


def _flat_sequence(tree: Any, name: str) -> tuple[Sequence[Any], Sequence[str], Rebuild] | None:
    """A ``list`` or ``tuple`` of arrays of one type (the common case, thousands of
    leaves) without a walk per leaf: the sequence itself is the leaves (never written
    to: promotions make a new list), and its paths are made only if asked for."""
    typ = type(tree)
    if (typ is not list and typ is not tuple) or not tree:
        return None
    types = set(map(type, tree))
    if len(types) != 1 or not _compat.is_array_api_obj(tree[0]):
        return None
    n = len(tree)
    return tree, _IndexPaths(name, n), lambda it: typ(itertools.islice(it, n))


def _keystr(key: Any) -> str:
    return f"[{key!r}]"


_LEAF = object()  # a rebuild step: the next leaf
_NONE = object()  # a rebuild step: a None kept as None
_EXIT = object()  # a walk step: every child of a container has been visited


def walk(
    root: Any,
    name: str,
    is_leaf: Callable[[Any], bool],
    *,
    strict: bool = True,
    leaf_paths: frozenset[str] | set[str] = frozenset(),
) -> tuple[list[Any], list[str], list[Any]]:
    """The leaves of ``root``, their paths (``name['w'][0]``) and the steps that
    rebuild it, left to right.

    Dicts, lists and tuples (and, when JAX is imported, nodes registered with
    ``jax.tree_util``) are containers; ``is_leaf`` nodes are leaves; ``None`` is kept
    as ``None``. Anything else is a ``TypeError`` naming its path, or a leaf when not
    ``strict``. A node other than a dict at one of ``leaf_paths`` is a leaf. The walk
    keeps its own stack, so any depth works, and a container that contains itself is
    a ``ValueError`` naming where.
    """
    leaves: list[Any] = []
    paths: list[str] = []
    steps: list[Any] = []
    parts = [name]  # the path of the container being visited, in pieces
    open_paths: dict[int, str] = {}  # the containers on that path, by id
    todo: list[tuple[Any, Any]] = [(root, "")]  # (node, its key), or (_EXIT, its step)
    while todo:
        node, key = todo.pop()
        if node is _EXIT:
            node_id, step = key
            del open_paths[node_id]
            parts.pop()
            steps.append(step)
        elif is_leaf(node) or (
            leaf_paths and not isinstance(node, dict) and "".join(parts) + key in leaf_paths
        ):
            leaves.append(node)
            paths.append("".join(parts) + key)
            steps.append(_LEAF)
        elif node is None:
            steps.append(_NONE)
        else:
            path = "".join(parts) + key
            expanded = _children(node, path)
            if expanded is None:
                if strict:
                    raise TypeError(
                        f"{path} is a {type(node).__module__}.{type(node).__qualname__}, not "
                        "an array: every leaf of the gradient tree must be an array (or None) "
                        "from one array library"
                    )
                leaves.append(node)
                paths.append(path)
                steps.append(_LEAF)
                continue
            if id(node) in open_paths:
                raise ValueError(
                    f"{path} is {open_paths[id(node)]} again, inside itself (a reference "
                    "cycle): a gradient tree must be finite"
                )
            children, build = expanded
            open_paths[id(node)] = path
            parts.append(key)
            todo.append((_EXIT, (id(node), (build, len(children)))))
            todo.extend(reversed(children))
    return leaves, paths, steps


def _children(node: Any, path: str) -> tuple[list[tuple[Any, str]], Rebuild] | None:
    """``([(child, key), ...], build)`` for a container, ``build(values)`` making a new
    one of its type from its children's new values; ``None`` for anything else."""
    if isinstance(node, dict):
        keys = list(node)
        children = [(node[k], _keystr(k)) for k in keys]
        if type(node) is dict:
            return children, lambda values: dict(zip(keys, values))

        def rebuild_dict(values: list[Any]) -> Any:
            new = copy.copy(node)  # keeps a defaultdict's factory, an OrderedDict's type
            new.update(zip(keys, values))
            return new

        return children, rebuild_dict
    if isinstance(node, (list, tuple)):
        typ = type(node)
        children = [(v, f"[{i}]") for i, v in enumerate(node)]
        if hasattr(node, "_fields"):  # namedtuple
            return children, lambda values: typ(*values)
        if typ is list:
            return children, lambda values: values  # (a new list already)
        return children, typ
    jax = sys.modules.get("jax")
    if jax is None:
        return None
    sparse = sys.modules.get("jax.experimental.sparse")
    if sparse is not None and isinstance(node, sparse.JAXSparse):
        # a pytree of its values and integer indices: its norm is not theirs
        raise TypeError(
            f"{path} is a sparse {type(node).__name__} array, which gradclip does not "
            "clip: pass its dense form (.todense()) or its values (.data, when its "
            "indices are unique)"
        )
    tu = jax.tree_util
    keyed, treedef = tu.tree_flatten_with_path(node, is_leaf=lambda n: n is not node)
    if tu.treedef_is_leaf(treedef):
        return None
    return [(v, tu.keystr(k)) for k, v in keyed], lambda values: tu.tree_unflatten(treedef, values)


def _rebuild(steps: list[Any], leaves: Iterator[Any]) -> Any:
    """The tree ``walk`` took apart, with ``leaves`` in place of its leaves."""
    stack: list[Any] = []
    for step in steps:
        if step is _LEAF:
            stack.append(next(leaves))
        elif step is _NONE:
            stack.append(None)
        else:
            build, n = step
            values = stack[len(stack) - n :]
            del stack[len(stack) - n :]
            stack.append(build(values))
    return stack[0]


def flatten(
    tree: Any,
    name: str = "grads",
    *,
    inplace: bool = False,
    allow_empty: bool = False,
) -> Tree:
    """Flatten ``tree`` and check that its leaves are arrays of one library.

    Integer leaves are promoted to the namespace's default floating dtype; with
    ``inplace`` they are a ``TypeError``, and so is any leaf that cannot be written
    in place (checked here, before anything is computed or written).
    """
    flat = _flat_sequence(tree, name)
    if flat is not None:
        leaves, paths, rebuild = flat
    else:
        leaves, paths, steps = walk(tree, name, _compat.is_array_api_obj)
        rebuild = functools.partial(_rebuild, steps)
    if not leaves:
        if allow_empty:
            return Tree(leaves, paths, None, None, None, rebuild)
        raise ValueError(f"{name} has no array leaves (only None or empty containers)")

    xp = _namespace(leaves, paths)
    if _compat.is_torch_namespace(xp):
        odd = _compat.first_unstrided(leaves)
        if odd is not None:
            raise TypeError(
                f"{paths[odd[0]]} is {odd[1]}, which gradclip does not clip: pass its "
                "values (g.coalesce().values(), which share its memory once coalesced) "
                "or its dense form (g.to_dense())"
            )
    dev = _compat.device(leaves[0])
    try:
        kinds = {dt: _compat.dtype_kind(xp, dt) for dt in {x.dtype for x in leaves}}
    except TypeError:  # an unhashable dtype: leaf by leaf
        kinds = None
    if kinds is None or any(k not in ("low", "float", "complex") for k in kinds.values()):
        leaves = _promote_or_raise(xp, leaves, paths, promote_int=not inplace)
        kinds = None
    acc = _compat.accumulation_dtype(xp, [x.dtype for x in leaves] if kinds is None else kinds)
    out = Tree(leaves, paths, xp, acc, dev, rebuild, None if kinds is None else frozenset(kinds))
    if inplace:
        _check_writable(out)
    return out


def _check_writable(tree: Tree) -> None:
    """Everything that could make an in-place multiply fail, or write some memory
    twice, checked before anything is written: a ``TypeError`` or ``ValueError``
    naming the leaf (or leaves)."""
    leaves, paths = tree.leaves, tree.paths
    functional = "use the functional form gradclip.clip_by_global_norm, which returns new arrays"
    bad = _compat.first_unwritable(leaves, lambda: tree.requires_grad)
    if bad is not None:
        raise TypeError(f"{paths[bad[0]]} cannot be clipped in place: {bad[1]}; {functional}")
    shared = _compat.first_overlap(leaves)
    if shared is None:
        return
    i, j = shared
    if j is None:
        raise TypeError(
            f"{paths[i]} cannot be clipped in place: its elements overlap in memory (an "
            "expanded or as_strided view), so one would be scaled more than once; "
            f"{functional}, or pass a copy"
        )
    raise ValueError(
        f"{paths[i]} and {paths[j]} share memory (the same array twice, or overlapping "
        "views of one buffer): clipped in place it would be scaled twice; pass each "
        f"array once, or {functional}"
    )


def _promote_or_raise(
    xp: Any, leaves: Sequence[Any], paths: Sequence[str], *, promote_int: bool
) -> list[Any]:
    """The leaves with integer ones promoted to the default float (a new list); a
    ``TypeError`` naming the first leaf that is not floating point."""
    out = list(leaves)
    for i, x in enumerate(leaves):
        kind = _compat.dtype_kind(xp, x.dtype)
        if kind == "int" and promote_int:
            out[i] = xp.astype(x, _compat.default_float(xp, _compat.device(x)))
        elif kind == "long":
            raise TypeError(
                f"{paths[i]} has dtype {x.dtype}, wider than float64, which gradclip does "
                "not take: its norm is accumulated in float64, which cannot hold values "
                "beyond float64's range; cast the leaf to float64 (x.astype(np.float64))"
            )
        elif kind not in ("low", "float", "complex"):
            hint = (
                "; integer gradients are promoted only by the functional form, "
                "use it or pass a floating array"
                if kind == "int"
                else ""
            )
            raise TypeError(
                f"{paths[i]} has dtype {x.dtype}, but gradients must be floating point{hint}"
            )
    return out


def _namespace(leaves: Sequence[Any], paths: Sequence[str]) -> Any:
    """The one namespace of all leaves; a ``TypeError`` naming two that differ, or a
    masked array."""
    types = set(map(type, leaves))
    _reject_masked(types, leaves, paths)
    if len(types) == 1:
        return _compat.array_namespace(leaves[0])
    seen: dict[type, tuple[Any, int]] = {}
    first: tuple[Any, int] | None = None
    for i, x in enumerate(leaves):
        typ = type(x)
        if typ not in seen:
            seen[typ] = (_compat.array_namespace(x), i)
        xp, j = seen[typ]
        if first is None:
            first = (xp, j)
        elif xp is not first[0]:
            a, b = leaves[first[1]], x
            raise TypeError(
                f"all leaves must come from one array library, but {paths[first[1]]} is a "
                f"{_compat.library_name(a)} array ({type(a).__name__}) and {paths[i]} is a "
                f"{_compat.library_name(b)} array ({type(b).__name__})"
            )
    assert first is not None
    return first[0]


def _masked_types() -> tuple[type, ...]:
    """The masked array types of the libraries loaded (none exist before their module
    is imported, so nothing is imported here)."""
    out = []
    ma = sys.modules.get("numpy.ma")
    if ma is not None:
        out.append(ma.MaskedArray)
    masked = sys.modules.get("torch.masked")
    if masked is not None and hasattr(masked, "MaskedTensor"):
        out.append(masked.MaskedTensor)
    return tuple(out)


def _reject_masked(types: set[type], leaves: Sequence[Any], paths: Sequence[str]) -> None:
    """A ``TypeError`` naming the first masked leaf: a mask is not honoured anywhere
    (the fast paths read the data under it, the reference may not), so none is taken."""
    masked = _masked_types()
    if not masked or not any(issubclass(t, masked) for t in types):
        return
    i = next(i for i, x in enumerate(leaves) if isinstance(x, masked))
    raise TypeError(
        f"{paths[i]} is a masked array ({type(leaves[i]).__module__}."
        f"{type(leaves[i]).__qualname__}), which gradclip does not take: masks are not "
        "honoured; pass the values with the masked ones filled in (NumPy: x.filled(0), "
        "torch: x.to_tensor(0)) or the data under the mask (x.data, x.get_data())"
    )


def check_same_structure(a: Tree, b: Tree, names: tuple[str, str]) -> None:
    """A ``ValueError`` naming the first position where two trees differ."""
    pa = [p[len(names[0]) :] for p in a.paths]
    pb = [p[len(names[1]) :] for p in b.paths]
    if pa == pb:
        return
    for ka, kb in zip(pa, pb):
        if ka != kb:
            raise ValueError(
                f"{names[0]} and {names[1]} differ in structure: {names[0]}{ka} vs {names[1]}{kb}"
            )
    raise ValueError(f"{names[0]} has {len(pa)} array leaves but {names[1]} has {len(pb)}")
