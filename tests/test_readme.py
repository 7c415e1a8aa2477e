"""The README is true for a newcomer: every Python block runs as written, on its own.

Also, when the source tree is at hand (not for a copied test folder): every ``STABLELSE_*``
variable the code reads is in the README's table, every relative link points at a file of
the repository, and no block needs a name defined by another block.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
HAVE_README = README.is_file()
HAVE_SOURCE = (ROOT / "src").is_dir() and (ROOT / "python" / "stablelse").is_dir()

pytestmark = pytest.mark.skipif(not HAVE_README, reason="README.md is not beside tests/")


def python_blocks() -> list[tuple[int, str]]:
    """(line number, code) of every ```python block."""
    blocks = []
    lines = README.read_text(encoding="utf-8").splitlines() if HAVE_README else []
    i = 0
    while i < len(lines):
        if lines[i].strip() == "```python":
            start = i + 1
            j = start
            while lines[j].strip() != "```":
                j += 1
            blocks.append((start + 1, "\n".join(lines[start:j]) + "\n"))
            i = j
        i += 1
    return blocks


BLOCKS = python_blocks()


def test_the_readme_has_python_blocks():
    # The API, losses (two) and streaming examples at least.
    assert len(BLOCKS) >= 4


@pytest.mark.parametrize(("line", "code"), BLOCKS, ids=[f"README.md:{n}" for n, _ in BLOCKS])
def test_readme_block_runs_as_written(line, code):
    namespace: dict[str, object] = {"__name__": "__readme__"}
    with warnings.catch_warnings():
        # The blocks show inf and NaN on purpose; NumPy may warn about them.
        warnings.simplefilter("ignore", RuntimeWarning)
        exec(compile(code, f"README.md:{line}", "exec"), namespace)


def test_readme_api_block_comments_are_the_results():
    import numpy as np

    import stablelse as sl

    x = np.array([[2, 1, 0.1], [1000, 1, -1000], [3, 2, 1]], dtype=np.float32)
    text = README.read_text(encoding="utf-8")
    shown = repr(sl.logsumexp(x, axis=-1))
    assert f"sl.logsumexp(x, axis=-1)            # {shown}" in text
    value, sign = sl.logsumexp([1, 2], b=[1, -1], return_sign=True)
    assert f"# ({float(value)!r}, {float(sign)!r})" in text
    logits = np.array([[np.inf, 1, 0], [3, 2, 1]])
    got = sl.cross_entropy(logits, np.array([2, 0]), reduction="none")
    assert f"# {got!r}" in text


@pytest.mark.skipif(not HAVE_SOURCE, reason="needs the source tree")
def test_every_stablelse_variable_the_code_reads_is_documented():
    pattern = re.compile(r"\bSTABLELSE_[A-Z0-9_]*[A-Z0-9]\b")
    used: set[str] = set()
    for folder in ("src", "python", "tests", "scripts", "benches"):
        for path in (ROOT / folder).rglob("*"):
            if path.suffix in {".rs", ".py", ".pyi", ".cu"} or (
                path.parent.name == "scripts" and path.is_file()
            ):
                used |= set(pattern.findall(path.read_text(encoding="utf-8", errors="replace")))
    documented = set(pattern.findall(README.read_text(encoding="utf-8")))
    assert used, "found no STABLELSE_ variable in the code"
    assert sorted(used - documented) == []


@pytest.mark.skipif(not HAVE_SOURCE, reason="needs the source tree")
def test_relative_links_point_at_files_of_the_repository():
    text = README.read_text(encoding="utf-8")
    for target in re.findall(r"\]\(([^)#\s]+)\)", text):
        assert "://" not in target, f"README links outside the repository: {target}"
        assert (ROOT / target).exists(), f"README links to a missing file: {target}"
