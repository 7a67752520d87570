"""Problems, their JSON records, and the chunking of a pool into rounds.

A *problem* is one prompt with its reference answer, a ``source`` label and a stable
integer ``id``. The *pool* is the list of candidate training problems; a *chunk* is the
``chunk_size`` pool problems scored in one round. Chunks cycle through a seeded shuffle of
the pool (one permutation per pass).
"""

from __future__ import annotations

import errno
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np


class ProblemError(ValueError):
    """A problem record is malformed; the message names the file, line and field."""


MAX_LINE_BYTES = 8 * 2**20  # a JSONL line (one record) longer than 8 MiB is rejected unread


class Stream(IntEnum):
    """The random streams of a round, each seeded `round_seed(seed, round, stream)`."""

    CANDIDATES = 1  # candidate rollouts
    VALIDATION = 2  # validation rollouts
    SELECT = 3  # the draws of the sampled modes (acc, rand, the zero-gradient fallback)
    EVAL = 4  # eval rollouts
    TRAIN = 5  # the round's GRPO steps: the loop's trainer, the TRL callback's row order
    HALVING = 6  # successive halving's second-stage candidate rollouts (select.budget=halving)


def round_seed(seed: int, round_: int, stream: Stream) -> int:
    """A distinct, reproducible seed per (run seed, round, stream)."""
    return int(np.random.SeedSequence([seed, round_ + 1, int(stream)]).generate_state(1)[0])


@dataclass(frozen=True)
class Problem:
    id: int  # stable integer id, unique within a pool
    prompt: str  # user message (the chat template is applied by the policy)
    answer: str  # reference answer checked by the reward function
    source: str  # task family or data source, e.g. "addition", "countdown", "gsm8k"
    reward: str = "exact"  # name of the reward function in `gradalign.data.rewards.REWARDS`
    meta: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    # `meta` records what a regime did to the problem (e.g. {"corruption": "coinflip"}),
    # for measurement only: selection never reads it; a file's problem holds its provenance
    # there (file, line or row, index, data_source: see `provenance`).
    messages: tuple[dict[str, str], ...] | None = field(default=None, hash=False)
    # the whole chat of a file's prompt (system message included; the last user message's
    # content is `prompt`); None: the one user message `prompt`
    columns: dict[str, Any] | None = field(default=None, hash=False, compare=False)
    # a file record's fields but the prompt, as written there (TRL reward functions get them
    # as a dataset's columns); None for built-in problems

    @property
    def chat(self) -> list[dict[str, str]]:
        """The chat the policy is prompted with: `messages`, or the one user message."""
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.prompt}]


PROVENANCE = ("file", "line", "row", "index", "data_source")


def provenance(p: Problem) -> dict[str, Any]:
    """Where a problem comes from, to join scores back on the original data: ``file`` (its
    path as given), ``line`` (JSONL, from 1) or ``row`` (Parquet, from 0), ``index`` (the
    record's ``extra_info.index``) and ``data_source`` (the record's own). Keys that do not
    apply are None; a built-in problem has ``file`` None and ``data_source``
    ``"builtin:<source>"``."""
    meta = p.meta
    out = {name: meta.get(name) for name in PROVENANCE}
    if out["file"] is None and out["data_source"] is None:
        out["data_source"] = f"builtin:{p.source}"
    return out


_REQUIRED = {"id": int, "prompt": str, "answer": str, "source": str}


def problem_from_record(rec: Any, where: str) -> Problem:
    """Build a Problem from a decoded JSON record; `where` is "file:line" for messages."""
    if not isinstance(rec, dict):
        raise ProblemError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for name, typ in _REQUIRED.items():
        if name not in rec:
            raise ProblemError(f"{where}: missing field '{name}'")
        value = rec[name]
        if typ is int and (isinstance(value, bool) or not isinstance(value, int)):
            raise ProblemError(f"{where}: field 'id' must be an integer, got {value!r}")
        if typ is str and not isinstance(value, str):
            raise ProblemError(f"{where}: field '{name}' must be a string, got {value!r}")
    if not rec["prompt"].strip():
        raise ProblemError(f"{where}: field 'prompt' is empty")
    for name in ("prompt", "answer", "source"):
        try:
            rec[name].encode("utf-8")
        except UnicodeEncodeError as err:
            raise ProblemError(
                f"{where}: field '{name}' is not valid Unicode "
                f"(unpaired surrogate at character {err.start})"
            ) from None
    reward = rec.get("reward", "exact")
    if not isinstance(reward, str):
        raise ProblemError(f"{where}: field 'reward' must be a string, got {reward!r}")
    meta = rec.get("meta", {})
    if not isinstance(meta, dict):
        raise ProblemError(f"{where}: field 'meta' must be an object, got {meta!r}")
    messages = rec.get("messages")
    if messages is not None:
        if not isinstance(messages, list) or not all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in messages
        ):
            raise ProblemError(f"{where}: field 'messages' must be a list of {{role, content}}")
        messages = tuple({"role": m["role"], "content": m["content"]} for m in messages)
    return Problem(rec["id"], rec["prompt"], rec["answer"], rec["source"], reward, meta, messages)


