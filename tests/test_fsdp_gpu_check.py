"""`benchmarks/fsdp_gpu_check.sh`: its CPU dry run prints the per-rank scoring memory at
R = 1 and 2 (each rank half of R = 1's weights and directions, the same scores) and shows
train.fsdp refused on CPU; without a GPU the real run refuses in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "fsdp_gpu_check.sh"


def run(tmp: Path, *args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PY": sys.executable, "OMP_NUM_THREADS": "1", "OUT": str(tmp)}
    return subprocess.run([str(SCRIPT), *args], env=env | env_vars, capture_output=True, text=True)


def test_dry_run_memory_halves_and_cpu_refusal(tmp_path: Path) -> None:
    proc = run(tmp_path, "--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = re.findall(r"^(\d) +(\d) +(\S+) MB +(\S+) MB +(\S+) MB", proc.stdout, re.M)
    held = {(int(r), int(k)): (float(w), float(d), float(g)) for r, k, w, d, g in rows}
    assert sorted(held) == [(1, 0), (2, 0), (2, 1)]
    # builtin:tiny, 535,808 fp32 values: 2.14 MB of weights, 4.29 MB for g^_V + g^_C at R=1
    assert held[(1, 0)][:2] == (2.14, 4.29)
    assert held[(2, 0)][:2] == held[(2, 1)][:2] == (1.07, 2.14)
    assert held[(2, 0)][2] == held[(1, 0)][2] == 0.52  # two 128 x 512 pieces gathered at once
    assert re.search(r"scores vs R=1: largest difference (\S+)", proc.stdout)
    assert float(re.search(r"largest difference (\S+)", proc.stdout).group(1)) <= 1e-6  # type: ignore[union-attr]
    assert "config error: train.fsdp: accelerate runs FSDP only on GPUs" in proc.stdout


def test_without_a_gpu_the_real_run_refuses_in_one_line(tmp_path: Path) -> None:
    proc = run(tmp_path, CUDA_VISIBLE_DEVICES="")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"fsdp_gpu_check.sh: no CUDA GPU visible to {sys.executable} "
        "(--dry-run runs the CPU part)\n"
    )
