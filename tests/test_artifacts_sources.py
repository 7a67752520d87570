"""Per-source shares of the picks (`run.artifacts.source_shares`) and the demo's per-source
table (`cli.source_table`), on hand-made histories."""

from __future__ import annotations

import pytest
from rich.console import Console

from gradalign.cli import source_table
from gradalign.run.artifacts import source_shares


def test_source_shares_pool_every_round() -> None:
    history = [
        {"select/source_mix": {"addition": 16}},
        {"select/source_mix": {"addition": 14, "countdown2": 2}},
    ]
    assert source_shares(history) == {
        "addition": pytest.approx(30 / 32),
        "countdown2": pytest.approx(2 / 32),
    }
    assert source_shares([]) == {}


def _render(table) -> str:
    console = Console(record=True, width=200)
    console.print(table)
    return console.export_text()


def test_source_table_shows_a_source_left_untrained() -> None:
    summaries = {
        "sim": {
            "selected_sources": {"addition": 0.98, "countdown2": 0.02},
            "final_eval_accuracy_by_source": {"addition": 0.97, "countdown2": 0.09},
        },
        "rand": {
            "selected_sources": {"addition": 0.52, "countdown2": 0.48},
            "final_eval_accuracy_by_source": {"addition": 0.93, "countdown2": 0.86},
        },
    }
    text = _render(source_table(summaries))
    lines = {line.split()[0]: line.split()[1:] for line in text.splitlines() if line.strip()}
    assert lines["sim"] == ["98%", "2%", "0.970", "0.090"]
    assert lines["rand"] == ["52%", "48%", "0.930", "0.860"]
    assert "countdown2 sel" in text and "addition final" in text


def test_no_source_table_for_one_source() -> None:
    one = {"selected_sources": {"addition": 1.0}, "final_eval_accuracy_by_source": {}}
    assert source_table({"sim": one}) is None
    assert source_table({"sim": {}}) is None  # summaries from before these fields
