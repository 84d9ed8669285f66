"""The tutorial's training loop, with gradclip's drop-in for ``clip_grad_norm_``.

The loop is the tutorial's, line for line (``torch.nn.Linear(10, 1)``, MSE loss, SGD
with lr 0.1, 100 steps of random data, clipping to norm 1), except for one import:
``from gradclip.torch import clip_grad_norm_`` in place of
``torch.nn.utils.clip_grad_norm_``. Same signature, same semantics (``.grad`` scaled in
place, the pre-clip norm returned as a tensor, ``eps = 1e-6``).

To show that it is a drop-in, the loop runs twice from the same seed, once with each
function, and the script prints how far the norms and the final weights differ.

    python examples/tutorial_loop.py                  # 100 steps, as in the tutorial
    python examples/tutorial_loop.py --steps 20 --out /tmp/tutorial

Writes ``tutorial_loop.json`` (loss and norm per step for both runs) into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from gradclip.torch import clip_grad_norm_


def train(steps: int, seed: int, clip_grad_norm_, every: int, label: str) -> dict:
    torch.manual_seed(seed)

    # the model and the loss
    model = torch.nn.Linear(10, 1)
    loss_fn = torch.nn.MSELoss()

    # the optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)

    losses, norms = [], []
    for i in range(steps):
        # the data (random, as in the tutorial: there is nothing to learn)
        x = torch.randn(1, 10)
        y = torch.randn(1, 1)

        # forward pass and loss
        y_pred = model(x)
        loss = loss_fn(y_pred, y)

        # backward pass
        optimizer.zero_grad()
        loss.backward()

        # gradient clipping: scales every .grad in place, returns the norm before
        norm = clip_grad_norm_(model.parameters(), max_norm=1)

        # update
        optimizer.step()

        losses.append(loss.item())
        norms.append(norm.item())
        if (i + 1) % every == 0 or i + 1 == steps:
            print(
                f"[{label}] step {i + 1}/{steps}  loss {losses[-1]:.4f}  norm {norms[-1]:.4f}",
                file=sys.stderr,
            )
    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    return {"losses": losses, "norms": norms, "weights": weights.tolist()}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100, help="training steps (100)")
    p.add_argument("--seed", type=int, default=0, help="torch seed (0)")
    p.add_argument("--out", type=Path, default=Path("examples/out"), help="output folder")
    p.add_argument("--every", type=int, default=25, help="progress line every N steps")
    args = p.parse_args(argv)

    ours = train(args.steps, args.seed, clip_grad_norm_, args.every, "gradclip.torch")
    theirs = train(args.steps, args.seed, torch.nn.utils.clip_grad_norm_, args.every, "torch")

    def max_rel(a: list[float], b: list[float]) -> float:
        return max(abs(u - v) / max(abs(v), 1e-30) for u, v in zip(a, b))

    clipped = sum(n > 1 for n in ours["norms"])
    print(f"{clipped} of {args.steps} steps had a norm above max_norm=1 and were clipped")
    print("largest relative difference to torch.nn.utils.clip_grad_norm_:")
    print(f"  pre-clip norms {max_rel(ours['norms'], theirs['norms']):.2e}")
    print(f"  final weights  {max_rel(ours['weights'], theirs['weights']):.2e}")
    result = {"gradclip": ours, "torch": theirs}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "tutorial_loop.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
