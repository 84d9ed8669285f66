"""docs/guarantees.md names, for each promise, the tests that check it: each exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_every_test_the_guarantees_page_names_exists():
    text = (ROOT / "docs" / "guarantees.md").read_text()
    refs = re.findall(r"`([\w/]+\.py)::(\w+)`", text)
    assert len(refs) > 50
    missing = [
        f"{f}::{name}"
        for f, name in refs
        if not (ROOT / "tests" / f).exists()
        or not re.search(rf"^\s*def {name}\(", (ROOT / "tests" / f).read_text(), re.M)
    ]
    assert not missing, f"docs/guarantees.md names tests that do not exist: {missing}"
