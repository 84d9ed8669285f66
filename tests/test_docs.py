"""The documentation: the site builds, every page's code runs, every docstring example holds.

- ``mkdocs build --strict`` (warnings are errors: broken links, pages missing from the
  nav, API reference entries that do not resolve, docstrings griffe cannot parse) into
  a temporary folder; the test fails on any line of its output that says WARNING, and
  on a code fence rendered as text;
- every ```python block of every ``docs/**/*.md`` page and of README.md runs, in order,
  one namespace per page, in a fresh interpreter (so a page sees what a user sees:
  JAX's default float32, no state left by other tests); ```python notest blocks are
  skipped; a failure names the page, the block and the line in the page;
- the docstring examples of the package (``pytest --doctest-modules src/gradclip``);
- the links of README.md point at files that exist, and ``python -m gradclip --help``
  explains the commands.

Run one page by hand: ``python tests/test_docs.py docs/numerics.md``.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = [*sorted((ROOT / "docs").rglob("*.md")), ROOT / "README.md"]
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`\n]*)$")


@dataclass
class Block:
    number: int  # 1-based, counting only ```python blocks of the page
    line: int  # 1-based line of the first line of code in the page
    code: str
    run: bool  # False for ```python notest


def python_blocks(text: str) -> list[Block]:
    """The fenced ```python blocks of a Markdown page, dedented to their fence."""
    blocks: list[Block] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence, info = m["indent"], m["fence"], m["info"].split()
        end = i + 1
        while end < len(lines) and not (
            lines[end].strip().startswith(fence) and set(lines[end].strip()) == {fence[0]}
        ):
            end += 1
        if info and info[0] in ("python", "py", "{.python}"):
            body = [
                ln[len(indent) :] if ln.startswith(indent) else ln for ln in lines[i + 1 : end]
            ]
            blocks.append(
                Block(len(blocks) + 1, i + 2, "\n".join(body) + "\n", "notest" not in info)
            )
        i = end + 1
    return blocks


def run_page(path: Path) -> int:
    """Execute a page's runnable blocks in one namespace; 0 if all pass, else report and 1."""
    rel = _rel(path)
    namespace: dict = {"__name__": "__main__"}
    for block in python_blocks(path.read_text(encoding="utf-8")):
        if not block.run:
            continue
        # pad with newlines so tracebacks give the line numbers of the page itself
        code = compile("\n" * (block.line - 1) + block.code, str(path), "exec")
        try:
            exec(code, namespace)
        except BaseException as exc:
            tb = traceback.extract_tb(exc.__traceback__)
            in_page = [f for f in tb if f.filename == str(path)]
            where = f"line {in_page[-1].lineno}" if in_page else f"starting at line {block.line}"
            print(
                f"{rel}: python block {block.number} ({where}) raised "
                f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}",
                file=sys.stderr,
            )
            return 1
    return 0


def _rel(path: Path) -> str:
    try:
        return str(path.resolve().relative_to(ROOT))
    except ValueError:
        return str(path)


def _python(*args: object, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    """``python *args`` in a fresh interpreter that imports this checkout's gradclip."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])]
    )
    env["NO_MKDOCS_2_WARNING"] = "1"
    return subprocess.run(
        [sys.executable, *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        cwd=cwd,
        timeout=300,
    )


# -- the site ---------------------------------------------------------------------------


def test_site_builds_strict(tmp_path):
    if importlib.util.find_spec("mkdocs") is None:
        pytest.skip("mkdocs is not installed (pip install -e '.[docs]')")
    site = tmp_path / "site"
    config = ROOT / "mkdocs.yml"
    # not -q: that hides the warnings; any warning fails here, whatever mkdocs' exit code
    proc = _python("-m", "mkdocs", "build", "--strict", "-f", config, "-d", site)
    log = f"{proc.stdout}\n{proc.stderr}"
    warnings = [line for line in log.splitlines() if "WARNING" in line]
    assert proc.returncode == 0 and not warnings, (
        f"mkdocs build --strict: exit code {proc.returncode}, "
        f"{len(warnings)} warning(s):\n" + "\n".join(warnings or [log[-6000:]])
    )
    # a fence Markdown did not recognise comes out as text with its backticks
    unrendered = [_rel(p) for p in sorted(site.rglob("*.html")) if "```" in p.read_text("utf-8")]
    assert not unrendered, f"code fences rendered as text in {unrendered}"
    api = (site / "api.html").read_text(encoding="utf-8")
    for name in ("global_norm", "clip_by_global_norm_", "clip_by_norm", "clip_by_value"):
        assert f'id="gradclip.{name}"' in api, f"the API reference lacks gradclip.{name}"
    assert "Pascanu" in api, "the API reference lacks the docstrings' text"


# -- the code on every page ---------------------------------------------------------------


def test_block_parser_finds_fences_and_notest():
    page = (
        "text\n```python\na = 1\n```\n```sh\nmake\n```\n"
        "- item\n\n    ```python notest\n    b = 2\n    ```\n````python\nc = '```'\n````\n"
    )
    blocks = python_blocks(page)
    assert [(b.number, b.line, b.code, b.run) for b in blocks] == [
        (1, 3, "a = 1\n", True),
        (2, 11, "b = 2\n", False),
        (3, 14, "c = '```'\n", True),
    ]


@pytest.mark.parametrize("page", PAGES, ids=[_rel(p) for p in PAGES])
def test_page_code_runs(page, tmp_path):
    blocks = [b for b in python_blocks(page.read_text(encoding="utf-8")) if b.run]
    if not blocks:
        pytest.skip(f"{_rel(page)} has no runnable python blocks")
    proc = _python(__file__, page, cwd=tmp_path)  # a page that writes files writes them there
    if proc.returncode != 0:
        pytest.fail(proc.stderr[-6000:], pytrace=False)


# -- docstrings, README, command line ------------------------------------------------------


def test_docstring_examples(tmp_path):
    args = ["-q", "-p", "no:cacheprovider", "--doctest-modules", "--rootdir", ROOT]
    proc = _python("-m", "pytest", *args, ROOT / "src" / "gradclip", cwd=tmp_path)
    assert proc.returncode == 0, f"docstring examples fail:\n{proc.stdout[-6000:]}"
    assert " passed" in proc.stdout, proc.stdout


def test_readme_links_exist():
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert "docs/api.md" in local
    assert "docs/index.md" in local
    missing = [link for link in local if not (ROOT / link).exists()]
    assert not missing, f"README.md links to missing files: {missing}"


def test_cli_help_names_the_commands():
    proc = _python("-m", "gradclip", "--help")
    assert proc.returncode == 0, proc.stderr
    out = proc.stdout
    for word in ("usage: python -m gradclip", "demo", "make test", "docs/index.md"):
        assert word in out, f"`python -m gradclip --help` does not mention {word!r}:\n{out}"


if __name__ == "__main__":
    sys.exit(max((run_page(Path(p).resolve()) for p in sys.argv[1:]), default=0))
