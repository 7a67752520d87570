"""The command line: help on every command, config errors name the field."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from gradalign.cli import app

runner = CliRunner()


@pytest.mark.parametrize("command", [[], ["run"], ["demo"], ["diagnose"], ["fields"]])
def test_help_on_every_command(command):
    result = runner.invoke(app, command + ["--help"])
    assert result.exit_code == 0
    assert "Usage" in result.output


def test_fields_lists_documented_fields():
    result = runner.invoke(app, ["fields"], terminal_width=200)
    assert result.exit_code == 0
    names = [line.split()[0] for line in result.output.splitlines()[1:] if line.strip()]
    assert {"select.mode", "rollout.k_r", "train.steps_per_round", "data.regime"} <= set(names)


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("select.mode=best", "select.mode: 'best' is not one of"),
        ("select.k=1000", "select.k (1000) leaves 0 problems"),
        ("train.learning_rate=fast", "train.learning_rate: expected float"),
        ("rollout.k_rr=3", "rollout.k_rr: unknown field"),
    ],
)
def test_bad_override_exits_with_field_named(override, message):
    result = runner.invoke(app, ["run", "--set", override], terminal_width=200)
    assert result.exit_code == 2
    assert message in result.output


def test_bad_yaml_value_names_file_field(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("select:\n  chunk_size: many\n")
    result = runner.invoke(app, ["run", str(path)], terminal_width=200)
    assert result.exit_code == 2
    assert "select.chunk_size: expected int" in result.output
