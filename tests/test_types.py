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

# (function, option, the misspelt value in BAD, its line in BAD)
CASES = [
    ("cross_entropy", "reduction", "avg", 7),
    ("softmax", "algorithm", "fastest", 8),
]


def _mypy(tmp_path, code: str) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "snippet.py"
    path.write_text(code)
    return subprocess.run(
        [sys.executable, "-m", "mypy", "--strict", "--no-incremental",
         "--cache-dir", str(tmp_path / ".mypy_cache"), "--config-file", "", str(path)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )


def _is_literal(function: str, option: str) -> bool:
    hint = typing.get_type_hints(getattr(stablelse, function)).get(option)
    return typing.get_origin(hint) is typing.Literal


def test_mypy_strict_accepts_valid_options(tmp_path):
    out = _mypy(tmp_path, GOOD)
    assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module")
def bad_errors(tmp_path_factory) -> list[str]:
    out = _mypy(tmp_path_factory.mktemp("bad"), BAD)
    assert out.returncode in (0, 1), out.stdout + out.stderr
    return [line for line in out.stdout.splitlines() if ": error:" in line]


@pytest.mark.parametrize(
    ("function", "option", "value", "line"),
    [
        pytest.param(
            *case,
            marks=pytest.mark.xfail(
                not _is_literal(case[0], case[1]),
                reason=f"{case[0]}'s {case[1]} is not annotated with Literal[...] in this build",
                strict=True,
            ),
        )
        for case in CASES
    ],
)
def test_mypy_strict_rejects_a_misspelt_option(bad_errors, function, option, value, line):
    assert any(f"snippet.py:{line}:" in e and value in e for e in bad_errors), bad_errors
