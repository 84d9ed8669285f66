"""Global norms of gradients sharded over processes or devices, each element counted once.

The engines communicate; gradclip decides what each rank contributes. With torch the
call reduces over process groups, with JAX (inside ``shard_map``/``pmap``) over mesh
axes; sharded arrays under plain ``jit`` need nothing, XLA inserts the collectives.

**The call's dimensions.** ``process_group=`` / ``axis_name=``, every group or axis a
leaf is *sharded* over (``sharded=``, ``Layout``) and every dimension of every
DTensor's mesh. Nested dimensions collapse to the larger one (an expert-parallel group
inside the data-parallel group of the dense mesh is already covered by it), the same
ranks named twice count once, and what is left must meet only in this rank, like the
rows and columns of a grid. Without ``process_group=``/``axis_name=`` the groups
leaves are *replicated* over are dimensions too (with them, a group of copies may lie
across the call's dimensions: a tied embedding on the first and last stage).

**What each rank counts.** Each leaf is sharded over some of those dimensions and
replicated over others; it is counted on the rank whose index is 0 in each dimension
it is replicated over, and 0 elsewhere, so one sum over the call's dimensions adds
every element of the whole model once.

**The combination.** The ranks' local norms ``n_r`` (float32 or wider) are summed as
``n_r ** p`` in float64 for ``p`` 1 and 2 (one collective per dimension: no finite
float32 norm overflows there); otherwise by two, ``M = max_r n_r`` and ``S = sum_r
(n_r / M) ** p`` to ``M * S ** (1/p)`` (no term exceeds 1), in float64 where the
library has it; ``ord=inf`` is one MAX. A NaN anywhere is NaN everywhere. Nothing is
read back to the host: ranks are host integers (torch) or ``lax.axis_index`` (JAX).
"""

from __future__ import annotations

import math
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from . import _backends, _compat, _tree
from ._reference import divide, power, safe_scale, scaled_root

__all__ = ["Layout", "tree_norm"]

Reduce = Callable[[Any, str], Any]  # (0-d or 1-d array, "sum" | "max") -> the reduced array

ALL = "all"  # a marker's True: every dimension of the call
_SELF = object()  # the one element every JAX axis shares, as every torch group has this rank


@dataclass(frozen=True)
class Layout:
    """Where one gradient (or a sub-tree of them) lives: the groups or mesh axes it is
    split over, and those that hold copies of it.

    A marker for ``sharded=`` or ``replicated=`` that says both at once. Each field is
    a torch ``ProcessGroup``, a list of them or a ``DeviceMesh`` (all its dimensions);
    with JAX an axis name, a tuple of them or a ``PartitionSpec``; ``True`` for every
    dimension of the call; ``None`` for none. The leaf is counted on the rank whose
    index is 0 in every ``replicated`` group; the ``sharded`` groups join the call's
    reduction. Every dimension of the call must be named by one of the two fields (or
    lie inside, or be made of, a named group): a ``Layout`` is the full statement.

    Examples
    --------
    Experts split over 2 devices (``"ep"``) and copied over 2 (``"edp"``), in one
    ``vmap`` per mesh axis standing for 4 ranks; the dense weight is the same
    everywhere:

    >>> import numpy as np, jax, jax.numpy as jnp, gradclip as gc
    >>> experts = np.arange(1.0, 5.0, dtype=np.float32).reshape(2, 2)  # row: an ep shard
    >>> dense = np.array([1.0, 1.0], dtype=np.float32)
    >>> layout = {"experts": gc.Layout(sharded="ep", replicated="edp"), "dense": None}
    >>> def norm(e, d):
    ...     g = {"experts": e, "dense": d}
    ...     return gc.global_norm(g, axis_name=("edp", "ep"), sharded=layout)
    >>> per_ep = jax.vmap(norm, in_axes=(0, None), axis_name="ep")
    >>> ranks = jax.vmap(per_ep, in_axes=(None, None), axis_size=2, axis_name="edp")
    >>> norms = ranks(jnp.asarray(experts), jnp.asarray(dense))  # one per (edp, ep) rank
    >>> print(np.round(np.asarray(norms) ** 2, 4))  # 1 + 4 + 9 + 16 + 1 + 1 on every rank
    [[32. 32.]
     [32. 32.]]
    """

    sharded: Any = None
    replicated: Any = None

    def __post_init__(self) -> None:
        if self.sharded is True and self.replicated is True:
            raise ValueError("a Layout cannot be sharded and replicated over every group")


