"""Packaging: the version (from git tags through hatch-vcs), `python -m cm_monitor --version`, the classifiers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from packaging.version import Version

import cm_monitor

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIR = Path(cm_monitor.__file__).resolve().parent


def test_version_is_a_pep440_version():
    assert cm_monitor.__version__ != "0+unknown", "neither _version.py (hatch-vcs) nor installed metadata found"
    version = Version(cm_monitor.__version__)  # raises InvalidVersion otherwise
    assert version >= Version("0.1.dev0")


def test_python_m_cm_monitor_version():
    if not (PACKAGE_DIR / "__main__.py").exists():
        pytest.skip("cm_monitor/__main__.py (the command line) is not there yet")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(PACKAGE_DIR.parent), os.environ.get("PYTHONPATH", "")])}
    env["OMP_NUM_THREADS"] = "1"
    result = subprocess.run(
        [sys.executable, "-m", "cm_monitor", "--version"], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert cm_monitor.__version__ in result.stdout


def test_classifiers_are_valid_trove_classifiers():
    classifiers = pytest.importorskip("trove_classifiers").classifiers
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["classifiers"], "pyproject.toml lists no classifiers"
    unknown = [c for c in project["classifiers"] if c not in classifiers]
    assert not unknown, f"not trove classifiers: {unknown}"
    minor = int(project["requires-python"].removeprefix(">=3."))
    versions = [c for c in project["classifiers"] if c.startswith("Programming Language :: Python :: 3.")]
    assert f"Programming Language :: Python :: 3.{minor}" in versions  # the oldest supported one is listed
