"""The distributions: ``python -m build`` makes an sdist and, from it, a wheel that installs
only the ``skyroute`` namespace (never a top-level ``proxy``, ``routing`` or ``statesync``
another project could overwrite), with the demo's data file, and both pass ``twine check``.

Built offline (``--no-isolation``: the test extras hold the build backend) once per run.
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from importlib import metadata
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
VERSION = PYPROJECT["project"]["version"]
#: Folder in the repository -> the package it installs as (pyproject's package-dir).
FOLDERS = {folder: package for package, folder in
           PYPROJECT["tool"]["setuptools"]["package-dir"].items()}
BUILD_TIMEOUT_S = 300.0


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The sdist and the wheel built from it, as ``{"sdist": ..., "wheel": ...}``."""
    out = tmp_path_factory.mktemp("dist")
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--no-isolation", "--outdir", str(out), str(REPO)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, f"python -m build failed:\n{proc.stdout}\n{proc.stderr}"
    (sdist,) = out.glob("*.tar.gz")
    (wheel,) = out.glob("*.whl")
    return {"sdist": sdist, "wheel": wheel}


def _modules_in_repo() -> set[str]:
    """Each module of the three folders, by the path it installs at."""
    return {
        f"{package.replace('.', '/')}/{path.relative_to(REPO / folder).as_posix()}"
        for folder, package in FOLDERS.items()
        for path in (REPO / folder).rglob("*.py")
    }


def test_wheel_installs_only_the_skyroute_namespace(dists: dict[str, Path]) -> None:
    """Every file is under skyroute/ or the dist-info; skyroute/ itself has no __init__."""
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = wheel.namelist()
        top_level = wheel.read(f"skyroute-{VERSION}.dist-info/top_level.txt").decode().split()
    dist_info = f"skyroute-{VERSION}.dist-info/"
    strays = [n for n in names if not n.startswith(("skyroute/", dist_info))]
    assert not strays, f"the wheel installs outside skyroute/: {strays}"
    assert top_level == ["skyroute"]
    assert "skyroute/__init__.py" not in names, "skyroute must stay a namespace package"


def test_wheel_holds_every_module_and_the_demo_file(dists: dict[str, Path]) -> None:
    """A subpackage missing from pyproject's package list would be missing here."""
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        names = {n for n in wheel.namelist() if n.startswith("skyroute/")}
    assert "skyroute/proxy/demo/demo.yaml" in names
    modules = {n for n in names if n.endswith(".py")}
    assert modules == _modules_in_repo(), modules ^ _modules_in_repo()


def test_wheel_metadata_has_the_license_version_and_command(dists: dict[str, Path]) -> None:
    """SPDX license with its text, pyproject's version, and the ``skyroute`` command."""
    dist_info = f"skyroute-{VERSION}.dist-info"
    with zipfile.ZipFile(dists["wheel"]) as wheel:
        fields = wheel.read(f"{dist_info}/METADATA").decode().split("\n\n", 1)[0].splitlines()
        license_text = wheel.read(f"{dist_info}/licenses/LICENSE").decode()
        entry_points = wheel.read(f"{dist_info}/entry_points.txt").decode()
    assert "License-Expression: Apache-2.0" in fields
    assert f"Version: {VERSION}" in fields
    assert any(f.startswith("Project-URL: Source, ") for f in fields), fields
    assert "Apache License" in license_text and "Version 2.0" in license_text
    assert "skyroute = skyroute.proxy.cli:main" in entry_points


def test_sdist_carries_the_sources_tests_and_chart(dists: dict[str, Path]) -> None:
    """The sdist builds the wheel (the fixture did so) and runs the suite: tests, helm/ and
    deploy/ are in it, caches and node_modules are not."""
    root = f"skyroute-{VERSION}/"
    with tarfile.open(dists["sdist"]) as sdist:
        names = {n.removeprefix(root) for n in sdist.getnames()}
    expected = {"LICENSE", "README.md", "pyproject.toml", "proxy/demo/demo.yaml",
                "tests/run.sh", "tests/conftest.py", "tests/chart_check.py",
                "tests/interop/package.json", "helm/Chart.yaml", "helm/values.schema.json",
                "deploy/Dockerfile"}
    assert expected <= names, sorted(expected - names)
    junk = [n for n in names if "__pycache__" in n or "node_modules" in n or ".venv" in n]
    assert not junk, junk


def test_twine_check_passes(dists: dict[str, Path]) -> None:
    """PyPI would accept the metadata and render the README."""
    proc = subprocess.run(
        [sys.executable, "-m", "twine", "check", "--strict", *map(str, dists.values())],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_skyroute_version_prints_the_installed_version() -> None:
    """``skyroute --version`` reports the installed distribution, which is pyproject's."""
    proc = subprocess.run(
        [sys.executable, "-m", "skyroute.proxy.cli", "--version"],
        capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"skyroute {metadata.version('skyroute')}"
    assert metadata.version("skyroute") == VERSION, "reinstall: pip install -e ."
