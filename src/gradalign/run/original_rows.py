"""The chosen pool problems written back in their files' own schema and format.

One selected file per input format, rows in rank order (best first):

- Parquet pool files → ``OUT/selected.parquet``: the original tables' rows taken by row
  index (pyarrow ``take``), so the columns, their types (a verl ``prompt`` list of
  messages, system message included; ``reward_model``; ``extra_info``) and the schema's
  metadata are the file's own. Several Parquet pool files must share one schema;
- JSONL pool files → ``OUT/selected.jsonl``: the original lines, byte for byte;
- a built-in pool (no file) → ``OUT/selected.jsonl`` of problem records (id, prompt, answer,
  source, reward, meta), as problems.jsonl holds them.
"""

from __future__ import annotations

import dataclasses
import io
import json
from collections import defaultdict
from pathlib import Path

from gradalign.config import ConfigError
from gradalign.data.problems import Problem, ProblemError, jsonl_lines
from gradalign.storage import write_bytes


def write_selected(out: Path, chosen: list[Problem]) -> list[Path]:
    """Write `chosen` (rank order) as OUT/selected.parquet and / or OUT/selected.jsonl."""
    parquet = [p for p in chosen if "row" in p.meta]
    jsonl = [p for p in chosen if "line" in p.meta]
    builtin = [p for p in chosen if "file" not in p.meta]
    written = []
    if parquet:
        write_bytes(out / "selected.parquet", _parquet_rows(parquet))
        written.append(out / "selected.parquet")
    if jsonl or builtin:
        lines = _jsonl_lines(jsonl) if jsonl else b""
        lines += b"".join(
            json.dumps(dataclasses.asdict(p), default=str).encode() + b"\n" for p in builtin
        )
        write_bytes(out / "selected.jsonl", lines)
        written.append(out / "selected.jsonl")
    return written


def _parquet_rows(chosen: list[Problem]) -> bytes:
    """The Parquet bytes of the chosen rows of their files, in `chosen` order."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    by_file: dict[str, list[int]] = defaultdict(list)
    for p in chosen:
        by_file[p.meta["file"]].append(p.meta["row"])
    tables: list[pa.Table] = []
    start: dict[str, int] = {}
    for file, rows in by_file.items():
        try:
            table = pq.read_table(file)
        except Exception as err:
            raise ProblemError(
                f"{file}: cannot read Parquet ({' '.join(str(err).split())})"
            ) from None
        start[file] = sum(len(t) for t in tables)
        tables.append(table.take(pa.array(rows, type=pa.int64())))
    first = next(iter(by_file))
    for file, table in zip(by_file, tables):
        if not table.schema.equals(tables[0].schema, check_metadata=False):
            raise ConfigError(
                f"data.pool_files: {first} and {file} have different Parquet schemas; one "
                "selected.parquet needs one schema (score them with separate configs)"
            )
    taken = pa.concat_tables(tables)
    position = {f: iter(range(start[f], start[f] + len(r))) for f, r in by_file.items()}
    order = [next(position[p.meta["file"]]) for p in chosen]  # rank order across files
    buf = io.BytesIO()
    pq.write_table(taken.take(pa.array(order, type=pa.int64())), buf)
    return buf.getvalue()


def _jsonl_lines(chosen: list[Problem]) -> bytes:
    """The chosen problems' original lines (each ending in a newline), in `chosen` order."""
    wanted: dict[str, set[int]] = defaultdict(set)
    for p in chosen:
        wanted[p.meta["file"]].add(p.meta["line"])
    found: dict[tuple[str, int], bytes] = {}
    for file, lines in wanted.items():
        for lineno, raw in jsonl_lines(Path(file)):
            if lineno in lines and raw is not None:
                found[file, lineno] = raw if raw.endswith(b"\n") else raw + b"\n"
    return b"".join(found[p.meta["file"], p.meta["line"]] for p in chosen)
