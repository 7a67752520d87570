"""Loading public problem files (JSONL / Parquet) into a pool of `Problem`s.

Two record schemas are read, field by field:

- verl / reference: ``prompt`` is a list of chat messages, kept whole in
  ``Problem.messages`` (system message included; the last ``user`` message's content is
  ``Problem.prompt``, the text a ``template`` wraps), the answer is
  ``reward_model.ground_truth``, the source ``data_source``;
- plain: the prompt is ``question`` or ``problem`` (or a string ``prompt``), the answer
  ``answer``.

Answers go through an extractor: ``gsm8k`` takes the number after the last ``####`` (thousands
commas dropped), ``boxed`` the last ``\\boxed{}`` (MATH ``solution``), ``plain`` the value as it
is (JSON numbers as written, integral floats such as AMC's ``27.0`` as ``27``); ``auto`` picks
``gsm8k`` for text with ``####``, ``boxed`` for text with ``\\boxed``, else ``plain``.

`load_files` mixes several files: ids run from ``first_id`` in load order (files in the given
order, records in file order); repeated prompts are dropped, first kept, and counted; every
rejected record is reported with its file, line (JSONL, from 1) or row (Parquet, from 0) and
reason, never silently dropped. Each problem's ``meta`` holds its provenance: ``file``,
``line`` or ``row``, ``index`` (``extra_info.index``) and ``data_source`` when the record has
them (`problems.provenance`).

A file spec may read part of its file, so that one file feeds two sets without overlap: the
records (non-blank JSONL lines, Parquet rows, counted from 0 in file order, before any is
rejected) at positions ``offset`` .. ``offset + limit - 1``, and of those, with ``fraction``,
the records whose seeded hash of (``seed``, position) falls below ``fraction`` (``take:
first``) or not (``take: rest``): the two takes of one seed are complementary.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from gradalign.data.problems import (
    LINE_TOO_LONG,
    Problem,
    ProblemError,
    decode_json_line,
    jsonl_lines,
)
from gradalign.data.records import AnswerExtractor, extract_reference, problem_fields, read_record
from gradalign.data.rewards import RewardError, resolve_reward

__all__ = ["FileSpec", "LoadResult", "extract_reference", "load_file", "load_files", "summarise"]

Take = Literal["first", "rest"]
FileFormat = Literal["auto", "jsonl", "parquet"]

BOXED_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
_SUFFIXES: dict[str, FileFormat] = {".jsonl": "jsonl", ".parquet": "parquet"}
_SPLITS = {"train", "test", "validation", "valid", "val", "dev"}


@dataclass(frozen=True)
class FileSpec:
    """One problem file and how to read it."""

    path: Path
    format: FileFormat = "auto"  # "auto": by suffix (.jsonl, .parquet)
    prompt_field: str | None = None  # dotted path; None: "prompt", else "question", "problem"
    answer_field: str | None = None  # dotted path; None: "reward_model.ground_truth", "answer"
    answer_extractor: AnswerExtractor = "auto"  # how the answer is read from the answer field
    source: str | None = None  # source label; None: the record's data_source, else file_label
    reward: str = "math"  # reward name in rewards.REWARDS or "module:function"
    count: int | None = None  # keep a seeded sample of this many problems; None: all
    template: str | None = None  # prompt template; "{prompt}" is replaced by the prompt
    offset: int = 0  # first record position read (records counted from 0)
    limit: int | None = None  # records read from `offset`; None: to the end
    fraction: float | None = None  # seeded share of the records kept (`take`); None: all
    seed: int = 0  # seed of the `fraction` split
    take: Take = "first"  # "first": the `fraction` share; "rest": its complement

    def __post_init__(self) -> None:
        object.__setattr__(self, "path", Path(self.path))
        if self.format not in ("auto", "jsonl", "parquet"):
            raise ProblemError(f"{self.path}: format '{self.format}' is not auto, jsonl, parquet")
        if self.answer_extractor not in ("auto", "gsm8k", "boxed", "plain"):
            raise ProblemError(
                f"{self.path}: answer_extractor '{self.answer_extractor}' is not "
                "auto, gsm8k, boxed or plain"
            )
        if self.count is not None and self.count < 0:
            raise ProblemError(f"{self.path}: count ({self.count}) must be >= 0")
        if self.template is not None and "{prompt}" not in self.template:
            raise ProblemError(f"{self.path}: template has no '{{prompt}}' placeholder")
        if self.offset < 0 or (self.limit is not None and self.limit < 0):
            raise ProblemError(
                f"{self.path}: offset ({self.offset}) and limit ({self.limit}) must be >= 0"
            )
        if self.fraction is not None:
            object.__setattr__(self, "fraction", float(self.fraction))
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ProblemError(f"{self.path}: fraction ({self.fraction}) must be in [0, 1]")
        if self.take not in ("first", "rest"):
            raise ProblemError(f"{self.path}: take '{self.take}' is not first or rest")
        if self.fraction is None and self.take != "first":
            raise ProblemError(f"{self.path}: take: rest needs a fraction")

    def reads(self, position: int) -> bool:
        """Whether the record at `position` (from 0) is in this spec's slice and split."""
        if position < self.offset or (
            self.limit is not None and position >= self.offset + self.limit
        ):
            return False
        if self.fraction is None:
            return True
        first = split_hash(self.seed, position) < self.fraction
        return first if self.take == "first" else not first

    @property
    def file_label(self) -> str:
        """The file stem, or its folder's name for a split file: "gsm8k/test.jsonl" -> "gsm8k"."""
        stem = self.path.stem
        return (self.path.parent.name or stem) if stem.lower() in _SPLITS else stem

    @property
    def resolved_format(self) -> Literal["jsonl", "parquet"]:
        fmt = _SUFFIXES.get(self.path.suffix.lower()) if self.format == "auto" else self.format
        if fmt == "jsonl" or fmt == "parquet":
            return fmt
        raise ProblemError(
            f"{self.path}: cannot tell the format from suffix '{self.path.suffix}'; "
            "set format to jsonl or parquet"
        )


