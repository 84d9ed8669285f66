"""Dask: chunked gradients clip lazily, and on a dask.distributed LocalCluster the
result equals NumPy's (gradclip on the NumPy arrays, and the float64 reference).

A Dask graph has no ranks: every chunk is one node of the graph, so each is counted
once whatever worker holds it, and no process_group is needed. Chunks copied to
several workers (``Client.replicate``) are still counted once.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np
import pytest
from conftest import ref_clip, ref_norm

import gradclip as gc

da = pytest.importorskip("dask.array")
distributed = pytest.importorskip("distributed")

ORDS = (2.0, 1.0, float("inf"))
RTOL = 1e-6


def _grads_np(scale: float = 1.0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(11)
    shapes = {"w": (40, 30), "b": (30,), "ln": (7,)}
    return {k: (rng.standard_normal(s) * scale).astype(np.float32) for k, s in shapes.items()}


def _chunked(grads: dict[str, np.ndarray]) -> dict[str, Any]:
    chunks = {"w": (10, 15), "b": 8, "ln": 7}
    return {k: da.from_array(v, chunks=chunks[k]) for k, v in grads.items()}


@pytest.fixture(scope="module")
def client() -> Any:
    cluster = distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=False, dashboard_address=None
    )
    with distributed.Client(cluster, timeout="30s") as c:
        yield c
    cluster.close(timeout=30)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("scale", [1.0, 1e30])
@pytest.mark.parametrize("p", ORDS)
def test_cluster_norm_equals_numpy(client: Any, p: float, scale: float) -> None:
    g = _grads_np(scale)
    norm = gc.global_norm(_chunked(g), ord=p)
    assert isinstance(norm, da.Array)
    got = client.compute(norm).result(timeout=30)
    np.testing.assert_allclose(got, float(gc.global_norm(g, ord=p)), rtol=RTOL)
    np.testing.assert_allclose(got, ref_norm(list(g.values()), p), rtol=RTOL)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("p", ORDS)
def test_cluster_clip_equals_numpy(client: Any, p: float) -> None:
    g = _grads_np()
    clipped, norm = gc.clip_by_global_norm(_chunked(g), 1.0, ord=p)
    (got, got_norm) = client.compute((clipped, norm), sync=True)
    want, want_norm = ref_clip(list(g.values()), 1.0, p)
    np_clipped, _ = gc.clip_by_global_norm(g, 1.0, ord=p)
    np.testing.assert_allclose(got_norm, want_norm, rtol=RTOL)
    for k, w in zip(g, want):
        np.testing.assert_allclose(got[k], w, rtol=RTOL, atol=1e-7, err_msg=k)
        np.testing.assert_allclose(got[k], np_clipped[k], rtol=RTOL, atol=1e-7, err_msg=k)


@pytest.mark.timeout(60)
def test_chunks_replicated_on_workers_count_once(client: Any) -> None:
    g = _grads_np()
    keys, arrays = zip(*_chunked(g).items())
    persisted = dict(zip(keys, client.persist(list(arrays))))
    distributed.wait(list(persisted.values()), timeout=30)
    client.replicate(list(persisted.values()), n=2)
    who = client.who_has(persisted["w"])
    assert all(len(workers) == 2 for workers in who.values())  # every chunk on both
    for p in ORDS:
        got = client.compute(gc.global_norm(persisted, ord=p)).result(timeout=30)
        np.testing.assert_allclose(got, ref_norm(list(g.values()), p), rtol=RTOL)


def test_clip_is_lazy() -> None:
    """Nothing is computed until the result is: the blocks' function runs only then."""
    calls = []
    lock = threading.Lock()

    def seen(block: np.ndarray) -> np.ndarray:
        with lock:
            calls.append(block.shape)
        return block

    g = {
        k: v.map_blocks(seen, meta=np.empty((0,) * v.ndim, v.dtype))
        for k, v in _chunked(_grads_np()).items()
    }
    clipped, norm = gc.clip_by_global_norm(g, 1.0)
    assert calls == []
    assert all(isinstance(v, da.Array) for v in clipped.values())
    want, want_norm = ref_clip(list(_grads_np().values()), 1.0, 2.0)
    np.testing.assert_allclose(clipped["w"].compute(scheduler="threads"), want[0], rtol=RTOL)
    assert calls  # the graph ran when asked
    np.testing.assert_allclose(norm.compute(scheduler="threads"), want_norm, rtol=RTOL)
