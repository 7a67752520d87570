"""Hostile input never ends in a traceback (issue 7): a corpus of malformed files, configs,
rewards and numbers, each with the message it must give (what and where), and checks that the
valid records around a bad one are all kept and the rejection counted."""

from __future__ import annotations

import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from problem_records import read_problems
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import ConfigError, config_from_dict, load_config
from gradalign.core.selection import Candidates, SelectionWarning, select
from gradalign.data import rewards
from gradalign.data.files import FileSpec, load_file, load_files, summarise
from gradalign.data.problems import ChunkSchedule, Problem, ProblemError
from gradalign.data.rewards import RewardError, RewardWarning, checked_reward, score_completion
from gradalign.engine.rollout import score_rollouts
from gradalign.run.sources import (
    check_prompt_lengths,
    file_specs,
    load_set,
    model_context,
    sets_from_files,
)


def good(i: int) -> bytes:
    return b'{"question": "what is %d + 1?", "answer": "%d"}' % (i, i + 1)


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


# --- configuration ---------------------------------------------------------------------------

# (case, YAML bytes, message fragment); "{path}" is the config file
BAD_CONFIGS = [
    ("invalid YAML", b"select:\n  k: 4\n   bad: : x\n", "{path}: invalid YAML (mapping values"),
    ("not UTF-8", b"select:\n  mode: \xff\n", "{path}: not UTF-8 text (byte 16: invalid start byte)"),
    ("top level is a list", b"- 1\n- 2\n", "{path}: expected a mapping of sections at the top level"),
    ("section is a list", b"select: [1, 2]\n", "select: expected a mapping, got [1, 2]"),
    ("unknown field", b"select:\n  chunksize: 8\n", "select.chunksize: unknown field (known in select:"),
    ("unknown section", b"selection:\n  k: 8\n", "selection: unknown field (known in config:"),
    ("mistyped int", b"select:\n  chunk_size: many\n", "select.chunk_size: expected int, got 'many'"),
    ("fractional int", b"rounds: 2.5\n", "rounds: expected int, got 2.5"),
    ("mistyped bool", b"select:\n  scale_advantages: maybe\n", "select.scale_advantages: expected true or false"),
    ("NaN float", b"train:\n  learning_rate: .nan\n", "train.learning_rate: expected a finite number, got nan"),
    ("Inf float", b"train:\n  learning_rate: .inf\n", "train.learning_rate: expected a finite number, got inf"),
    ("unknown mode", b"select:\n  mode: best\n", "select.mode: 'best' is not one of sim, dot"),
    ("files entry not a mapping", b"data:\n  pool_files: [a.jsonl]\n", "data.pool_files[0]: expected a mapping, got 'a.jsonl'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("case", "text", "message"), BAD_CONFIGS, ids=[c for c, _, _ in BAD_CONFIGS]
)
def test_bad_config_file(tmp_path: Path, case: str, text: bytes, message: str) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert message.format(path=path) in str(err.value)


def test_config_file_missing_or_a_directory(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config file .*nope.yaml does not exist"):
        load_config(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=f"config file {tmp_path}: cannot read it"):
        load_config(tmp_path)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ({"path": "x.jsonl", "colour": "red"}, "data.pool_files[0].colour: unknown key"),
        ({"path": "x.jsonl", "count": "ten"}, "data.pool_files[0].count: expected an integer, got 'ten'"),
        ({"path": "x.jsonl", "count": -1}, "data.pool_files[0]: {path}: count (-1) must be >= 0"),
        ({"count": 3}, "data.pool_files[0]: missing 'path'"),
        ({"path": "x.txt"}, "data.pool_files[0]: {path}: cannot tell the format from suffix '.txt'"),
        ({"path": "x.jsonl", "template": "no slot"}, "data.pool_files[0]: {path}: template has no"),
        (
            {"path": "x.jsonl", "reward": "ga_no_such_module:fn"},
            "data.pool_files[0].reward: reward 'ga_no_such_module:fn': cannot import module",
        ),
        ({"path": "x.jsonl", "reward": "mathh"}, "data.pool_files[0].reward: unknown reward 'mathh'"),
    ],
)  # fmt: skip
def test_bad_file_entries_name_the_entry(tmp_path: Path, entry: dict, message: str) -> None:
    (tmp_path / "x.jsonl").write_bytes(good(0))
    (tmp_path / "x.txt").write_bytes(good(0))
    if "path" in entry:
        entry = {**entry, "path": str(tmp_path / entry["path"])}
    with pytest.raises(ConfigError) as err:
        file_specs([entry], "data.pool_files")
    assert message.format(path=entry.get("path")) in str(err.value)


