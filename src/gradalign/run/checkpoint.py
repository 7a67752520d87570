"""Crash-safe runs: a lock on the run directory, round checkpoints and resume.

A run directory is written by one process at a time: `RunLock` holds an exclusive `flock`
on `OUT/.lock` (released by the kernel if the process dies, so a killed run never leaves a
stale lock) and records the holder's pid, host and start time for the message a second
process gets.

After every round the loop writes `checkpoints/round-NNNN/` (NNNN = the round's number,
from 1; `round_base`): `policy.pt` (the trainable
parameters: all of them, or the LoRA adapter), `trainer.pt` (optimizer and LR-scheduler
states, RNG states) and, last, `state.json` (the config, eval history, wall time, the round
— the position in the pool, whose chunks `chunks/manifest.json` lists — and the sha256 of
the two other files). `state.json` is the commit mark: a checkpoint without it,
or whose files do not match their hashes, is reported and skipped, and the run resumes from
the newest checkpoint that verifies, redoing the rounds after it. The last `KEEP`
checkpoints are kept, so one damaged checkpoint costs one round.

`crash_point(name, round)` is a fault-injection point for the kill-and-resume tests: with
`GRADALIGN_KILL_AT=name:round` in the environment, the process SIGKILLs itself there.
"""

from __future__ import annotations

import datetime
import fcntl
import hashlib
import io
import json
import os
import random
import shutil
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import numpy as np
import torch

from gradalign import ranks
from gradalign.config import (
    RESUMABLE_FIELDS,
    Config,
    differing_fields,
    flatten_config,
    upgrade_saved,
)
from gradalign.run.sharded_state import load_full_state
from gradalign.scoring import sharded
from gradalign.storage import StorageError, write_bytes, write_json

KEEP = 2  # checkpoints kept: a damaged newest one falls back to the one before
KILL_ENV = "GRADALIGN_KILL_AT"


class RunLocked(RuntimeError):
    """Another process holds the run directory."""


class ResumeError(RuntimeError):
    """The run directory cannot be continued with this config."""


T = TypeVar("T")


def from_main(fn: Callable[[], T]) -> T:
    """`fn()` on rank 0 (it takes the run directory), its result broadcast to every rank. A
    refusal (locked run directory, other config, storage) is raised on every rank, so none
    waits for the others."""
    value, error = None, None
    if ranks.is_main():
        try:
            value = fn()
        except (RunLocked, ResumeError, StorageError) as err:
            error = err
    value, error = ranks.broadcast_object((value, error))
    if error is not None:
        raise error
    return cast(T, value)  # fn's result: it returned, nothing raised


def crash_point(name: str, round_: int) -> None:
    """SIGKILL this process when GRADALIGN_KILL_AT is `name:round` (kill-and-resume tests)."""
    if os.environ.get(KILL_ENV) == f"{name}:{round_}":
        os.kill(os.getpid(), signal.SIGKILL)


class RunLock:
    """Exclusive lock on a run directory for the life of a run (`with RunLock(out): ...`)."""

    def __init__(self, out: Path) -> None:
        self.path = Path(out) / ".lock"
        self._fd: int | None = None

    def __enter__(self) -> RunLock:
        out = self.path.parent
        if out.exists() and not out.is_dir():
            raise StorageError(f"out_dir {out} is a file, not a directory; choose another out_dir")
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise StorageError.of("create the run directory", out, err) from None
        if self.path.is_dir():
            raise StorageError(
                f"the lock file {self.path} is a directory; remove it (a run creates its "
                ".lock file itself)"
            )
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            raise StorageError.of("open the lock file", self.path, err) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise RunLocked(
                f"{self.path.parent} is in use by {holder}; wait for that run "
                "to finish, or give this one another out_dir"
            ) from None
        except OSError as err:  # e.g. ENOLCK: the file system cannot lock
            os.close(fd)
            raise StorageError.of("lock", self.path, err) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        try:
            os.ftruncate(fd, 0)
            os.pwrite(
                fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0
            )
        except OSError as err:
            os.close(fd)  # closing drops the lock
            raise StorageError.of("write the lock file", self.path, err) from None
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


