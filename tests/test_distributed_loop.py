"""The round loop under `torchrun --nproc_per_node 2` (gloo, CPU): the ranks share out the
rollouts and the scoring, and the first round, before any training, samples, scores and
selects exactly as one process; rank 0 alone writes the run directory; a killed 2-process run
resumes to the same results."""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest
from gradalign_runs import SCORED, gradalign_run

from gradalign.storage import read_json, read_jsonl

SETTINGS = ["rounds=2", *SCORED, "rollout.prompts_per_batch=4"]  # 4 batches a chunk: 2 a rank


def launch(out: Path, cache: Path, nproc: int, kill_at: str = "") -> subprocess.CompletedProcess:
    return gradalign_run(SETTINGS, out, cache, nproc, kill_at, threads=1)


@pytest.mark.slow
def test_two_processes_sample_score_and_select_as_one(tmp_path):
    cache = tmp_path / "cache"
    one = launch(tmp_path / "one", cache, 1)
    assert one.returncode == 0, one.stdout + one.stderr
    two = launch(tmp_path / "two", cache, 2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("round 1/2:") == 1  # rank 0 alone logs

    a, b = tmp_path / "one" / "rounds" / "0001", tmp_path / "two" / "rounds" / "0001"
    assert read_jsonl(a / "rollouts.jsonl") == read_jsonl(b / "rollouts.jsonl")
    assert read_jsonl(a / "selected.jsonl") == read_jsonl(b / "selected.jsonl")
    sa, sb = read_jsonl(a / "scores.jsonl"), read_jsonl(b / "scores.jsonl")
    assert [s["id"] for s in sa] == [s["id"] for s in sb]
    for key in ("score", "dot_val", "norm"):
        x = np.array([s[key] for s in sa], dtype=float)
        y = np.array([s[key] for s in sb], dtype=float)
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7 * np.abs(x).max())
    ma, mb = read_json(a / "metrics.json"), read_json(b / "metrics.json")
    assert ma["select/fallback"] is None and ma["val/pass_rate"] > 0
    for key in ("eval/accuracy", "val/pass_rate", "select/chunk_pass_rate", "select/source_mix"):
        assert ma[key] == mb[key], key
    assert mb["train/steps"] == 2  # TRL trained both rounds under DDP
    assert len(read_json(tmp_path / "two" / "summary.json")["eval_accuracy"]) == 2
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".lock", "checkpoints", "chunks", "config.yaml", "final", "metrics.jsonl", "problems.jsonl",
        "rounds", "summary.json",
    ]  # fmt: skip


@pytest.mark.slow
def test_two_process_run_killed_and_resumed_matches_uninterrupted(tmp_path):
    cache = tmp_path / "cache"
    ref = launch(tmp_path / "ref", cache, 2)
    assert ref.returncode == 0, ref.stdout + ref.stderr
    out = tmp_path / "killed"
    killed = launch(out, cache, 2, kill_at="training:1")  # every rank dies in round 2
    assert killed.returncode != 0 and not (out / "summary.json").exists()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0001"]
    resumed = launch(out, cache, 2)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "after round 1/2 (round-0001)" in " ".join(resumed.stdout.split())
    for r in ("0001", "0002"):
        a, b = tmp_path / "ref" / "rounds" / r, out / "rounds" / r
        for name in ("selected.jsonl", "scores.jsonl", "rollouts.jsonl"):
            assert read_jsonl(a / name) == read_jsonl(b / name), (r, name)
        ma, mb = read_json(a / "metrics.json"), read_json(b / "metrics.json")
        assert {k: v for k, v in ma.items() if not k.startswith("time/")} == {
            k: v for k, v in mb.items() if not k.startswith("time/")
        }
