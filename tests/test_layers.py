"""The import contracts of ``pyproject.toml`` (``lint-imports``, run by ``make test``)
hold, and they bite: a planted upward import or circle breaks them."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LINT = Path(sys.executable).with_name("lint-imports")

pytestmark = pytest.mark.skipif(not LINT.exists(), reason="import-linter is not installed")


def _lint(root: Path) -> subprocess.CompletedProcess:
    """``lint-imports`` on the package under ``root/src`` with the project's contracts."""
    return subprocess.run(
        [str(LINT), "--no-logo", "--no-cache", "--config", str(root / "pyproject.toml")],
        cwd=root,
        env={"PYTHONPATH": str(root / "src"), "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def copy(tmp_path: Path) -> Path:
    """The package and the contracts, copied to plant imports into."""
    shutil.copy(ROOT / "pyproject.toml", tmp_path)
    shutil.copytree(ROOT / "src" / "gradclip", tmp_path / "src" / "gradclip")
    return tmp_path


def _plant(path: Path, line: str) -> None:
    """A function-local import (as a lazy import would be) at the end of ``path``."""
    with path.open("a", encoding="utf-8") as f:
        f.write(f"\n\ndef _planted():\n    {line}\n")


def test_the_package_keeps_every_contract(copy):
    out = _lint(copy)
    assert out.returncode == 0, out.stdout + out.stderr
    assert "4 kept, 0 broken" in out.stdout


@pytest.mark.parametrize(
    ("module", "line", "contract"),
    [
        # the reference reaching up to the public functions
        ("_reference.py", "from . import _clipping", "layers import downward only"),
        # a circle between two low layers
        ("_compat.py", "from . import _tree", "layers import downward only"),
        # a backend re-entering the dispatcher (switching itself off, say)
        ("_backends/_jax.py", "from . import fast_paths", "never imports the dispatcher"),
        # one backend reaching into another
        ("_backends/_torch.py", "from . import _numpy", "the backends over the host paths"),
        # the reference importing an array library
        ("_reference.py", "import numpy", "imports no array library"),
    ],
)
def test_a_planted_import_breaks_a_contract(copy, module, line, contract):
    _plant(copy / "src" / "gradclip" / module, line)
    out = _lint(copy)
    assert out.returncode != 0, out.stdout
    assert " 0 broken" not in out.stdout
    broken = out.stdout.split("Broken contracts")[-1]
    assert contract in broken, out.stdout
