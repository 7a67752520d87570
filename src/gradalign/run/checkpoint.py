"""Crash-safe runs: a lock on the run directory, round checkpoints and resume.

A run directory is written by one process at a time: `RunLock` holds an exclusive `flock`
on `OUT/.lock` (released by the kernel if the process dies, so a killed run never leaves a
stale lock) and records the holder's pid, host and start time for the message a second
process gets.

After every round the loop writes `checkpoints/round-NNNN/`: `policy.pt` (the trainable
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gradalign.config import RESUMABLE_FIELDS, differing_fields
from gradalign.rundir import write_bytes, write_json

KEEP = 2  # checkpoints kept: a damaged newest one falls back to the one before
KILL_ENV = "GRADALIGN_KILL_AT"


class RunLocked(RuntimeError):
    """Another process holds the run directory."""


class ResumeError(RuntimeError):
    """The run directory cannot be continued with this config."""


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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode("utf-8", "replace").strip() or "unknown process"
            os.close(fd)
            raise RunLocked(
                f"run directory {self.path.parent} is in use by {holder}; wait for that run "
                "to finish, or give this one another out_dir"
            ) from None
        started = datetime.datetime.now().isoformat(timespec="seconds")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()} since {started}\n".encode(), 0)
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


def checkpoint_dir(out: Path, round_: int) -> Path:
    return Path(out) / "checkpoints" / f"round-{round_:04d}"


def save_checkpoint(
    out: Path,
    round_: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    state: dict[str, Any],
) -> Path:
    """Write checkpoints/round-NNNN/ (state.json last, with the other files' hashes) and
    drop all but the newest KEEP checkpoints."""
    path = checkpoint_dir(out, round_)
    files = {
        "policy.pt": _torch_bytes(trainable_state(model)),
        "trainer.pt": _torch_bytes(
            {
                "optimizer": optimizer.state_dict(),
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


def read_checkpoint(path: Path) -> Checkpoint:
    """Read and verify one checkpoint; ValueError names the file and what is wrong."""
    state_file = path / "state.json"
    if not state_file.is_file():
        raise ValueError(f"{state_file} is missing (the checkpoint was not finished)")
    try:
        state = json.loads(state_file.read_text(encoding="utf-8"))
        hashes = state["sha256"]
        round_ = int(state["round"])
    except (ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{state_file} is unreadable ({err})") from None
    loaded = {}
    for name in ("policy.pt", "trainer.pt"):
        f = path / name
        if not f.is_file():
            raise ValueError(f"{f} is missing")
        data = f.read_bytes()
        if _sha256(data) != hashes.get(name):
            raise ValueError(f"{f} is truncated or corrupted (sha256 does not match state.json)")
        # policy.pt holds only tensors; trainer.pt also numpy / python RNG states
        loaded[name] = torch.load(io.BytesIO(data), weights_only=name == "policy.pt")
    return Checkpoint(path, round_, state, loaded["policy.pt"], loaded["trainer.pt"])


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
    expected = {n for n, p in model.named_parameters() if p.requires_grad}
    if set(ckpt.policy) != expected:
        missing, extra = sorted(expected - set(ckpt.policy)), sorted(set(ckpt.policy) - expected)
        raise ResumeError(
            f"{ckpt.path / 'policy.pt'} does not fit this model "
            f"(missing {missing[:3]}, unexpected {extra[:3]})"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, value in ckpt.policy.items():
            params[name].copy_(value.to(params[name].device, params[name].dtype))
    optimizer.load_state_dict(ckpt.trainer["optimizer"])
    scheduler.load_state_dict(ckpt.trainer["scheduler"])
    set_rng_state(ckpt.trainer["rng"])


def config_differences(saved: dict[str, Any], current: dict[str, Any]) -> list[str]:
    """The fields whose values differ, one line each (`config.RESUMABLE_FIELDS` ignored)."""
    diffs = differing_fields([saved, current], RESUMABLE_FIELDS)
    return [f"{name}: {a!r} in the run directory, {b!r} now" for name, (a, b) in diffs.items()]
