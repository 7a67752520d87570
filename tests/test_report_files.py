"""`gradalign report` on runs over problem files: the data is named as what it is ("files"),
with no built-in regime, no corrupted-share table and no "noisy" title."""

from __future__ import annotations

from report_runs import write_run

from gradalign.analysis.report import build_report
from gradalign.analysis.runs import load_run

FILES = [
    "data.pool_files=[{path: pool.jsonl}]",
    "data.validation_files=[{path: val.jsonl}]",
    "data.eval_files=[{path: eval.jsonl}]",
]


def test_report_of_a_file_data_run_names_no_regime(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, "noisy", "sim", 0, [0.2, 0.3], [0.0, 0.0], extra=FILES)
    run = load_run(run_dir)
    assert (run.regime, run.shares, run.pool_shares) == ("files", {}, {})
    res = build_report(run_dir)
    assert list(res["final_accuracy"]) == ["files"]
    assert res["final_accuracy"]["files"]["sim"]["mean"] == 0.3
    text = (run_dir / "report" / "report.md").read_text()
    assert "noisy" not in text and "Share of" not in text and "Difference to" not in text
    assert "mode `sim` on problem files" in text
    assert "Greedy eval accuracy 0.050 before training, 0.300 after the last round" in text
    assert "| round | eval accuracy | corrupted share |" in text  # as this hand-made run wrote
    assert (run_dir / "report" / "accuracy.png").is_file()


def test_built_in_runs_keep_their_regime_and_shares(tmp_path):
    run_dir = tmp_path / "run"
    write_run(run_dir, "noisy", "sim", 0, [0.2, 0.3], [0.25, 0.5])
    run = load_run(run_dir)
    assert (run.regime, run.shares["corrupted"], run.pool_shares["corrupted"]) == (
        "noisy", [0.25, 0.5], 0.5
    )  # fmt: skip