_MASK64 = 2**64 - 1


def split_hash(seed: int, position: int) -> float:
    """A uniform number in [0, 1) from (seed, position): splitmix64's finaliser of
    seed * 2**32 + position, so each record's side of a split needs no other record."""
    z = (seed * 2**32 + position + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) / 2**64


@dataclass(frozen=True)
class Rejection:
    """A record that was not loaded: its file, line (JSONL, from 1) or row (Parquet, from 0)."""

    file: str
    line: int | None
    row: int | None
    reason: str

    def __str__(self) -> str:
        where = (
            f"{self.file}:{self.line}" if self.line is not None else f"{self.file} row {self.row}"
        )
        return f"{where}: {self.reason}"


@dataclass(frozen=True)
class FileReport:
    """What happened to one file's records."""

    file: str
    records: int  # non-blank lines / rows read
    rejected: int
    duplicates: int  # prompts already seen in this file or an earlier one
    loaded: int  # after sampling `count`


@dataclass(frozen=True)
class LoadResult:
    """The loaded pool and everything left out of it."""

    problems: list[Problem]  # ids first_id, first_id + 1, ... in load order
    rejected: list[Rejection]  # in load order
    duplicates_dropped: int  # repeated prompts dropped (the first is kept)
    files: list[FileReport]  # one per FileSpec, in order


def _records(path: Path, fmt: str) -> Iterator[tuple[int, Any, str | None]]:
    """Yield (line or row, record, error); a record that cannot be decoded has an error."""
    if fmt == "parquet":
        yield from _parquet_records(path)
        return
    for lineno, raw in jsonl_lines(path):  # bounded lines; OSError -> ProblemError
        if raw is None:
            yield lineno, None, LINE_TOO_LONG
            continue
        decoded = decode_json_line(raw, lineno)
        if decoded is not None:
            yield lineno, *decoded


def _one_line(err: Exception) -> str:
    return " ".join(str(err).split())


def _parquet_records(path: Path) -> Iterator[tuple[int, Any, str | None]]:
    """Parquet rows from 0; a file or page that cannot be read raises ProblemError naming
    the first row not read."""
    import pyarrow.parquet as pq

    try:
        batches = pq.ParquetFile(path).iter_batches(batch_size=4096)
    except Exception as err:
        raise ProblemError(f"{path}: cannot read Parquet ({_one_line(err)})") from err
    row = 0
    while True:
        try:
            batch = next(batches, None)
        except Exception as err:
            raise ProblemError(f"{path} row {row}: cannot read Parquet ({_one_line(err)})") from err
        if batch is None:
            return
        for rec in batch.to_pylist():
            yield row, rec, None
            row += 1