# ------------------------------------------------------------------ state to save


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The parameters training changes: all of them, or only a LoRA adapter's."""
    return {n: p.detach().cpu() for n, p in model.named_parameters() if p.requires_grad}


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _torch_bytes(obj: Any) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@dataclass
class Checkpoint:
    """A verified checkpoint read back from disk."""

    path: Path
    round: int  # the last completed round
    state: dict[str, Any]  # state.json: config, initial, history, wall_s
    policy: dict[str, torch.Tensor]
    trainer: dict[str, Any]  # optimizer, scheduler, rng


def round_base(out: Path) -> int:
    """The number of a run directory's first round in its names: 1 (rounds/0001 holds round
    1, as the console and metrics.jsonl count), or 0 for a run directory written before
    names counted from 1 (it has rounds/0000), which keeps its names when resumed."""
    return 0 if (Path(out) / "rounds" / "0000").is_dir() else 1


def round_dir(out: Path, round_: int) -> Path:
    """rounds/NNNN/ of the 0-based round index `round_`."""
    return Path(out) / "rounds" / f"{round_ + round_base(out):04d}"


def checkpoint_dir(out: Path, round_: int) -> Path:
    """checkpoints/round-NNNN/: the checkpoint after the 0-based round index `round_`."""
    return Path(out) / "checkpoints" / f"round-{round_ + round_base(out):04d}"


