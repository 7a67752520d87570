"""Hostile problem files never end in a traceback (issue 7): malformed JSONL and Parquet, empty,
missing and duplicated records, each with the message it must give (file, line or row, and why),
and the valid records around a bad one all kept and the rejection counted
(`gradalign.data.files`, `gradalign.run.sources`)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from problem_records import good, read_problems

from gradalign.config import ConfigError, config_from_dict, load_config
from gradalign.core.selection import Candidates, select
from gradalign.data.files import FileSpec, load_file, load_files, summarise
from gradalign.data.problems import ChunkSchedule, Problem, ProblemError
from gradalign.run.sources import (
    check_prompt_lengths,
    file_specs,
    load_set,
    model_context,
    sets_from_files,
)

# --- JSONL: one bad line between two good ones ----------------------------------------------

# (case, bad line, the rejection's reason after "file:2: ")
BAD_LINES = [
    ("truncated JSON", b'{"question": "q", "answer": ', "invalid JSON (Expecting value)"),
    ("JSON array", b"[1, 2]", "expected an object, got list"),
    ("JSON string", b'"just text"', "expected an object, got str"),
    ("JSON number", b"42", "expected an object, got int"),
    (
        "prompt is a number",
        b'{"question": 5, "answer": "1"}',
        "field 'question' must be a string or chat messages, got 5",
    ),
    (
        "answer is a list",
        b'{"question": "q", "answer": [1]}',
        "field 'answer' must be a string or number, got [1]",
    ),
    (
        "answer is a boolean",
        b'{"question": "q", "answer": true}',
        "field 'answer' must be a string or number, got True",
    ),
    (
        "answer is null",
        b'{"question": "q", "answer": null}',
        "field 'answer' must be a string or number, got None",
    ),
    (
        "answer is NaN",
        b'{"question": "q", "answer": NaN}',
        "field 'answer' must be a finite number, got nan",
    ),
    (
        "answer is Infinity",
        b'{"question": "q", "answer": -Infinity}',
        "field 'answer' must be a finite number, got -inf",
    ),
    (
        "missing prompt",
        b'{"answer": "1"}',
        "no prompt field (looked for 'prompt', 'question', 'problem')",
    ),
    (
        "missing answer",
        b'{"question": "q"}',
        "no answer field (looked for 'reward_model.ground_truth', 'answer')",
    ),
    ("empty prompt", b'{"question": "  \\n ", "answer": "1"}', "field 'question' is empty"),
    ("empty answer", b'{"question": "q", "answer": " "}', "field 'answer' is empty"),
    (
        "invalid UTF-8",
        b'{"question": "caf\xe9", "answer": "1"}',
        "invalid UTF-8 (invalid continuation byte)",
    ),
    (
        "unpaired surrogate",
        b'{"question": "q\\ud800", "answer": "1"}',
        "field 'question' is not valid Unicode (unpaired surrogate at character 1)",
    ),
    ("nested too deeply", b"[" * 100_000, "invalid JSON (nested too deeply)"),
    (
        "integer over 4300 digits",
        b'{"question": "q", "answer": 1' + b"0" * 5000 + b"}",
        "invalid JSON (Exceeds the limit (4300 digits) for integer string conversion",
    ),
    (
        "chat without a user message",
        b'{"prompt": [{"role": "system", "content": "s"}], "reward_model": {"ground_truth": "1"}}',
        "field 'prompt' has no user message",
    ),
    (
        "chat content not a string",
        b'{"prompt": [{"role": "user", "content": 3}], "reward_model": {"ground_truth": "1"}}',
        "field 'prompt[user].content' must be a string or chat messages, got 3",
    ),
    (
        "empty data_source",
        b'{"question": "q", "answer": "1", "data_source": ""}',
        "field 'data_source' must be a non-empty string, got ''",
    ),
    (
        "gsm8k answer without a number",
        b'{"question": "q", "answer": "so #### many"}',
        "field 'answer' has no '#### <number>' line",
    ),
    (
        "unbalanced boxed answer",
        b'{"question": "q", "answer": "\\\\boxed{1"}',
        "field 'answer' has no \\boxed{} answer",
    ),
]


@pytest.mark.parametrize(("case", "bad", "reason"), BAD_LINES, ids=[c for c, _, _ in BAD_LINES])
def test_bad_jsonl_line_is_rejected_by_line_and_its_neighbours_kept(
    tmp_path: Path, case: str, bad: bytes, reason: str
) -> None:
    path = tmp_path / "pool.jsonl"
    path.write_bytes(good(0) + b"\n" + bad + b"\n\n" + good(1) + b"\n")
    result = load_file(FileSpec(path))
    assert [p.answer for p in result.problems] == ["1", "2"]  # no silent loss
    assert [p.meta["line"] for p in result.problems] == [1, 4]
    (rej,) = result.rejected
    assert (rej.file, rej.line, rej.row) == (str(path), 2, None)
    assert str(rej).startswith(f"{path}:2: {reason}")
    report = result.files[0]
    assert (report.records, report.rejected, report.loaded) == (3, 1, 2)
    assert f"1 record(s) rejected: {path}:2: {reason}" in summarise(result)
    with pytest.raises(ProblemError, match="^" + str(path).replace(".", r"\.") + ":2: "):
        load_file(FileSpec(path), strict=True)


def test_a_leading_byte_order_mark_is_not_a_rejection(tmp_path: Path) -> None:
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + good(0) + b"\n" + good(1) + b"\n")
    result = load_file(FileSpec(path))
    assert [p.answer for p in result.problems] == ["1", "2"] and not result.rejected


def test_a_missing_named_field_is_reported_by_line(tmp_path: Path) -> None:
    path = tmp_path / "p.jsonl"
    path.write_bytes(good(0) + b"\n" + b'{"text": "q", "answer": "3"}\n')
    result = load_file(FileSpec(path, prompt_field="text"))
    assert [(p.prompt, p.meta["line"]) for p in result.problems] == [("q", 2)]
    assert [str(r) for r in result.rejected] == [f"{path}:1: missing field 'text'"]


# --- Parquet ---------------------------------------------------------------------------------


def parquet_bytes(columns: dict[str, list[Any]]) -> bytes:
    buf = io.BytesIO()
    pq.write_table(pa.table(columns), buf, compression="none", use_dictionary=False)
    return buf.getvalue()


GOOD_COLUMNS = {"question": [f"question {i}" for i in range(20)], "answer": list("0123456789") * 2}


def test_truncated_parquet_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    path.write_bytes(parquet_bytes(GOOD_COLUMNS)[:-100])
    with pytest.raises(ProblemError, match="cannot read Parquet") as err:
        load_file(FileSpec(path))
    assert str(err.value).startswith(f"{path}: cannot read Parquet (Parquet magic bytes not found")
    with pytest.raises(ConfigError) as err2:
        load_set([{"path": str(path)}], "data.pool_files", 0, 0)
    assert str(err2.value).startswith(f"data.pool_files: {path}: cannot read Parquet (")


def test_corrupt_parquet_page_names_file_and_row(tmp_path: Path) -> None:
    data = bytearray(parquet_bytes(GOOD_COLUMNS))
    data[4:44] = b"\xab" * 40  # the first data page's header
    path = tmp_path / "pool.parquet"
    path.write_bytes(bytes(data))
    with pytest.raises(ProblemError) as err:
        load_file(FileSpec(path))
    assert str(err.value).startswith(f"{path} row 0: cannot read Parquet (")
    assert "\n" not in str(err.value)


def test_text_that_is_not_parquet(tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    path.write_bytes(good(0) + b"\n")
    with pytest.raises(ProblemError, match=r"pool\.parquet: cannot read Parquet"):
        load_file(FileSpec(path))


def test_parquet_missing_a_column_rejects_every_row_by_number(tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    path.write_bytes(parquet_bytes({"question": ["a", "b"]}))
    result = load_file(FileSpec(path))
    assert not result.problems
    assert [str(r) for r in result.rejected] == [
        f"{path} row {i}: no answer field (looked for 'reward_model.ground_truth', 'answer')"
        for i in (0, 1)
    ]


def test_parquet_nulls_and_wrong_types_reject_only_their_rows(tmp_path: Path) -> None:
    path = tmp_path / "pool.parquet"
    path.write_bytes(
        parquet_bytes({"question": ["a", "b", "c", "d"], "answer": [1.0, None, 3.5, np.nan]})
    )
    result = load_file(FileSpec(path))
    assert [(p.prompt, p.answer, p.meta["row"]) for p in result.problems] == [
        ("a", "1", 0),
        ("c", "3.5", 2),
    ]
    assert [str(r) for r in result.rejected] == [
        f"{path} row 1: field 'answer' must be a string or number, got None",
        f"{path} row 3: field 'answer' must be a finite number, got nan",
    ]


# --- files, duplicates, empty sets -----------------------------------------------------------


def test_empty_missing_and_directory_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_bytes(b"")
    result = load_file(FileSpec(empty))
    assert not result.problems and result.files[0].records == 0
    with pytest.raises(ConfigError) as err:
        load_set([{"path": str(empty)}], "data.pool_files", 0, 0)
    assert str(err.value).startswith("data.pool_files: no usable problems (Loaded 0 problems")
    assert "empty.jsonl: 0 of 0 records" in str(err.value)

    missing = tmp_path / "missing.jsonl"
    with pytest.raises(ProblemError, match=f"^{missing}: no such file$"):
        load_file(FileSpec(missing))
    with pytest.raises(
        ConfigError, match=r"^data\.validation_files\[0\]\.path: .*missing\.jsonl is not a file"
    ):
        file_specs([{"path": str(missing)}], "data.validation_files")
    folder = tmp_path / "folder.jsonl"
    folder.mkdir()
    with pytest.raises(ProblemError, match="folder.jsonl: not a file$"):
        load_file(FileSpec(folder))
    with pytest.raises(ProblemError, match="missing.jsonl: no such file$"):
        read_problems(missing)


def test_duplicate_prompts_are_dropped_counted_and_reported(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_bytes(good(0) + b"\n" + good(0) + b"\n" + good(1) + b"\n")
    b.write_bytes(good(1) + b"\n" + good(2) + b"\n")
    result = load_files([FileSpec(a), FileSpec(b)])
    assert [p.id for p in result.problems] == [0, 1, 2]
    assert [p.answer for p in result.problems] == ["1", "2", "3"]
    assert result.duplicates_dropped == 2
    assert [(r.records, r.duplicates, r.loaded) for r in result.files] == [(3, 1, 2), (2, 1, 1)]
    assert "2 duplicate prompt(s) dropped" in summarise(result)


def test_duplicate_ids_name_both_lines(tmp_path: Path) -> None:
    path = tmp_path / "problems.jsonl"
    rec = b'{"id": 4, "prompt": "p%d", "answer": "a", "source": "s"}\n'
    path.write_bytes(rec % 1 + rec % 2)
    with pytest.raises(
        ProblemError, match=r"problems\.jsonl:2: duplicate id 4 \(first seen on line 1\)"
    ):
        read_problems(path)


def file_config(tmp_path: Path, pool: bytes, val: bytes, chunk_size: int = 2) -> Any:
    for name, data in (("pool", pool), ("val", val), ("eval", good(50) + b"\n" + good(51))):
        (tmp_path / f"{name}.jsonl").write_bytes(data)
    return config_from_dict(
        {
            "data": {
                f"{key}_files": [{"path": str(tmp_path / f"{name}.jsonl")}]
                for name, key in (("pool", "pool"), ("val", "validation"), ("eval", "eval"))
            },
            "select": {"chunk_size": chunk_size, "k": 2},
            "train": {"batch_size": 1},
        }
    )


def test_an_empty_pool_names_the_field_and_the_rejections(tmp_path: Path) -> None:
    cfg = file_config(tmp_path, b'{"question": 1}\n[]\n', good(40))
    with pytest.raises(ConfigError) as err:
        sets_from_files(cfg, log=lambda _: None)
    msg = str(err.value)
    assert msg.startswith("data.pool_files: no usable problems (Loaded 0 problems")
    assert f"2 record(s) rejected: {tmp_path / 'pool.jsonl'}:1: field 'question' must be" in msg


def test_an_empty_validation_set_names_the_field(tmp_path: Path) -> None:
    cfg = file_config(tmp_path, good(0) + b"\n" + good(1), b"\n\n")
    with pytest.raises(
        ConfigError, match=r"^data\.validation_files: no usable problems \(Loaded 0"
    ):
        sets_from_files(cfg, log=lambda _: None)


def test_chunk_size_larger_than_the_pool(tmp_path: Path) -> None:
    cfg = file_config(tmp_path, good(0) + b"\n" + good(1) + b"\n" + good(1), good(40), chunk_size=4)
    logs: list[str] = []
    with pytest.raises(ConfigError) as err:
        sets_from_files(cfg, log=logs.append)
    assert str(err.value).startswith(
        "select.chunk_size (4) exceeds the 2 pool problems loaded from data.pool_files"
    )
    assert any("1 duplicates" in line for line in logs)  # the dropped prompt is reported
    with pytest.raises(
        ConfigError, match=r"select\.chunk_size \(64\) exceeds data\.pool_size \(10\)"
    ):
        load_config(None, ["data.pool_size=10"])
    with pytest.raises(ProblemError, match=r"chunk_size \(5\) exceeds the pool's 3 problems"):
        ChunkSchedule(3, 5, seed=0)
    with pytest.raises(ProblemError, match=r"chunk_size must be >= 1, got 0"):
        ChunkSchedule(0, 0, seed=0)


def test_a_selection_size_of_zero() -> None:
    with pytest.raises(
        ConfigError, match=r"select\.k \(100\) leaves 0 problems from chunk_size 64"
    ):
        load_config(None, ["select.k=100"])
    with pytest.raises(ConfigError, match=r"select\.k: must be > 0, got 0"):
        load_config(None, ["select.k=0"])
    with pytest.raises(ValueError, match="selection size n must be >= 1, got 0"):
        select("rand", Candidates(np.arange(3)), 0, np.random.default_rng(0))


# --- over-long prompts -----------------------------------------------------------------------


def test_over_long_prompts_are_dropped_and_named(tokenizer: Any, tiny_model: Any) -> None:
    from gradalign.engine.policy import format_prompt

    short = Problem(0, "1+1", "2", "addition")
    long = Problem(1, "9" * 400, "9", "gsm8k", meta={"file": "data/gsm8k.jsonl", "line": 12})
    row = Problem(2, "8" * 400, "8", "amc", meta={"file": "amc.parquet", "row": 3})
    n_short = len(format_prompt(tokenizer, short.prompt))
    n_long = len(format_prompt(tokenizer, long.prompt))
    context = model_context(tiny_model)
    assert context == 256
    kept, messages = check_prompt_lengths([short, long, row], tokenizer, context, 12, "pool")
    assert kept == [short]
    assert messages[0] == (
        f"pool problem 1 (data/gsm8k.jsonl:12, source 'gsm8k'): prompt of {n_long} tokens + "
        f"rollout.max_new_tokens 12 exceeds the model context of 256 tokens; dropped"
    )
    assert messages[1].startswith("pool problem 2 (amc.parquet row 3, source 'amc'): prompt of")
    exact = n_short + 12
    assert check_prompt_lengths([short], tokenizer, exact, 12, "eval") == ([short], [])
    assert check_prompt_lengths([short], tokenizer, exact - 1, 12, "eval")[0] == []
    assert check_prompt_lengths([long], tokenizer, None, 12, "eval") == ([long], [])


def test_model_context_reads_common_config_names() -> None:
    def model(**config: Any) -> SimpleNamespace:
        return SimpleNamespace(config=SimpleNamespace(**config))

    assert model_context(model(max_position_embeddings=4096)) == 4096
    assert model_context(model(n_positions=1024)) == 1024
    assert model_context(model(max_sequence_length=2048)) == 2048
    assert model_context(model(hidden_size=8)) is None
    assert model_context(SimpleNamespace()) is None
