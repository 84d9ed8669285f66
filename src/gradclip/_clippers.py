"""Clippers whose threshold follows the history of gradient norms.

Each clipper is a pure pair of functions over a state made of arrays (a
``NamedTuple``), so it runs under ``jax.jit``/``lax.scan``, ``torch.compile`` and on
any Array API library, and its state can be checkpointed like an optimizer's::

    state = clipper.init(like)                       # like: a 0-d array (library, dtype, device)
    max_norm, state = clipper.threshold(state, norm) # max_norm: 0-d, +inf means "no clip"

``clip_stateful`` and ``clip_stateful_`` clip a gradient tree with one call;
each clipper object also keeps a state of its own for imperative loops
(``clipper.clip_(grads)``). Nothing reads a value back to the host.

- ``AutoClip``: Seetharaman, Wichern, Pardo and Le Roux, "AutoClip: Adaptive
  Gradient Clipping for Source Separation Networks", MLSP 2020 (arXiv:2007.14469).
- ``ZClip``: Kumar, Owen, Ashton, Sanyal and others, "ZClip: Adaptive Spike
  Mitigation for LLM Pre-Training", 2025 (arXiv:2504.02507).
- ``QuantileClip``: Andrew, Thakkar, McMahan and Ramaswamy, "Differentially
  Private Learning with Adaptive Clipping", NeurIPS 2021 (arXiv:1905.03871).
"""

from __future__ import annotations

import math
import numbers
from typing import Any, NamedTuple, Protocol, runtime_checkable

from . import _checks, _compat, _tree
from ._clipping import clip_step

__all__ = [
    "AutoClip",
    "AutoClipState",
    "ClipInfo",
    "QuantileClip",
    "QuantileClipState",
    "StatefulClipper",
    "ZClip",
    "ZClipState",
    "clip_stateful",
    "clip_stateful_",
]


class ClipInfo(NamedTuple):
    """What one clipping step did, as 0-d arrays (nothing read back to the host)."""

    norm: Any
    """The gradients' global norm before clipping."""
    threshold: Any
    """The threshold used (``+inf``: no clipping)."""
    clipped: Any
    """A boolean: whether the gradients were scaled down (``False`` for a non-finite
    norm, which is reported as such by ``norm``)."""


@runtime_checkable
class StatefulClipper(Protocol):
    """The protocol every stateful clipper follows (and the integrations accept)."""

    def init(self, like: Any) -> Any:
        """A fresh state of arrays with ``like``'s library, device and (accumulation)
        dtype; ``like`` is any 0-d array."""

    def threshold(self, state: Any, norm: Any) -> tuple[Any, Any]:
        """``(max_norm, new_state)`` for this step's pre-clip global ``norm``."""


