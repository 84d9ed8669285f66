"""The core functions under jax.jit, jax.vmap and jax.grad, and on JAX pytrees."""

from __future__ import annotations

import dataclasses
import math
from collections import namedtuple

import numpy as np
import pytest
from conftest import ref_clip, ref_norm

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import gradclip as gc  # noqa: E402
import gradclip.optax as gco  # noqa: E402

ORDS = [1, 2, 3, math.inf]


def _np(tree):
    return [np.asarray(x, np.float64) for x in jax.tree.leaves(tree)]


# -- jit ----------------------------------------------------------------------------


@pytest.mark.parametrize("ord", [2, math.inf])
def test_jit_with_traced_max_norm(ord):
    rng = np.random.default_rng(0)
    grads = {"w": jnp.asarray(rng.standard_normal((4, 3))), "b": jnp.asarray([0.5, -2.0])}
    traces = []

    @jax.jit
    def f(g, m):
        traces.append(m)  # runs once per trace
        return gc.clip_by_global_norm(g, m, ord=ord)

    for m in (0.5, 1e3):  # clipped, then not: one compile, max_norm is traced
        out, norm = f(grads, jnp.asarray(m))
        want, n = ref_clip(_np(grads), m, ord)
        np.testing.assert_allclose(float(norm), n, rtol=1e-14)
        for x, y in zip(_np(out), want):
            np.testing.assert_allclose(x, y, rtol=1e-14)
    assert len(traces) == 1


# -- vmap: per-example clipping --------------------------------------------------------


def test_vmap_per_example_clipping_matches_a_loop_and_optax():
    rng = np.random.default_rng(1)
    B, C = 5, 1.0
    s = np.array([0.0, 0.1, 0.3, 3.0, 10.0])  # example 0 is all zeros
    batch = {
        "w": jnp.asarray(rng.standard_normal((B, 3, 2)) * s[:, None, None]),
        "b": jnp.asarray(rng.standard_normal((B, 2)) * s[:, None]),
    }
    clipped, norms = jax.jit(jax.vmap(lambda g: gc.clip_by_global_norm(g, C)))(batch)
    for i in range(B):
        example = {k: v[i] for k, v in batch.items()}
        loop, n = gc.clip_by_global_norm(example, C)  # eager, one example at a time
        want, ref_n = ref_clip([np.asarray(example[k]) for k in ("w", "b")], C, 2)
        np.testing.assert_allclose(float(norms[i]), ref_n, rtol=1e-14)
        np.testing.assert_allclose(float(norms[i]), float(n), rtol=1e-15)
        for k, y in zip(("w", "b"), want):
            np.testing.assert_allclose(clipped[k][i], loop[k], rtol=1e-15)
            np.testing.assert_allclose(clipped[k][i], y, rtol=1e-14)
    # optax's DP-SGD helper sums the same per-example clipped gradients
    summed, _ = optax.per_example_global_norm_clip([batch["b"], batch["w"]], C)
    np.testing.assert_allclose(summed[0], jnp.sum(clipped["b"], 0), rtol=1e-13)
    np.testing.assert_allclose(summed[1], jnp.sum(clipped["w"], 0), rtol=1e-13)
    assert float(jnp.min(norms)) < C < float(jnp.max(norms))


# -- grad ---------------------------------------------------------------------------

W = np.array([[1.0, -2.0], [0.5, 3.0]])  # the loss weights: L(g) = sum(W * clip(g))


def _loss(g, max_norm=1.0, ord=2):
    return jnp.sum(jnp.asarray(W) * gc.clip_by_global_norm(g, max_norm, ord=ord)[0])


@pytest.mark.parametrize("ord", ORDS)
def test_grad_at_zero_norm_is_finite(ord):
    # below the threshold the clip is the identity, so dL/dg = W, also at g = 0
    d, dn = jax.jit(
        lambda g: (jax.grad(_loss)(g, 1.0, ord), jax.grad(lambda x: gc.global_norm(x, ord=ord))(g))
    )(jnp.zeros((2, 2)))
    np.testing.assert_array_equal(d, W)
    assert np.all(np.isfinite(dn))


def test_optax_grad_at_zero_norm_is_nan():
    def loss(g):
        out, _ = optax.clip_by_global_norm(1.0).update(g, optax.EmptyState())
        return jnp.sum(jnp.asarray(W) * out)

    assert np.all(np.isnan(jax.grad(loss)(jnp.zeros((2, 2)))))
    assert np.all(np.isnan(jax.grad(optax.tree.norm)(jnp.zeros(3))))


