"""One version, from Cargo.toml, everywhere a user looks; the licences travel with the package."""

from __future__ import annotations

import importlib.metadata
import re
import subprocess
import sys
from pathlib import Path

import pytest

import stablelse

ROOT = Path(__file__).resolve().parent.parent
HAVE_SOURCE = (ROOT / "Cargo.toml").is_file() and (ROOT / "pyproject.toml").is_file()


def test_version_attribute_matches_the_installed_distribution():
    assert stablelse.__version__ == importlib.metadata.version("stablelse")
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)?", stablelse.__version__)


def test_command_line_prints_the_version():
    out = subprocess.run(
        [sys.executable, "-m", "stablelse", "--version"],
        check=True, capture_output=True, text=True,
    )
    assert out.stdout.strip() == f"stablelse {stablelse.__version__}"


def test_the_distribution_declares_its_licences():
    meta = importlib.metadata.metadata("stablelse")
    assert meta["License-Expression"] == "MIT OR Apache-2.0"
    assert sorted(meta.get_all("License-File") or []) == ["LICENSE-APACHE", "LICENSE-MIT"]


@pytest.mark.skipif(not HAVE_SOURCE, reason="needs the source tree")
def test_cargo_toml_is_the_one_version_source():
    cargo = (ROOT / "Cargo.toml").read_text(encoding="utf-8")
    version = re.search(r'(?m)^version = "([^"]+)"', cargo).group(1)
    assert version == stablelse.__version__
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert re.search(r"(?m)^version\s*=", pyproject) is None
    assert 'dynamic = ["version"]' in pyproject
    changelog = (ROOT / "CHANGELOG.md").read_text(encoding="utf-8")
    assert f"## [{version}]" in changelog
