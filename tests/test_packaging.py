"""The wheel: what it holds, and that it installs and runs outside the repository.

The wheel is built from a copy of the working tree in a temporary folder, so the build leaves
nothing (``build/``, ``*.egg-info``) in the repository.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest

from support import ROOT

NOT_PACKAGED = {"tests", "bench", "docs", "build"}  # top-level folders that stay out of the wheel


def _clean_env() -> dict[str, str]:
    """The environment without anything that would let Python find the repository."""
    return {k: v for k, v in os.environ.items()
            if k not in {"PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV"}}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    source = tmp / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", ".venv", ".local", "__pycache__", "*.egg-info", "build", ".*_cache",
        ".hypothesis"))
    began = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp / "dist"),
         str(source)], capture_output=True, text=True, env=_clean_env(), cwd=tmp, timeout=240)
    assert result.returncode == 0, result.stdout + result.stderr
    print(f"\nwheel built in {time.monotonic() - began:.1f}s")
    [built] = (tmp / "dist").glob("phoneverify-*.whl")
    return built


def _modules_in_the_source() -> set[str]:
    """Every module of the package, the broker's files and the templates, as wheel paths."""
    found = set()
    for folder, dirs, files in os.walk(ROOT):
        rel = Path(folder).relative_to(ROOT)
        dirs[:] = [d for d in dirs if not (d.startswith(".") or d == "__pycache__"
                                           or d.endswith(".egg-info")
                                           or (rel == Path() and d in NOT_PACKAGED))]
        broker = rel == Path("ops", "broker")
        templates = rel == Path("models", "templates")  # the locales' data files
        found |= {f"phoneverify/{(rel / name).as_posix()}" for name in files
                  if name.endswith(".py") or broker or (templates and name.endswith(".toml"))}
    return found


def test_the_wheel_holds_the_package_and_nothing_else(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}

    assert "phoneverify" in top
    assert len(top) == 2, top
    [info] = top - {"phoneverify"}
    assert re.fullmatch(r"phoneverify-[\w.]+\.dist-info", info), info
    assert not [name for name in names if name.split("/")[1] in NOT_PACKAGED]
    assert "phoneverify/ops/broker/pom.xml" in names
    assert "phoneverify/ops/broker/log4j.properties" in names
    missing = _modules_in_the_source() - set(names)
    assert not missing, f"not in the wheel (a package missing from pyproject?): {missing}"
    entry_points = zipfile.ZipFile(wheel).read(f"{info}/entry_points.txt").decode()
    assert "phoneverify = phoneverify.interfaces.cli:main" in entry_points


@pytest.mark.slow  # a fresh virtualenv and the dependencies from PyPI: about 30 s here
def test_the_wheel_installs_and_runs_outside_the_repository(wheel: Path,
                                                             tmp_path: Path) -> None:
    venv = tmp_path / "venv"
    began = time.monotonic()
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    python, script = venv / "bin" / "python", venv / "bin" / "phoneverify"
    install = subprocess.run([str(python), "-m", "pip", "install", "-q", str(wheel)],
                             capture_output=True, text=True, env=_clean_env(), cwd=tmp_path,
                             timeout=280)
    assert install.returncode == 0, install.stdout + install.stderr
    print(f"\nvirtualenv and install: {time.monotonic() - began:.1f}s")
    outside = tmp_path / "elsewhere"
    outside.mkdir()

    def run(*cmd: str) -> str:
        result = subprocess.run(cmd, capture_output=True, text=True, env=_clean_env(),
                                cwd=outside, timeout=60)
        assert result.returncode == 0, result.stdout + result.stderr
        return result.stdout

    where = run(str(python), "-c", "import phoneverify; from phoneverify import VerificationClient;"
                " print(phoneverify.__file__)")
    assert Path(where.strip()).is_relative_to(venv), where  # the installed copy, not the repo
    assert "worker" in run(str(script), "--help")
    assert "stop" in run(str(python), "-m", "phoneverify.ops.broker", "--help")