def clip_stateful(
    grads: Any,
    clipper: StatefulClipper,
    state: Any,
    /,
    *,
    ord: float = 2,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> tuple[Any, Any, ClipInfo]:
    """Clip ``grads`` by global norm to the threshold ``clipper`` gives for this step.

    Returns ``(clipped, new_state, info)``; ``info`` holds the norm, the threshold
    and whether the step was clipped, all as arrays. The keyword options are those
    of ``gradclip.clip_by_global_norm`` (``eps=1e-6`` is torch's and the
    reference packages' choice); the clipper sees the global norm over all ranks.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> clipper = gc.ZClip(warmup_steps=2, max_norm=None)
    >>> state = clipper.init(np.float64(0))
    >>> for g in ([1.0], [1.2], [1.1], [9.0]):
    ...     clipped, state, info = gc.clip_stateful(np.array(g), clipper, state)
    >>> bool(info.clipped), float(np.round(info.threshold, 4))
    (True, 1.1077)
    """
    tree = _tree.flatten(grads)
    dist = {
        "process_group": process_group,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    options = {"ord": ord, "eps": eps, "nonfinite": nonfinite, "clipper": clipper, "state": state}
    step = clip_step(tree, **options, **dist)
    return tree.unflatten(step.leaves), step.state, _info(step)


def clip_stateful_(
    grads: Any,
    clipper: StatefulClipper,
    state: Any,
    /,
    *,
    ord: float = 2,
    eps: float = 0.0,
    nonfinite: str = "propagate",
    process_group: Any = None,
    axis_name: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> tuple[Any, ClipInfo]:
    """``clip_stateful`` in place, for writable arrays: returns ``(new_state, info)``.

    Every leaf is checked before any is written.
    """
    tree = _tree.flatten(grads, inplace=True)
    dist = {
        "process_group": process_group,
        "axis_name": axis_name,
        "replicated": replicated,
        "sharded": sharded,
    }
    options = {"ord": ord, "eps": eps, "nonfinite": nonfinite, "clipper": clipper, "state": state}
    step = clip_step(tree, inplace=True, **options, **dist)
    return step.state, _info(step)


def _info(step: Any) -> ClipInfo:
    return ClipInfo(step.norm, step.max_norm, step.clipped)


class _Imperative:
    """A state kept on the object, for loops that do not thread it themselves.

    ``self.state`` is ``None`` until the first call, then the latest state (a
    ``NamedTuple`` of arrays you can save and assign back to resume).
    """

    state: Any = None

    def clip(self, grads: Any, /, **options: Any) -> tuple[Any, ClipInfo]:
        """Clip ``grads`` (functional); returns ``(clipped, info)`` and keeps the state.
        The keyword options are those of ``clip_stateful``."""
        state = self._state_for(grads)
        out, self.state, info = clip_stateful(grads, self._for_step(state), state, **options)
        return out, info

    def clip_(self, grads: Any, /, **options: Any) -> ClipInfo:
        """Clip ``grads`` in place; returns ``info`` and keeps the state."""
        state = self._state_for(grads)
        self.state, info = clip_stateful_(grads, self._for_step(state), state, **options)
        return info

    def reset(self) -> None:
        """Forget the kept state: the next call starts afresh."""
        self.state = None

    def _for_step(self, state: Any) -> Any:
        """The clipper whose ``threshold`` this step calls."""
        return self

    def _state_for(self, grads: Any) -> Any:
        if self.state is None:
            tree = _tree.flatten(grads)
            return self.init(tree.xp.zeros((), dtype=tree.acc_dtype, device=tree.device))
        return self.state


def _like(like: Any) -> tuple[Any, Any, Any]:
    """``(xp, float dtype, device)`` for a state made like the 0-d array ``like``."""
    if not _compat.is_array_api_obj(like):
        raise TypeError(
            f"like must be a 0-d array (of the norms' library, dtype and device), "
            f"got {type(like).__name__}"
        )
    xp = _compat.array_namespace(like)
    dev = _compat.device(like)
    kind = _compat.dtype_kind(xp, like.dtype)
    if kind in ("low", "float"):
        dt = _compat.accumulation_dtype(xp, [like.dtype])
    else:
        dt = _compat.default_float(xp, dev)
    return xp, dt, dev


def _norm_as(xp: Any, norm: Any, like: Any, *, batch: bool = False) -> Any:
    """``norm`` (0-d; 0-d or 1-d with ``batch``) in the state's dtype, on its device."""
    if getattr(norm, "ndim", None) not in ((0, 1) if batch else (0,)):
        want = "a 0-d or 1-d array" if batch else "a 0-d array"
        shape = getattr(norm, "shape", type(norm).__name__)
        raise ValueError(f"norm must be {want} (the global norm), got {shape}")
    if norm.dtype != like.dtype:
        norm = xp.astype(norm, like.dtype)
    if (
        _compat.is_torch_array(norm) or _compat.is_cupy_array(norm)
    ) and norm.device != like.device:
        norm = _compat.to_device(norm, like.device)
    return norm


def _increment(xp: Any, count: Any, ok: Any) -> Any:
    """``count + 1`` where ``ok``, staying at the largest int32 rather than wrapping."""
    return xp.where(ok & (count < 2**31 - 1), count + 1, count)


def _full(xp: Any, value: float, like: Any) -> Any:
    return xp.full(like.shape, value, dtype=like.dtype, device=_compat.device(like))


def _positive(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
        raise ValueError(f"{name} must be a number > 0, got {value!r}")
    return _checks.host_real(value, name)  # (an integer past float's range: inf)


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


def _fraction(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


# -- AutoClip ------------------------------------------------------------------------


class AutoClipState(NamedTuple):
    count: Any
    """How many (finite) norms have been seen (int32)."""
    history: Any
    """A ring buffer of the last ``history`` norms (entry ``count % history`` is next)."""


class AutoClip(_Imperative):
    """AutoClip: the threshold is a quantile of the recent norms (arXiv:2007.14469).

    At step ``t`` the threshold is the ``quantile`` of the norms of the last
    ``history`` steps before ``t`` (linear interpolation, as ``torch.quantile`` and
    ``numpy.quantile``); the first step is not clipped. Then the step's own
    pre-clip norm joins the history. This is the global mode of the ``autoclip``
    package (``QuantileClip(..., global_threshold=True)``), with its defaults
    (quantile 0.9, history 1000); the paper's experiments use the 10th percentile
    (``quantile=0.1``) over the whole history. A non-finite norm is not recorded.

    The quantile sorts the buffer each step: ``O(history log history)``, a
    fraction of a millisecond for the default length.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> clipper = gc.AutoClip(quantile=0.5, history=4)
    >>> for g in ([1.0], [2.0], [3.0], [30.0]):
    ...     info = clipper.clip_(np.array(g))
    >>> float(info.threshold), bool(info.clipped)
    (2.0, True)
    """

    def __init__(self, *, quantile: float = 0.9, history: int = 1000) -> None:
        self.quantile = _fraction(quantile, "quantile")
        self.history = _count(history, "history")

    def init(self, like: Any) -> AutoClipState:
        xp, dt, dev = _like(like)
        return AutoClipState(
            xp.zeros((), dtype=xp.int32, device=dev),
            xp.zeros((self.history,), dtype=dt, device=dev),
        )

    def threshold(self, state: AutoClipState, norm: Any) -> tuple[Any, AutoClipState]:
        xp = _compat.array_namespace(state.history)
        hist = state.history
        dev = _compat.device(hist)
        size = self.history
        x = _norm_as(xp, norm, hist[0])
        n = xp.minimum(state.count, xp.asarray(size, dtype=xp.int32, device=dev))
        slots = xp.arange(size, dtype=xp.int32, device=dev)
        # empty slots sort last (a finite filler keeps the arithmetic below finite)
        filler = _full(xp, float(xp.finfo(hist.dtype).max), hist)
        ordered = xp.sort(xp.where(slots < n, hist, filler))
        pos = self.quantile * xp.astype(xp.maximum(n - 1, xp.zeros_like(n)), hist.dtype)
        lo = xp.astype(xp.floor(pos), xp.int32)
        hi = xp.minimum(lo + 1, xp.maximum(n - 1, xp.zeros_like(n)))
        below = xp.sum(xp.where(slots == lo, ordered, xp.zeros_like(ordered)))
        above = xp.sum(xp.where(slots == hi, ordered, xp.zeros_like(ordered)))
        thr = below + (pos - xp.floor(pos)) * (above - below)
        thr = xp.where(n > 0, thr, _full(xp, math.inf, thr))
        ok = xp.isfinite(x)
        nxt = state.count % size
        hist = xp.where(ok & (slots == nxt), x, hist)
        count = _increment(xp, state.count, ok)
        return _compat.as_array(xp, thr), AutoClipState(count, hist)


# -- ZClip ----------------------------------------------------------------------------


class ZClipState(NamedTuple):
    step: Any
    """How many (finite) norms have been seen (int32)."""
    mean: Any
    """The EMA of the norm (during warm-up: the plain mean so far)."""
    var: Any
    """The EMA of its variance (during warm-up: the population variance so far)."""


class ZClip(_Imperative):
    """ZClip: clip norms whose EMA z-score is a spike (arXiv:2504.02507).

    During the first ``warmup_steps`` steps the threshold is ``max_norm`` and
    the norms' mean and population variance are collected. After that, with ``mu``
    and ``sigma**2`` exponential moving averages (factor ``alpha``) and
    ``z = (norm - mu) / (sigma + eps)``:

    - ``mode="zscore"``, ``clip_option="adaptive_scaling"`` (default): if
      ``z > z_thresh`` the threshold is ``clip_factor * (mu + z_thresh**2 * sigma / z)``;
    - ``clip_option="mean"``: if ``z > z_thresh`` the threshold is ``mu``;
    - ``mode="percentile"``: the threshold is ``mu + z_thresh * sigma`` when the norm
      exceeds it;

    and it is never looser than ``max_norm`` (``None``: no such bound; the package's
    ``max_grad_norm``). The
    statistics are then updated once with the clipped value (the adaptive threshold
    on a spike, else the norm), unless ``skip_update_on_spike``. These are the rule
    and the defaults of the ``zclip`` 1.0.0 package, which is tested to give the same
    clipped norms. A non-finite norm leaves the statistics unchanged (the package
    would feed it into the averages).

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> clipper = gc.ZClip(warmup_steps=3, max_norm=None)
    >>> norms = [1.0, 1.1, 0.9, 1.0, 5.0]
    >>> infos = [clipper.clip_(np.array([n])) for n in norms]
    >>> [bool(i.clipped) for i in infos]
    [False, False, False, False, True]
    """

    def __init__(
        self,
        *,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        max_norm: float | None = 1.0,
        eps: float = 1e-6,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        skip_update_on_spike: bool = False,
    ) -> None:
        self.alpha = _fraction(alpha, "alpha")
        self.z_thresh = _positive(z_thresh, "z_thresh")
        self.max_norm = None if max_norm is None else _checks.check_setting(max_norm, "max_norm")
        self.eps = _checks.check_setting(eps, "eps", finite=True)
        self.warmup_steps = _count(warmup_steps, "warmup_steps")
        _checks.check_choice(mode, "mode", ("zscore", "percentile"))
        _checks.check_choice(clip_option, "clip_option", ("adaptive_scaling", "mean"))
        self.mode = mode
        self.clip_option = clip_option
        self.clip_factor = _positive(clip_factor, "clip_factor")
        self.skip_update_on_spike = bool(skip_update_on_spike)

    def init(self, like: Any) -> ZClipState:
        xp, dt, dev = _like(like)
        zero = xp.zeros((), dtype=dt, device=dev)
        return ZClipState(xp.zeros((), dtype=xp.int32, device=dev), zero, zero)

    def threshold(self, state: ZClipState, norm: Any) -> tuple[Any, ZClipState]:
        xp = _compat.array_namespace(state.mean)
        mean, var = state.mean, state.var
        x = _norm_as(xp, norm, mean)
        bound = math.inf if self.max_norm is None else self.max_norm
        ceiling = _full(xp, bound, mean)
        warm = state.step < self.warmup_steps

        # warm-up: running mean and population variance (Welford)
        k = xp.astype(state.step + 1, mean.dtype)
        delta = x - mean
        mean_w = mean + delta / k
        var_w = var + (delta * (x - mean_w) - var) / k

        # after warm-up: the z-score rule
        std = xp.sqrt(var)
        if self.mode == "percentile":
            clip_val = mean + self.z_thresh * std
            spike = x > clip_val
        else:
            z = (x - mean) / (std + self.eps)
            spike = z > self.z_thresh
            if self.clip_option == "mean":
                clip_val = mean
            else:
                eta = xp.where(spike, z, xp.ones_like(z)) / self.z_thresh  # > 1 on a spike
                clip_val = (mean + (self.z_thresh * std) / eta) * self.clip_factor
        thr = xp.where(warm, ceiling, xp.where(spike, xp.minimum(clip_val, ceiling), ceiling))
        seen = xp.where(spike, clip_val, x)
        mean_e = self.alpha * mean + (1 - self.alpha) * seen
        var_e = self.alpha * var + (1 - self.alpha) * (seen - mean_e) ** 2
        if self.skip_update_on_spike:
            mean_e = xp.where(spike, mean, mean_e)
            var_e = xp.where(spike, var, var_e)

        ok = xp.isfinite(x)
        new = ZClipState(
            _increment(xp, state.step, ok),
            xp.where(ok, xp.where(warm, mean_w, mean_e), mean),
            xp.where(ok, xp.where(warm, var_w, var_e), var),
        )
        return _compat.as_array(xp, thr), new


# -- Quantile adaptive clipping (DP) ----------------------------------------------------


class QuantileClipState(NamedTuple):
    clip: Any
    """The current threshold ``C``."""


class QuantileClip(_Imperative):
    """Adaptive clipping to a target quantile of the norms (Andrew et al., arXiv:1905.03871).

    Each step clips to the current ``C`` and then moves it so that a fraction
    ``target_quantile`` (``gamma``) of the norms falls below it:
    ``C <- C * exp(-learning_rate * (b - gamma))`` (``update="geometric"``, the paper's
    choice) or ``C <- C - learning_rate * (b - gamma)`` (``"linear"``), where ``b`` is
    the fraction of this step's norms at most ``C``. ``norm`` may be one norm or a 1-d
    array of per-example norms (from ``gradclip.per_example_clip``).

    For differential privacy ``b`` is released with Gaussian noise:
    ``b = (sum_i 1[n_i <= C] + noise_multiplier * noise) / m``, ``noise`` being a
    standard normal draw the caller passes to ``threshold`` (for example
    ``jax.random.normal(key, ())``), which keeps the function pure. The object's
    own ``clip`` / ``clip_`` draw it from a NumPy generator seeded with
    ``seed``. Defaults are the paper's: ``C_0 = 0.1``, ``gamma = 0.5``, ``eta = 0.2``.
    A NaN norm does not count.

    Examples
    --------
    >>> import numpy as np, gradclip as gc
    >>> clipper = gc.QuantileClip(initial_max_norm=1.0)
    >>> state = clipper.init(np.float64(0))
    >>> c, state = clipper.threshold(state, np.array([0.5, 2.0, 3.0, 4.0]))
    >>> float(c), round(float(state.clip), 6)   # 1/4 at most C: C grows by exp(0.05)
    (1.0, 1.051271)
    """

    def __init__(
        self,
        *,
        initial_max_norm: float = 0.1,
        target_quantile: float = 0.5,
        learning_rate: float = 0.2,
        noise_multiplier: float = 0.0,
        update: str = "geometric",
        seed: int | None = None,
    ) -> None:
        self.initial_max_norm = _checks.check_setting(initial_max_norm, "initial_max_norm")
        self.target_quantile = _fraction(target_quantile, "target_quantile")
        self.learning_rate = _checks.check_setting(learning_rate, "learning_rate", finite=True)
        self.noise_multiplier = _checks.check_setting(
            noise_multiplier, "noise_multiplier", finite=True
        )
        _checks.check_choice(update, "update", ("geometric", "linear"))
        self.update = update
        self.seed = seed
        self._rng: Any = None

    def init(self, like: Any) -> QuantileClipState:
        xp, dt, dev = _like(like)
        return QuantileClipState(xp.asarray(self.initial_max_norm, dtype=dt, device=dev))

    def threshold(
        self, state: QuantileClipState, norm: Any, *, noise: Any = None
    ) -> tuple[Any, QuantileClipState]:
        """``(C, new_state)``; ``noise``: a standard normal 0-d array, required when
        ``noise_multiplier > 0``."""
        xp = _compat.array_namespace(state.clip)
        c = state.clip
        x = _norm_as(xp, norm, c, batch=True)
        valid = ~xp.isnan(x)
        m = xp.sum(xp.astype(valid, c.dtype))
        below = xp.sum(xp.astype(valid & (x <= c), c.dtype))
        if self.noise_multiplier > 0:
            if noise is None:
                raise ValueError(
                    "QuantileClip with noise_multiplier > 0 needs noise=: a standard "
                    "normal 0-d array drawn from your own key"
                )
            below = below + self.noise_multiplier * _norm_as(xp, noise, c)
        b = below / xp.maximum(m, xp.ones_like(m))
        step = self.learning_rate * (b - self.target_quantile)
        if self.update == "geometric":
            new = c * xp.exp(-step)
        else:
            new = xp.maximum(c - step, xp.zeros_like(c))
        new = xp.where(m > 0, new, c)
        return c, QuantileClipState(new)

    def _for_step(self, state: Any) -> Any:
        if not self.noise_multiplier:
            return self
        import numpy as np  # the imperative helper's generator; threshold() stays pure

        if self._rng is None:
            self._rng = np.random.default_rng(self.seed)
        xp = _compat.array_namespace(state.clip)
        draw = float(self._rng.standard_normal())
        noise = xp.asarray(draw, dtype=state.clip.dtype, device=_compat.device(state.clip))
        return _WithNoise(self, noise)


class _WithNoise:
    """A ``QuantileClip`` with this step's noise draw bound."""

    def __init__(self, clipper: QuantileClip, noise: Any) -> None:
        self.clipper, self.noise = clipper, noise

    def threshold(self, state: Any, norm: Any) -> tuple[Any, Any]:
        return self.clipper.threshold(state, norm, noise=self.noise)
