"""A hand-written training loop on NumPy (and CuPy) arrays, clipped in place.

A 2-layer MLP (2 -> 32 tanh -> 1, logistic output) learns the "two moons" with
backpropagation written out by hand, and every step's gradients (a dict of arrays) are
clipped to global norm 1 in place by ``gradclip.clip_by_global_norm_``, which returns
the norm before clipping. No framework is involved: gradclip picks NumPy or CuPy from
the arrays it is given. The same function trains on CuPy when a CUDA device is found;
otherwise the script says it skipped CuPy.

    python examples/numpy_loop.py                       # 2000 steps
    python examples/numpy_loop.py --steps 300 --out /tmp/np

Writes ``numpy_loop.json`` (per backend: loss, norm before and after clipping, accuracy)
into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import gradclip as gc


def two_moons(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` points of two interleaved half circles with noise, labels 0 and 1."""
    rng = np.random.default_rng(seed)
    t = rng.uniform(0, np.pi, n)
    label = rng.integers(0, 2, n)
    x = np.where(label, 1 - np.cos(t), np.cos(t))
    y = np.where(label, 0.5 - np.sin(t), np.sin(t))
    points = np.stack([x, y], axis=1) + rng.normal(0, 0.1, (n, 2))
    return points.astype(np.float32), label.astype(np.float32)


def train(xp, data, *, steps: int, lr: float, max_norm: float, seed: int, every: int) -> dict:
    """Full-batch gradient descent on arrays of ``xp`` (``numpy`` or ``cupy``)."""
    X, t = (xp.asarray(a) for a in data)
    rng = np.random.default_rng(seed)
    params = {
        "W1": xp.asarray(rng.normal(0, 1.0, (2, 32)).astype(np.float32)),
        "b1": xp.zeros(32, dtype=xp.float32),
        "W2": xp.asarray(rng.normal(0, 1.0, (32, 1)).astype(np.float32)),
        "b2": xp.zeros(1, dtype=xp.float32),
    }
    log = {"loss": [], "norm_before": [], "norm_after": []}
    for step in range(1, steps + 1):
        # forward
        h = xp.tanh(X @ params["W1"] + params["b1"])
        z = (h @ params["W2"] + params["b2"])[:, 0]
        loss = xp.mean(xp.logaddexp(0, z) - t * z)  # binary cross-entropy with logits

        # backward, by hand
        dz = (1 / (1 + xp.exp(-z)) - t)[:, None] / len(t)
        dh = (dz @ params["W2"].T) * (1 - h * h)
        grads = {"W1": X.T @ dh, "b1": dh.sum(0), "W2": h.T @ dz, "b2": dz.sum(0)}

        # clip the whole dict to global norm max_norm, in place; the norm before is returned
        norm = gc.clip_by_global_norm_(grads, max_norm)

        for name in params:
            params[name] -= lr * grads[name]

        log["loss"].append(float(loss))
        log["norm_before"].append(float(norm))
        log["norm_after"].append(float(gc.global_norm(grads)))
        if step % every == 0 or step == steps:
            print(
                f"[{xp.__name__}] step {step}/{steps}  loss {log['loss'][-1]:.4f}  "
                f"norm {log['norm_before'][-1]:.3f} -> {log['norm_after'][-1]:.3f}",
                file=sys.stderr,
            )
    h = xp.tanh(X @ params["W1"] + params["b1"])
    predicted = (h @ params["W2"] + params["b2"])[:, 0] > 0
    log["accuracy"] = float(xp.mean(predicted == (t > 0.5)))
    return log


def _cupy():
    """CuPy when it is installed and sees a CUDA device, else the reason it is skipped."""
    try:
        import cupy

        if cupy.cuda.runtime.getDeviceCount() > 0:
            return cupy, None
        return None, "no CUDA device"
    except Exception as exc:  # not installed, or no driver
        return None, f"{type(exc).__name__}: {exc}".splitlines()[0]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=2000, help="gradient steps (2000)")
    p.add_argument("--lr", type=float, default=1.0, help="learning rate (1.0)")
    p.add_argument("--max-norm", type=float, default=1.0, help="clipping threshold (1.0)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and weights (0)")
    p.add_argument("--out", type=Path, default=Path("examples/out"), help="output folder")
    p.add_argument("--every", type=int, default=500, help="progress line every N steps")
    args = p.parse_args(argv)

    data = two_moons(1000, args.seed)
    opts = dict(steps=args.steps, lr=args.lr, max_norm=args.max_norm, seed=args.seed)
    result = {"max_norm": args.max_norm, "numpy": train(np, data, **opts, every=args.every)}
    cupy, why = _cupy()
    if cupy is None:
        print(f"cupy: skipped ({why})")
        result["cupy"] = {"skipped": why}
    else:
        result["cupy"] = train(cupy, data, **opts, every=args.every)
    for name, log in result.items():
        if isinstance(log, dict) and "accuracy" in log:
            clipped = sum(n > args.max_norm for n in log["norm_before"])
            print(
                f"{name}: accuracy {log['accuracy']:.3f}, final loss {log['loss'][-1]:.4f}, "
                f"{clipped} of {args.steps} steps clipped (largest norm "
                f"{max(log['norm_before']):.2f}, after clipping at most "
                f"{max(log['norm_after']):.4f})"
            )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "numpy_loop.json").write_text(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
