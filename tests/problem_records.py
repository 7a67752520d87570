"""A JSONL problem reader for the tests of problem records (`test_problems`, `test_hostile`), and
the well-formed record line they put around the bad ones."""

from __future__ import annotations

from pathlib import Path

from gradalign.data.problems import (
    LINE_TOO_LONG,
    Problem,
    ProblemError,
    decode_json_line,
    jsonl_lines,
    problem_from_record,
)


def read_problems(path: str | Path) -> list[Problem]:
    """Problems of a JSONL file (one object per line, blank lines ignored), through the
    record functions the file loaders use: `decode_json_line`, `problem_from_record`."""
    path = Path(path)
    if not path.is_file():
        raise ProblemError(f"{path}: " + ("not a file" if path.exists() else "no such file"))
    problems: list[Problem] = []
    seen: dict[int, int] = {}
    for lineno, raw in jsonl_lines(path):  # bounded memory, as the file loaders read
        where = f"{path}:{lineno}"
        if raw is None:
            raise ProblemError(f"{where}: {LINE_TOO_LONG}")
        decoded = decode_json_line(raw, lineno)
        if decoded is None:
            continue
        rec, error = decoded
        if error is not None:
            raise ProblemError(f"{where}: {error}")
        problem = problem_from_record(rec, where)
        if problem.id in seen:
            raise ProblemError(
                f"{where}: duplicate id {problem.id} (first seen on line {seen[problem.id]})"
            )
        seen[problem.id] = lineno
        problems.append(problem)
    return problems


def good(i: int) -> bytes:
    """A well-formed JSONL record: problem i ("what is i + 1?")."""
    return b'{"question": "what is %d + 1?", "answer": "%d"}' % (i, i + 1)