def decode_json_line(raw: bytes, lineno: int) -> tuple[Any, str | None] | None:
    """One JSONL line: None when blank, else (record, None) or (None, why it cannot be
    decoded). A UTF-8 byte-order mark is allowed on line 1."""
    try:
        line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
    except UnicodeDecodeError as err:
        return None, f"invalid UTF-8 ({err.reason})"
    if not line.strip():
        return None
    try:
        return json.loads(line), None
    except json.JSONDecodeError as err:
        return None, f"invalid JSON ({err.msg})"
    except ValueError as err:  # e.g. an integer over Python's 4300-digit limit
        return None, f"invalid JSON ({err})"
    except RecursionError:
        return None, "invalid JSON (nested too deeply)"


def jsonl_lines(path: Path) -> Iterator[tuple[int, bytes | None]]:
    """(line number from 1, raw bytes) of each line of a JSONL file, in bounded memory: a
    line over MAX_LINE_BYTES (newline not counted) yields None, its bytes skipped in
    64 KiB pieces and never held whole. An OSError while opening or reading (EIO,
    EACCES) raises ProblemError naming the file and the line."""
    lineno = 0
    try:
        with open(path, "rb") as fh:
            while raw := fh.readline(MAX_LINE_BYTES + 1):
                lineno += 1
                if len(raw) <= MAX_LINE_BYTES or raw.endswith(b"\n"):
                    yield lineno, raw
                    continue
                del raw  # the rest of the over-long line is read in small pieces and dropped
                while (piece := fh.readline(2**16)) and not piece.endswith(b"\n"):
                    pass
                yield lineno, None
    except OSError as err:
        where = f"{path}:{lineno + 1}" if lineno else str(path)
        code = errno.errorcode.get(err.errno or 0, "")
        raise ProblemError(f"{where}: cannot read ({err.strerror or err} [{code}])") from None


LINE_TOO_LONG = f"line longer than {MAX_LINE_BYTES // 2**20} MiB (MAX_LINE_BYTES); not read"


def check_disjoint(a: list[Problem], b: list[Problem], names: tuple[str, str]) -> None:
    """Raise if two problem sets share a prompt (e.g. validation and eval sets)."""
    shared = {p.prompt for p in a} & {p.prompt for p in b}
    if shared:
        example = sorted(shared)[0]
        raise ProblemError(
            f"the {names[0]} and {names[1]} sets share {len(shared)} prompt(s), e.g. {example!r}"
        )


@dataclass(frozen=True)
class ChunkSchedule:
    """Chunks of `chunk_size` problems cycling through seeded shuffles of the pool.

    Pass e (0, 1, ...) uses permutation `rng(seed + e)` of the pool; a chunk never spans
    two passes, so a pool of 100 with chunk_size 32 yields 3 chunks per pass.
    """

    pool_size: int
    chunk_size: int
    seed: int

    def __post_init__(self) -> None:
        if self.chunk_size < 1:
            raise ProblemError(f"chunk_size must be >= 1, got {self.chunk_size}")
        if self.chunk_size > self.pool_size:
            raise ProblemError(
                f"chunk_size ({self.chunk_size}) exceeds the pool's {self.pool_size} problems"
            )

    @property
    def chunks_per_pass(self) -> int:
        return self.pool_size // self.chunk_size

    def chunk(self, r: int) -> np.ndarray:
        """Pool positions of chunk r (round r). # [chunk_size]"""
        per_pass = self.chunks_per_pass
        epoch, j = divmod(r, per_pass)
        perm = np.random.default_rng(self.seed + epoch).permutation(self.pool_size)
        return perm[j * self.chunk_size : (j + 1) * self.chunk_size]

    def manifest(self, rounds: int) -> dict[str, Any]:
        """The schedule's rule and the chunks of its first pass (at most `rounds` of them):
        bounded by the pool, however many rounds. Round r is chunk r % chunks_per_pass of
        pass r // chunks_per_pass, whose order is default_rng(shuffle_seed + pass)."""
        listed = min(rounds, self.chunks_per_pass)
        return {
            "pool_size": self.pool_size,
            "chunk_size": self.chunk_size,
            "shuffle_seed": self.seed,
            "chunks_per_pass": self.chunks_per_pass,
            "rule": "round r: chunk r % chunks_per_pass of pass r // chunks_per_pass, the "
            "pool positions permuted by numpy default_rng(shuffle_seed + pass)",
            "chunks": [self.chunk(r).tolist() for r in range(listed)],
        }
