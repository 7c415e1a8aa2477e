"""A type checker can use the public signatures: ``mypy --strict`` rejects a misspelt option.

Runs mypy (skipped when it is not installed) on small snippets against the installed package.
"""

from __future__ import annotations

import subprocess
import sys
import typing

import pytest

import stablelse

pytest.importorskip("mypy")

GOOD = """
import numpy as np
import stablelse

logits = np.zeros((4, 3), dtype=np.float32)
target = np.zeros(4, dtype=np.int64)
loss = stablelse.cross_entropy(logits, target, reduction="sum")
probs = stablelse.softmax(logits, axis=-1, algorithm="online")
"""

BAD = """
import numpy as np
import stablelse

logits = np.zeros((4, 3), dtype=np.float32)
target = np.zeros(4, dtype=np.int64)
loss = stablelse.cross_entropy(logits, target, reduction="avg")
probs = stablelse.softmax(logits, axis=-1, algorithm="fastest")
"""


def _mypy(tmp_path, code: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "snippet.py"
    path.write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "--config-file", "", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def _options_are_literal() -> bool:
    hints = [
        typing.get_type_hints(stablelse.cross_entropy).get("reduction"),
        typing.get_type_hints(stablelse.softmax).get("algorithm"),
    ]
    return all(typing.get_origin(h) is typing.Literal for h in hints)


def test_mypy_strict_accepts_valid_options(tmp_path):
    out = _mypy(tmp_path, GOOD)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.xfail(
    not _options_are_literal(),
    reason="reduction / algorithm are not annotated with Literal[...] in this build",
    strict=True,
)
def test_mypy_strict_rejects_a_misspelt_reduction_and_algorithm(tmp_path):
    out = _mypy(tmp_path, BAD)
    assert out.returncode == 1, out.stdout + out.stderr
    errors = [line for line in out.stdout.splitlines() if ": error:" in line]
    assert any("snippet.py:7:" in e and "avg" in e for e in errors), out.stdout
    assert any("snippet.py:8:" in e and "fastest" in e for e in errors), out.stdout
