"""Crash safety: a run SIGKILLed anywhere and re-run with the same command ends with the same
selections, scores, metrics and weights as an uninterrupted run; damaged artifacts are
reported and redone; a locked or foreign run directory is refused with a message."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from gradalign_runs import SCORED, assert_same_run, command, gradalign_run, results
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import load_config
from gradalign.run.checkpoint import (
    KEEP,
    RunLock,
    RunLocked,
    config_differences,
    latest_checkpoint,
    read_checkpoint,
    restore,
    save_checkpoint,
)
from gradalign.storage import read_json

TINY = ["rounds=3", *SCORED]


def run_cli(out: Path, cache: Path, kill_at: str = "") -> subprocess.CompletedProcess:
    return gradalign_run(TINY, out, cache, kill_at=kill_at)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    base = tmp_path_factory.mktemp("resume")
    out, cache = base / "reference", base / "cache"
    proc = run_cli(out, cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    metrics = [read_json(out / "rounds" / f"{r + 1:04d}" / "metrics.json") for r in range(3)]
    assert all(m["select/fallback"] is None for m in metrics)  # selections made by score
    return base, out, cache


@pytest.mark.slow
def test_killed_at_every_phase_then_resumed_matches_uninterrupted_run(reference):
    base, ref, cache = reference
    out = base / "killed"
    # one process per line: killed during rollouts, scoring, training, writing the round's
    # artifacts, writing a checkpoint, and after eval; each re-run continues the last one
    for kill_at in (
        "rollouts:0",
        "training:0",
        "writing:1",
        "checkpoint.policy.pt:1",
        "scoring:2",
        "eval:2",
    ):
        proc = run_cli(out, cache, kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stdout + proc.stderr)
    assert not (out / "summary.json").exists()
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["round-0001", "round-0002"]  # round 2 was killed after its eval

    # damage what the last kill left: the newest checkpoint and the staged round
    trainer_pt = out / "checkpoints" / "round-0002" / "trainer.pt"
    trainer_pt.write_bytes(trainer_pt.read_bytes()[:100])
    staged = out / "rounds" / "0002" / "selection.json"  # the round resumed at
    staged.write_text(staged.read_text()[:40])

    proc = run_cli(out, cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    log = " ".join(proc.stdout.split())
    assert "skipping checkpoint round-0002" in log and "trainer.pt is truncated or corrupted" in log
    assert "resuming" in log and "after round 1/3 (round-0001)" in log
    assert "0002/selection.json is unusable" in log
    assert_same_run(out, ref)


@pytest.mark.slow
def test_external_sigkill_mid_run_then_resume(reference):
    base, ref, cache = reference
    out = base / "external"
    proc = subprocess.Popen(
        command(TINY, out, cache),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    while not (out / "rounds" / "0001" / "selection.json").exists() and proc.poll() is None:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    done = run_cli(out, cache)
    assert done.returncode == 0, done.stdout + done.stderr
    assert_same_run(out, ref)


@pytest.mark.slow
def test_finished_run_is_not_rerun_and_a_foreign_config_is_refused(reference):
    _, ref, cache = reference
    before = results(ref)
    proc = run_cli(ref, cache)
    assert proc.returncode == 0 and "all 3 rounds already done" in " ".join(proc.stdout.split())
    assert results(ref) == before
    res = CliRunner().invoke(
        app,
        ["run", *[f"--set={s}" for s in TINY], f"--set=out_dir={ref}", "--set=select.mode=dot"],
    )
    assert res.exit_code == 2
    text = " ".join(res.output.split())
    assert (
        "holds a run with another config (select.mode: 'sim' in the run directory, 'dot' now)"
        in text
    )
    assert "Traceback" not in res.output


def test_second_process_is_refused_with_the_holder_named(tmp_path):
    with RunLock(tmp_path):
        res = CliRunner().invoke(app, ["run", f"--set=out_dir={tmp_path}"])
        assert res.exit_code == 2
        text = " ".join(res.output.split())
        assert f"run directory: {tmp_path} is in use by pid {os.getpid()} on" in text
        assert "Traceback" not in res.output
        with pytest.raises(RunLocked, match="another out_dir"):
            RunLock(tmp_path).__enter__()
    with RunLock(tmp_path):  # released on exit
        pass


def test_lock_of_a_killed_process_is_released(tmp_path):
    code = f"from gradalign.run.checkpoint import RunLock; RunLock({str(tmp_path)!r}).__enter__(); import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == -signal.SIGKILL
    assert "pid" in (tmp_path / ".lock").read_text()  # the holder's note stays behind
    with RunLock(tmp_path):  # but not the lock
        pass


def _trained(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    model[0].bias.requires_grad_(False)  # frozen: not saved
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 / (s + 1))
    for _ in range(3):
        model(torch.randn(5, 3)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    return model, opt, sched


# the state.json fields the resume reads, as the loop writes them
STATE = {"config": {}, "initial": {"eval/accuracy": 0.25}, "history": [], "wall_s": 1.5}


def test_checkpoint_round_trip_restores_weights_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _trained(0)
    torch.manual_seed(123)
    history = [{"eval/accuracy": 0.5}]
    save_checkpoint(tmp_path, 0, model, opt, sched, STATE | {"history": history})
    expected_draw = torch.rand(3)
    ckpt = read_checkpoint(tmp_path / "checkpoints" / "round-0001")
    assert set(ckpt.policy) == {"0.weight", "1.weight", "1.bias"}
    assert ckpt.state["history"] == history

    other, opt2, sched2 = _trained(1)
    restore(ckpt, other, opt2, sched2)
    assert all(
        torch.equal(a, b) for a, b in zip(model.parameters(), other.parameters()) if a.requires_grad
    )
    assert not torch.equal(model[0].bias, other[0].bias)  # frozen parameters are not saved
    assert sched2.last_epoch == 3 and opt2.param_groups[0]["lr"] == pytest.approx(0.1 / 4)
    s1, s2 = opt.state_dict()["state"], opt2.state_dict()["state"]
    assert all(torch.equal(s1[i]["exp_avg_sq"], s2[i]["exp_avg_sq"]) for i in s1)
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where it was saved


def test_damaged_checkpoints_are_skipped_and_only_the_newest_kept(tmp_path):
    model, opt, sched = _trained(0)
    for r in range(4):
        save_checkpoint(tmp_path, r, model, opt, sched, STATE | {"wall_s": float(r)})
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert names == [f"round-{r + 1:04d}" for r in range(4 - KEEP, 4)]
    newest = tmp_path / "checkpoints" / "round-0004"
    (newest / "policy.pt").write_bytes(b"junk")
    warnings: list[str] = []
    assert latest_checkpoint(tmp_path, warnings.append).round == 2
    assert warnings == [
        f"skipping checkpoint round-0004: {newest / 'policy.pt'} is truncated or corrupted "
        "(sha256 does not match state.json); its round will be redone"
    ]
    (newest / "state.json").unlink()
    (tmp_path / "checkpoints" / "round-0003" / "state.json").write_text("{not json")
    warnings.clear()
    assert latest_checkpoint(tmp_path, warnings.append) is None
    assert "was not finished" in warnings[0] and "state.json is unreadable" in warnings[1]


def test_config_differences_ignore_out_dir_and_rounds():
    saved = {"rounds": 3, "out_dir": "a", "select": {"mode": "sim", "k": 4}, "seed": 0}
    now = {"rounds": 5, "out_dir": "b", "select": {"mode": "dot", "k": 4}, "seed": 0}
    assert config_differences(saved, now) == ["select.mode: 'sim' in the run directory, 'dot' now"]
    assert config_differences(saved, saved | {"rounds": 9}) == []


def test_a_run_saved_before_the_validation_files_rename_still_resumes():
    files = {
        "pool_files": [{"path": "pool.jsonl"}],
        "eval_files": [{"path": "eval.jsonl"}],
    }
    spec = [{"path": "val.jsonl", "reward": "exact"}]
    now = load_config(None, []).to_dict()
    now["data"] |= files | {"validation_files": spec, "val_files": []}
    saved = {**now, "data": {k: v for k, v in now["data"].items() if k != "validation_files"}}
    saved["data"]["val_files"] = spec  # what an older version wrote
    assert config_differences(saved, now) == []
    other = {**saved, "data": {**saved["data"], "val_files": [{"path": "other.jsonl"}]}}
    assert config_differences(other, now) == [
        f"data.validation_files: {[{'path': 'other.jsonl'}]!r} in the run directory, {spec!r} now"
    ]


def test_damaged_warm_start_cache_is_retrained(tmp_path):
    from gradalign.engine.warmstart import load_or_warmstart

    args = ("tiny", ["addition"], 3, 1e-3, 4, 0, set(), str(tmp_path))
    logs: list[str] = []
    model, _ = load_or_warmstart(*args, log=logs.append)
    (cached,) = tmp_path.glob("warmstart-tiny-*")
    weights = cached / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    again, _ = load_or_warmstart(*args, log=logs.append)
    assert any(f"cached warm start {cached} is unreadable" in m for m in logs)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    assert load_or_warmstart(*args, log=logs.append)[0] is not None
    assert logs[-1] == f"warm start: loaded from cache {cached}"


@pytest.mark.slow
def test_successive_halving_killed_mid_round_then_resumed_matches_uninterrupted_run(
    reference, tmp_path
):
    """select.budget=halving: both stages' rollouts are seeded by (seed, round, stream), so
    a round redone after a kill during its rollouts or its scoring samples the same."""
    halving = [*TINY, "select.budget=halving", "select.k_r0=2"]
    cache = reference[2]  # its warm start
    ref, out = tmp_path / "reference", tmp_path / "killed"
    assert gradalign_run(halving, ref, cache).returncode == 0
    for kill_at in ("rollouts:1", "scoring:2"):
        proc = gradalign_run(halving, out, cache, kill_at=kill_at)
        assert proc.returncode == -signal.SIGKILL, (kill_at, proc.stdout + proc.stderr)
    proc = gradalign_run(halving, out, cache)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert_same_run(out, ref)
    metrics = [read_json(d / "metrics.json") for d in sorted((ref / "rounds").iterdir())]
    assert len(metrics) == 3 and all(0 < m["select/stopped_frac"] < 1 for m in metrics)
    assert all(m["rollouts/candidates"] < 16 * 4 for m in metrics)  # chunk 16 x k_r 4
