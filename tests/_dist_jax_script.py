"""JAX on 8 host devices, run by tests/test_distributed_jax.py in a subprocess.

``XLA_FLAGS=--xla_force_host_platform_device_count=8`` must be set before jax is
imported, and the rest of the suite imports jax in the pytest process, so this runs
as ``python tests/_dist_jax_script.py`` and prints one JSON object: each case's norms
(for ``ord`` 2, 1, inf) and clipped arrays. The test compares them with the float64
NumPy norm of the full gradients. Importing this module does not import jax.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from typing import Any

import numpy as np

ORDS = (2.0, 1.0, math.inf)
MAX_NORM = 1.0
MESH = (4, 2)  # axes ("x", "y") of the 8 devices


def full_grads(scale: float = 1.0) -> dict[str, np.ndarray]:
    """The full float32 gradients: w sharded over x and y, b over x (replicated over
    y), ln replicated on every device."""
    rng = np.random.default_rng(7)
    shapes = {"w": (8, 6), "b": (8,), "ln": (5,)}
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def _ord_key(p: float) -> str:
    return str(p)


def main() -> dict[str, Any]:
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    import gradclip as gc

    assert jax.device_count() == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()).reshape(MESH), ("x", "y"))
    specs = {"w": P("x", "y"), "b": P("x"), "ln": P()}
    marks = {"w": False, "b": "y", "ln": True}  # what each leaf is replicated over
    out: dict[str, Any] = {}

    def put(f: dict[str, np.ndarray]) -> dict[str, Any]:
        return {
            k: jax.device_put(jnp.asarray(v), NamedSharding(mesh, specs[k])) for k, v in f.items()
        }

    def case(name: str, fn: Any) -> None:
        try:
            out[name] = fn()
        except Exception:
            out[name] = {"error": traceback.format_exc()}

    def in_shard_map(fn: Any, grads: Any, out_specs: Any = None) -> Any:
        out_specs = P() if out_specs is None else out_specs
        return jax.jit(jax.shard_map(fn, mesh=mesh, in_specs=(specs,), out_specs=out_specs))(grads)

    def norms_shard_map(grads: Any, replicated: Any) -> dict[str, float]:
        return {
            _ord_key(p): float(
                in_shard_map(
                    lambda g, p=p: gc.global_norm(
                        g, ord=p, axis_name=("x", "y"), replicated=replicated
                    ),
                    grads,
                )
            )
            for p in ORDS
        }

    def jit_sharded() -> Any:
        g = put(full_grads())
        norms = {
            _ord_key(p): float(jax.jit(lambda g, p=p: gc.global_norm(g, ord=p))(g)) for p in ORDS
        }
        clipped, norm = jax.jit(lambda g: gc.clip_by_global_norm(g, MAX_NORM))(g)
        same = all(clipped[k].sharding.is_equivalent_to(g[k].sharding, g[k].ndim) for k in g)
        return {
            "norms": norms,
            "norm": float(norm),
            "clipped": {k: np.asarray(v).tolist() for k, v in clipped.items()},
            "sharding_kept": same,
        }

    def shard_map_marked() -> Any:
        return {"norms": norms_shard_map(put(full_grads()), marks)}

    def shard_map_predicate() -> Any:
        by_path = {"grads['w']": False, "grads['b']": "y", "grads['ln']": True}
        return {"norms": norms_shard_map(put(full_grads()), by_path.__getitem__)}

    def shard_map_unmarked() -> Any:
        return {"norms": norms_shard_map(put(full_grads()), None)}

    def shard_map_huge() -> Any:
        return {"norms": norms_shard_map(put(full_grads(1e30)), marks)}

    def shard_map_clip() -> Any:
        def fn(g: Any) -> Any:
            return gc.clip_by_global_norm(
                g, MAX_NORM, ord=1, axis_name=("x", "y"), replicated=marks
            )

        clipped, norm = in_shard_map(fn, put(full_grads()), out_specs=(specs, P()))
        return {
            "norm": float(norm),
            "clipped": {k: np.asarray(v).tolist() for k, v in clipped.items()},
        }

    def shard_map_nonfinite() -> Any:
        res = {}
        for bad in (math.nan, math.inf):
            f = full_grads()
            f["w"][5, 4] = bad  # on one device only
            res[str(bad)] = norms_shard_map(put(f), marks)
        return res

    def pmap_replicated() -> Any:
        f = full_grads()
        g = {
            "w": f["w"].reshape(8, 1, 6),  # one row per device
            "ln": np.broadcast_to(f["ln"], (8, *f["ln"].shape)),  # the same on every device
        }
        res = {}
        for label, rep in (("marked", {"w": False, "ln": True}), ("unmarked", None)):
            res[label] = {
                _ord_key(p): np.asarray(
                    jax.pmap(
                        lambda g, p=p, rep=rep: gc.global_norm(
                            g, ord=p, axis_name="i", replicated=rep
                        ),
                        axis_name="i",
                    )(g)
                ).tolist()
                for p in ORDS
            }
        return res

    case("jit_sharded", jit_sharded)
    case("shard_map_marked", shard_map_marked)
    case("shard_map_predicate", shard_map_predicate)
    case("shard_map_unmarked", shard_map_unmarked)
    case("shard_map_huge", shard_map_huge)
    case("shard_map_clip", shard_map_clip)
    case("shard_map_nonfinite", shard_map_nonfinite)
    case("pmap_replicated", pmap_replicated)
    return out


if __name__ == "__main__":
    if "--xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
        raise SystemExit("set XLA_FLAGS=--xla_force_host_platform_device_count=8")
    print(json.dumps(main(), allow_nan=True))
