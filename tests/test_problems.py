"""problems: JSONL records with file:line errors, chunk schedule, set disjointness."""

from __future__ import annotations

import json

import numpy as np
import pytest
from problem_records import read_problems

from gradalign.data.problems import (
    ChunkSchedule,
    Problem,
    ProblemError,
    check_disjoint,
)


def rec(id_=1, **kw):
    r = {"id": id_, "prompt": f"p{id_}", "answer": "a", "source": "s"}
    r.update(kw)
    return r


def write_lines(path, lines: list[str | bytes]) -> None:
    raw = [ln if isinstance(ln, bytes) else ln.encode("utf-8") for ln in lines]
    path.write_bytes(b"\n".join(raw) + b"\n")


def test_read_problems_reads_records_and_skips_blank_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    write_lines(
        path,
        [
            json.dumps(rec(3, prompt="2+2?", answer="4", source="addition")),
            "",
            json.dumps(rec(1, reward="math", meta={"corruption": "coinflip"})),
        ],
    )
    problems = read_problems(path)
    assert problems == [Problem(3, "2+2?", "4", "addition"), Problem(1, "p1", "a", "s", "math")]
    assert problems[1].meta == {"corruption": "coinflip"}
    assert problems[0].reward == "exact"


@pytest.mark.parametrize(
    "bad,expected",
    [
        ('{"id": 1, "prompt": ', "invalid JSON"),
        ("[1, 2]", "expected a JSON object, got list"),
        (json.dumps({"id": 1, "prompt": "x", "source": "s"}), "missing field 'answer'"),
        (json.dumps(rec("7")), "field 'id' must be an integer, got '7'"),
        (json.dumps(rec(True)), "field 'id' must be an integer, got True"),
        (json.dumps(rec(7, answer=4)), "field 'answer' must be a string, got 4"),
        (json.dumps(rec(7, source=None)), "field 'source' must be a string"),
        (json.dumps(rec(7, prompt="  \n ")), "field 'prompt' is empty"),
        (json.dumps(rec(7, reward=1)), "field 'reward' must be a string"),
        (json.dumps(rec(7, meta=[1])), "field 'meta' must be an object"),
        (b'{"id": 7, "prompt": "\xff\xfe", "answer": "a", "source": "s"}', "invalid UTF-8"),
    ],
)
def test_bad_record_names_file_line_and_field(tmp_path, bad, expected):
    path = tmp_path / "pool.jsonl"
    write_lines(path, [json.dumps(rec(1)), "", bad, json.dumps(rec(2))])
    with pytest.raises(ProblemError) as err:
        read_problems(path)
    assert f"{path}:3: " in str(err.value)  # blank line 2 still counts
    assert expected in str(err.value)


def test_duplicate_id_names_both_lines(tmp_path):
    path = tmp_path / "pool.jsonl"
    write_lines(path, [json.dumps(rec(5)), json.dumps(rec(6)), json.dumps(rec(5, prompt="q"))])
    with pytest.raises(ProblemError, match="duplicate id 5 \\(first seen on line 1\\)") as err:
        read_problems(path)
    assert f"{path}:3: " in str(err.value)


def test_chunks_of_a_pass_are_disjoint_and_cover_the_pool():
    sched = ChunkSchedule(pool_size=96, chunk_size=32, seed=7)
    assert sched.chunks_per_pass == 3
    chunks = [sched.chunk(r) for r in range(3)]
    assert all(len(c) == 32 for c in chunks)
    assert sorted(np.concatenate(chunks).tolist()) == list(range(96))  # disjoint and covering


def test_a_partial_last_chunk_is_dropped_not_spanning_passes():
    sched = ChunkSchedule(pool_size=100, chunk_size=32, seed=0)
    assert sched.chunks_per_pass == 3
    positions = np.concatenate([sched.chunk(r) for r in range(3)]).tolist()
    assert len(set(positions)) == 96 and set(positions) <= set(range(100))
    assert len(sched.chunk(3)) == 32


def test_chunks_cycle_to_a_new_permutation_each_pass():
    sched = ChunkSchedule(pool_size=96, chunk_size=32, seed=7)
    pass0 = np.concatenate([sched.chunk(r) for r in range(3)])
    pass1 = np.concatenate([sched.chunk(r) for r in range(3, 6)])
    pass2 = np.concatenate([sched.chunk(r) for r in range(6, 9)])
    assert sorted(pass1.tolist()) == list(range(96))
    assert not np.array_equal(pass0, pass1) and not np.array_equal(pass1, pass2)
    # documented contract (resumable from the manifest): pass e uses rng(seed + e)
    perm1 = np.random.default_rng(7 + 1).permutation(96)
    assert sched.chunk(4).tolist() == perm1[32:64].tolist()


def test_chunks_are_deterministic_by_seed():
    a, b = ChunkSchedule(50, 10, seed=3), ChunkSchedule(50, 10, seed=3)
    assert all(np.array_equal(a.chunk(r), b.chunk(r)) for r in range(12))
    assert not np.array_equal(a.chunk(0), ChunkSchedule(50, 10, seed=4).chunk(0))
    manifest = a.manifest(6)  # the first pass is listed; later rounds follow its rule
    assert manifest["shuffle_seed"] == 3 and manifest["chunks_per_pass"] == 5
    assert manifest["chunks"] == [a.chunk(r).tolist() for r in range(5)]
    assert a.manifest(2)["chunks"] == [a.chunk(r).tolist() for r in range(2)]
    assert a.manifest(10**12)["chunks"] == manifest["chunks"]  # not one list per round


def test_check_disjoint_raises_on_shared_prompts():
    val = [Problem(1, "1+1", "2", "addition"), Problem(2, "2+2", "4", "addition")]
    ev = [Problem(10, "3+3", "6", "addition"), Problem(11, "2+2", "4", "addition")]
    with pytest.raises(ProblemError, match="validation and eval sets share 1 prompt.*'2\\+2'"):
        check_disjoint(val, ev, ("validation", "eval"))
    check_disjoint(val, ev[:1], ("validation", "eval"))  # no error when disjoint
