"""What the exploding-RNN examples share: the adding problem, the initial weights, the
command line, progress lines and the plot. Framework-free (NumPy and matplotlib only),
so the PyTorch and JAX scripts train the very same network on the very same data.

The adding problem (Hochreiter & Schmidhuber 1997, used by Pascanu et al. 2013): each
input is a sequence of ``T`` pairs ``(value, marker)`` with values uniform in [0, 1] and
exactly two markers set, one in each half; the target is the sum of the two marked
values. Predicting the mean (1.0) gives a mean squared error of 2 * 1/12 = 0.167.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np

BASELINE = 1 / 6  # MSE of always predicting 1.0, the mean of the target


def adding_problem(rng: np.random.Generator, batch: int, seq_len: int):
    """A batch of the adding problem: inputs ``(batch, seq_len, 2)``, targets ``(batch, 1)``."""
    values = rng.random((batch, seq_len), dtype=np.float32)
    markers = np.zeros((batch, seq_len), dtype=np.float32)
    rows = np.arange(batch)
    markers[rows, rng.integers(0, seq_len // 2, batch)] = 1.0
    markers[rows, rng.integers(seq_len // 2, seq_len, batch)] = 1.0
    x = np.stack([values, markers], axis=-1)
    y = (values * markers).sum(axis=1, keepdims=True)
    return x, y


def init_params(seed: int, hidden: int, gain: float) -> dict[str, np.ndarray]:
    """A tanh RNN ``h_t = tanh(W_ih x_t + W_hh h_{t-1} + b)``, read out by ``V h_T + c``.

    ``W_hh`` is a random orthogonal matrix times ``gain``: with ``gain > 1`` the
    recurrence amplifies along every direction where tanh is not saturated, the regime
    where Pascanu et al. find the gradient's "cliffs". The rest follows PyTorch's
    default uniform(-1/sqrt(hidden), 1/sqrt(hidden)).
    """
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.standard_normal((hidden, hidden)))
    w_hh = gain * q * np.sign(np.diag(r))
    k = 1 / math.sqrt(hidden)
    params = {
        "W_ih": rng.uniform(-k, k, (hidden, 2)),
        "W_hh": w_hh,
        "b": rng.uniform(-k, k, hidden),
        "V": rng.uniform(-k, k, (1, hidden)),
        "c": rng.uniform(-k, k, 1),
    }
    return {name: v.astype(np.float32) for name, v in params.items()}


def parser(description: str, steps: int) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--steps", type=int, default=steps, help=f"SGD steps per run ({steps})")
    p.add_argument("--out", type=Path, default=Path("examples/out"), help="output folder")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and data (0)")
    p.add_argument("--seq-len", type=int, default=20, help="sequence length T (20)")
    p.add_argument("--hidden", type=int, default=32, help="hidden units (32)")
    p.add_argument("--gain", type=float, default=1.2, help="W_hh = gain * orthogonal (1.2)")
    p.add_argument("--lr", type=float, default=0.1, help="SGD learning rate (0.1)")
    p.add_argument("--batch", type=int, default=64, help="batch size (64)")
    p.add_argument("--max-norm", type=float, default=1.0, help="clipping threshold (1.0)")
    p.add_argument("--every", type=int, default=250, help="progress line every N steps")
    return p


class Run:
    """The loss and the pre-clip gradient norm of every step of one training run."""

    def __init__(self, label: str, steps: int, every: int) -> None:
        self.label, self.steps, self.every = label, steps, every
        self.losses: list[float] = []
        self.norms: list[float] = []
        self.blew_up_at: int | None = None

    def record(self, loss: float, norm: float) -> bool:
        """Store one step, print progress to stderr; False once the loss is not finite."""
        self.losses.append(loss)
        self.norms.append(norm)
        step = len(self.losses)
        finite = math.isfinite(loss) and math.isfinite(norm)
        if step % self.every == 0 or step == self.steps or not finite:
            print(
                f"[{self.label}] step {step}/{self.steps}  loss {loss:.4g}  grad norm {norm:.4g}",
                file=sys.stderr,
                flush=True,
            )
        if not finite:
            self.blew_up_at = step
            print(f"[{self.label}] blew up at step {step}: stopping", file=sys.stderr)
        return finite

    def summary(self, window: int = 100) -> dict:
        tail = self.losses[-window:]
        return {
            "label": self.label,
            "steps_run": len(self.losses),
            "blew_up_at": self.blew_up_at,
            "first_norm": self.norms[0],
            "max_finite_norm": max((n for n in self.norms if math.isfinite(n)), default=None),
            "mean_loss_first": float(np.mean(self.losses[:window])),
            "mean_loss_last": float(np.mean(tail)),
            "losses": [x if math.isfinite(x) else None for x in self.losses],
            "norms": [x if math.isfinite(x) else None for x in self.norms],
        }


def report(runs: list[Run], args: argparse.Namespace, name: str, title: str) -> dict:
    """Print a summary, write ``name.json`` and ``name.png`` into ``args.out``."""
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"baseline": BASELINE, "max_norm": args.max_norm, "runs": {}}
    for run in runs:
        s = run.summary()
        result["runs"][run.label] = s
        if s["blew_up_at"]:
            what = f"blew up at step {s['blew_up_at']} (loss or gradient norm inf/NaN)"
        else:
            what = f"mean loss of the last 100 steps {s['mean_loss_last']:.4f}"
        print(f"{run.label:>10}: {what}; largest finite grad norm {s['max_finite_norm']:.3g}")
    print(f"{'baseline':>10}: {BASELINE:.4f} (always predicting the mean)")
    (args.out / f"{name}.json").write_text(json.dumps(result))
    _plot(runs, args, args.out / f"{name}.png", title)
    print(f"wrote {args.out / name}.png and .json")
    return result


def _plot(runs: list[Run], args: argparse.Namespace, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_norm) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True)
    for run, color in zip(runs, ["tab:red", "tab:blue"]):
        steps = np.arange(1, len(run.losses) + 1)
        ax_loss.plot(steps, _smooth(run.losses), color=color, label=run.label)
        ax_norm.plot(steps, _finite(run.norms), color=color, lw=0.6, label=run.label)
        if run.blew_up_at:
            for ax in (ax_loss, ax_norm):
                ax.axvline(run.blew_up_at, color=color, ls=":", lw=1)
            ax_loss.annotate(
                f"inf/NaN at step {run.blew_up_at}",
                (run.blew_up_at, 1),
                xycoords=("data", "axes fraction"),
                xytext=(4, -14),
                textcoords="offset points",
                color=color,
            )
    ax_loss.axhline(BASELINE, color="gray", ls="--", lw=1, label="predict the mean (0.167)")
    ax_norm.axhline(args.max_norm, color="gray", ls="--", lw=1, label="max_norm")
    # the unclipped loss runs off the top: the range shows what the clipped run learns
    low = min(min((x for x in r.losses if math.isfinite(x)), default=1.0) for r in runs)
    ax_loss.set(yscale="log", ylim=(0.5 * low, 30), ylabel="MSE (running mean of 20)")
    ax_loss.set_title(title)
    ax_norm.set(yscale="log", ylabel="gradient norm before clipping", xlabel="SGD step")
    ax_loss.legend(loc="upper right")
    ax_norm.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _finite(values: list[float]) -> np.ndarray:
    v = np.asarray(values, dtype=np.float64)
    return np.where(np.isfinite(v), v, np.nan)


def _smooth(values: list[float], k: int = 20) -> np.ndarray:
    v = _finite(values)
    out = np.empty_like(v)
    for i in range(len(v)):
        out[i] = v[max(0, i - k + 1) : i + 1].mean()
    return out
