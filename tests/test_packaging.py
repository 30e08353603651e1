"""`make setup` installs the project quietly: pyproject.toml's metadata builds without setuptools warnings."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_license_is_an_spdx_string_and_the_metadata_builds_without_warnings(tmp_path):
    tomllib = pytest.importorskip("tomllib")
    pytest.importorskip("setuptools")
    project = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not the deprecated {text = ...} table

    # the metadata step of `pip install -e .`, on a copy (nothing is installed), with every warning shown
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, tmp_path / name)
    for package in ("moecl", "flows"):
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "out").mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-W",
            "default",
            "-c",
            "from setuptools import build_meta; print(build_meta.prepare_metadata_for_build_editable('out'))",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    output = run.stdout + run.stderr
    assert "Warning" not in output and "deprecated" not in output.lower(), output[-3000:]
    metadata = (tmp_path / "out" / run.stdout.strip().splitlines()[-1] / "METADATA").read_text()
    assert "License-Expression: Apache-2.0" in metadata.splitlines()
