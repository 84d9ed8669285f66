"""Trees at the edges: containers that contain themselves, absurd nesting depth
(walked without recursion), shared sub-trees, and sparse leaves (torch's sparse
layouts, JAX's BCOO/BCSR), which are a TypeError naming their position.
"""

from __future__ import annotations

import math
import re
import sys

import numpy as np
import pytest
from conftest import make_backend, ref_norm
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradclip as gc

SETTINGS = settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck))
KINDS = ["list", "tuple", "dict"]


def _wrap(kind, child):
    return {"list": lambda: [child], "tuple": lambda: (child,), "dict": lambda: {"k": child}}[
        kind
    ]()


def _key(kind):
    return "['k']" if kind == "dict" else "[0]"


def _unwrap(kind, node):
    return node["k"] if kind == "dict" else node[0]


def chain_kinds(depth):
    """The container kinds of a chain ``depth`` deep, from the top."""
    return st.lists(st.sampled_from(KINDS), min_size=depth, max_size=depth)


def _build_chain(kinds, leaf):
    node = leaf
    for kind in reversed(kinds):
        node = _wrap(kind, node)
    return node


@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "array_api_strict"])
def test_any_depth_is_walked_and_rebuilt(name):
    """Chains thousands of levels deep (far past Python's recursion limit): the norm,
    the clipped leaf, and every container rebuilt with its type."""
    b = make_backend(name)
    depth = 3 * sys.getrecursionlimit()

    @settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
    @given(chain_kinds(depth), st.floats(0.1, 10.0))
    def check(kinds, max_norm):
        leaf = b.asarray(np.array([3.0, 4.0]))
        tree = _build_chain(kinds, leaf)
        assert float(b.to_numpy(gc.global_norm(tree))) == pytest.approx(5.0)
        clipped, _ = gc.clip_by_global_norm(tree, max_norm)
        node = clipped
        for kind in kinds:  # (a loop: recursion would overflow here too)
            assert type(node) is {"list": list, "tuple": tuple, "dict": dict}[kind]
            node = _unwrap(kind, node)
        want = np.array([3.0, 4.0]) * min(1.0, max_norm / 5.0)
        np.testing.assert_allclose(b.to_numpy(node), want, rtol=1e-6)

    check()


def test_deep_errors_name_the_deep_position():
    depth = 5000
    tree = _build_chain(["list"] * depth, "not an array")
    with pytest.raises(TypeError, match=r"^grads(\[0\]){5000} is a builtins.str"):
        gc.global_norm(tree)


def test_deep_replicated_markers():
    """The replicated= markers are walked the same way (checked without a group)."""
    depth = 3000
    grads = _build_chain(["dict"] * depth, np.array([3.0, 4.0]))
    markers = _build_chain(["dict"] * depth, True)
    assert float(gc.global_norm(grads, replicated=markers)) == 5.0
    with pytest.raises(ValueError, match="no marker"):
        gc.global_norm(grads, replicated=_build_chain(["dict"] * depth, {"other": True}))


@st.composite
def cyclic(draw):
    """A random tree of containers (and array leaves), one of which, at a random
    position, holds a reference back to one of its ancestors (itself included)."""
    depth = draw(st.integers(1, 12))
    kinds = draw(st.lists(st.sampled_from(["list", "dict"]), min_size=depth, max_size=depth))
    back = draw(st.integers(0, depth - 1))  # the ancestor the cycle returns to
    extra = draw(st.lists(st.integers(0, 3), min_size=depth, max_size=depth))
    nodes = [[] if k == "list" else {} for k in kinds]
    paths, path = [], "grads"
    for i, (kind, node) in enumerate(zip(kinds, nodes)):
        paths.append(path)
        for j in range(extra[i]):  # array leaves beside the chain
            if kind == "list":
                node.append(np.ones(2))
            else:
                node[f"a{j}"] = np.ones(2)
        child = nodes[i + 1] if i + 1 < depth else nodes[back]
        key = len(node) if kind == "list" else "next"
        if kind == "list":
            node.append(child)
        else:
            node[key] = child
        path += f"[{key!r}]" if kind == "dict" else f"[{key}]"
    return nodes[0], path, paths[back]


