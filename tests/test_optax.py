"""gradclip.optax against optax's own transforms and float64 NumPy references."""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import pytest
from conftest import LIBRARY_CLIPPERS, ref_clip, ref_norm

jax = pytest.importorskip("jax")
jnp = pytest.importorskip("jax.numpy")
optax = pytest.importorskip("optax")

import gradclip as gc  # noqa: E402
import gradclip.optax as gco  # noqa: E402

# Gradient scales per step: some steps are clipped, some are not.
SCALES = [0.1, 10.0, 0.5, 20.0, 3.0]


def _grads(rng: np.random.Generator, dtype: str) -> list[dict[str, np.ndarray]]:
    out = []
    for s in SCALES:
        out.append(
            {
                "w": (s * rng.standard_normal((3, 2))).astype(dtype),
                "b": (s * rng.standard_normal(2)).astype(dtype),
            }
        )
    return out


def _stepper(tx):
    """One jitted optimizer step: ``(params, state, grads) -> (params, state, updates)``."""

    @jax.jit
    def step(params, state, g):
        updates, state = tx.update(g, state, params)
        return optax.apply_updates(params, updates), state, updates

    return step


def _run(tx, grads, params):
    """Apply ``tx`` under jit over the gradient list: ``(updates, params, state)`` per step."""
    step, state = _stepper(tx), tx.init(params)
    history = []
    for g in grads:
        params, state, updates = step(params, state, jax.tree.map(jnp.asarray, g))
        history.append((updates, params, state))
    return history


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize(
    ("ours", "theirs"),
    [
        (lambda: gco.clip_by_global_norm(1.5), lambda: optax.clip_by_global_norm(1.5)),
        (lambda: gco.clip_by_value(0.7), lambda: optax.clip(0.7)),
        (lambda: gco.adaptive_grad_clip(0.05), lambda: optax.adaptive_grad_clip(0.05)),
        (lambda: gco.clip_by_block_rms(0.5), lambda: optax.clip_by_block_rms(0.5)),
    ],
    ids=["global_norm", "value", "agc", "block_rms"],
)
def test_same_updates_and_params_as_optax(ours, theirs, inner, dtype):
    rng = np.random.default_rng(0)
    grads = _grads(rng, dtype)
    params = {"w": jnp.ones((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    opt = (lambda: optax.sgd(0.1)) if inner == "sgd" else (lambda: optax.adam(0.1))
    a = _run(optax.chain(ours(), opt()), grads, params)
    b = _run(optax.chain(theirs(), opt()), grads, params)
    # to rounding: a few ulps of the largest element (Adam's moments cancel in places;
    # XLA's GPU kernels round Adam's steps a little differently from its CPU ones)
    tol = (4e-7 if jax.default_backend() == "cpu" else 2e-6) if dtype == "float32" else 1e-15
    for (ua, pa, _), (ub, pb, _) in zip(a, b):
        for k in ("w", "b"):
            assert ua[k].dtype == ub[k].dtype == pa[k].dtype
            for x, y in ((ua[k], ub[k]), (pa[k], pb[k])):
                np.testing.assert_allclose(x, y, rtol=0, atol=tol * float(jnp.max(jnp.abs(y))))
    # the test is only meaningful if the clip acted on some steps and not on others
    norms = [ref_norm(list(g.values()), 2) for g in grads]
    assert min(norms) < 0.7
    assert max(norms) > 1.5


def test_global_norm_drop_in_keeps_optax_state():
    params = {"w": jnp.ones(3)}
    assert gco.clip_by_global_norm(1.0).init(params) == optax.clip_by_global_norm(1.0).init(params)


def test_clip_by_norm_matches_per_leaf_reference():
    rng = np.random.default_rng(1)
    grads = _grads(rng, "float64")
    params = {"w": jnp.zeros((3, 2)), "b": jnp.zeros(2)}
    history = _run(optax.chain(gco.clip_by_norm(1.2, ord=3), optax.sgd(1.0)), grads, params)
    total = {k: np.zeros_like(v) for k, v in grads[0].items()}
    for g, (updates, new_params, _) in zip(grads, history):
        for k in g:
            (want,), _ = ref_clip([g[k]], 1.2, 3)
            np.testing.assert_allclose(updates[k], -want, rtol=1e-13)
            total[k] -= want
            np.testing.assert_allclose(new_params[k], total[k], rtol=1e-12, atol=1e-15)


def test_float16_updates_are_clipped_where_optax_zeroes_them():
    g = jnp.full((1000,), 300.0, jnp.float16)  # the true norm 9486.8 overflows float16
    ours, _ = jax.jit(gco.clip_by_global_norm(1.0).update)(g, optax.EmptyState())
    theirs, _ = jax.jit(optax.clip_by_global_norm(1.0).update)(g, optax.EmptyState())
    (want,), _ = ref_clip([np.asarray(g)], 1.0, 2)
    assert ours.dtype == jnp.float16
    np.testing.assert_allclose(np.asarray(ours, np.float64), want, rtol=1e-3)
    assert not np.any(np.asarray(theirs))  # optax: norm = inf, every update 0


# -- stateful clippers -----------------------------------------------------------------


class HalvingState(NamedTuple):
    threshold: jax.Array
    seen: jax.Array  # the last norm the transform passed in


class Halving:
    """A tiny stateful clipper: the threshold starts at ``start`` and halves every step."""

    def __init__(self, start: float) -> None:
        self.start = start

    def init(self, like):
        return HalvingState(jnp.full_like(like, self.start), jnp.zeros_like(like))

    def threshold(self, state, norm):
        return state.threshold, HalvingState(state.threshold / 2, norm)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_stateful_clipper_threshold_and_state(dtype):
    rng = np.random.default_rng(2)
    grads = _grads(rng, dtype)
    params = {"w": jnp.zeros((3, 2), dtype), "b": jnp.zeros(2, dtype)}
    tx = optax.chain(gco.clip_by_global_norm(Halving(8.0), eps=1e-6), optax.sgd(1.0))
    init = tx.init(params)
    clipped_flags = []
    rtol = 1e-6 if dtype == "float32" else 1e-13
    for k, (g, (updates, _, state)) in enumerate(zip(grads, _run(tx, grads, params))):
        limit = 8.0 / 2**k
        arrays = [g["w"], g["b"]]
        want, n = ref_clip(arrays, limit, 2, eps=1e-6)
        np.testing.assert_allclose(updates["w"], -want[0], rtol=rtol)
        np.testing.assert_allclose(updates["b"], -want[1], rtol=rtol)
        clip_state = state[0]
        assert isinstance(clip_state, gco.ClipByGlobalNormState)
        np.testing.assert_allclose(clip_state.norm, n, rtol=rtol)
        np.testing.assert_allclose(clip_state.clipper_state.seen, n, rtol=rtol)
        assert float(clip_state.max_norm) == limit
        assert float(clip_state.clipper_state.threshold) == limit / 2
        assert bool(clip_state.clipped) == (n + 1e-6 > limit)
        clipped_flags.append(bool(clip_state.clipped))
        # the state keeps its structure and dtypes, so it can be a scan carry
        assert jax.tree.structure(state) == jax.tree.structure(init)
        assert [x.dtype for x in jax.tree.leaves(state)] == [
            x.dtype for x in jax.tree.leaves(init)
        ]
    assert jnp.dtype(clip_state.norm.dtype) == jnp.dtype(dtype)
    assert True in clipped_flags
    assert False in clipped_flags


def test_stateful_clipper_infinite_threshold_does_not_clip():
    class Never:
        def init(self, like):
            return ()

        def threshold(self, state, norm):
            return jnp.asarray(jnp.inf, norm.dtype), state

    g = {"a": jnp.array([300.0, -400.0])}
    tx = gco.clip_by_global_norm(Never())
    out, state = jax.jit(tx.update)(g, tx.init(g))
    np.testing.assert_array_equal(out["a"], g["a"])
    assert float(state.norm) == 500.0
    assert not bool(state.clipped)
    assert math.isinf(float(state.max_norm))


# -- skip_nonfinite -------------------------------------------------------------------


def _bitwise_equal(a, b) -> bool:
    la, lb = jax.tree.leaves(a), jax.tree.leaves(b)
    return jax.tree.structure(a) == jax.tree.structure(b) and all(
        x.dtype == y.dtype and np.asarray(x).tobytes() == np.asarray(y).tobytes()
        for x, y in zip(la, lb)
    )


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_skip_nonfinite_leaves_inner_state_untouched(bad):
    inner = optax.chain(gco.clip_by_global_norm(1.0), optax.adam(0.1))
    tx = gco.skip_nonfinite(inner)
    params = {"w": jnp.array([1.0, -2.0]), "b": jnp.array([0.5])}
    g1 = {"w": jnp.array([0.3, 2.0]), "b": jnp.array([-1.0])}
    g_bad = {"w": jnp.array([0.3, bad]), "b": jnp.array([-1.0])}
    g3 = {"w": jnp.array([-0.4, 0.1]), "b": jnp.array([0.2])}
    step = _stepper(tx)
    p1, s1, _ = step(params, tx.init(params), g1)
    p2, s2, u2 = step(p1, s1, g_bad)
    assert all(not np.any(np.asarray(u)) for u in jax.tree.leaves(u2))
    assert _bitwise_equal(s2.inner_state, s1.inner_state)  # adam's mu, nu and count
    assert _bitwise_equal(p2, p1)
    assert (bool(s2.last_finite), int(s2.consecutive), int(s2.skipped)) == (False, 1, 1)
    p3, s3, _ = step(p2, s2, g3)
    q3, t3, _ = step(p1, s1, g3)  # the same run without the bad step
    assert _bitwise_equal(p3, q3)
    assert _bitwise_equal(s3.inner_state, t3.inner_state)
    assert (bool(s3.last_finite), int(s3.consecutive), int(s3.skipped)) == (True, 0, 1)
    # and the inner optimizer did take both finite steps: its count is 2
    assert int(s3.inner_state[1][0].count) == 2


def test_skip_nonfinite_counters_unlike_optax():
    """After giving up once, optax applies every further NaN of the streak."""
    seq = [1.0, math.nan, math.nan, math.nan, 1.0, math.nan]
    ours = gco.skip_nonfinite(optax.sgd(1.0), max_consecutive=1)
    theirs = optax.apply_if_finite(optax.sgd(1.0), 1)
    p = jnp.array(0.0)
    so, st = ours.init(p), theirs.init(p)
    applied_ours, applied_theirs = [], []
    upd_o, upd_t = jax.jit(ours.update), jax.jit(theirs.update)
    for g in seq:
        uo, so = upd_o(jnp.asarray(g), so, p)
        ut, st = upd_t(jnp.asarray(g), st, p)
        applied_ours.append(bool(uo != 0))
        applied_theirs.append(bool(ut != 0))
    # ours: skip, give up once, then skip again
    assert applied_ours == [True, False, True, False, True, False]
    assert int(so.skipped) == 3
    assert int(so.consecutive) == 1
    # optax: the third NaN in a row is applied too, and total_notfinite counts applied steps
    assert applied_theirs == [True, False, True, True, True, False]
    assert int(st.total_notfinite) == 4


def test_skip_nonfinite_max_consecutive_zero_never_skips():
    tx = gco.skip_nonfinite(optax.sgd(1.0), max_consecutive=0)
    u, s = tx.update(jnp.array([jnp.nan]), tx.init(jnp.zeros(1)))
    assert bool(jnp.isnan(u[0]))
    assert int(s.skipped) == 0


# -- argument checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "err", "word"),
    [
        (lambda: gco.clip_by_global_norm(-1.0), ValueError, "max_norm"),
        (lambda: gco.clip_by_global_norm(math.nan), ValueError, "max_norm"),
        (lambda: gco.clip_by_global_norm(1.0, ord=0), ValueError, "ord"),
        (lambda: gco.clip_by_global_norm(1.0, eps=-1e-6), ValueError, "eps"),
        (lambda: gco.clip_by_global_norm(1.0, nonfinite="skip"), ValueError, "nonfinite"),
        (lambda: gco.clip_by_global_norm("1.0"), TypeError, "max_norm"),
        (lambda: gco.clip_by_norm(-1.0), ValueError, "max_norm"),
        (lambda: gco.clip_by_value(-0.5), ValueError, "clip_value"),
        (lambda: gco.skip_nonfinite(optax.sgd(1.0), max_consecutive=-1), ValueError, "max_"),
        (lambda: gco.skip_nonfinite(optax.sgd(1.0), max_consecutive=2.0), TypeError, "max_"),
    ],
)
def test_bad_arguments_fail_at_construction(make, err, word):
    with pytest.raises(err, match=word):
        make()


def test_nonfinite_zero_transform_under_jit():
    tx = gco.clip_by_global_norm(1.0, nonfinite="zero")
    g = [jnp.array([1.0, jnp.inf]), jnp.array([2.0])]
    out, _ = jax.jit(tx.update)(g, tx.init(g))
    assert all(not np.any(np.asarray(x)) for x in out)


def test_inject_hyperparams_max_norm_like_optax():
    g = {"w": jnp.array([3.0, 4.0]), "b": jnp.array([[12.0]])}
    ours = optax.inject_hyperparams(gco.clip_by_global_norm, static_args=("ord", "eps"))
    theirs = optax.inject_hyperparams(optax.clip_by_global_norm)
    for tx in (ours(max_norm=1.0), theirs(max_norm=1.0)):
        traces = []

        @jax.jit
        def update(g, state, tx=tx, traces=traces):
            traces.append(None)  # runs once per trace
            return tx.update(g, state)

        state = tx.init(g)
        out = []
        for m in (1.0, 26.0, 6.5):  # one compile: max_norm is traced from the state
            state.hyperparams["max_norm"] = jnp.asarray(m)
            out.append(update(g, state)[0])
        assert len(traces) == 1
        want = [ref_clip([np.asarray(g["w"]), np.asarray(g["b"])], m, 2)[0] for m in (1, 26, 6.5)]
        for o, (w, b) in zip(out, want):
            np.testing.assert_allclose(o["w"], w, rtol=1e-15)
            np.testing.assert_allclose(o["b"], b, rtol=1e-15)
    with pytest.raises(TypeError, match="static_args"):
        optax.inject_hyperparams(gco.clip_by_global_norm)(max_norm=1.0).init(g)


def test_skip_nonfinite_counters_saturate_instead_of_wrapping():
    tx = gco.skip_nonfinite(optax.sgd(1.0))
    top = jnp.asarray(np.iinfo(np.int32).max, jnp.int32)
    state = tx.init(jnp.zeros(1))._replace(consecutive=top, skipped=top)
    _, state = jax.jit(tx.update)(jnp.array([jnp.nan]), state)
    assert state.consecutive.dtype == state.skipped.dtype == jnp.int32
    assert int(state.consecutive) == int(state.skipped) == np.iinfo(np.int32).max


def test_stateless_helper_passes_params_when_asked():
    """The hook that adaptive clipping (gc.adaptive_grad_clip) plugs into."""

    def clip_to_params(g, p, factor):  # each element to factor * |param|
        return jax.tree.map(lambda a, b: jnp.clip(a, -factor * abs(b), factor * abs(b)), g, p)

    tx = gco._stateless(clip_to_params, 0.5, needs_params=True)
    g, p = {"w": jnp.array([3.0, -4.0])}, {"w": jnp.array([2.0, 10.0])}
    out, _ = jax.jit(tx.update)(g, tx.init(p), p)
    np.testing.assert_array_equal(out["w"], [1.0, -4.0])
    with pytest.raises(ValueError, match="clip_to_params needs the parameters"):
        tx.update(g, tx.init(p))


@pytest.mark.parametrize("name", list(LIBRARY_CLIPPERS))
def test_library_clippers_in_the_transform_match_clip_stateful(name):
    """AutoClip, ZClip and QuantileClip plug into the transform: under jit, in a chain,
    it gives the same updates, thresholds and flags as gc.clip_stateful step by step."""
    rng = np.random.default_rng(1)
    grads = _grads(rng, "float32") * 2  # 10 steps with spikes
    params = {"w": jnp.ones((3, 2)), "b": jnp.zeros(2)}
    history = _run(
        optax.chain(gco.clip_by_global_norm(LIBRARY_CLIPPERS[name]()), optax.sgd(1.0)),
        grads,
        params,
    )
    clipper = LIBRARY_CLIPPERS[name]()
    state = clipper.init(jnp.zeros((), jnp.float32))
    clipped_steps = 0
    for g, (updates, _, tx_state) in zip(grads, history):
        ref, state, info = gc.clip_stateful(jax.tree.map(jnp.asarray, g), clipper, state)
        ours = tx_state[0]
        np.testing.assert_allclose(ours.norm, info.norm, rtol=1e-6)
        np.testing.assert_allclose(ours.max_norm, info.threshold, rtol=1e-6)
        assert bool(ours.clipped) == bool(info.clipped)
        clipped_steps += bool(info.clipped)
        for k in ("w", "b"):
            np.testing.assert_allclose(-updates[k], ref[k], rtol=1e-6, atol=1e-7)
    assert 0 < clipped_steps < len(grads)  # the clipper acted on some steps only