def test_grad_matches_the_analytic_formula():
    # above the threshold clip(g) = M g / |g|, so dL/dg = M / n (W - (W.g) g / n^2)
    # and dL/dM = (W.g) / n
    g = np.array([[3.0, -1.0], [2.0, 4.0]])
    M = 1.5
    n = np.linalg.norm(g)
    dg, dm = jax.grad(_loss, argnums=(0, 1))(jnp.asarray(g), jnp.asarray(M))
    np.testing.assert_allclose(dg, M / n * (W - np.sum(W * g) * g / n**2), rtol=1e-13)
    np.testing.assert_allclose(float(dm), np.sum(W * g) / n, rtol=1e-13)
    # below the threshold: the identity, and no dependence on max_norm
    dg, dm = jax.grad(_loss, argnums=(0, 1))(jnp.asarray(g), jnp.asarray(10.0))
    np.testing.assert_array_equal(dg, W)
    assert float(dm) == 0.0


@pytest.mark.parametrize("ord", [1, 3, math.inf])
def test_grad_matches_finite_differences(ord):
    g = np.array([[3.0, -1.0], [2.0, 4.5]])  # distinct magnitudes: inf-norm is smooth here
    dg = np.asarray(jax.jit(jax.grad(_loss), static_argnums=2)(jnp.asarray(g), 1.0, ord))

    def ref(x):  # the float64 NumPy reference of the loss
        (out,), _ = ref_clip([x], 1.0, ord)
        return float(np.sum(W * out))

    h = 1e-6
    fd = np.zeros_like(g)
    for idx in np.ndindex(g.shape):
        e = np.zeros_like(g)
        e[idx] = h
        fd[idx] = (ref(g + e) - ref(g - e)) / (2 * h)
    np.testing.assert_allclose(dg, fd, rtol=1e-7, atol=1e-9)


# -- pytrees ----------------------------------------------------------------------------


@jax.tree_util.register_pytree_node_class
class Linear:
    """A custom node, as equinox and haiku modules are."""

    def __init__(self, weight, bias):
        self.weight, self.bias = weight, bias

    def tree_flatten(self):
        return (self.weight, self.bias), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)


@dataclasses.dataclass(frozen=True)
class Block:
    """A ``flax.struct.dataclass``-style node with a static field."""

    dense: Linear
    scale: jax.Array
    name: str = dataclasses.field(default="block", metadata={"static": True})


jax.tree_util.register_dataclass(Block, data_fields=["dense", "scale"], meta_fields=["name"])

Pair = namedtuple("Pair", ["first", "second"])


def _model_tree():
    rng = np.random.default_rng(3)
    lin = Linear(jnp.asarray(rng.standard_normal((3, 2))), jnp.asarray([2.0, -1.0]))
    return {
        "z_block": Block(lin, jnp.asarray(4.0), name="enc"),
        "a_pair": Pair(jnp.asarray([1.0, 2.0]), None),
        "m": [jnp.asarray([[0.5]])],
    }


def _check_tree(out, tree):
    assert list(out) == ["z_block", "a_pair", "m"]  # insertion order, not sorted
    assert isinstance(out["z_block"], Block)
    assert out["z_block"].name == "enc"
    assert isinstance(out["z_block"].dense, Linear)
    assert isinstance(out["a_pair"], Pair)
    assert out["a_pair"].second is None
    assert jax.tree.structure(out) == jax.tree.structure(tree)


def test_custom_pytrees_and_namedtuples_survive():
    tree = _model_tree()
    out, norm = gc.clip_by_global_norm(tree, 1.0)
    _check_tree(out, tree)
    want, n = ref_clip(_np(tree), 1.0, 2)
    np.testing.assert_allclose(float(norm), n, rtol=1e-14)
    for x, y in zip(_np(out), want):
        np.testing.assert_allclose(x, y, rtol=1e-14)
    _check_tree(gc.clip_by_norm(tree, 1.0), tree)
    _check_tree(gc.clip_by_value(tree, 1.0), tree)
    tx = gco.clip_by_global_norm(1.0)
    _check_tree(tx.update(tree, tx.init(tree))[0], tree)
    # under jit the custom nodes survive too (jax itself rebuilds dicts in sorted order)
    jitted, _ = jax.jit(lambda t: gc.clip_by_global_norm(t, 1.0))(tree)
    assert isinstance(jitted["z_block"].dense, Linear)
    assert isinstance(jitted["a_pair"], Pair)
    for x, y in zip(jax.tree.leaves(jitted), jax.tree.leaves(out)):
        np.testing.assert_allclose(x, y, rtol=1e-15)


def test_norm_of_pytree_equals_optax():
    tree = _model_tree()
    np.testing.assert_allclose(
        float(gc.global_norm(tree)), float(optax.tree.norm(tree)), rtol=1e-14
    )
    assert float(gc.global_norm(tree)) == pytest.approx(ref_norm(_np(tree), 2), rel=1e-14)
