"""Small `gradalign run` settings, and runs launched as a user would (optionally under
torchrun): shared by the end-to-end, bench, resume, distributed-loop and hostile-run tests,
with the comparison of two run directories."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

from gradalign.run.checkpoint import read_checkpoint
from gradalign.storage import read_json, read_jsonl

# The round arithmetic every small test run shares: chunks of 16 with 4 selected, 2 GRPO steps
# of 2 problems x 4 completions, 4 rollouts of at most 8 tokens per candidate.
ROUND = [
    "select.chunk_size=16",
    "select.k=4",
    "train.batch_size=2",
    "train.steps_per_round=2",
    "train.num_generations=4",
    "rollout.k_r=4",
    "rollout.max_new_tokens=8",
]
SCORED = [
    *ROUND,
    "model.warmstart_steps=120",  # enough for validation passes: real scores, g_V != 0
    "model.warmstart_flaw=none",  # targets the reward accepts: a short warm start passes
    "data.families=[addition]",  # the family a short warm start already passes sometimes
    "data.pool_size=48",
    "data.val_size=12",
    "data.eval_size=12",
    "rollout.k_v=8",
]


# A 2-round run of that arithmetic on a 20-step warm start: the end-to-end, tracking and
# operating-system-fault tests' run.
TWO_ROUNDS = [
    *ROUND,
    "rounds=2",
    "model.warmstart_steps=20",  # cached after the first run
    "data.pool_size=48",
    "data.val_size=6",
    "data.eval_size=12",
    "rollout.k_v=4",
]


def command(settings: list[str], out: Path, cache: Path, nproc: int = 1) -> list[str]:
    launcher = ["-m", "gradalign.cli"]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", *launcher]  # fmt: skip
    sets = [f"--set={s}" for s in [*settings, f"out_dir={out}", f"model.cache_dir={cache}"]]
    return [sys.executable, *launcher, "run", *sets]


def gradalign_run(
    settings: list[str],
    out: Path,
    cache: Path,
    nproc: int = 1,
    kill_at: str = "",
    threads: int | None = None,
) -> subprocess.CompletedProcess:
    """Run to the end (or to the GRADALIGN_KILL_AT point); output captured."""
    env = os.environ | {"GRADALIGN_KILL_AT": kill_at}
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    cmd = command(settings, out, cache, nproc)
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


def results(out: Path) -> dict:
    """Everything a run produces that must not depend on interruptions (times excluded)."""
    rounds = {}
    for d in sorted((out / "rounds").iterdir()):
        metrics = read_json(d / "metrics.json")
        rounds[d.name] = {
            "selected": read_jsonl(d / "selected.jsonl"),
            "scores": read_jsonl(d / "scores.jsonl"),
            "rollouts": read_jsonl(d / "rollouts.jsonl"),
            "metrics": {k: v for k, v in metrics.items() if not k.startswith("time/")},
        }
    summary = read_json(out / "summary.json")
    for k in ("wall_s", "time_totals"):
        summary.pop(k)
    lines = [  # metrics.jsonl: one line per round, however often the run was resumed
        {k: v for k, v in m.items() if not k.startswith("time/")}
        for m in read_jsonl(out / "metrics.jsonl")
    ]
    assert lines == [r["metrics"] for r in rounds.values()]
    return {"rounds": rounds, "summary": summary, "metrics_lines": lines}


def final_weights(out: Path) -> dict[str, torch.Tensor]:
    return read_checkpoint(sorted((out / "checkpoints").glob("round-*"))[-1]).policy


def assert_same_run(out: Path, ref: Path) -> None:
    got, want = results(out), results(ref)
    assert got["summary"] == want["summary"]
    for name, r in want["rounds"].items():
        for key, value in r.items():
            assert got["rounds"][name][key] == value, (name, key)
    a, b = final_weights(out), final_weights(ref)
    assert a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)
