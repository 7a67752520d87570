"""Hostile config files and settings never end in a traceback (issue 7): each is refused with
the field or line it names, exit 2 from the command line (`gradalign.config`, `gradalign.cli`)."""

from __future__ import annotations

from pathlib import Path

import pytest
from problem_records import good
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import ConfigError, load_config
from gradalign.run.sources import (
    file_specs,
)

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
