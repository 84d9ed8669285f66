"""Property tests: random trees, shapes, dtypes, ord, max_norm and eps vs float64 NumPy."""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import make_backend, ref_clip
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradclip as gc

# the largest |exponent| of the values drawn per dtype, so the leaves stay finite
EXPONENTS = {"float16": 3, "bfloat16": 30, "float32": 30, "float64": 200}
LEAF_RTOL = {"float16": 1e-3, "bfloat16": 8e-3, "float32": 3e-7, "float64": 1e-15}
TINY = {"float16": 6.2e-5, "bfloat16": 1.2e-38, "float32": 1.2e-38, "float64": 2.3e-308}


@st.composite
def cases(draw, dtypes):
    dtype = draw(st.sampled_from(sorted(dtypes)))
    shapes = draw(
        st.lists(st.lists(st.integers(0, 5), min_size=0, max_size=3), min_size=1, max_size=5)
    )
    e = EXPONENTS[dtype]
    exps = draw(st.lists(st.integers(-e, e), min_size=len(shapes), max_size=len(shapes)))
    seed = draw(st.integers(0, 2**32 - 1))
    p = draw(st.one_of(st.sampled_from([1.0, 2.0, 3.0, math.inf]), st.floats(0.5, 8.0)))
    frac = draw(st.sampled_from([0.0, 0.1, 0.5, 0.99, 1.0, 2.0]))
    eps = draw(st.sampled_from([0.0, 1e-6]))
    nest = draw(
        st.lists(
            st.sampled_from(["list", "dict", "tuple"]), min_size=len(shapes), max_size=len(shapes)
        )
    )
    return dtype, shapes, exps, seed, p, frac, eps, nest


def _build(backend, dtype, shapes, exps, seed, nest):
    rng = np.random.default_rng(seed)
    leaves = [
        backend.asarray(rng.standard_normal(s) * 10.0**x, dtype) for s, x in zip(shapes, exps)
    ]
    tree: dict = {}
    for i, (leaf, kind) in enumerate(zip(leaves, nest)):
        tree[f"k{i}"] = {"list": [leaf, None], "dict": {"x": leaf}, "tuple": (leaf,)}[kind]
    return tree, leaves


def _leaves_of(tree, nest):
    return [
        {"list": lambda v: v[0], "dict": lambda v: v["x"], "tuple": lambda v: v[0]}[k](
            tree[f"k{i}"]
        )
        for i, k in enumerate(nest)
    ]


@pytest.mark.parametrize("name", ["numpy", "torch", "jax", "array_api_strict"])
def test_clip_by_global_norm_properties(name):
    backend = make_backend(name)

    # JAX compiles every new shape eagerly: fewer examples keep the file fast
    examples = 20 if name == "jax" else 40

    @settings(max_examples=examples, deadline=None, suppress_health_check=list(HealthCheck))
    @given(cases(backend.dtypes))
    def check(case):
        dtype, shapes, exps, seed, p, frac, eps, nest = case
        tree, leaves = _build(backend, dtype, shapes, exps, seed, nest)
        stored = [backend.to_numpy(x) for x in leaves]
        _, rnorm = ref_clip(stored, 1.0, p)
        max_norm = frac * rnorm
        clipped, norm = gc.clip_by_global_norm(tree, max_norm, ord=p, eps=eps)
        ref, rnorm = ref_clip(stored, max_norm, p, eps)
        acc64 = dtype == "float64"
        assert str(norm.dtype).endswith("float64" if acc64 else "float32")
        n = float(backend.to_numpy(norm))
        assert math.isfinite(n)
        assert n == pytest.approx(rnorm, rel=1e-12 if acc64 else 1e-6, abs=1e-300)
        out = _leaves_of(clipped, nest)
        for c, r, x in zip(out, ref, leaves):
            assert c.dtype == x.dtype and tuple(c.shape) == tuple(x.shape)
            got = backend.to_numpy(c)
            # the leaf's rounding plus the scale's error, which is the norm's (<= 1e-6)
            tol = (LEAF_RTOL[dtype] + (1e-12 if acc64 else 1e-6)) * np.abs(r) + 4 * TINY[dtype]
            assert np.all(np.abs(got - r) <= tol), (got, r)
        # the clipped tree's norm never exceeds the threshold by more than rounding
        if rnorm + eps > max_norm and max_norm > 0:
            after = float(backend.to_numpy(gc.global_norm(out, ord=p)))
            assert after <= max_norm * (1 + 3 * LEAF_RTOL[dtype] + 2e-6) + 1e-300

    check()