def tree_norm(
    plan: _backends.Plan,
    p: float,
    *,
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> Any:
    """The global ``p``-norm of ``plan``'s tree over the ranks, or the local one when
    nothing is distributed (no group, no axis, no DTensor leaf)."""
    tree = plan.tree
    ranks = _plan(tree, process_group, axis_name, replicated, sharded)
    if ranks is None:
        return plan.norm(p)
    local = _local_norm(tree, ranks.buckets, p)
    return local if ranks.reduce is None else _reduce_norm(tree, local, ranks.reduce, p)


@dataclass
class _Plan:
    """The leaves each rank counts (in buckets sharing one owner mask) and the
    reduction over the call's dimensions (``None``: there are none)."""

    buckets: list[tuple[list[Any], Any]]  # (local leaves, True or a traced bool)
    reduce: Reduce | None


@dataclass(frozen=True)
class _Spec:
    """One leaf's marker read: the groups/axes named sharded and replicated (raw, or
    ``ALL``), and what the leaf is over the call's dimensions it does not name."""

    sharded: Any
    replicated: Any
    rest: str  # "sharded" (replicated=), "replicated" (sharded=) or "named" (Layout)
    option: str = "replicated"  # where it was given


def _plan(
    tree: _tree.Tree, process_group: Any, axis_name: Any, replicated: Any, sharded: Any
) -> _Plan | None:
    if process_group is not None and axis_name is not None:
        raise ValueError(
            "pass process_group= (torch) or axis_name= (JAX), not both: one array library "
            "has one way to communicate"
        )
    if replicated is not None and sharded is not None:
        raise ValueError(
            "pass sharded= or replicated=, not both: a leaf that needs both takes a "
            "gc.Layout(sharded=..., replicated=...) in either"
        )
    marked = sharded is not None or replicated is not None
    if _compat.is_jax_array(tree.leaves[0]):
        if process_group is not None:
            raise _wrong_engine(tree, "process_group")
        if axis_name is None and not marked:
            return None
        return _jax_plan(tree, axis_name, _specs(tree, replicated, sharded))
    if axis_name is not None:
        raise _wrong_engine(tree, "axis_name")
    torch_tree = _compat.is_torch_namespace(tree.xp)
    dtensor = _dtensor_type() if torch_tree else None
    has_dtensor = dtensor is not None and any(
        issubclass(t, dtensor) for t in set(map(type, tree.leaves))
    )
    if process_group is not None and not torch_tree:
        raise _wrong_engine(tree, "process_group")
    specs = _specs(tree, replicated, sharded) if marked else None  # checked in any case
    if not (torch_tree and (process_group is not None or has_dtensor or marked)):
        return None
    if specs is None:
        specs = [_Spec(None, None, "sharded")] * len(tree.leaves)
    return _torch_plan(tree, process_group, specs, dtensor if has_dtensor else None)


def _wrong_engine(tree: _tree.Tree, option: str) -> TypeError:
    lib = _compat.library_name(tree.leaves[0])
    if option == "axis_name":
        return TypeError(
            f"axis_name= is for JAX arrays inside shard_map or pmap, but grads are {lib} "
            "arrays; with torch pass process_group="
        )
    return TypeError(
        f"process_group= is for torch tensors, but grads are {lib} arrays; with JAX pass "
        "axis_name="
    )


# -- the combination over ranks -----------------------------------------------------------


def _local_norm(tree: _tree.Tree, buckets: list[tuple[list[Any], Any]], p: float) -> Any:
    """This rank's norm of the leaves it counts, in the tree's accumulation dtype."""
    xp = tree.xp
    zero = xp.zeros((), dtype=tree.acc_dtype, device=tree.device)
    norms = []
    for leaves, mask in buckets:
        n = _backends.plan(_tree.flatten(leaves)).norm(p)
        n = n if n.dtype == tree.acc_dtype else xp.astype(n, tree.acc_dtype)
        norms.append(n if mask is True else xp.where(mask, n, zero))
    if not norms:
        return zero
    return norms[0] if len(norms) == 1 else _backends.plan(_tree.flatten(norms)).norm(p)


def _reduce_norm(tree: _tree.Tree, local: Any, reduce: Reduce, p: float) -> Any:
    """The norm over the ranks from each rank's ``local`` norm: every rank computes
    the same number from the same reduced values, so every rank decides the same."""
    xp = tree.xp
    acc = local.dtype
    if math.isinf(p):
        # a collective's MAX need not propagate NaN: it travels as a flag beside the
        # largest non-NaN norm
        nan = xp.isnan(local)
        flag = xp.astype(nan, acc)
        both = reduce(xp.stack([xp.where(nan, xp.zeros_like(local), local), flag]), "max")
        return xp.where(both[1] > 0, xp.full_like(both[0], math.nan), both[0])
    wide = _wide_dtype(tree, acc)
    if wide is not None and p in (1, 2):
        # float32 norms below 3.5e38: their squares fit float64 with room to spare, and
        # a sum propagates inf and NaN as it is
        n = xp.astype(local, wide)
        total = reduce(n * n if p == 2 else n, "sum")
        return xp.astype(xp.sqrt(total) if p == 2 else total, acc)
    n = local if wide is None else xp.astype(local, wide)
    nan = xp.isnan(n)
    both = reduce(xp.stack([xp.where(nan, xp.zeros_like(n), n), xp.astype(nan, n.dtype)]), "max")
    big = _compat.stop_gradient(xp, both[0])  # a constant to autodiff, as in _reference
    r = divide(xp, n, safe_scale(xp, big))
    norm = scaled_root(xp, big, reduce(power(xp, r, p), "sum"), p)
    norm = xp.where(both[1] > 0, xp.full_like(norm, math.nan), norm)
    return norm if norm.dtype == acc else xp.astype(norm, acc)


def _wide_dtype(tree: _tree.Tree, acc: Any) -> Any:
    """float64 for combining float32 norms where the library and device have it."""
    xp = tree.xp
    if acc != xp.float32:
        return None
    if _compat.is_jax_namespace(xp):  # float64 only with jax_enable_x64
        jax = sys.modules["jax"]
        return xp.float64 if jax.dtypes.canonicalize_dtype(xp.float64) == xp.float64 else None
    if getattr(tree.device, "type", None) == "mps":
        return None  # Apple's GPUs have no float64
    return xp.float64


# -- which leaves count where: the markers ------------------------------------------------


def _specs(tree: _tree.Tree, replicated: Any, sharded: Any) -> list[_Spec]:
    """One ``_Spec`` per leaf from ``sharded=`` or ``replicated=``."""
    option, rest = ("sharded", "replicated") if sharded is not None else ("replicated", "sharded")
    marks = _markers(tree, sharded if sharded is not None else replicated, option)
    out = []
    for m in marks:
        if isinstance(m, Layout):
            sh, rep, leaf_rest = _none_if_false(m.sharded), _none_if_false(m.replicated), "named"
        elif m is None or m is False:
            sh, rep, leaf_rest = None, None, rest
        else:
            named = ALL if m is True else m
            sh, rep = (named, None) if option == "sharded" else (None, named)
            leaf_rest = rest
        out.append(_Spec(sh, rep, leaf_rest, option))
    return out


def _none_if_false(field: Any) -> Any:
    return ALL if field is True else None if field is False else field


def _markers(tree: _tree.Tree, spec: Any, option: str) -> list[Any]:
    """One marker per leaf from a tree of markers (or a prefix of the grads' tree), a
    function of each leaf's path, or one marker for every leaf."""
    if callable(spec) and not _is_marker_leaf(spec):
        return [spec(path) for path in tree.paths]
    root = re.split(r"[\[.]", tree.paths[0], maxsplit=1)[0]  # "grads", optax's "updates"
    # {path: marker}, with the paths of _tree.flatten; where the gradients hold an
    # array, the node is its marker (a list of groups too)
    walked = _tree.walk(spec, root, _is_marker, strict=False, leaf_paths=set(tree.paths))
    markers, paths, _ = walked
    given = dict(zip(paths, markers))
    out = []
    for path in tree.paths:
        hit = [k for k in given if path.startswith(k) and path[len(k) : len(k) + 1] in "[."]
        if not hit:
            raise ValueError(
                f"{option}= has no marker for {path}: give a tree with the structure of "
                "grads (or a prefix of it), or a function of the leaf's path"
            )
        out.append(given[max(hit, key=len)])
    return out


def _is_marker_leaf(node: Any) -> bool:
    """A Layout, a PartitionSpec, a group or a mesh: one marker, not a tree of them."""
    if isinstance(node, Layout) or _is_group(node) or _is_mesh(node):
        return True
    sharding = sys.modules.get("jax.sharding")
    return sharding is not None and isinstance(node, sharding.PartitionSpec)


def _is_marker(node: Any) -> bool:
    return node is None or isinstance(node, (bool, str)) or _is_marker_leaf(node)


def _bad_marker(option: str, path: str, marker: Any, kinds: str) -> TypeError:
    return TypeError(
        f"{option}= marks {path} with {marker!r}; a marker is True (every group of the "
        f"call), False or None (none), a gc.Layout, or {kinds}"
    )


# -- the call's dimensions and what each leaf is over them ----------------------------------


@dataclass(frozen=True)
class _Dim:
    """One dimension of the call: a torch group (``members``: its global ranks) or a
    JAX axis (``members``: its name and ``_SELF``, so two axes meet in one element as
    two groups of a grid meet in this rank)."""

    members: frozenset[Any]
    handle: Any  # the ProcessGroup or the axis name
    order: int  # where the call first names it: every rank reduces in this order

    def label(self) -> str:
        if isinstance(self.handle, str):
            return f"axis {self.handle!r}"
        return f"the group of ranks {sorted(self.members)}"


def _distinct(dims: Sequence[_Dim]) -> list[_Dim]:
    """Each set of ranks once (the group named first), none inside another."""
    uniq: dict[frozenset[Any], _Dim] = {}
    for d in dims:
        if len(d.members) > 1:  # a group of one rank reduces nothing
            other = uniq.get(d.members)
            uniq[d.members] = d if other is None or d.order < other.order else other
    return [d for d in uniq.values() if not any(d.members < e.members for e in uniq.values())]


def _call_dims(
    explicit: Sequence[_Dim] | None,
    per_leaf: Sequence[tuple[list[_Dim], list[_Dim]]],
    meshes: Sequence[_Dim] = (),
) -> list[_Dim]:
    """The call's dimensions, made distinct and checked to meet only in this rank:
    ``process_group=``/``axis_name=`` (``explicit``), the DTensor meshes' and the
    groups leaves are sharded over; also those they are replicated over unless
    ``explicit`` names the call's dimensions (then a group of copies may lie across
    them: a tied embedding on the first and the last pipeline stage)."""
    named = [*(explicit or ()), *meshes]
    for sharded, replicated in per_leaf:
        named += sharded if explicit is not None else [*sharded, *replicated]
    dims = _distinct(named)
    for i, a in enumerate(dims):
        for b in dims[:i]:
            both = a.members & b.members
            if len(both) > 1:
                shared = sorted(x for x in both if x is not _SELF)
                raise ValueError(
                    f"{b.label()} and {a.label()} share ranks {shared} without one "
                    "containing the other: their shards would be counted twice; the "
                    "call's groups must meet only in this rank (the rows and columns "
                    "of a grid, a DeviceMesh's dimensions)"
                )
    return sorted(dims, key=lambda d: d.order)


def _replicated_over(
    path: str,
    spec: _Spec,
    sharded: list[_Dim],
    replicated: list[_Dim],
    dims: list[_Dim],
    plain_beside: list[_Dim],
) -> list[_Dim]:
    """The dimensions over which the leaf holds copies (it counts on index 0 of each)."""
    for s in sharded:
        for r in replicated:
            if s.members == r.members:
                raise ValueError(f"{path} is marked both sharded and replicated over {s.label()}")
    if spec.rest == "sharded":
        return _distinct([*replicated, *plain_beside])
    named = [*sharded, *replicated]
    rest = []
    for g in dims:
        if any(g.members <= h.members for h in named):
            continue  # named, or inside a named group
        inner = [h for h in named if h.members < g.members]
        if inner and math.prod(len(h.members) for h in inner) == len(g.members):
            continue  # made of named groups (a mesh's dimensions inside its flattened group)
        if inner or any(len(g.members & h.members) > 1 for h in named) or spec.rest == "named":
            what = "its gc.Layout names" if spec.rest == "named" else "sharded= names"
            raise ValueError(
                f"{path}: {what} no part of {g.label()} as sharded or replicated; say "
                "what it is over those ranks: gc.Layout(sharded=..., replicated=...)"
            )
        rest.append(g)  # not named: copies of the leaf (sharded= names the splits)
    return _distinct([*replicated, *rest])


# -- JAX: axis names inside shard_map / pmap ----------------------------------------------


def _jax_plan(tree: _tree.Tree, axis_name: Any, specs: list[_Spec]) -> _Plan | None:
    lax = sys.modules["jax"].lax
    order: dict[str, int] = {}

    def dims_of(names: tuple[str, ...]) -> list[_Dim]:
        return [_Dim(frozenset({a, _SELF}), a, order.setdefault(a, len(order))) for a in names]

    def of_marker(raw: Any, spec: _Spec, path: str) -> list[_Dim]:
        if raw is None or raw is ALL:
            return []
        try:
            return dims_of(_axis_tuple(raw, path))
        except (TypeError, ValueError):
            kinds = "the axis name(s) or a PartitionSpec"
            raise _bad_marker(spec.option, path, raw, kinds) from None

    explicit = None if axis_name is None else dims_of(_axis_tuple(axis_name, "axis_name"))
    per_leaf = [
        (of_marker(s.sharded, s, p), of_marker(s.replicated, s, p))
        for s, p in zip(specs, tree.paths)
    ]
    dims = _call_dims(explicit, per_leaf)
    if not dims:
        return None
    axes = tuple(d.handle for d in dims)
    groups: dict[tuple[str, ...], list[Any]] = {}
    for x, path, spec, (sh, rep) in zip(tree.leaves, tree.paths, specs, per_leaf):
        sh = dims if spec.sharded is ALL else sh
        rep = dims if spec.replicated is ALL else rep
        for d in rep:
            if d.members not in {e.members for e in dims}:
                raise ValueError(
                    f"{path} is marked replicated over {d.label()}, which the call does not "
                    f"reduce over (axes {axes}): add it to axis_name="
                )
        over = _replicated_over(path, spec, sh, rep, dims, [])
        groups.setdefault(tuple(sorted((d.handle for d in over), key=axes.index)), []).append(x)
    buckets = []
    for rep_axes, leaves in groups.items():
        mask: Any = True
        for a in rep_axes:
            first = lax.axis_index(a) == 0
            mask = first if mask is True else mask & first
        buckets.append((leaves, mask))

    def reduce(v: Any, op: str) -> Any:
        return lax.psum(v, axes) if op == "sum" else lax.pmax(v, axes)

    return _Plan(buckets, reduce)


def _axis_tuple(names: Any, what: str) -> tuple[Any, ...]:
    sharding = sys.modules.get("jax.sharding")
    if sharding is not None and isinstance(names, sharding.PartitionSpec):
        flat: list[Any] = []
        for entry in names:  # None (not split), a name, or a tuple of names
            flat += [] if entry is None else [entry] if isinstance(entry, str) else list(entry)
        names = tuple(flat)
        if not names:
            return ()
    names = tuple(names) if isinstance(names, (tuple, list, frozenset, set)) else (names,)
    if not names or not all(isinstance(a, str) for a in names):
        raise TypeError(f"{what} must be an axis name (str) or a tuple of them, got {names!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"{what} names an axis twice: {names!r}; each shard must count once")
    return names


# -- torch.distributed: process groups, DeviceMesh, DTensor -------------------------------


def _dtensor_type() -> Any:
    mod = sys.modules.get("torch.distributed.tensor")
    return getattr(mod, "DTensor", None)


def _is_group(obj: Any) -> bool:
    dist = sys.modules.get("torch.distributed")
    return dist is not None and isinstance(obj, dist.ProcessGroup)


def _is_mesh(obj: Any) -> bool:
    return hasattr(obj, "get_all_groups") and hasattr(obj, "mesh")


def _groups(spec: Any, what: str) -> list[Any]:
    """A group, a list of groups or a DeviceMesh (its dimensions' groups) as a list."""
    if _is_group(spec):
        return [spec]
    if _is_mesh(spec):
        return list(spec.get_all_groups())
    if isinstance(spec, (list, tuple, frozenset, set)) and spec:
        out = []
        for g in spec:
            out += _groups(g, what)
        return out
    raise TypeError(
        f"{what} must be a torch.distributed ProcessGroup, a list of them or a DeviceMesh, "
        f"got {spec!r}"
    )


class _TorchDims:
    """The ``_Dim`` of each group, made once per call (a host lookup of its ranks)."""

    def __init__(self, dist: Any) -> None:
        self.dist = dist
        self.made: dict[int, _Dim] = {}

    def __call__(self, groups: Sequence[Any]) -> list[_Dim]:
        out = []
        for g in groups:
            d = self.made.get(id(g))
            if d is None:
                ranks = frozenset(self.dist.get_process_group_ranks(g))
                d = self.made[id(g)] = _Dim(ranks, g, len(self.made))
            out.append(d)
        return out

    def of_marker(self, raw: Any, spec: _Spec, path: str) -> list[_Dim]:
        if raw is None or raw is ALL:
            return []
        try:
            return self(_groups(raw, path))
        except TypeError:
            kinds = "the process group(s) or a DeviceMesh"
            raise _bad_marker(spec.option, path, raw, kinds) from None


def _torch_plan(
    tree: _tree.Tree, process_group: Any, specs: list[_Spec], dtensor: Any
) -> _Plan | None:
    dist = sys.modules["torch.distributed"]
    dims_of = _TorchDims(dist)
    explicit = None
    if process_group is not None:
        explicit = dims_of(_groups(process_group, "process_group"))
        _check_grid(explicit)

    meshes: dict[int, list[_Dim]] = {}  # each DTensor mesh's dimensions, by id
    leaves, per_leaf = [], []
    for x, path, spec in zip(tree.leaves, tree.paths, specs):
        sh = dims_of.of_marker(spec.sharded, spec, path)
        rep = dims_of.of_marker(spec.replicated, spec, path)
        if dtensor is not None and isinstance(x, dtensor):
            mesh = x.device_mesh
            mesh_dims = meshes.get(id(mesh))
            if mesh_dims is None:
                mesh_dims = meshes[id(mesh)] = dims_of(
                    [mesh.get_group(i) for i in range(mesh.ndim)]
                )
            x, split = _dtensor_local(x)
            sh += [d for i, d in enumerate(mesh_dims) if split[i]]
            rep += [d for i, d in enumerate(mesh_dims) if not split[i]]
        leaves.append(x)
        per_leaf.append((sh, rep))
    all_mesh_dims = [d for ds in meshes.values() for d in ds]
    dims = _call_dims(explicit, per_leaf, all_mesh_dims)
    span = math.prod(len(d.members) for d in dims)
    counted = []
    for x, orig, path, spec, (sh, rep) in zip(leaves, tree.leaves, tree.paths, specs, per_leaf):
        sh = dims if spec.sharded is ALL else sh
        rep = dims if spec.replicated is ALL else rep
        # a plain tensor beside DTensors is the same on every rank of their meshes, as
        # FSDP2 leaves the parameters it does not shard (unless a sharded=/Layout says)
        beside = all_mesh_dims if spec.rest == "sharded" and orig is x else []
        over = _replicated_over(path, spec, sh, rep, dims, beside)
        for d in over:
            if len(d.members) > span:
                raise ValueError(
                    f"{path} is replicated over {len(d.members)} ranks but the call reduces "
                    f"over {span}: pass process_group= (or sharded=) with the groups its "
                    "copies span"
                )
        if all(_rank_in(dist, d.handle, path) == 0 for d in over):
            counted.append(x)
    groups = [d.handle for d in dims]
    return _Plan(
        [(counted, True)] if counted else [], _all_reduce(dist, groups) if groups else None
    )


def _dtensor_local(x: Any) -> tuple[Any, list[bool]]:
    """The local shard of a DTensor and, per mesh dimension, whether it is split there
    (a pending sum, ``Partial``, is reduced first: its local values are not a shard)."""
    if any(pl.is_partial() for pl in x.placements):
        from torch.distributed.tensor import Replicate  # torch is loaded: x is a DTensor

        x = x.redistribute(
            x.device_mesh, [Replicate() if pl.is_partial() else pl for pl in x.placements]
        )
    return x.to_local(), [not pl.is_replicate() for pl in x.placements]


def _rank_in(dist: Any, group: Any, path: str) -> int:
    rank = dist.get_rank(group=group)
    if rank < 0:
        raise ValueError(
            f"{path} is marked replicated over a process group this rank "
            f"({dist.get_rank()}) is not in"
        )
    return rank


def _check_grid(dims: Sequence[_Dim]) -> None:
    """``process_group=`` itself: two of its groups that share more than this rank
    would count the shards of the shared ranks twice."""
    for i, a in enumerate(dims):
        for b in dims[:i]:
            both = a.members & b.members
            if len(both) > 1:
                raise ValueError(
                    f"the process groups to reduce over share ranks {sorted(both)}: their "
                    "shards would be counted twice; pass groups that meet only in this "
                    "rank (the rows and columns of a grid, a DeviceMesh's dimensions)"
                )


def _all_reduce(dist: Any, groups: list[Any]) -> Reduce:
    ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}

    def reduce(v: Any, op: str) -> Any:
        v = v.clone()  # all_reduce writes in place
        for g in groups:
            dist.all_reduce(v, op=ops[op], group=g)
        return v

    return reduce
