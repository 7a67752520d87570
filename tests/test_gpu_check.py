"""`benchmarks/gpu_check.sh`: its CPU dry run goes through every step (the output-layer
feature scorer included) on a tiny Qwen2 shape in bf16, and without a GPU the real run refuses with one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


def run(*args: str, **env_vars: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PY": sys.executable, "OMP_NUM_THREADS": "1"} | env_vars
    return subprocess.run([str(SCRIPT), *args], env=env, capture_output=True, text=True)


def test_dry_run_scores_and_generates_with_a_tiny_qwen_shape_in_bf16() -> None:
    proc = run("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "== qwen-tiny: 0.14M scored params, 8 problems x 4 rollouts" in out
    assert ", 16 groups per micro-batch, cpu, bfloat16, " in out  # GPM: 16 unless set
    steps = ("plain forward", "floor (plain fwd+bwd)", "batched, chunk=False")
    steps += ("last:1, chunk=False", "output exact", "output 64x128", "exact per-group loop")
    for step in steps:
        assert re.search(rf"^{re.escape(step)}\s+\d+\.\d\d\s+\d+\.\d\d", out, re.M), step
    diff = re.search(r"max rel\. diff batched vs exact: dot_val (\S+),", out)
    assert diff is not None and float(diff.group(1)) < 1e-2  # bf16 round-off, not an error
    for step in ("output exact", "output 64x128"):  # ranks like the full gradient's cosines
        rho = re.search(rf"of {step}: Spearman ([+-]\d\.\d+) with the full", out)
        assert rho is not None and -1 <= float(rho.group(1)) <= 1, step
    assert re.search(r"^qwen-tiny\s+hf\s+\d+\.\d\d\s+\d", out, re.M)
    assert "qwen-tiny     vLLM: not measured (not installed, or no CUDA GPU)" in out


def test_without_a_gpu_the_real_run_refuses_in_one_line() -> None:
    proc = run(CUDA_VISIBLE_DEVICES="")  # no GPU visible, on any machine
    assert proc.returncode == 1
    assert proc.stderr == (
        f"gpu_check.sh: no CUDA GPU visible to {sys.executable} (--dry-run runs the CPU version)\n"
    )


def test_scoring_benchmark_takes_the_micro_batch_rule_with_zero() -> None:
    """--groups-per-micro 0 (GPM=0 in gpu_check.sh): the rule of select.groups_per_micro=0;
    qwen-tiny in bf16 is (2 blocks x (16 x 64 + 8 x 128) + 2 x 1,024) x 2 bytes per token,
    well within 512 MiB at 4 rollouts: the cap of 16 groups."""
    script = SCRIPT.parent / "scoring.py"
    skip = "exact per-group loop,batched, chunk=True,output exact,output 64x128"
    args = ["--sizes", "qwen-tiny", "--dtype", "bfloat16", "--problems", "4", "--rollouts", "4"]
    args += ["--val-problems", "2", "--groups-per-micro", "0", "--skip", skip]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), *args], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert ", 16 groups per micro-batch (the rule), cpu, bfloat16, " in proc.stdout
    assert re.search(r"^batched, chunk=False\s+\d+\.\d\d", proc.stdout, re.M)
    assert not re.search(r"^output exact\s", proc.stdout, re.M)  # skipped, comma and all
