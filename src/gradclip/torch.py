"""Drop-ins for ``torch.nn.utils``' gradient clipping, and an optimizer hook.

Change one import and a training run follows the same trajectory::

    from gradclip.torch import clip_grad_norm_   # was: from torch.nn.utils import ...

``clip_grad_norm_``, ``clip_grad_value_``, ``get_total_norm`` and
``clip_grads_with_norm_`` keep torch 2.13's signatures and results (a lone
tensor or any iterable of parameters, parameters without ``.grad`` skipped,
``eps = 1e-6``, the norm returned as a tensor, ``foreach``), with this library's
numerics: float16/bfloat16 gradients give a float32-accurate norm, and finite
gradients never overflow it (float32 gradients of 1e30 are clipped, not zeroed).
The clipping rule is Pascanu, Mikolov and Bengio's, "On the difficulty of training
recurrent neural networks", ICML 2013 (arXiv:1211.5063).

``clip_before_step`` clips before every ``optimizer.step()``, with a fixed
threshold or a stateful clipper (AutoClip, ZClip, ...), without reading a value
back to the host.

Nothing here reads the norm on the host unless ``error_if_nonfinite=True`` (or
``nonfinite="raise"``), so a training step that calls these functions compiles
with ``torch.compile(fullgraph=True)`` and can be captured in a CUDA graph.
"""

from __future__ import annotations

import contextlib
import inspect
import types
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from torch.utils._foreach_utils import (
    _device_has_foreach_support,
    _group_tensors_by_device_and_dtype,
    _has_foreach_support,
)

from . import _backends, _checks, _clipping, _distributed, _reference, _tree
from ._clippers import StatefulClipper

__all__ = [
    "ClipHandle",
    "clip_before_step",
    "clip_grad_norm_",
    "clip_grad_value_",
    "clip_grads_with_norm_",
    "get_total_norm",
]

EPS = 1e-6  # torch's: scale = min(1, max_norm / (total_norm + 1e-6))

Tensors = torch.Tensor | Iterable[torch.Tensor]


