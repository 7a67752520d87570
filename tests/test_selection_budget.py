"""`benchmarks/selection_budget.py`, run as a user would on a small setting: its two tables,
the exact rollout counts and ratios of a strategy, and an unknown strategy refused."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from gradalign_runs import SCORED

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_budget.py"


def bench(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    sets = [*SCORED, "data.regime=noisy", f"model.cache_dir={tmp_path / 'cache'}"]
    cmd = [sys.executable, str(SCRIPT), "--out", str(tmp_path / "runs"), *args]
    cmd += [a for s in sets for a in ("--set", s)]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path)


def row(out: str, table: str, name: str) -> list[str]:
    part = out.split(f"== {table}")[1].split("\n\n")[0]
    line = next(x for x in part.splitlines() if x.startswith(f"{name}  "))
    return re.findall(r"[-+]?\d+\.\d+|[-+]?\d+|-(?=\s|$)", line[len(name) :])


@pytest.mark.slow
def test_budget_bench_prints_both_tables_with_exact_rollout_counts(tmp_path) -> None:
    got = bench(
        tmp_path, "--seeds", "1", "--chunks", "1", "--rounds", "1", "--strategies",
        "k_v=4,halving k_r0=2",
    )  # fmt: skip
    assert got.returncode == 0, got.stdout + got.stderr
    out = got.stdout
    # full: 16 candidates x k_r 4 + 12 validation problems x k_v 8 = 160 rollouts
    full = row(out, "starting policy", "full")
    assert full[0] == "160" and full[-1] == "1.00"
    kv4 = row(out, "starting policy", "k_v=4")
    assert kv4[0] == "112" and kv4[-1] == "0.70"  # 16 x 4 + 12 x 4
    resampled = row(out, "starting policy", "full (resampled)")
    assert resampled[0] == "160"
    overlap = out.split("== starting policy")[1]
    assert re.search(r"^full\s+160\s+\S+\s+\S+\s+\S+\s+1\.000\s", overlap, re.M)  # itself
    halving = row(out, "starting policy", "halving k_r0=2")
    assert 16 * 2 + 96 <= int(halving[0]) <= 160  # every candidate 2, survivors 2 more
    trained = row(out, "training", "k_v=4")
    assert trained[0] == "112" and trained[-1] == "0.70"
    assert (tmp_path / "runs" / "k_v=4" / "seed0" / "rounds" / "0001").is_dir()
    assert "benchmark wall time" in out


def test_an_unknown_strategy_is_refused_with_the_known_ones(tmp_path) -> None:
    got = bench(tmp_path, "--strategies", "k_r=5")
    assert got.returncode == 2
    assert "unknown strategies ['k_r=5'] (known: full, halving k_r0=2," in got.stderr