def _load_file(
    spec: FileSpec, seen: set[str], strict: bool, rng: np.random.Generator
) -> tuple[list[tuple[str, dict[str, Any]]], list[Rejection], FileReport]:
    fmt = spec.resolved_format
    if not spec.path.is_file():
        raise ProblemError(
            f"{spec.path}: " + ("not a file" if spec.path.exists() else "no such file")
        )
    name = str(spec.path)
    kept: list[tuple[str, dict[str, Any]]] = []  # (raw prompt, Problem fields)
    rejected: list[Rejection] = []
    records = duplicates = total = 0
    for position, (pos, rec, error) in enumerate(_records(spec.path, fmt)):
        total = position + 1
        if not spec.reads(position):
            continue
        records += 1
        try:
            if error is not None:
                raise ValueError(error)
            record = read_record(rec, spec, spec.file_label)
        except ValueError as err:
            rej = Rejection(
                name, pos if fmt == "jsonl" else None, pos if fmt == "parquet" else None, str(err)
            )
            if strict:
                raise ProblemError(str(rej)) from None
            rejected.append(rej)
            continue
        if record.prompt in seen:
            duplicates += 1
            continue
        seen.add(record.prompt)
        kept.append((record.prompt, problem_fields(record, spec.template, name, fmt, pos)))
    if spec.offset > 0 and spec.offset >= total:
        raise ProblemError(
            f"{name}: offset {spec.offset} skipped all {total} records of the file (records "
            f"count from 0: offset must be below {total})"
        )
    if spec.count is not None:
        if spec.count > len(kept):
            raise ProblemError(
                f"{name}: count {spec.count} exceeds the {len(kept)} usable problems "
                f"({records} records, {len(rejected)} rejected, {duplicates} duplicates)"
            )
        chosen = np.sort(rng.choice(len(kept), size=spec.count, replace=False))
        for i in set(range(len(kept))) - set(chosen.tolist()):
            seen.discard(kept[i][0])  # unsampled prompts may appear in later files
        kept = [kept[i] for i in chosen]
    report = FileReport(name, records, len(rejected), duplicates, len(kept))
    return kept, rejected, report


def load_files(
    specs: list[FileSpec], seed: int = 0, first_id: int = 0, strict: bool = False
) -> LoadResult:
    """Load and mix problem files.

    Ids run from `first_id` in load order (files in `specs` order, records in file order; a
    sampled file keeps its file order). A prompt seen before (in this file or a kept problem of
    an earlier one; compared exactly, before the template) is dropped and counted. A file's
    `count` sample uses a generator seeded by (`seed`, file position). `strict` raises
    ProblemError at the first rejected record instead of reporting it.
    """
    for spec in specs:
        try:
            resolve_reward(spec.reward)
        except RewardError as err:
            raise ProblemError(f"{spec.path}: reward: {err}") from err
    problems: list[Problem] = []
    rejected: list[Rejection] = []
    reports: list[FileReport] = []
    seen: set[str] = set()
    for position, spec in enumerate(specs):
        rng = np.random.default_rng([seed, position])
        kept, file_rejected, report = _load_file(spec, seen, strict, rng)
        for _, fields in kept:
            pid = first_id + len(problems)
            problems.append(Problem(id=pid, reward=spec.reward, **fields))
        rejected.extend(file_rejected)
        reports.append(report)
    duplicates = sum(r.duplicates for r in reports)
    return LoadResult(problems, rejected, duplicates, reports)


def load_file(spec: FileSpec, seed: int = 0, strict: bool = False) -> LoadResult:
    """`load_files` for one file."""
    return load_files([spec], seed=seed, strict=strict)


def _short(file: str) -> str:
    return "/".join(Path(file).parts[-2:])


def summarise(result: LoadResult) -> str:
    """One paragraph: problems per file and source, rejections (first few), duplicates."""
    files = "; ".join(
        f"{_short(r.file)}: {r.loaded} of {r.records} records"
        + (f", {r.rejected} rejected" if r.rejected else "")
        + (f", {r.duplicates} duplicates" if r.duplicates else "")
        for r in result.files
    )
    sources = Counter(p.source for p in result.problems)
    mix = ", ".join(f"{name} {n}" for name, n in sorted(sources.items()))
    text = (
        f"Loaded {len(result.problems)} problems from {len(result.files)} file(s) ({files}). "
        f"Sources: {mix or 'none'}. "
        f"{result.duplicates_dropped} duplicate prompt(s) dropped; "
        f"{len(result.rejected)} record(s) rejected"
    )
    if result.rejected:
        shown = "; ".join(str(r) for r in result.rejected[:3])
        more = f" and {len(result.rejected) - 3} more" if len(result.rejected) > 3 else ""
        text += f": {shown}{more}"
    return text + "."