def clip_grad_norm_(
    parameters: Tensors,
    max_norm: float | torch.Tensor,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> torch.Tensor:
    """Scale the gradients in place so that their global norm is at most ``max_norm``.

    ``torch.nn.utils.clip_grad_norm_`` with float32 accumulation for low-precision
    gradients and no overflow of finite ones. Every ``.grad`` is multiplied by
    ``min(1, max_norm / (total_norm + 1e-6))`` (Pascanu et al., arXiv:1211.5063),
    computed on the device: no host read-back unless ``error_if_nonfinite``.

    Parameters
    ----------
    parameters : Tensor or iterable of Tensor
        A lone tensor, a list or a generator (``model.parameters()``); tensors whose
        ``.grad`` is ``None`` are skipped.
    max_norm : float or 0-d Tensor
        The threshold, ``>= 0`` (a negative or NaN number is a ``ValueError``,
        where torch would flip the gradients' signs). A tensor stays on the device
        and is not read: a negative or NaN one makes every gradient NaN.
    norm_type : float or str, optional
        The ``p`` of the p-norm: any real ``p > 0`` or ``inf`` (``"inf"`` too, as
        ``float()`` reads it). Orders torch also accepts that are not norms
        (``0``, negative, ``-inf``) use torch's own definition.
    error_if_nonfinite : bool, optional
        Raise ``RuntimeError`` (as torch) when the norm is NaN or inf, before any
        gradient is changed. Reads the norm on the host.
    foreach : bool or None, optional
        ``None``: the fastest path available (grouped ``torch._foreach_*`` kernels
        per device and dtype). ``False``: the pure Array API core, tensor by tensor.
        ``True``: like ``None``, but a ``RuntimeError`` (as torch) for tensors on a
        device without foreach kernels.
    process_group : optional, keyword-only
        A ``torch.distributed`` process group (or a list of groups, or a
        ``DeviceMesh``) over which the gradients are sharded: the norm then covers
        every rank's gradients, each shard counted once (see the distributed docs).
        Every rank of the group must call with at least one gradient.
    replicated : optional, keyword-only
        The parameters whose gradients are the same on every rank (counted once,
        not world-size times): an iterable of parameters, a dict mapping
        parameters to markers (``True`` or the groups they are replicated over), or
        a predicate on the gradient's path ``"grads[i]"``.
    sharded : optional, keyword-only
        The other way round (give one of the two): the groups each parameter's
        gradient is split over (a dict mapping parameters to groups, a
        ``gradclip.Layout`` or a predicate); it is replicated over the others.

    Returns
    -------
    Tensor
        The total norm before clipping, a 0-d tensor on the first gradient's device:
        float32 for float16/bfloat16/float32 gradients, float64 when any is float64.
        ``tensor(0.)`` when no parameter has a gradient.

    Examples
    --------
    >>> import torch, gradclip.torch as gct
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> gct.clip_grad_norm_([w], max_norm=1.0)
    tensor(5.)
    >>> w.grad
    tensor([0.6000, 0.8000])
    """
    if isinstance(parameters, torch.Tensor):
        parameters = [parameters]
    else:
        generator = isinstance(parameters, types.GeneratorType)
        parameters = list(parameters)  # a generator is read once, for both steps
        if generator and not parameters:
            warnings.warn(
                "`parameters` is an empty generator, no gradient clipping will occur.",
                stacklevel=2,
            )
    max_norm = _checks.check_nonneg(max_norm, "max_norm")  # before anything is computed
    tree, dist = _grad_tree(parameters, process_group, replicated, sharded)
    if tree is None:
        return torch.tensor(0.0)
    with torch.no_grad(), _mode(tree.leaves, foreach):
        plan = _backends.plan(tree)  # one plan for the norm and the scaling
        norm = _total_norm(plan, norm_type, error_if_nonfinite, foreach, dist)
        _scale(plan, max_norm, norm)
    return norm


def get_total_norm(
    tensors: Tensors,
    norm_type: float | str = 2.0,
    error_if_nonfinite: bool = False,
    foreach: bool | None = None,
    *,
    process_group: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> torch.Tensor:
    """The norm of all ``tensors`` taken as one vector (``torch.nn.utils.get_total_norm``).

    Accumulated in float32 for float16/bfloat16/float32 tensors (float64 when any
    is float64) and free of overflow for finite values. Arguments as in
    ``clip_grad_norm_``, but ``tensors`` are the gradients themselves.

    Examples
    --------
    >>> import torch, gradclip.torch as gct
    >>> gct.get_total_norm([torch.tensor([3e30, 4e30])])  # torch: inf
    tensor(5.0000e+30)
    """
    tensors = [tensors] if isinstance(tensors, torch.Tensor) else list(tensors)
    if not tensors:
        return torch.tensor(0.0)
    tree = _tree.flatten(tensors, "grads")
    dist = _dist_options(tensors, process_group, replicated, sharded)
    with torch.no_grad(), _mode(tree.leaves, foreach):
        return _total_norm(_backends.plan(tree), norm_type, error_if_nonfinite, foreach, dist)


def clip_grads_with_norm_(
    parameters: Tensors,
    max_norm: float | torch.Tensor,
    total_norm: float | torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """Scale the gradients in place by ``min(1, max_norm / (total_norm + 1e-6))``.

    ``torch.nn.utils.clip_grads_with_norm_``: the second half of
    ``clip_grad_norm_``, for a norm computed (or all-reduced) by the caller.

    Examples
    --------
    >>> import torch, gradclip.torch as gct
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> gct.clip_grads_with_norm_([w], 1.0, gct.get_total_norm([w.grad]))
    >>> w.grad
    tensor([0.6000, 0.8000])
    """
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    max_norm = _checks.check_nonneg(max_norm, "max_norm")
    total_norm = _checks.check_nonneg(total_norm, "total_norm")
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    tree = _writable(grads)
    with torch.no_grad(), _mode(tree.leaves, foreach):
        _scale(_backends.plan(tree), max_norm, total_norm)


def clip_grad_value_(
    parameters: Tensors,
    clip_value: float | torch.Tensor,
    foreach: bool | None = None,
) -> None:
    """Clip every gradient element to ``[-clip_value, clip_value]`` in place.

    ``torch.nn.utils.clip_grad_value_``; a negative ``clip_value`` is a
    ``ValueError`` (torch would set every element to it), a 0-d tensor stays on the
    device (not read: a negative or NaN one makes every element NaN), and complex
    gradients have their magnitude clipped, keeping the phase.

    Examples
    --------
    >>> import torch, gradclip.torch as gct
    >>> w = torch.nn.Parameter(torch.zeros(3))
    >>> w.grad = torch.tensor([-3.0, 0.5, 2.0])
    >>> gct.clip_grad_value_(w, 1.0)
    >>> w.grad
    tensor([-1.0000,  0.5000,  1.0000])
    """
    parameters = [parameters] if isinstance(parameters, torch.Tensor) else list(parameters)
    c = _checks.check_nonneg(clip_value, "clip_value")  # a float, or a tensor not read
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads:
        return
    tree = _writable(grads)
    _check_foreach(grads, foreach)
    with torch.no_grad():
        groups = _group_tensors_by_device_and_dtype([tree.leaves])
        for (device, dtype), ([group], _) in groups.items():
            if dtype.is_complex:  # the reference's rule: scale each element's magnitude
                for g, clipped in zip(group, _clipping.clip_by_value(group, c)):
                    g.copy_(clipped)
            elif (
                foreach is not False
                and isinstance(c, float)
                and _has_foreach_support(group, device)
            ):
                torch._foreach_clamp_min_(group, -c)
                torch._foreach_clamp_max_(group, c)
            else:
                cd = c
                if not isinstance(c, float):  # NaN bounds, so NaN elements, if it is < 0
                    cd = c.to(device=device, dtype=dtype)
                    cd = _reference.nan_unless_nonneg(torch, cd, cd)
                for g in group:
                    g.clamp_(-cd, cd)


# -- an optimizer hook ---------------------------------------------------------------


class ClipHandle:
    """What ``clip_before_step`` returns: the last step's values, and ``remove()``.

    Attributes
    ----------
    last_norm, last_threshold : Tensor or None
        The pre-clip global norm and the threshold of the last step (0-d tensors on
        the gradients' device, never read to the host); ``None`` before the first.
        Under a ``GradScaler`` the norm is that of the unscaled gradients.
    last_clipped : Tensor or None
        A 0-d bool tensor: whether the last step's gradients were scaled down
        (``scale < 1`` with a finite norm; a non-finite ``last_norm`` is not
        counted as clipped).
    last_skipped : Tensor or None
        With ``nonfinite="skip"``, a 0-d bool tensor: whether the last step was
        skipped (a non-finite norm, or a ``GradScaler`` that found an inf);
        ``None`` otherwise.
    state : NamedTuple or None
        A stateful clipper's state (``None`` for a fixed threshold, and before the
        first step).
    fused : bool
        Whether the scale reaches the optimizer's own kernel as ``grad_scale`` (a
        fused optimizer, ``fuse=True``, and ``nonfinite`` other than ``"zero"``)
        rather than a separate multiply.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        max_norm: float | torch.Tensor | StatefulClipper,
        p: float,
        eps: float,
        nonfinite: str,
        process_group: Any = None,
        replicated: Any = None,
        sharded: Any = None,
        *,
        fuse: bool = True,
    ) -> None:
        self.optimizer = optimizer
        self._dist = (process_group, replicated, sharded)
        stateful = isinstance(max_norm, StatefulClipper)
        self.clipper = max_norm if stateful else None
        self.max_norm = None if stateful else _checks.check_nonneg(max_norm, "max_norm")
        self.p, self.eps, self.nonfinite = p, eps, nonfinite
        self.state: Any = None
        self.last_norm: torch.Tensor | None = None
        self.last_threshold: torch.Tensor | None = None
        self.last_clipped: torch.Tensor | None = None
        self.last_skipped: torch.Tensor | None = None
        self._kernel = _takes_grad_scale(optimizer)
        self.fused = bool(fuse) and self._kernel and nonfinite != "zero"
        # (what was on the optimizer, what this hook gave it) for the running step
        self._given: tuple[dict[str, Any], dict[str, Any]] | None = None
        self._hidden: list[tuple[torch.Tensor, torch.Tensor]] = []  # a skipped step's grads
        self._handles = [
            optimizer.register_step_pre_hook(self._hook),
            optimizer.register_step_post_hook(self._after),
        ]

    def remove(self) -> None:
        """Stop clipping this optimizer's steps."""
        for handle in self._handles:
            handle.remove()
        self._after(self.optimizer, (), {})

    def _hook(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        self._after(optimizer, args, kwargs)  # what a step that raised left behind
        params = [p for group in optimizer.param_groups for p in group["params"]]
        tree, dist = _grad_tree(params, *self._dist)
        if tree is None:
            return
        limit, like = self.max_norm, {"dtype": tree.acc_dtype, "device": tree.device}
        if isinstance(limit, torch.Tensor):
            limit = limit.to(**like)
        elif self.clipper is not None and self.state is None:
            self.state = self.clipper.init(torch.zeros((), **like))
        # a fused step divides by grad_scale and skips on found_inf in its own kernel
        kernel = self._kernel and all(g.get("fused", True) for g in optimizer.param_groups)
        skip = self.nonfinite == _checks.SKIP
        with torch.no_grad():
            plan = _backends.plan(tree)
            step = _clipping.clip_step(
                tree,
                limit,
                ord=self.p,
                eps=self.eps,
                nonfinite="propagate" if skip else self.nonfinite,
                inplace=True,
                clipper=self.clipper,
                state=self.state,
                plan=plan,
                multiply=False,
                # a GradScaler's loss scale, still in the gradients (fused optimizers)
                unscale=getattr(optimizer, "grad_scale", None) if kernel else None,
                **dist,
            )
            if self.clipper is not None:
                self.state = step.state
            threshold = step.max_norm
            if not isinstance(threshold, torch.Tensor):  # a checked float: a fill, no host read
                threshold = torch.full((), threshold, **like)
            self.last_norm, self.last_threshold = step.norm, threshold
            self.last_clipped = step.clipped
            bad = self._bad(optimizer, step.norm, kernel) if skip else None
            if bad is not None and (not kernel or _empty_buffers(optimizer)):
                # the step cannot skip itself on the device: one host read
                if bool(bad):
                    self._hidden = [(p, p.grad) for p in params if p.grad is not None]
                    for p, _ in self._hidden:
                        p.grad = None  # an optimizer leaves a parameter without grad alone
                    return
                bad = None
            given: dict[str, Any] = {} if bad is None else {"found_inf": bad.float()}
            if kernel and self.fused:
                # the kernel divides by it: 1 / min(1, m / (n + eps)) = max(1, (n + eps) / m)
                c = torch.reciprocal(step.scale).float()
                loss_scale = getattr(optimizer, "grad_scale", None)
                given["grad_scale"] = c if loss_scale is None else loss_scale * c.to(loss_scale)
            else:
                scale = step.scale
                if bad is not None:  # a skipped step's gradients stay as they are
                    scale = torch.where(bad, torch.ones_like(scale), scale)
                nonfinite = "zero" if self.nonfinite == "zero" else "propagate"
                plan.scale(scale, step.norm, nonfinite, inplace=True)
            if given:
                before = {k: getattr(optimizer, k, _ABSENT) for k in given}
                for k, v in given.items():
                    setattr(optimizer, k, v)
                self._given = (before, given)

    def _bad(self, optimizer: torch.optim.Optimizer, norm: torch.Tensor, kernel: bool) -> Any:
        """Whether to skip this step, on the device: a non-finite norm, or a GradScaler
        that found an inf (its ``found_inf``, on fused optimizers; on the others it
        skips the step itself)."""
        bad = ~torch.isfinite(norm)
        found = getattr(optimizer, "found_inf", None) if kernel else None
        if found is not None:
            bad = bad | (found.to(bad.device) > 0)
        self.last_skipped = bad
        return bad

    def _after(self, optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        """After the step: put back the optimizer's ``grad_scale``/``found_inf`` as they
        were (a GradScaler deletes its own after the step) and the hidden gradients."""
        if self._given is not None:
            before, given = self._given
            self._given = None
            for k, v in given.items():
                if getattr(optimizer, k, None) is v:  # not replaced since
                    if before[k] is _ABSENT:
                        delattr(optimizer, k)
                    else:
                        setattr(optimizer, k, before[k])
        for p, g in self._hidden:
            if p.grad is None:
                p.grad = g
        self._hidden = []


_ABSENT = object()  # an attribute the optimizer did not have


def _takes_grad_scale(optimizer: torch.optim.Optimizer) -> bool:
    """Whether ``optimizer.step()`` divides the gradients by ``optimizer.grad_scale``
    and skips itself, step counts included, when ``optimizer.found_inf`` is 1, inside
    its kernel: torch's fused optimizers (GradScaler's test, without the older
    contract of a ``grad_scaler`` argument to ``step``)."""
    if not getattr(optimizer, "_step_supports_amp_scaling", False):
        return False
    return "grad_scaler" not in inspect.signature(optimizer.step).parameters


def _empty_buffers(optimizer: torch.optim.Optimizer) -> bool:
    """Whether this is the first step of torch's fused SGD with momentum, which makes
    its momentum buffers with ``empty_like`` and fills them in the kernel: skipped
    through ``found_inf``, that step would leave them uninitialised for the next one
    (torch 2.13), so it is skipped on the host instead."""
    if not isinstance(optimizer, torch.optim.SGD):
        return False
    return any(
        group["momentum"] != 0
        and p.grad is not None
        and "momentum_buffer" not in optimizer.state.get(p, ())
        for group in optimizer.param_groups
        for p in group["params"]
    )


def clip_before_step(
    optimizer: torch.optim.Optimizer,
    max_norm: float | torch.Tensor | StatefulClipper,
    *,
    norm_type: float = 2.0,
    eps: float = EPS,
    nonfinite: str = "propagate",
    fuse: bool = True,
    process_group: Any = None,
    replicated: Any = None,
    sharded: Any = None,
) -> ClipHandle:
    """Clip the gradients by their global norm before every ``optimizer.step()``.

    Registers an ``optimizer.register_step_pre_hook`` that scales every ``.grad``
    of the optimizer's parameters by ``min(1, max_norm / (norm + eps))``
    (Pascanu et al., arXiv:1211.5063), on the device, and keeps the norm.

    A fused optimizer (``Adam``, ``AdamW``, ``SGD``, ``Adagrad`` with
    ``fused=True``) divides every gradient by ``optimizer.grad_scale`` inside its
    own kernel (and writes it back so divided): there the hook takes the norm and
    hands the kernel ``max(1, (norm + eps) / max_norm)`` (times a ``GradScaler``'s
    loss scale), so the gradients are read once for the norm and never multiplied
    separately; after the step ``.grad`` holds the clipped gradients, as after
    torch's clip. Under a ``torch.amp.GradScaler`` the clip sees the unscaled
    gradients; call ``scaler.step(optimizer)`` as usual, without ``scaler.unscale_``.

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
    max_norm : float, 0-d Tensor or stateful clipper
        A fixed threshold ``>= 0``, or an object with ``init(like) -> state`` and
        ``threshold(state, norm) -> (max_norm, state)`` (both pure, no host reads;
        ``like`` is a 0-d zero tensor of the norm's dtype and device; a threshold of
        ``inf`` means no clipping), called once per step with the pre-clip norm.
    norm_type : float, optional
        Any real ``p > 0`` or ``math.inf``.
    eps : float, optional
        Added to the norm; ``1e-6`` as in torch.
    nonfinite : {"propagate", "raise", "zero", "skip"}, optional
        For a NaN or inf norm: let it flow through (torch's behaviour), raise
        ``FloatingPointError`` (a host read), zero every gradient (plain SGD then
        does nothing; Adam and momentum still move the parameters), or skip the
        whole step: parameters, every optimizer state tensor and the step counts
        stay bit for bit, and so do the gradients. A fused optimizer skips on the
        device, through ``found_inf``, with no host read (but on the first step of
        fused SGD with momentum); any other optimizer costs one host read of a flag
        per step, and a skipped step sees its parameters without gradients.
    fuse : bool, optional
        ``True`` (default): hand the scale to a fused optimizer's kernel.
        ``False``: multiply the gradients separately, as for any other optimizer.
    process_group, replicated, sharded : optional
        For sharded gradients, as in ``clip_grad_norm_``: every rank gets the
        same norm, so every rank skips a step or none does.

    Returns
    -------
    ClipHandle
        With ``last_norm``, ``last_threshold``, ``last_clipped``,
        ``last_skipped``, ``state`` and ``remove()``.

    Examples
    --------
    >>> import torch, gradclip.torch as gct
    >>> w = torch.nn.Parameter(torch.zeros(2))
    >>> opt = torch.optim.SGD([w], lr=1.0)
    >>> handle = gct.clip_before_step(opt, max_norm=1.0)
    >>> w.grad = torch.tensor([3.0, 4.0])
    >>> opt.step()
    >>> w.detach(), handle.last_norm
    (tensor([-0.6000, -0.8000]), tensor(5.))
    >>> handle.remove()

    A fused AdamW skips a step whose norm is NaN without reading it:

    >>> opt = torch.optim.AdamW([w], lr=0.1, fused=True)
    >>> handle = gct.clip_before_step(opt, max_norm=1.0, nonfinite="skip")
    >>> w.grad = torch.tensor([float("nan"), 1.0])
    >>> opt.step()
    >>> w.detach(), opt.state[w]["step"], handle.last_skipped
    (tensor([-0.6000, -0.8000]), tensor(0.), tensor(True))
    """
    p = _checks.check_ord(norm_type)
    eps = _checks.check_nonneg(eps, "eps")
    nonfinite = _checks.check_nonfinite(nonfinite, skip=True)
    dist = (process_group, replicated, sharded)
    return ClipHandle(optimizer, max_norm, p, eps, nonfinite, *dist, fuse=fuse)


# -- shared steps ---------------------------------------------------------------------


def _grad_tree(
    parameters: list[torch.Tensor], process_group: Any, replicated: Any, sharded: Any = None
) -> tuple[_tree.Tree | None, dict[str, Any]]:
    """The ``.grad`` of the parameters that have one, as a tree checked writable
    (``None`` when none has), and the distributed options for them."""
    with_grad = [p for p in parameters if p.grad is not None]
    tree = _writable([p.grad for p in with_grad]) if with_grad else None
    return tree, _dist_options(with_grad, process_group, replicated, sharded)


def _writable(grads: list[torch.Tensor]) -> _tree.Tree:
    """The gradients as a tree checked writable as they are written: under no_grad."""
    with torch.no_grad():
        return _tree.flatten(grads, inplace=True)


def _dist_options(
    tensors: list[torch.Tensor], process_group: Any, replicated: Any, sharded: Any = None
) -> dict:
    """The distributed options, with ``replicated``/``sharded`` given as parameters (or
    a dict of parameter -> marker) turned into one marker per tensor, in order."""
    return {
        "process_group": process_group,
        "replicated": _per_tensor(tensors, replicated),
        "sharded": _per_tensor(tensors, sharded),
    }


def _per_tensor(tensors: list[torch.Tensor], markers: Any) -> Any:
    """A dict of parameter -> marker, or an iterable of parameters (marked ``True``),
    as one marker per tensor; anything else (one marker for all, a predicate on the
    path) as it is."""
    if isinstance(markers, dict):
        given = markers
    elif isinstance(markers, (list, tuple, set, frozenset)) or _is_generator(markers):
        markers = list(markers)
        if markers and not all(isinstance(t, torch.Tensor) for t in markers):
            return lambda _path: markers  # groups, not parameters: one marker for all
        given = dict.fromkeys(markers, True)
    else:
        return markers
    by_id = {id(t): m for t, m in given.items()}
    return [by_id.get(id(t), False) for t in tensors]


def _is_generator(obj: Any) -> bool:
    return isinstance(obj, types.GeneratorType)


def _check_foreach(tensors: list[torch.Tensor], foreach: bool | None) -> None:
    if foreach:
        for device in dict.fromkeys(t.device for t in tensors):
            if not _device_has_foreach_support(device):
                raise RuntimeError(
                    f"foreach=True was passed, but can't use the foreach API on "
                    f"{device.type} tensors"
                )


def _mode(tensors: list[torch.Tensor], foreach: bool | None) -> Any:
    """The context that runs the core as ``foreach`` asks (after torch's check)."""
    _check_foreach(tensors, foreach)
    return _backends.fast_paths(False) if foreach is False else contextlib.nullcontext()


def _total_norm(
    plan: _backends.Plan,
    norm_type: Any,
    error_if_nonfinite: bool,
    foreach: bool | None,
    dist: dict[str, Any],
) -> torch.Tensor:
    """The norm of the plan's tensors, as torch's (under ``no_grad`` and ``_mode``)."""
    try:
        p = float(norm_type)  # as torch: "inf" and 0-d tensors are accepted
    except OverflowError:  # an integer past float's range
        bits = norm_type.bit_length()
        raise ValueError(
            f"norm_type, an integer of {bits} bits, is past the float range"
        ) from None
    if p > 0:
        norm = _distributed.tree_norm(plan, p, **dist)
    elif any(v is not None for v in dist.values()):
        raise ValueError(f"norm_type must be > 0 for sharded gradients, got {norm_type!r}")
    else:  # 0, negative, -inf, NaN: not norms; torch's own definition
        norm = torch.nn.utils.get_total_norm(plan.tree.leaves, p, False, foreach)
    if error_if_nonfinite and not bool(torch.isfinite(norm)):
        raise RuntimeError(
            f"The total norm of order {p} for gradients from `parameters` is non-finite, "
            "so it cannot be clipped. To disable this error and scale the gradients by the "
            "non-finite norm anyway, set `error_if_nonfinite=False`"
        )
    return norm


def _scale(plan: _backends.Plan, max_norm: Any, norm: Any) -> None:
    """Multiply every gradient by ``min(1, max_norm / (norm + 1e-6))``, in place."""
    tree = plan.tree
    if isinstance(norm, torch.Tensor):
        if norm.dtype in (torch.float16, torch.bfloat16):
            norm = norm.float()
        norm = norm.to(tree.device)
    else:
        norm = torch.tensor(norm, dtype=tree.acc_dtype, device=tree.device)
    if isinstance(max_norm, torch.Tensor):
        max_norm = max_norm.to(tree.device)  # the reference casts it, but keeps its device
    _clipping.clip_step(tree, max_norm, eps=EPS, inplace=True, norm=norm, plan=plan)
