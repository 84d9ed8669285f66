"""Exploding gradients in a vanilla RNN, and global-norm clipping, in JAX and optax.

The JAX twin of ``exploding_rnn_torch.py``: the same tanh RNN (written with
``jax.lax.scan``), the same initial weights and batches, plain ``optax.sgd``. The whole
training step is one ``jax.jit``-compiled function, and ``gradclip.clip_by_global_norm``
runs inside it with a traced ``max_norm``: the scale is computed on the device, nothing
is read back to the host. Without clipping the loss and gradients reach inf within a
few dozen steps; with it the network learns the adding problem.

    python examples/exploding_rnn_jax.py --out examples/out            # 3000 steps
    python examples/exploding_rnn_jax.py --steps 300 --out /tmp/rnn    # a quick look

Writes ``exploding_rnn_jax.png`` and ``exploding_rnn_jax.json`` into ``--out``.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _common import Run, adding_problem, init_params, parser, report

import gradclip as gc


def predict(params, x):
    """Run the RNN over ``x`` (batch, time, 2) and read out the last hidden state."""

    def cell(h, x_t):
        h = jnp.tanh(x_t @ params["W_ih"].T + h @ params["W_hh"].T + params["b"])
        return h, None

    h0 = jnp.zeros((x.shape[0], params["W_hh"].shape[0]), x.dtype)
    h, _ = jax.lax.scan(cell, h0, jnp.swapaxes(x, 0, 1))
    return h @ params["V"].T + params["c"]


def loss_fn(params, x, y):
    return jnp.mean((predict(params, x) - y) ** 2)


@partial(jax.jit, static_argnames=("opt", "clip"))
def train_step(params, opt_state, x, y, max_norm, *, opt, clip):
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    if clip:  # traced max_norm; the scale min(1, max_norm / norm) stays on the device
        grads, norm = gc.clip_by_global_norm(grads, max_norm)
    else:
        norm = gc.global_norm(grads)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, norm


def train(args, clip: bool) -> Run:
    params = {k: jnp.asarray(v) for k, v in init_params(args.seed, args.hidden, args.gain).items()}
    opt = optax.sgd(args.lr)
    opt_state = opt.init(params)
    max_norm = jnp.float32(args.max_norm)
    data = np.random.default_rng(args.seed + 1)  # the same batches for both runs
    run = Run("clipped" if clip else "unclipped", args.steps, args.every)
    for _ in range(args.steps):
        x, y = adding_problem(data, args.batch, args.seq_len)
        params, opt_state, loss, norm = train_step(
            params, opt_state, x, y, max_norm, opt=opt, clip=clip
        )
        if not run.record(float(loss), float(norm)):
            break
    return run


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0], steps=3000).parse_args(argv)
    runs = [train(args, clip=False), train(args, clip=True)]
    title = f"JAX tanh RNN, adding problem T={args.seq_len}, optax.sgd lr={args.lr}"
    return report(runs, args, "exploding_rnn_jax", title)


if __name__ == "__main__":
    main()
