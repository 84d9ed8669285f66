"""Exploding gradients in a vanilla RNN, and global-norm clipping, in PyTorch.

A tanh RNN (``torch.nn.RNN``) learns Hochreiter's adding problem with plain SGD, as in
Pascanu, Mikolov and Bengio, "On the difficulty of training recurrent neural networks"
(ICML 2013). The recurrent matrix starts at 1.2 times an orthogonal matrix. Without
clipping, an early step hits one of the "cliffs" of the loss surface, the step
overshoots and the loss and gradients grow to inf within a few dozen steps. With
``gradclip.clip_by_global_norm_`` (threshold 1.0) the same network, data and learning
rate learn the task well below the 0.167 of predicting the mean.

    python examples/exploding_rnn_torch.py --out examples/out            # 3000 steps
    python examples/exploding_rnn_torch.py --steps 300 --out /tmp/rnn    # a quick look

Writes ``exploding_rnn_torch.png`` (loss and pre-clip gradient norm per step) and
``exploding_rnn_torch.json`` into ``--out``.
"""

from __future__ import annotations

import numpy as np
import torch
from _common import Run, adding_problem, init_params, parser, report

import gradclip as gc


def make_model(params: dict[str, np.ndarray]) -> tuple[torch.nn.RNN, torch.nn.Linear]:
    hidden = params["W_hh"].shape[0]
    rnn = torch.nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
    head = torch.nn.Linear(hidden, 1)
    with torch.no_grad():
        rnn.weight_ih_l0.copy_(torch.from_numpy(params["W_ih"]))
        rnn.weight_hh_l0.copy_(torch.from_numpy(params["W_hh"]))
        rnn.bias_ih_l0.copy_(torch.from_numpy(params["b"]))
        rnn.bias_hh_l0.zero_()
        head.weight.copy_(torch.from_numpy(params["V"]))
        head.bias.copy_(torch.from_numpy(params["c"]))
    return rnn, head


def train(args, clip: bool) -> Run:
    rnn, head = make_model(init_params(args.seed, args.hidden, args.gain))
    params = [*rnn.parameters(), *head.parameters()]
    opt = torch.optim.SGD(params, lr=args.lr)
    data = np.random.default_rng(args.seed + 1)  # the same batches for both runs
    run = Run("clipped" if clip else "unclipped", args.steps, args.every)
    for _ in range(args.steps):
        x, y = (torch.from_numpy(a) for a in adding_problem(data, args.batch, args.seq_len))
        out, _ = rnn(x)
        loss = torch.nn.functional.mse_loss(head(out[:, -1]), y)
        opt.zero_grad()
        loss.backward()
        grads = [p.grad for p in params]
        # clipping scales every .grad in place and returns the norm before clipping
        norm = gc.clip_by_global_norm_(grads, args.max_norm) if clip else gc.global_norm(grads)
        opt.step()
        if not run.record(loss.item(), norm.item()):
            break
    return run


def main(argv: list[str] | None = None) -> dict:
    args = parser(__doc__.splitlines()[0], steps=3000).parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(1)  # a tiny model: threads only add overhead
    runs = [train(args, clip=False), train(args, clip=True)]
    title = f"PyTorch tanh RNN, adding problem T={args.seq_len}, SGD lr={args.lr}"
    return report(runs, args, "exploding_rnn_torch", title)


if __name__ == "__main__":
    main()