@given(cyclic())
@SETTINGS
def test_a_container_inside_itself_is_a_value_error(case):
    """Wherever the cycle closes: a ValueError naming the position and the container
    it repeats, never a RecursionError (nor an endless loop); in place, nothing is
    written."""
    tree, where, ancestor = case
    for call in (
        gc.global_norm,
        lambda t: gc.clip_by_global_norm(t, 1.0),
        lambda t: gc.clip_by_global_norm_(t, 1.0),
        lambda t: gc.clip_by_value(t, 1.0),
    ):
        with pytest.raises(ValueError, match="cycle") as info:
            call(tree)
        assert f"{where} is {ancestor} again" in str(info.value)


def test_the_issue_example_and_markers():
    a: list = []
    a.append(a)
    with pytest.raises(ValueError, match=r"grads\[0\] is grads again"):
        gc.clip_by_global_norm(a, 1.0)
    d: dict = {"w": np.ones(2)}
    d["self"] = d
    with pytest.raises(ValueError, match="cycle"):
        gc.global_norm({"w": np.ones(2)}, replicated=d)


def test_shared_subtrees_are_not_cycles():
    """The same sub-tree twice (a DAG) is two positions, as in the functional form of
    every other library: each counts, and each is rebuilt."""
    sub = [np.array([3.0]), np.array([4.0])]
    tree = {"a": sub, "b": sub}
    n = gc.global_norm(tree)
    assert float(n) == pytest.approx(ref_norm([np.array([3.0, 4.0, 3.0, 4.0])], 2))
    clipped, _ = gc.clip_by_global_norm(tree, 1.0)
    assert clipped["a"] is not clipped["b"]
    np.testing.assert_allclose(clipped["a"][1], 4.0 / float(n))


# -- sparse leaves ------------------------------------------------------------------------


def _torch_sparse(torch, layout, dense):
    return {
        "coo": lambda: dense.to_sparse(),
        "csr": lambda: dense.to_sparse_csr(),
        "csc": lambda: dense.to_sparse_csc(),
        "bsr": lambda: dense.to_sparse_bsr((1, 1)),
    }[layout]()


@st.composite
def trees_with_one_odd_leaf(draw):
    """A dict/list tree of dense leaves with one odd leaf at a random position: the
    tree's recipe and that leaf's path."""
    n = draw(st.integers(1, 6))
    at = draw(st.integers(0, n - 1))
    kinds = draw(st.lists(st.sampled_from(["list", "dict"]), min_size=n, max_size=n))
    return n, at, kinds


def _tree_with(make_dense, odd, n, at, kinds):
    tree, path = {}, None
    for i, kind in enumerate(kinds):
        leaf = odd if i == at else make_dense()
        if kind == "list":
            tree[f"k{i}"] = [make_dense(), leaf]
            p = f"grads['k{i}'][1]"
        else:
            tree[f"k{i}"] = {"w": leaf}
            p = f"grads['k{i}']['w']"
        path = p if i == at else path
    return tree, path


@pytest.mark.parametrize("layout", ["coo", "csr", "csc", "bsr"])
def test_sparse_torch_leaves_are_named_type_errors(layout):
    """Every entry point, functional and in place: a TypeError naming the sparse
    leaf's position (not torch's "reshape is not implemented for sparse tensors"),
    and in place, no dense leaf written."""
    torch = pytest.importorskip("torch")

    @SETTINGS
    @given(trees_with_one_odd_leaf())
    def check(case):
        n, at, kinds = case
        sparse = _torch_sparse(torch, layout, torch.tensor([[0.0, 3.0], [4.0, 0.0]]))
        tree, path = _tree_with(lambda: torch.tensor([30.0, 40.0]), sparse, n, at, kinds)
        for call in (
            gc.global_norm,
            lambda t: gc.clip_by_global_norm(t, 1.0),
            lambda t: gc.clip_by_global_norm_(t, 1.0),
            lambda t: gc.clip_by_norm(t, 1.0),
            lambda t: gc.clip_by_value(t, 1.0),
        ):
            with pytest.raises(TypeError, match=re.escape(f"{path} is a sparse tensor")):
                call(tree)
        dense = [x for v in tree.values() for x in (v if isinstance(v, list) else v.values())]
        for x in dense:
            if x.layout == torch.strided:
                torch.testing.assert_close(x, torch.tensor([30.0, 40.0]))

    check()


