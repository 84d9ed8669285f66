"""``python -m gradclip``: the tutorial's example on every installed backend.

Clips ``[1, 2, 3, 4, 5]`` to global norm 3 with each array library that is
installed, prints the norm and the clipped gradients per backend, checks that they
agree with a float64 reference, and lists the devices found.
"""

from __future__ import annotations

import argparse
import importlib
import math
import sys
from collections.abc import Callable
from typing import Any

EXAMPLE = [1, 2, 3, 4, 5]
MAX_NORM = 3.0


def _reference() -> tuple[float, list[float]]:
    norm = math.sqrt(sum(v * v for v in EXAMPLE))
    return norm, [v * MAX_NORM / norm for v in EXAMPLE]


def _cupy_gpu() -> Any:
    import cupy

    if cupy.cuda.runtime.getDeviceCount() < 1:
        raise RuntimeError("no CUDA device")
    return cupy


def _torch_devices(torch: Any) -> list[str]:
    devs = ["cpu"]
    if torch.cuda.is_available():
        devs += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        devs.append("mps")
    return devs


# name -> (module to import, make an array from a list on a device, list devices)
BACKENDS: dict[str, tuple[Callable[[], Any], Callable[..., Any], Callable[[Any], list[str]]]] = {
    "numpy": (
        lambda: importlib.import_module("numpy"),
        lambda m, v, d: m.asarray(v),
        lambda m: ["cpu"],
    ),
    "array-api-strict": (
        lambda: importlib.import_module("array_api_strict"),
        lambda m, v, d: m.asarray(v),
        lambda m: ["CPU_DEVICE"],
    ),
    "torch": (
        lambda: importlib.import_module("torch"),
        lambda m, v, d: m.tensor(v, device=d),
        _torch_devices,
    ),
    "jax": (
        lambda: importlib.import_module("jax.numpy"),
        lambda m, v, d: m.asarray(v, device=d),
        lambda m: sys.modules["jax"].devices(),
    ),
    "dask": (
        lambda: importlib.import_module("dask.array"),
        lambda m, v, d: m.from_array(importlib.import_module("numpy").asarray(v), chunks=2),
        lambda m: ["cpu (lazy)"],
    ),
    "cupy": (
        _cupy_gpu,
        lambda m, v, d: m.asarray(v),
        lambda m: [f"cuda:{i}" for i in range(m.cuda.runtime.getDeviceCount())],
    ),
}


def _to_list(x: Any) -> list[float]:
    if hasattr(x, "compute"):  # Dask: the user asks for the values here
        x = x.compute()
    if hasattr(x, "get"):  # CuPy
        x = x.get()
    if hasattr(x, "cpu"):  # torch
        x = x.cpu()
    import numpy as np

    return [float(v) for v in np.asarray(x).reshape(-1)]


def demo(out: Any = None) -> int:
    """Run the tutorial's example on every backend; return 0 when all agree."""
    import gradclip as gc

    out = out or sys.stdout
    ref_norm, ref_clipped = _reference()
    w = out.write
    w(f"gradclip {gc.__version__}: clip_by_global_norm({EXAMPLE}, max_norm={MAX_NORM:g})\n")
    w(f"  expected  norm = sqrt(55) = {ref_norm:.6f}\n")
    w(f"            grads * 3/sqrt(55) = [{', '.join(f'{v:.4f}' for v in ref_clipped)}]\n\n")
    w(f"  {'backend':<18}{'device':<16}{'dtype':<10}{'norm':<11}clipped grads\n")
    failures = 0
    found: dict[str, list[str]] = {}
    for name, (load, make, devices) in BACKENDS.items():
        try:
            mod = load()
            devs = [str(d) for d in devices(mod)]
        except Exception as exc:  # not installed, or no GPU
            why = "not installed" if isinstance(exc, ImportError) else str(exc).splitlines()[0]
            w(f"  {name:<18}-- skipped: {why}\n")
            continue
        found[name] = devs
        for dev in devs[:2] if name == "torch" else devs[:1]:
            arg = dev if name == "torch" else None
            try:
                clipped, norm = gc.clip_by_global_norm(make(mod, EXAMPLE, arg), max_norm=MAX_NORM)
                values, n = _to_list(clipped), _to_list(norm)[0]
                dtype = str(clipped.dtype).rsplit(".", 1)[-1]
                tol = 1e-6 if "32" in dtype else 1e-12
                ok = abs(n - ref_norm) <= tol * ref_norm and all(
                    abs(a - b) <= tol * abs(b) for a, b in zip(values, ref_clipped)
                )
                mark = "ok" if ok else "MISMATCH"
                failures += not ok
                grads = ", ".join(f"{v:.4f}" for v in values)
                w(f"  {name:<18}{dev[:15]:<16}{dtype:<10}{n:<11.6f}[{grads}]  {mark}\n")
            except Exception as exc:
                failures += 1
                w(f"  {name:<18}{dev[:15]:<16}FAILED: {type(exc).__name__}: {exc}\n")
    w("\n  devices found: ")
    w("; ".join(f"{k}: {', '.join(v)}" for k, v in found.items()) + "\n")
    if failures:
        w(f"\n  {failures} backend(s) disagree with the float64 reference\n")
    else:
        w(f"\n  all {len(found)} backends agree with the float64 reference.\n")
    w(
        "  (The tutorial printed norm 3.1623 and grads [0.5388, ...] of norm 3.996 > 3: no\n"
        "   clipping gives that. Its call, torch.nn.utils.clip_grad_norm_(np.array(...)), raises\n"
        "   AttributeError: torch clips parameters' .grad in place and returns only the norm.)\n"
    )
    return 1 if failures else 0


DESCRIPTION = """\
gradclip: exact, fast gradient clipping for any Python Array API library
(NumPy, CuPy, PyTorch, JAX, Dask, array-api-strict); the library is picked from
the arrays you pass in.

With no command, runs `demo`: the tutorial's example, [1, 2, 3, 4, 5] clipped to
global norm 3, on every installed backend and device, checked against a float64
reference (exit status 1 if any backend disagrees)."""

EPILOG = """\
in Python:
  import gradclip as gc
  clipped, norm = gc.clip_by_global_norm(grads, max_norm=1.0)   # any array tree
  norm = gc.clip_by_global_norm_(grads, max_norm=1.0)           # in place

next steps:
  make test                        the whole test suite (what CI runs)
  make docs                        the documentation site, into site/
  python examples/exploding_rnn_torch.py --out examples/out
                                   an RNN that blows up without clipping
  docs/index.md                    quick start; docs/api.md: the API reference"""


def main(argv: list[str] | None = None) -> int:
    """The command line: ``python -m gradclip [COMMAND]`` (also installed as ``gradclip``)."""
    import gradclip

    parser = argparse.ArgumentParser(
        prog="python -m gradclip",
        usage="%(prog)s [-h] [--version] [COMMAND] [options]",
        description=DESCRIPTION,
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"gradclip {gradclip.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", title="commands")
    sub.add_parser(
        "demo",
        help="the tutorial's example on every installed backend (the default)",
        description="Clip [1, 2, 3, 4, 5] to global norm 3 with every installed array "
        "library and device, print the results and check them against float64.",
    )
    args = parser.parse_args(argv)
    if args.command in (None, "demo"):
        return demo()
    parser.error(f"unknown command {args.command!r}")
    return 2


if __name__ == "__main__":
    sys.exit(main())