def save_checkpoint(
    out: Path,
    round_: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
    whole: tuple[dict, dict] | None = None,
) -> Path:
    """Write checkpoints/round-NNNN/ (state.json last, with the other files' hashes) and
    drop all but the newest KEEP checkpoints. `whole`: an FSDP-sharded model's weights and
    optimizer state gathered whole (`sharded_state.full_state`)."""
    path = checkpoint_dir(out, round_)
    weights, optim = whole or (trainable_state(model), optimizer.state_dict())
    files = {
        "policy.pt": _torch_bytes(weights),
        "trainer.pt": _torch_bytes(
            {
                "optimizer": optim,
                "scheduler": scheduler.state_dict(),
                "rng": rng_state(),
            }
        ),
    }
    for name, data in files.items():
        write_bytes(path / name, data)
        crash_point(f"checkpoint.{name}", round_)
    write_json(
        path / "state.json",
        state | {"round": round_, "sha256": {n: _sha256(d) for n, d in files.items()}},
    )
    for old in sorted((Path(out) / "checkpoints").glob("round-*"))[:-KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return path


_FILES = ("policy.pt", "trainer.pt")


def _check_state(state: Any, path: Path) -> int:
    """The round of a decoded state.json, after checking the shape of every field the
    resume reads; ValueError names the field and what it holds instead."""

    def wrong(name: str, want: str, value: Any) -> ValueError:
        return ValueError(f"field '{name}' should be {want}, got {repr(value)[:60]}")

    if not isinstance(state, dict):
        raise wrong("(top level)", "an object", state)
    missing = [
        k for k in ("round", "sha256", "config", "initial", "history", "wall_s") if k not in state
    ]
    if missing:
        raise ValueError(f"field '{missing[0]}' is missing")
    round_, hashes = state["round"], state["sha256"]
    if isinstance(round_, bool) or not isinstance(round_, int) or round_ < 0:
        raise wrong("round", "a round number >= 0", round_)
    if path.name != checkpoint_dir(path.parent.parent, round_).name:
        raise ValueError(f"field 'round' is {round_}, but the checkpoint is {path.name}")
    if not isinstance(hashes, dict) or not all(isinstance(hashes.get(n), str) for n in _FILES):
        raise wrong("sha256", "an object of the sha256 of policy.pt and trainer.pt", hashes)
    for name in ("config", "initial"):
        if not isinstance(state[name], dict):
            raise wrong(name, "an object", state[name])
    history = state["history"]
    if not isinstance(history, list) or not all(isinstance(m, dict) for m in history):
        raise wrong("history", "a list of metrics objects", history)
    for i, m in enumerate([state["initial"], *history]):
        acc = m.get("eval/accuracy")
        if isinstance(acc, bool) or not isinstance(acc, (int, float)):
            where = "initial" if i == 0 else f"history[{i - 1}]"
            raise wrong(f"{where}.eval/accuracy", "a number", acc)
    if isinstance(state["wall_s"], bool) or not isinstance(state["wall_s"], (int, float)):
        raise wrong("wall_s", "a number", state["wall_s"])
    return round_


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; ValueError names the file and what is wrong (missing,
    unreadable, a field of the wrong type, a hash that does not match)."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise ValueError(f"{state_file} is missing (the checkpoint was not finished)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        round_ = _check_state(state, path)
    except OSError as err:
        raise ValueError(f"{state_file} cannot be read ({err.strerror})") from None
    except (ValueError, RecursionError) as err:
        raise ValueError(f"{state_file} is unreadable ({err})") from None
    loaded = {}
    for name in _FILES:
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing")
        try:
            data = f.read_bytes()
        except OSError as err:
            raise ValueError(f"{f} cannot be read ({err.strerror})") from None
        if _sha256(data) != state["sha256"][name]:
            raise ValueError(f"{f} is truncated or corrupted (sha256 does not match state.json)")
        try:  # policy.pt holds only tensors; trainer.pt also numpy / python RNG states
            loaded[name] = torch.load(io.BytesIO(data), weights_only=name == "policy.pt")
        except Exception as err:
            raise ValueError(f"{f} cannot be loaded ({type(err).__name__})") from None
    policy, trainer = loaded["policy.pt"], loaded["trainer.pt"]
    if not isinstance(policy, dict) or not all(
        isinstance(t, torch.Tensor) for t in policy.values()
    ):
        raise ValueError(f"{path / 'policy.pt'} does not hold a mapping of tensors")
    if not isinstance(trainer, dict) or not {"optimizer", "scheduler", "rng"} <= set(trainer):
        raise ValueError(f"{path / 'trainer.pt'} lacks the optimizer, scheduler or rng state")
    return Checkpoint(path, round_, state, policy, trainer)


def latest_checkpoint(out: Path, warn) -> Checkpoint | None:
    """The newest checkpoint that verifies; damaged newer ones are reported through `warn`."""
    for path in sorted((Path(out) / "checkpoints").glob("round-*"), reverse=True):
        try:
            return read_checkpoint(path)
        except ValueError as err:
            warn(f"skipping checkpoint {path.name}: {err}; its round will be redone")
    return None


def restore(ckpt: Checkpoint, model: torch.nn.Module, optimizer, scheduler) -> None:
    """Load a checkpoint's parameters, optimizer, scheduler and RNG states in place."""
    if sharded.is_sharded(model):  # train.fsdp: each rank keeps its shard of the whole state
        load_full_state(model, ckpt.policy, optimizer, ckpt.trainer["optimizer"])
    else:
        load_weights(ckpt, model)
        optimizer.load_state_dict(ckpt.trainer["optimizer"])
    scheduler.load_state_dict(ckpt.trainer["scheduler"])
    set_rng_state(ckpt.trainer["rng"])


def load_weights(ckpt: Checkpoint, model: torch.nn.Module) -> None:
    """Copy a checkpoint's trainable parameters into `model` (ResumeError if they do not fit)."""
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(ckpt.policy) != expected:
        missing, extra = sorted(expected - set(ckpt.policy)), sorted(set(ckpt.policy) - expected)
        raise ResumeError(
            f"{ckpt.path / 'policy.pt'} does not fit this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    params = dict(model.named_parameters())
    for name, value in ckpt.policy.items():
        if value.shape != params[name].shape:
            raise ResumeError(
                f"{ckpt.path / 'policy.pt'} does not fit this model ({name} has shape "
                f"{tuple(value.shape)} there, {tuple(params[name].shape)} here)"
            )
    with torch.no_grad():
        for name, value in ckpt.policy.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields whose values differ, one line each (`config.RESUMABLE_FIELDS` ignored).
    A field the saved config lacks (a run directory older than the field) counts as equal
    when the current value is the field's default, which is what that run used."""
    absent = object()
    diffs = differing_fields([upgrade_saved(saved), current], RESUMABLE_FIELDS, absent=absent)
    defaults = flatten_config(json.loads(json.dumps(Config().to_dict())))
    return [
        f"{name}: {a!r} in the run directory, {b!r} now"
        for name, (a, b) in diffs.items()
        if not (a is absent and name in defaults and b == defaults[name])
    ]