def test_sparse_embedding_gradients_in_the_torch_drop_ins():
    torch = pytest.importorskip("torch")
    gct = pytest.importorskip("gradclip.torch")
    model = torch.nn.ModuleDict(
        {"emb": torch.nn.Embedding(10, 3, sparse=True), "lin": torch.nn.Linear(3, 1)}
    )
    model["lin"](model["emb"](torch.tensor([1, 2, 1]))).sum().backward()
    before = model["lin"].weight.grad.clone()
    for call in (
        lambda: gct.clip_grad_norm_(model.parameters(), 0.1),
        lambda: gct.clip_grad_value_(model.parameters(), 0.1),
        lambda: gct.get_total_norm([p.grad for p in model.parameters()]),
    ):
        with pytest.raises(TypeError, match=r"grads\[0\] is a sparse tensor"):
            call()
    torch.testing.assert_close(model["lin"].weight.grad, before)
    # the values, as the message says, are clipped (and share the sparse grad's memory)
    g = model["emb"].weight.grad.coalesce()
    model["emb"].weight.grad = g
    want = torch.linalg.vector_norm(g.to_dense())
    n = gc.clip_by_global_norm_(g.values(), 0.1)
    torch.testing.assert_close(n, want)
    torch.testing.assert_close(
        torch.linalg.vector_norm(model["emb"].weight.grad.to_dense()),
        torch.tensor(0.1),
        rtol=1e-5,
        atol=0,
    )


def test_nested_torch_tensors_are_named_type_errors():
    torch = pytest.importorskip("torch")
    nt = torch.nested.nested_tensor([torch.ones(2), torch.ones(3)], layout=torch.jagged)
    with pytest.raises(TypeError, match=r"grads\['b'\] is a"):
        gc.global_norm({"a": torch.ones(2), "b": nt})


@pytest.mark.parametrize("kind", ["BCOO", "BCSR"])
def test_sparse_jax_arrays_are_named_type_errors(kind):
    """JAX's sparse arrays are pytrees of their values *and integer indices*: taken as
    a tree, the norm would count the indices (and clip them). A TypeError instead."""
    pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    sparse = pytest.importorskip("jax.experimental.sparse")

    @SETTINGS
    @given(trees_with_one_odd_leaf())
    def check(case):
        n, at, kinds = case
        m = getattr(sparse, kind).fromdense(jnp.array([[0.0, 3.0], [4.0, 0.0]]))
        tree, path = _tree_with(lambda: jnp.array([3.0, 4.0]), m, n, at, kinds)
        for call in (gc.global_norm, lambda t: gc.clip_by_global_norm(t, 1.0)):
            with pytest.raises(TypeError, match=re.escape(f"{path} is a sparse {kind}")):
                call(tree)

    check()


def test_jax_pytrees_nest_deeply():
    """Registered pytree nodes (namedtuples here) are walked one level at a time."""
    pytest.importorskip("jax")
    jnp = pytest.importorskip("jax.numpy")
    from collections import namedtuple

    Node = namedtuple("Node", "child extra")
    tree = jnp.array([3.0, 4.0])
    depth = 2 * sys.getrecursionlimit()
    for _ in range(depth):
        tree = Node(tree, None)
    clipped, n = gc.clip_by_global_norm(tree, 1.0)
    assert float(n) == pytest.approx(5.0)
    for _ in range(depth):
        assert type(clipped) is Node and clipped.extra is None
        clipped = clipped.child
    np.testing.assert_allclose(clipped, [0.6, 0.8], rtol=1e-6)
    assert math.isclose(float(gc.global_norm(clipped)), 1.0, rel_tol=1e-6)
