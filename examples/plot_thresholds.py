"""Plot a gradient-norm sequence with spikes and each adaptive clipper's threshold.

Writes docs/img/thresholds.png (used by the pages in docs/clippers/):

    python examples/plot_thresholds.py [--steps 400] [--out docs/img/thresholds.png]

Each clipper runs through the pure protocol (``init`` / ``threshold``) on NumPy
arrays; the norms are synthetic: a slow drift with noise, a few isolated spikes and
a burst.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

import gradclip as gc

FIXED = 1.5  # the bound a fixed clip_by_global_norm would use


def spiky_norms(steps: int, seed: int = 0) -> np.ndarray:
    """Norms around 1 that drift down slowly, with spikes of x3 to x20 and a burst."""
    rng = np.random.default_rng(seed)
    t = np.arange(steps)
    norms = (1.2 * np.exp(-t / (2 * steps)) + 0.1 * np.sin(t / 15)) * np.exp(
        0.12 * rng.standard_normal(steps)
    )
    for frac, factor in ((0.15, 6.0), (0.3, 20.0), (0.45, 3.0), (0.75, 10.0)):
        norms[int(frac * steps)] *= factor
    burst = int(0.6 * steps)
    norms[burst : burst + max(2, steps // 50)] *= 4.0
    return norms


def thresholds(clipper: gc.StatefulClipper, norms: np.ndarray) -> tuple[np.ndarray, list]:
    """The threshold ``clipper`` gives at each step, and the state before each step."""
    state = clipper.init(np.zeros((), dtype=np.float64))
    out, states = [], []
    for n in norms:
        states.append(state)
        thr, state = clipper.threshold(state, np.asarray(n))
        out.append(float(thr))
    return np.array(out), states


def zclip_boundary(clipper: gc.ZClip, states: list) -> np.ndarray:
    """The norm above which ZClip calls a step a spike: ``mu + z_thresh * sigma``."""
    return np.array(
        [
            float(s.mean + clipper.z_thresh * np.sqrt(s.var))
            if int(s.step) >= clipper.warmup_steps
            else np.nan
            for s in states
        ]
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--out", type=Path, default=Path("docs/img/thresholds.png"))
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    norms = spiky_norms(args.steps)
    zclip = gc.ZClip(max_norm=None)
    zclip_thr, zclip_states = thresholds(zclip, norms)
    panels = [
        ("fixed: clip_by_global_norm(max_norm=1.5)", np.full_like(norms, FIXED), None),
        ("AutoClip(quantile=0.9)", thresholds(gc.AutoClip(quantile=0.9), norms)[0], None),
        ("ZClip(max_norm=None)", zclip_thr, zclip_boundary(zclip, zclip_states)),
        (
            "QuantileClip(initial_max_norm=0.1, target_quantile=0.9)",
            thresholds(gc.QuantileClip(initial_max_norm=0.1, target_quantile=0.9), norms)[0],
            None,
        ),
    ]
    fig, axes = plt.subplots(len(panels), 1, figsize=(9, 9), sharex=True)
    steps = np.arange(len(norms))
    for ax, (title, thr, boundary) in zip(axes, panels):
        clipped = norms > thr
        ax.semilogy(steps, norms, color="0.6", lw=1, label="gradient norm")
        finite = np.where(np.isfinite(thr), thr, np.nan)
        ax.semilogy(steps, finite, color="C3", lw=1.5, label="threshold (inf: none)")
        if boundary is not None:
            ax.semilogy(steps, boundary, "--", color="C2", lw=1, label="spike above")
            ax.legend(loc="upper right", fontsize=8)
        ax.semilogy(
            steps[clipped],
            np.minimum(norms, thr)[clipped],
            "v",
            color="C0",
            ms=4,
            label="clipped to",
        )
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_ylabel("norm")
    axes[0].legend(loc="upper right", fontsize=8, ncol=3)
    axes[-1].set_xlabel("step")
    fig.tight_layout()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.out, dpi=110)
    plt.close(fig)
    return args.out


if __name__ == "__main__":
    print(main())
