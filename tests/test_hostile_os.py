"""What the operating system and a run can throw at `gradalign run`: a run directory that is
a file, read-only or whose lock is a folder; a full disk while a checkpoint or a round's
artifacts are written; a data file that fails to read (EIO); the built-in model's device,
size, LoRA targets and scored blocks; diverged training; a user reward that exits.

Each case ends with a non-zero exit and one line naming the path (or field) and the cause,
never a traceback; what was valid stays (the user's files, earlier checkpoints), and after
a full disk the same command resumes to the uninterrupted result. Disk faults are made real
where that is simple (writes that land on /dev/full fail with the kernel's ENOSPC) and
simulated otherwise (tests run as root, whom chmod does not stop)."""

from __future__ import annotations

import builtins
import errno
import os
import tempfile
from pathlib import Path
from typing import Any

import pytest
import torch
from gradalign_runs import TWO_ROUNDS, assert_same_run
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.data import problems
from gradalign.data.files import FileSpec, load_file
from gradalign.data.rewards import RewardWarning
from gradalign.run.checkpoint import read_checkpoint
from gradalign.storage import read_json

runner = CliRunner()
LABELS = ("config error: ", "storage error: ", "training diverged: ")  # _fail's labels
TINY = TWO_ROUNDS
FULL = "No space left on device [ENOSPC]; free some space, then run the same command again: it resumes"  # fmt: skip
READ_ONLY = "make it writable, or choose another out_dir"


def gradalign(out: Path, *settings: str, config: Path | None = None) -> tuple[int, list[str], str]:
    """`gradalign run` in this process on the tiny settings: (exit code, its error lines,
    the whole output). It must end in an exit, never an uncaught exception."""
    sets = [a for s in [*TINY, *settings, f"out_dir={out}"] for a in ("--set", s)]
    res = runner.invoke(app, ["run", *([str(config)] if config else []), *sets])
    assert res.exception is None or isinstance(res.exception, SystemExit), res.exception
    assert "Traceback" not in res.output
    errors = [line for line in res.output.splitlines() if line.startswith(LABELS)]
    return res.exit_code, errors, " ".join(res.output.split())


def write_fails(monkeypatch: pytest.MonkeyPatch, target: Path, code: int = errno.ENOSPC) -> None:
    """The atomic writer's temporary file for `target` fails: ENOSPC writes go to /dev/full
    (the kernel's own error); other codes are raised when the file is created."""
    real = tempfile.mkstemp

    def mkstemp(suffix: Any = None, prefix: Any = None, dir: Any = None, text: bool = False):
        hit = dir is not None and prefix is not None and Path(dir) / prefix[1:-1] == target
        if hit and code != errno.ENOSPC:
            raise OSError(code, os.strerror(code), str(target))
        fd, name = real(suffix, prefix, dir, text)
        if hit:
            full = os.open("/dev/full", os.O_WRONLY)
            os.dup2(full, fd)
            os.close(full)
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


# --- the run directory ----------------------------------------------------------------------


def test_out_dir_that_is_a_file(tmp_path: Path) -> None:
    out = tmp_path / "results"
    out.write_text("my notes\n")
    code, errors, _ = gradalign(out)
    assert (code, errors) == (
        1,
        [f"storage error: out_dir {out} is a file, not a directory; choose another out_dir"],
    )
    assert out.read_text() == "my notes\n"


def test_out_dir_under_a_file(tmp_path: Path) -> None:
    (tmp_path / "notes").write_text("x")
    out = tmp_path / "notes" / "run"
    code, errors, _ = gradalign(out)
    assert (code, errors) == (
        1,
        [
            f"storage error: cannot create the run directory {out}: Not a directory [ENOTDIR]; "
            "a file stands where a folder is needed; remove it or choose another out_dir"
        ],
    )
    assert (tmp_path / "notes").read_text() == "x"


