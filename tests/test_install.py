"""Installing gradalign into an environment that already has torch (a user's CUDA / TRL / verl
environment) keeps that torch: README, "Install into the environment you already have"."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _python(python: Path, code: str) -> str:
    done = subprocess.run([str(python), "-c", code], capture_output=True, text=True, check=True)
    return done.stdout.strip()


@pytest.mark.slow
def test_pip_install_into_an_environment_with_torch_keeps_that_torch(tmp_path) -> None:
    """A fresh virtual environment that sees this one's packages (torch, TRL, ...) through a
    .pth file stands for the user's; `pip install .` there, offline (--no-index: nothing may
    be fetched), installs gradalign and leaves torch as it was."""
    venv = tmp_path / "env"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = venv / "bin" / "python"
    site = _python(python, "import sysconfig; print(sysconfig.get_paths()['purelib'])")
    Path(site, "users_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    where_torch = "import torch; print(torch.__version__, torch.__file__)"
    before = _python(python, where_torch)

    source = tmp_path / "gradalign"  # a copy: building writes build/ and *.egg-info
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "src", source / "src", ignore=shutil.ignore_patterns("*.egg-info"))
    pip = [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-index"]
    done = subprocess.run(
        [*pip, "--no-build-isolation", str(source)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr
    (installed,) = [x for x in done.stdout.splitlines() if x.startswith("Successfully installed")]
    assert installed.split()[2:] == ["gradalign-0.1.0"]  # nothing else, torch least of all
    assert _python(python, where_torch) == before
    where = _python(python, "import gradalign; print(gradalign.__file__)")
    assert where.startswith(site)  # this environment's own copy, importable