runner = CliRunner()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (b"select:\n  k: 4\n   bad: : x\n", "invalid YAML"),
        (b"select:\n  mode: \xff\n", "not UTF-8 text"),
        (b"select:\n  chunksize: 8\n", "select.chunksize: unknown field"),
        (b"train:\n  learning_rate: .nan\n", "train.learning_rate: expected a finite number"),
        (b"select:\n  k: 1000\n", "select.k (1000) leaves 0 problems"),
    ],
)
def test_cli_config_errors_exit_2_without_a_traceback(
    tmp_path: Path, text: bytes, message: str
) -> None:
    path = tmp_path / "config.yaml"
    path.write_bytes(text)
    result = runner.invoke(app, ["run", str(path)], terminal_width=300)
    assert result.exit_code == 2
    assert isinstance(result.exception, SystemExit)  # an exit, not an uncaught error
    assert message in result.output and "Traceback" not in result.output


def test_cli_unusable_data_file_exits_2_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "pool.jsonl"
    bad.write_bytes(b'{"question": "1+1"\n\xff\xfe\n')
    good = tmp_path / "val.jsonl"
    good.write_text('{"question": "1+1=", "answer": "2"}\n{"question": "2+2=", "answer": "4"}\n')
    path = tmp_path / "config.yaml"
    path.write_text(
        f"data:\n  pool_files: [{{path: {bad}}}]\n  validation_files: [{{path: {good}}}]\n"
        f"  eval_files: [{{path: {good}}}]\n"
        f"out_dir: {tmp_path / 'run'}\n"
    )
    result = runner.invoke(app, ["run", str(path)], terminal_width=300)
    assert result.exit_code == 2 and isinstance(result.exception, SystemExit)
    text = " ".join(result.output.split())
    assert "data.pool_files: no usable problems" in text and "Traceback" not in result.output


# --- rewards ---------------------------------------------------------------------------------

USER_REWARDS = """
import math

def boom(problem, completion):
    raise ValueError("cannot grade " + completion)

def nan(problem, completion):
    return math.nan

def inf(problem, completion):
    return float("inf")

def nothing(problem, completion):
    return None

def words(problem, completion):
    return "one"

def half(problem, completion):
    return 0.5

def flaky(problem, completion):  # NaN for even completion numbers
    return math.nan if int(completion.split()[-1]) % 2 == 0 else 0.5
"""


@pytest.fixture
def user_rewards(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "ga_hostile_rewards.py").write_text(USER_REWARDS)
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ga_hostile_rewards"
    sys.modules.pop("ga_hostile_rewards", None)
    for name in [n for n in rewards._USER_REWARDS if n.startswith("ga_hostile_rewards:")]:
        del rewards._USER_REWARDS[name]
        rewards._WARNED.discard(name)


def problem(pid: int, reward: str) -> Problem:
    return Problem(pid, f"prompt {pid}", "1", "src", reward)


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("boom", "raised ValueError: cannot grade text"),
        ("nan", "returned nan, not a finite number"),
        ("inf", "returned inf, not a finite number"),
        ("nothing", "returned None, not a number"),
        ("words", "returned 'one', not a number"),
    ],
)
def test_a_failing_user_reward_scores_zero_and_says_why(
    user_rewards: str, fn: str, why: str
) -> None:
    name = f"{user_rewards}:{fn}"
    assert checked_reward(problem(7, name), "text") == (
        0.0,
        f"problem 7 (source 'src'): reward '{name}' {why}",
    )
    with pytest.warns(RewardWarning, match=f"problem 7 .*reward '{name}' .*; it scores 0"):
        assert score_completion(problem(7, name), "text") == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per reward name, not once per completion
        assert score_completion(problem(8, name), "text") == 0.0


def test_missing_user_reward_functions_are_named(user_rewards: str) -> None:
    with pytest.raises(RewardError, match="'ga_hostile_rewards' has no attribute 'missing'"):
        checked_reward(problem(1, "ga_hostile_rewards:missing"), "x")
    with pytest.raises(RewardError, match="cannot import module 'ga_hostile_nope'"):
        score_completion(problem(1, "ga_hostile_nope:fn"), "x")