def test_a_lock_that_is_a_directory(tmp_path: Path) -> None:
    (tmp_path / ".lock").mkdir()
    (tmp_path / ".lock" / "keep").write_text("k")
    code, errors, _ = gradalign(tmp_path)
    assert (code, errors) == (
        1,
        [
            f"storage error: the lock file {tmp_path / '.lock'} is a directory; remove it "
            "(a run creates its .lock file itself)"
        ],
    )
    assert (tmp_path / ".lock" / "keep").read_text() == "k"


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_a_read_only_run_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, code: int
) -> None:
    real = os.open

    def open_(path: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if str(path).startswith(str(tmp_path)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise OSError(code, os.strerror(code), str(path))
        return real(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", open_)
    (tmp_path / "summary.json").write_text("{}")
    code_, errors, _ = gradalign(tmp_path)
    name = errno.errorcode[code]
    assert (code_, errors) == (
        1,
        [
            f"storage error: cannot open the lock file {tmp_path / '.lock'}: "
            f"{os.strerror(code)} [{name}]; {READ_ONLY}"
        ],
    )
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_a_run_directory_whose_files_cannot_be_created(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write_fails(monkeypatch, tmp_path / "config.yaml", errno.EACCES)
    code, errors, _ = gradalign(tmp_path)
    assert (code, errors) == (
        1,
        [
            f"storage error: cannot write {tmp_path / 'config.yaml'}: Permission denied "
            f"[EACCES]; {READ_ONLY}"
        ],
    )
    assert not (tmp_path / "config.yaml").exists() and not list(tmp_path.glob(".config*"))


def test_a_full_disk_while_the_lock_names_its_holder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    code, errors, _ = gradalign(tmp_path)
    assert (code, errors) == (
        1,
        [f"storage error: cannot write the lock file {tmp_path / '.lock'}: {FULL}"],
    )


def test_an_os_error_no_writer_names_still_names_its_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--restart removes the previous summary; the system refuses (read-only file)."""
    summary = tmp_path / "summary.json"
    summary.write_text('{"mode": "sim"}')
    real = Path.unlink

    def unlink(self: Path, missing_ok: bool = False) -> None:
        if self == summary:
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real(self, missing_ok=missing_ok)

    monkeypatch.setattr(Path, "unlink", unlink)
    res = runner.invoke(app, ["run", "--restart", "--set", f"out_dir={tmp_path}"])
    assert res.exit_code == 1 and isinstance(res.exception, SystemExit)
    assert res.output.splitlines() == [
        f"storage error: {summary}: Read-only file system [EROFS]; {READ_ONLY}"
    ]
    assert summary.read_text() == '{"mode": "sim"}'


# --- a data file that fails to read ---------------------------------------------------------


class FailingReader:
    """A binary file whose reads fail with EIO after `good` lines (a failing disk)."""

    def __init__(self, fh: Any, good: int) -> None:
        self.fh, self.left = fh, good

    def __enter__(self) -> FailingReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.fh.close()

    def readline(self, limit: int = -1) -> bytes:
        if self.left == 0:
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        self.left -= 1
        return self.fh.readline(limit)


def data_config(tmp_path: Path) -> tuple[Path, Path]:
    lines = [f'{{"question": "{i}+{i}", "answer": "{2 * i}"}}\n' for i in range(40)]
    for name, part in (("pool", lines[:24]), ("val", lines[24:32]), ("eval", lines[32:])):
        (tmp_path / f"{name}.jsonl").write_text("".join(part))
    config = tmp_path / "config.yaml"
    config.write_text(
        "data:\n"
        + "".join(
            f"  {key}: [{{path: {tmp_path / f'{n}.jsonl'}, reward: exact}}]\n"
            for n, key in (
                ("pool", "pool_files"),
                ("val", "validation_files"),
                ("eval", "eval_files"),
            )
        )
    )
    return config, tmp_path / "pool.jsonl"


@pytest.mark.parametrize(
    ("good", "where", "cause"),
    [
        (2, ":3", "Input/output error [EIO]"),
        (None, "", "Permission denied [EACCES]"),
    ],
    ids=["EIO on line 3", "EACCES on open"],
)
def test_a_data_file_that_fails_to_read(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, good: int | None, where: str, cause: str
) -> None:
    config, pool = data_config(tmp_path)
    real = builtins.open

    def open_(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        if Path(file) != pool:
            return real(file, mode, *args, **kwargs)
        if good is None:
            raise OSError(errno.EACCES, os.strerror(errno.EACCES), str(file))
        return FailingReader(real(file, mode, *args, **kwargs), good)

    monkeypatch.setattr(problems, "open", open_, raising=False)
    before = pool.read_bytes()
    code, errors, _ = gradalign(tmp_path / "run", config=config)
    assert (code, errors) == (
        2,
        [f"config error: data.pool_files: {pool}{where}: cannot read ({cause})"],
    )
    monkeypatch.undo()  # the disk recovered: every record is still there
    assert pool.read_bytes() == before and len(load_file(FileSpec(pool)).problems) == 24


# --- the built-in model is checked before it loads, as a local directory is ----------------


@pytest.mark.parametrize(
    ("settings", "gpus", "message"),
    [
        (["model.device=cuda"], 0, "model.device: 'cuda' but no CUDA GPU is visible; use cpu or auto"),
        (["model.device=auto"], 0, None),  # auto falls back to the CPU
        (["model.device=cuda:3"], 2, "model.device: 'cuda:3' but this process sees 2 CUDA GPU(s) (cuda:0 .. cuda:1)"),
        (["model.name=builtin:huge"], 0, "model.name: 'builtin:huge' is not a built-in model ('builtin:tiny', 'builtin:small'); or give a local Hugging Face model directory"),
        (["model.name=./no-such-model"], 0, "model.name: './no-such-model' is not a directory; give 'builtin:tiny', 'builtin:small' or a local Hugging Face model directory (config.json, weights, tokenizer)"),
        (["model.lora_r=4", "model.lora_targets=[qproj]"], 0, "model.lora_targets: ['qproj'] name no linear layer of the model (its linear layers: down_proj, gate_proj, k_proj, lm_head, o_proj, q_proj, up_proj, v_proj)"),
        (["select.params=last:9"], 0, "select.params: 'last:9' does not fit this model (score.params='last:9': the model has 2 blocks)"),
        (["data.families=[addition]", "data.pool_size=10000"], 0, "data.pool_size, val_size and eval_size: task family 'addition' cannot supply 10000 distinct problems in the pool partition"),
    ],
    ids=["cuda without a GPU", "auto without a GPU", "cuda:3 of 2", "unknown size", "no such directory", "LoRA targets", "last:9 of 2 blocks", "more problems than a family has"],
)  # fmt: skip
def test_the_model_and_data_settings_are_checked_before_the_run(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    settings: list[str],
    gpus: int,
    message: str | None,
) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    if message is None:
        from gradalign.run.sources import model_device

        assert model_device("auto") == "cpu"
        return
    code, errors, _ = gradalign(tmp_path, *settings)
    assert (code, errors) == (2, [f"config error: {message}"])
    assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "rounds").exists()


# --- a full disk during a run, then the same command once space is freed -------------------


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("hostile") / "reference"
    code, errors, _ = gradalign(out)
    assert (code, errors) == (0, [])
    return out


@pytest.mark.slow
@pytest.mark.parametrize(
    ("target", "resumed"),
    [
        (
            "checkpoints/round-0002/trainer.pt",
            "skipping checkpoint round-0002: {out}/checkpoints/round-0002/state.json is missing",
        ),
        ("rounds/0002/scores.jsonl", "resuming {out} after round 1/2 (round-0001)"),
        ("summary.json", "all 2 rounds already done"),
    ],
    ids=["checkpoint", "round artifacts", "summary"],
)
def test_a_full_disk_stops_the_run_and_the_same_command_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: Path, target: str, resumed: str
) -> None:
    out = tmp_path / "run"
    with monkeypatch.context() as m:
        write_fails(m, out / target)
        code, errors, _ = gradalign(out)
    assert (code, errors) == (1, [f"storage error: cannot write {out / target}: {FULL}"])
    assert not list((out / target).parent.glob(f".{(out / target).name}.*"))  # no debris
    assert read_checkpoint(out / "checkpoints" / "round-0001").round == 0  # what was done stays
    for name in ("rollouts.jsonl", "scores.jsonl", "selected.jsonl"):
        done = out / "rounds" / "0001" / name
        assert done.read_bytes() == (reference / "rounds" / "0001" / name).read_bytes()
    code, errors, log = gradalign(out)  # space freed: the same command
    assert (code, errors) == (0, []) and resumed.format(out=out) in log
    assert_same_run(out, reference)


@pytest.mark.slow
def test_a_huge_rounds_count_writes_a_bounded_manifest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """rounds=10**12 starts at once (no list of 10**12 chunks); the disk fills in round 1."""
    target = tmp_path / "rounds" / "0001" / "scores.jsonl"
    write_fails(monkeypatch, target)
    code, errors, _ = gradalign(tmp_path, "rounds=1000000000000")
    assert (code, errors) == (1, [f"storage error: cannot write {target}: {FULL}"])
    manifest = read_json(tmp_path / "chunks" / "manifest.json")
    assert manifest["chunks_per_pass"] == 3 and len(manifest["chunks"]) == 3
    assert (tmp_path / "rounds" / "0001" / "rollouts.jsonl").is_file()


# --- diverged training ---------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("lr", "steps", "message"),
    [
        (
            "1e30",
            1,
            "round 2: GRPO training diverged at step 1 of 1 with train.learning_rate=1e+30: "
            "parameter 'model.embed_tokens.weight' holds NaN or Inf; the update is not "
            "saved, and {out}/checkpoints/round-0001 (after round 1) keeps the last finite "
            "weights; lower train.learning_rate (or train.max_grad_norm) and start again "
            "with --restart",
        ),
        (
            "1e38",
            2,
            "round 1: GRPO training diverged at step 1 of 2 with train.learning_rate=1e+38: "
            "RuntimeError: value cannot be converted to type float without overflow; the "
            "update is not saved, and no checkpoint was written yet; lower "
            "train.learning_rate (or train.max_grad_norm) and start again with --restart",
        ),
    ],
    ids=["NaN weights in round 2", "overflow in round 1"],
)
def test_diverged_training_stops_naming_round_and_learning_rate(
    tmp_path: Path, lr: str, steps: int, message: str
) -> None:
    settings = [f"train.learning_rate={lr}", f"train.steps_per_round={steps}", "select.mode=rand"]
    code, errors, _ = gradalign(tmp_path, *settings)
    assert (code, errors) == (1, [f"training diverged: {message.format(out=tmp_path)}"])
    kept = sorted(p.name for p in (tmp_path / "checkpoints").glob("round-*"))
    assert kept == (["round-0001"] if lr == "1e30" else [])
    for name in kept:  # the last good checkpoint verifies and holds finite weights
        ckpt = read_checkpoint(tmp_path / "checkpoints" / name)
        assert all(bool(torch.isfinite(t).all()) for t in ckpt.policy.values())
    assert not (tmp_path / "rounds" / f"{len(kept) + 1:04d}" / "metrics.json").exists()


# --- a user reward that calls sys.exit does not end the run --------------------------------

EXITING_REWARD = """
import sys

calls = 0

def exits(problem, completion):
    global calls
    calls += 1
    if calls % 2:
        sys.exit(3)
    return float(completion.strip() == problem.answer)
"""


def test_a_reward_that_calls_sys_exit_scores_zero_and_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gradalign.data import rewards

    (tmp_path / "ga_exiting_reward.py").write_text(EXITING_REWARD)
    monkeypatch.syspath_prepend(str(tmp_path))
    config, _ = data_config(tmp_path)
    config.write_text(config.read_text().replace("exact", "ga_exiting_reward:exits"))
    settings = ["rounds=1", "model.warmstart_steps=0", "select.chunk_size=8", "select.k=2"]
    settings += [
        "rollout.k_r=2",
        "rollout.k_v=2",
        "rollout.eval_samples=0",
        "train.steps_per_round=1",
    ]
    try:
        with pytest.warns(RewardWarning) as caught:
            code, errors, _ = gradalign(tmp_path / "run", *settings, config=config)
    finally:
        rewards._USER_REWARDS.pop("ga_exiting_reward:exits", None)
        rewards._WARNED.discard("ga_exiting_reward:exits")
    assert (code, errors) == (0, [])
    assert str(caught[0].message) == (
        "4 of 8 rewards (eval) could not be computed and scored 0; first: problem "
        "2000000 (source 'eval'): reward 'ga_exiting_reward:exits' raised SystemExit (sys.exit(3))"
    )
    metrics = read_json(tmp_path / "run" / "rounds" / "0001" / "metrics.json")
    # every other call exits: 8 candidates x 2 rollouts and 8 validation problems x 2, half
    # of each bad; the eval's 8 calls, after training's, alternate too
    assert (metrics["rollouts/bad_rewards"], metrics["val/bad_rewards"]) == (8, 8)
    assert metrics["train/steps"] == 1 and metrics["eval/bad_rewards"] == 4
