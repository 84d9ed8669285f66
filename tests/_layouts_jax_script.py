"""The parallel layouts with JAX on 8 host devices, run by tests/test_layouts_jax.py
in a subprocess (``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set
before jax is imported).

Each layout is a mesh, the ``PartitionSpec`` of every gradient, and the full float32
gradients (``full_model``); inside ``shard_map`` (or ``pmap``) every device calls
gradclip on its block, under plain ``jit`` on the global arrays. The script prints one
JSON object: every device's norm for ``ord`` 2, 1, inf, the clipped full arrays, and
the collectives in each call's jaxpr. Importing this module does not import jax.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np
from _launch import record

ORDS = (2.0, 1.0, math.inf)
MAX_NORM = 1.0

# name: (mesh shape, axis names, {leaf: (shape, partition spec entries)})
LAYOUTS: dict[str, tuple[tuple[int, ...], tuple[str, ...], dict[str, Any]]] = {
    "data_x_tensor": (
        (2, 2),
        ("data", "tensor"),
        {
            "w": ((4, 6), (None, "tensor")),  # split over tensor, the same over data
            "ln": ((5,), ()),  # the same everywhere
            "b": ((8,), (("data", "tensor"),)),  # split over both (ZeRO beside TP)
        },
    ),
    "data_x_expert": (
        (2, 2),
        ("data", "expert"),
        {
            "experts": ((4, 3, 2), ("expert",)),  # split over expert, copies over data
            "dense": ((6, 3), ("data",)),  # FSDP over data, the same over expert
            "router": ((3, 4), ()),
        },
    ),
    "pipeline_x_data": (
        (2, 2),
        ("pp", "data"),
        {
            "stages": ((2, 3, 3), ("pp",)),  # stage s's weights at index s
            "head": ((3, 2), ()),  # the same on every device
        },
    ),
    "all_three": (
        (2, 2, 2),
        ("data", "tensor", "expert"),
        {
            "w": ((4, 6), (None, "tensor")),
            "experts": ((4, 3, 2), ("expert", None, "tensor")),
            "dense": ((8, 3), ("data",)),
            "ln": ((5,), ()),
        },
    ),
}


def full_model(name: str, scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([len(name), 42])
    leaves = LAYOUTS[name][2]
    return {
        k: (rng.standard_normal(shape) * scale).astype(np.float32)
        for k, (shape, _) in leaves.items()
    }


def _collectives(jaxpr: Any) -> list[str]:
    """The cross-device reductions of a jaxpr, sub-jaxprs (shard_map, pjit) included."""
    out = []
    for eqn in jaxpr.eqns:
        name = eqn.primitive.name
        if any(c in name for c in ("psum", "pmax", "pmin", "all_gather", "all_to_all")):
            out.append(name)
        for v in eqn.params.values():
            for sub in v if isinstance(v, (list, tuple)) else [v]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _collectives(inner)
    return out


def main() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    import optax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradclip as gc
    import gradclip.optax as gco

    assert jax.device_count() == 8, jax.devices()
    out: dict[str, Any] = {}

    def case(name: str, fn: Any) -> None:
        record(out, name, fn)

    def setup(name: str, scale: float = 1.0) -> tuple[Any, dict, dict, dict]:
        shape, axes, leaves = LAYOUTS[name]
        n = math.prod(shape)
        mesh = Mesh(np.array(jax.devices()[:n]).reshape(shape), axes)
        specs = {k: P(*entries) for k, (_, entries) in leaves.items()}
        f = full_model(name, scale)
        g = {
            k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in f.items()
        }
        return mesh, specs, f, g

    def shard_mapped(mesh: Any, specs: dict, fn: Any, out_specs: Any) -> Any:
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=out_specs))

    def norms(name: str, scale: float = 1.0, **options: Any) -> dict[str, Any]:
        """Every device's norm for each ord (one compilation), and the collectives
        of one call for each ord (its jaxpr: traced, not compiled)."""
        mesh, specs, _, g = setup(name, scale)
        axes = mesh.axis_names

        def one(g: Any, p: float) -> Any:
            return jnp.reshape(gc.global_norm(g, ord=p, **options), (1,) * len(axes))

        every = shard_mapped(mesh, specs, lambda g: [one(g, p) for p in ORDS], [P(*axes)] * 3)
        res: dict[str, Any] = {"norms": {}, "collectives": {}}
        for p, values in zip(ORDS, every(g)):
            res["norms"][str(p)] = np.asarray(values, dtype=np.float64).reshape(-1).tolist()
            single = shard_mapped(mesh, specs, lambda g, p=p: one(g, p), P(*axes))
            res["collectives"][str(p)] = _collectives(jax.make_jaxpr(single)(g).jaxpr)
        return res

    def layout(name: str, **options: Any) -> dict[str, Any]:
        """The norms, and the clips with ord 2 and 1 (one compilation)."""
        res = norms(name, **options)
        mesh, specs, _, g = setup(name)

        def body(g: Any) -> Any:
            return [gc.clip_by_global_norm(g, MAX_NORM, ord=p, **options) for p in (2.0, 1.0)]

        both = shard_mapped(mesh, specs, body, [(specs, P())] * 2)(g)
        for key, (clipped, norm) in zip(("clip", "clip1"), both):
            res[key] = {
                "norm": float(norm),
                "clipped": {k: np.asarray(v).tolist() for k, v in clipped.items()},
            }
        return res

    def specs_of(name: str) -> dict[str, Any]:
        return {k: P(*entries) for k, (_, entries) in LAYOUTS[name][2].items()}

    def data_x_tensor() -> Any:
        axes = ("data", "tensor")
        specs = specs_of("data_x_tensor")
        reps = {"w": "data", "ln": True, "b": False}
        lays = {
            "w": gc.Layout(sharded="tensor", replicated="data"),
            "ln": gc.Layout(replicated=True),
            "b": gc.Layout(sharded=True),
        }
        return {
            "specs": layout("data_x_tensor", axis_name=axes, sharded=specs),
            "specs_alone": layout("data_x_tensor", sharded=specs),
            "replicated": norms("data_x_tensor", axis_name=axes, replicated=reps),
            "layout": norms("data_x_tensor", axis_name=axes, sharded=lays),
            "unmarked": norms("data_x_tensor", axis_name=axes),
        }

    def data_x_expert() -> Any:
        return {"specs": layout("data_x_expert", sharded=specs_of("data_x_expert"))}

    def pipeline_x_data() -> Any:
        return {"specs": layout("pipeline_x_data", sharded=specs_of("pipeline_x_data"))}

    def all_three() -> Any:
        return {
            "specs": layout("all_three", sharded=specs_of("all_three")),
            "huge": norms("all_three", scale=1e30, sharded=specs_of("all_three")),
        }

    def jit_named() -> Any:
        """Plain jit on the global arrays of each layout: nothing to pass."""
        res = {}
        for name in LAYOUTS:
            _, _, _, g = setup(name)
            every = jax.jit(lambda g: [gc.global_norm(g, ord=p) for p in ORDS])(g)
            got = {str(p): float(v) for p, v in zip(ORDS, every)}
            clipped, norm = jax.jit(lambda g: gc.clip_by_global_norm(g, MAX_NORM))(g)
            kept = all(clipped[k].sharding.is_equivalent_to(g[k].sharding, g[k].ndim) for k in g)
            res[name] = {
                "norms": got,
                "norm": float(norm),
                "clipped": {k: np.asarray(v).tolist() for k, v in clipped.items()},
                "sharding_kept": kept,
            }
        return res

    def optax_transform() -> Any:
        """gradclip.optax inside shard_map with the in_specs as sharded=: the updates
        of optax.clip_by_global_norm on the full model."""
        name = "all_three"
        mesh, specs, f, g = setup(name)
        tx = optax.chain(gco.clip_by_global_norm(MAX_NORM, sharded=specs), optax.sgd(1.0))
        zeros = jax.tree.map(jnp.zeros_like, g)

        def body(g: Any, params: Any) -> Any:
            updates, _ = tx.update(g, tx.init(params), params)
            return updates

        f_ = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=(specs, specs), out_specs=specs))
        updates = f_(g, zeros)
        full_tx = optax.chain(optax.clip_by_global_norm(MAX_NORM), optax.sgd(1.0))
        f64 = {k: jnp.asarray(v) for k, v in f.items()}
        want, _ = full_tx.update(f64, full_tx.init(f64))
        return {
            "updates": {k: np.asarray(v).tolist() for k, v in updates.items()},
            "optax": {k: np.asarray(v).tolist() for k, v in want.items()},
        }

    def pmap_layout() -> Any:
        """pmap over the 8 devices: w split into 8 rows, ln the same on each."""
        rng = np.random.default_rng(5)
        w = rng.standard_normal((8, 3)).astype(np.float32)
        ln = rng.standard_normal(4).astype(np.float32)
        g = {"w": w.reshape(8, 1, 3), "ln": np.broadcast_to(ln, (8, 4))}
        res: dict[str, Any] = {"full": {"w": w.tolist(), "ln": ln.tolist()}}
        for label, opts in {
            "sharded": {"sharded": {"w": "i", "ln": None}},
            "axis_and_sharded": {"axis_name": "i", "sharded": {"w": True, "ln": False}},
        }.items():
            every = jax.pmap(
                lambda g, opts=opts: [gc.global_norm(g, ord=p, **opts) for p in ORDS],
                axis_name="i",
            )(g)
            res[label] = {str(p): np.asarray(v).tolist() for p, v in zip(ORDS, every)}
        return res

    def nonfinite() -> Any:
        """NaN in one element on one device: every device decides the same."""
        name = "data_x_expert"
        mesh, specs, f, _ = setup(name)
        f["experts"][3, 2, 1] = math.nan  # expert 3: on the devices of expert index 1
        g = {
            k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in f.items()
        }
        res = {}
        for policy in ("propagate", "zero"):

            def body(g: Any, policy: str = policy) -> Any:
                clipped, norm = gc.clip_by_global_norm(
                    g, MAX_NORM, nonfinite=policy, sharded=specs
                )
                return clipped, jnp.reshape(norm, (1, 1))

            fn = jax.jit(
                jax.shard_map(
                    body, mesh=mesh, in_specs=(specs,), out_specs=(specs, P(*mesh.axis_names))
                )
            )
            clipped, norm = fn(g)
            res[policy] = {
                "norms": np.asarray(norm).reshape(-1).tolist(),
                "clipped": {k: np.asarray(v).tolist() for k, v in clipped.items()},
            }
        return res

    def x64() -> Any:
        """With float64 enabled, ord 1 and 2 take one collective (float64 sums)."""
        jax.config.update("jax_enable_x64", True)
        try:
            return norms("data_x_tensor", sharded=specs_of("data_x_tensor"))
        finally:
            jax.config.update("jax_enable_x64", False)

    case("data_x_tensor", data_x_tensor)
    case("data_x_expert", data_x_expert)
    case("pipeline_x_data", pipeline_x_data)
    case("all_three", all_three)
    case("jit_named", jit_named)
    case("optax", optax_transform)
    case("pmap", pmap_layout)
    case("nonfinite", nonfinite)
    case("x64", x64)
    return out


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    print(json.dumps(main(), allow_nan=True))
