"""scipy's own tests of logsumexp, softmax and log_softmax, run against stablelse.

scipy ships its test files in the wheel. This runs the installed
``scipy/special/tests/test_logsumexp.py`` in a subprocess with the ``_scipy_rebind`` plugin
(``tests/_scipy_rebind.py``), which rebinds ``scipy.special.logsumexp``, ``softmax`` and
``log_softmax`` to stablelse's before the file is collected, and requires every test to pass.
Skipped when scipy (1.17 or later, whose semantics stablelse follows) or its tests are not
installed.

Deselected, because they test scipy's internals rather than the three functions:

- ``test_wrap_radians``: calls scipy's private ``scipy.special._logsumexp._wrap_radians``
  directly; it never reaches stablelse.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

SCIPY_INTERNALS = {
    "test_wrap_radians": "tests scipy's private _wrap_radians, not logsumexp/softmax/log_softmax",
}


def _scipy_test_file() -> Path | None:
    try:
        spec = importlib.util.find_spec("scipy.special.tests.test_logsumexp")
    except (ImportError, ValueError):
        return None
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin)
    return path if path.is_file() else None


def _counts(junit: Path) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}
    for case in ET.parse(junit).getroot().iter("testcase"):
        name = f"{case.get('classname', '')}::{case.get('name', '')}"
        kinds = {child.tag for child in case}
        if kinds & {"failure", "error"}:
            out["failed"].append(name)
        elif "skipped" in kinds:
            out["skipped"].append(name)
        else:
            out["passed"].append(name)
    return out


@pytest.mark.timeout(600)
def test_scipy_logsumexp_suite_passes_with_stablelse(tmp_path: Path) -> None:
    path = _scipy_test_file()
    if path is None:
        pytest.skip("scipy or its installed test files are not available")
    import scipy  # noqa: PLC0415

    if tuple(int(p) for p in scipy.__version__.split(".")[:2]) < (1, 17):
        pytest.skip(f"scipy {scipy.__version__}: the semantics matched are scipy 1.17's")
    pkg_root = path.parents[3]  # site-packages (or wherever scipy is installed)
    ini = tmp_path / "pytest.ini"
    ini.write_text("[pytest]\n")
    junit = tmp_path / "report.xml"
    env = dict(os.environ)
    here = str(Path(__file__).resolve().parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        str(path),
        "-q",
        "-p",
        "_scipy_rebind",
        "-p",
        "no:cacheprovider",
        "-c",
        str(ini),
        "--rootdir",
        str(pkg_root),
        f"--junitxml={junit}",
        *(
            arg
            for name in SCIPY_INTERNALS
            for arg in ("--deselect", f"{path.relative_to(pkg_root).as_posix()}::{name}")
        ),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if not junit.is_file():
        pytest.fail(f"scipy's suite did not run:\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    counts = _counts(junit)
    summary = ", ".join(f"{len(v)} {k}" for k, v in counts.items())
    print(f"scipy {path}: {summary}")
    assert not counts["failed"], (
        f"{summary}; failing: {counts['failed'][:20]}\n{proc.stdout[-6000:]}"
    )
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert len(counts["passed"]) > 0
    assert not any(name.endswith(tuple(SCIPY_INTERNALS)) for name in counts["passed"])