class FakeTokenizer:
    eos_token_id = 99

    def batch_decode(self, completions: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return [f"completion {ids[0]}" for ids in completions]


def test_score_rollouts_counts_bad_rewards_and_never_returns_nan(user_rewards: str) -> None:
    problems = [problem(3, f"{user_rewards}:half"), problem(4, f"{user_rewards}:flaky")]
    problems.append(problem(5, f"{user_rewards}:flaky"))
    with pytest.warns(RewardWarning) as caught:
        ro = score_rollouts(
            FakeTokenizer(), problems, [[1]] * 3, [[i] for i in range(6)], 2, "cand:4242"
        )
    assert ro.rewards.tolist() == [0.5, 0.5, 0.0, 0.5, 0.0, 0.5]
    assert ro.bad_rewards == 2
    assert np.isfinite(ro.pass_rates()).all() and ro.zero_variance().tolist() == [1, 0, 0]
    (w,) = caught
    assert str(w.message) == (  # the stage, not its salt's seed
        "2 of 6 rewards (cand) could not be computed and scored 0; first: problem 4 "
        f"(source 'src'): reward '{user_rewards}:flaky' returned nan, not a finite number"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = score_rollouts(FakeTokenizer(), problems[:1], [[1]], [[0], [1]], 2, "cand")
    assert clean.bad_rewards == 0


def test_a_reward_failing_on_every_completion_of_a_stage_stops(user_rewards: str) -> None:
    """One function failing on all its completions (here: beside one that works) is a
    RewardFailed naming it and its first failure, not a stage of all-zero rewards."""
    problems = [problem(3, f"{user_rewards}:half"), problem(4, f"{user_rewards}:boom")]
    problems.append(problem(5, f"{user_rewards}:boom"))
    with pytest.raises(rewards.RewardFailed) as caught:
        score_rollouts(
            FakeTokenizer(), problems, [[1]] * 3, [[i] for i in range(6)], 2,
            "candidate rollouts:901243215",
        )  # fmt: skip
    assert str(caught.value) == (
        f"{user_rewards}:boom: ValueError: cannot grade completion 2 (problem 4, source 'src'); "
        "it failed on all 4 completions of the candidate rollouts, so there is nothing to "
        "select or train on: fix the function (a reward that fails on some completions only "
        "scores them 0, counted as bad_rewards)"
    )


# --- non-finite scores and a zero validation gradient ----------------------------------------


def candidates(**overrides: Any) -> Candidates:
    base: dict[str, Any] = dict(
        ids=np.array([10, 11, 12, 13, 14]),
        pass_rate=np.array([0.5, 0.25, 0.5, 0.75, 0.5]),
        zero_variance=np.zeros(5, dtype=bool),
        dot_val=np.array([0.1, 0.4, 0.3, 0.2, -0.1]),
        dot_chunk=np.array([0.2, 0.1, 0.3, 0.0, 0.5]),
        norm=np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
    )
    return Candidates(**(base | overrides))


@pytest.mark.parametrize("mode", ["sim", "dot", "negsim", "simacc", "norm", "align", "accgreedy"])
def test_nonfinite_inputs_are_skipped_counted_and_do_not_spread(mode: str) -> None:
    clean = select(mode, candidates(), 5, np.random.default_rng(0))
    hostile = candidates(
        dot_val=np.array([0.1, np.nan, 0.3, 0.2, -0.1]),
        dot_chunk=np.array([0.2, 0.1, 0.3, np.inf, 0.5]),
        norm=np.array([1.0, 1.0, 1.0, 1.0, -np.inf]),
        pass_rate=np.array([0.5, 0.25, np.nan, 0.75, 0.5]),
    )
    bad = {  # the ids whose inputs for the mode are not finite
        "sim": {11, 14}, "dot": {11}, "negsim": {11, 14}, "simacc": {11, 12, 14},
        "norm": {14}, "align": {13, 14}, "accgreedy": {12},
    }[mode]  # fmt: skip
    with pytest.warns(SelectionWarning, match=f"skipped {len(bad)} of 5 candidates"):
        sel = select(mode, hostile, 5, np.random.default_rng(0))
    assert sel.skipped_nonfinite == len(bad)
    assert sel.ids.tolist() == [i for i in clean.ids.tolist() if i not in bad]
    kept = np.array([i not in bad for i in hostile.ids])
    assert np.isnan(sel.scores[~kept]).all()
    assert sel.scores[kept].tolist() == clean.scores[kept].tolist()
    assert sel.fallback is None


def test_acc_never_draws_a_nonfinite_pass_rate() -> None:
    c = candidates(pass_rate=np.array([np.nan, 0.5, np.inf, 0.0, 1.0]))
    for seed in range(20):
        with pytest.warns(SelectionWarning, match="problem ids 10, 12"):
            sel = select("acc", c, 3, np.random.default_rng(seed))
        assert sorted(sel.ids.tolist()) == [11, 13, 14] and sel.skipped_nonfinite == 2


@pytest.mark.parametrize("val_norm", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["sim", "dot", "negsim", "simacc"])
def test_zero_validation_gradient_falls_back_to_a_seeded_uniform_draw(
    mode: str, val_norm: float
) -> None:
    c = candidates(val_norm=val_norm)
    with pytest.warns(SelectionWarning, match=f"mode '{mode}': the validation gradient direction"):
        sel = select(mode, c, 3, np.random.default_rng(5))
    assert sel.fallback == "zero_validation_gradient"
    rand = select("rand", c, 3, np.random.default_rng(5))
    assert sel.ids.tolist() == rand.ids.tolist() and np.isnan(sel.scores).all()


@pytest.mark.parametrize("mode", ["norm", "align", "accgreedy", "acc", "rand"])
def test_modes_without_the_validation_direction_ignore_its_norm(mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = select(mode, candidates(val_norm=0.0), 3, np.random.default_rng(1))
        same = select(mode, candidates(), 3, np.random.default_rng(1))
    assert sel.fallback is None and sel.ids.tolist() == same.ids.tolist()


def test_a_healthy_validation_direction_ranks_as_before() -> None:
    sel = select("sim", candidates(val_norm=0.99999), 2, np.random.default_rng(0))
    assert sel.ids.tolist() == [11, 12] and sel.fallback is None


def scoring_batch(rewards: list[list[float]], seed: int) -> Any:
    import torch

    from gradalign.core.grpo import SequenceBatch, group_advantages, pack_sequences

    rng = np.random.default_rng(seed)
    group = [g for g, rs in enumerate(rewards) for _ in rs]
    prompts = [rng.integers(4, 80, size=5).tolist() for _ in rewards]
    completions = [rng.integers(4, 80, size=4).tolist() for _ in group]
    ids, mask, comp = pack_sequences([prompts[g] for g in group], completions, pad_id=0)
    flat = torch.tensor([r for rs in rewards for r in rs], dtype=torch.float64)
    adv = group_advantages(flat, torch.tensor(group), len(rewards))
    return SequenceBatch(ids, mask, comp, adv, torch.tensor(group), len(rewards))


@pytest.mark.parametrize("val_rewards", [[[1, 1, 1], [0, 0, 0]], [[1, 0, 1], [0, 0, 1]]])
def test_scorers_report_the_validation_norm_and_selection_falls_back(
    tiny_model: Any, val_rewards: list[list[float]]
) -> None:
    import torch

    from gradalign.core import alignment
    from gradalign.scoring import fastscore, precondition

    params = alignment.scored_parameters(tiny_model)
    cand, val = scoring_batch([[1, 0, 0], [1, 1, 0], [0, 1, 1]], 0), scoring_batch(val_rewards, 1)
    zero = all(len(set(rs)) == 1 for rs in val_rewards)  # every validation advantage is 0
    exact = alignment.exact_alignment(
        tiny_model, params, cand, alignment.validation_direction(tiny_model, params, val)
    )
    direction = fastscore.batched_validation_direction(tiny_model, params, val)
    fast = fastscore.batched_alignment(tiny_model, params, cand, direction)
    ones = {q: torch.ones_like(q) for q in params}
    pre = precondition.exact_preconditioned_alignment(tiny_model, params, cand, direction, ones)
    for al in (exact, fast, pre):
        assert al.val_norm == 0.0 if zero else abs(al.val_norm - 1.0) < 1e-3
    c = Candidates(
        np.arange(3),
        np.full(3, 0.5),
        np.zeros(3, bool),
        fast.dot_val,
        fast.dot_chunk,
        fast.norm,
        val_norm=fast.val_norm,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select("sim", c, 1, np.random.default_rng(0))
    assert sel.fallback == ("zero_validation_gradient" if zero else None)
    assert len(caught) == int(zero)


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
