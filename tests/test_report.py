"""The report builder on hand-made run directories, against hand-computed numbers.

Noisy regime, seeds 0-2, final eval accuracy:
  sim       [0.1, 0.2, 0.3]  -> mean 0.2, s = 0.1, half-width t(.975, 2) · 0.1/√3
                                = 4.302653 · 0.0577350 = 0.248414
  rand      [0.1, 0.1, 0.2]
  sim-rand  [0.0, 0.1, 0.1]  -> mean 0.0666667, s = 0.0577350, half 4.302653 · 0.0333333 = 0.143422
  accgreedy [0.3, 0.5]       (seed 2 failed) -> mean 0.4, s = 0.141421, half 12.706205 · 0.1
  accgreedy-rand [0.2, 0.4]  -> mean 0.3, half 1.2706205
Corrupted share of sim per round: seeds [.25,.5], [0,.25], [.5,.75] -> mean [.25, .5].
Imbalance (minority "countdown"), one seed: mixes {addition 2, countdown 6} and {addition 8}
of 8 selected -> minority share [0.75, 0.0]; n = 1 -> CI "n/a".
"""

from __future__ import annotations

import math

import pytest
from report_runs import write_run
from typer.testing import CliRunner

from gradalign.analysis.report import build_report
from gradalign.analysis.runs import collect, mean_ci, t_quantile
from gradalign.storage import read_json, write_json

FINAL = {
    "sim": [0.1, 0.2, 0.3],
    "rand": [0.1, 0.1, 0.2],
    "accgreedy": [0.3, 0.5],
}
SIM_CORRUPTED = [[0.25, 0.5], [0.0, 0.25], [0.5, 0.75]]
SIM_AUC = [[0.8, 0.6], [0.9, None], [0.7, 0.7]]  # per-run means 0.7, 0.9, 0.7
SIM_SPLIT = [[0.5, -0.1], [0.3, 0.2], [float("nan"), 0.4]]  # 4 of 5 finite ones > 0
MEAN_AT_K = {"sim": [0.3, 0.4, 0.5], "rand": [0.2, 0.3, 0.3], "accgreedy": [0.25, 0.35]}


@pytest.fixture()
def bench_dir(tmp_path):
    root = tmp_path / "bench"
    for mode, finals in FINAL.items():
        for seed, final in enumerate(finals):
            sim = mode == "sim"
            write_run(
                root / "noisy" / mode / f"seed{seed}", "noisy", mode, seed, [0.0, final],
                SIM_CORRUPTED[seed] if sim else [0.5, 0.5],
                auc=SIM_AUC[seed] if sim else None, split=SIM_SPLIT[seed] if sim else None,
                mean_at_k=MEAN_AT_K[mode][seed],
            )  # fmt: skip
    failed = root / "noisy" / "accgreedy" / "seed2"
    record = {"regime": "noisy", "mode": "accgreedy", "seed": 2, "status": "failed",
              "returncode": 1, "wall_s": 3.0, "stderr_tail": "Traceback\nRuntimeError: boom"}  # fmt: skip
    write_json(failed / "bench-run.json", record)
    write_run(root / "noisy" / "dot" / "seed0", "noisy", "dot", 0, [0.9], [1.0], finished=False)
    write_run(
        root / "imbalance" / "sim" / "seed0",
        "imbalance",
        "sim",
        0,
        [0.2, 0.4],
        [0.0, 0.0],
        mixes=[{"addition": 2, "countdown": 6}, {"addition": 8}],
        extra=["data.families=[addition,countdown]", "data.minority=countdown"],
    )
    return root


def test_t_quantiles():
    assert t_quantile(1) == pytest.approx(12.706205, abs=1e-6)
    assert t_quantile(2) == pytest.approx(4.302653, abs=1e-6)
    assert t_quantile(30) == pytest.approx(2.042272, abs=1e-6)
    # beyond the table (Cornish-Fisher), against published values
    assert t_quantile(40) == pytest.approx(2.021075, abs=2e-5)
    assert t_quantile(120) == pytest.approx(1.979930, abs=2e-5)
    assert t_quantile(10**6) == pytest.approx(1.959964, abs=1e-5)
    with pytest.raises(ValueError):
        t_quantile(0)


def test_mean_ci_hand_values():
    mean, half, n = mean_ci([0.1, 0.2, 0.3])
    assert (mean, n) == (pytest.approx(0.2, abs=1e-12), 3)
    assert half == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-9)
    assert half == pytest.approx(0.248414, abs=1e-6)
    assert mean_ci([0.7]) == (0.7, None, 1)
    assert mean_ci([]) == (None, None, 0)


def test_collect_reads_status_of_every_run(bench_dir):
    runs = collect(bench_dir)
    status = {(r.regime, r.mode, r.seed): r.status for r in runs}
    assert status[("noisy", "accgreedy", 2)] == "failed"
    assert status[("noisy", "dot", 0)] == "incomplete"
    assert sum(s == "done" for s in status.values()) == 9
    sim0 = next(r for r in runs if (r.regime, r.mode, r.seed) == ("noisy", "sim", 0))
    assert sim0.steps == [4, 8]
    assert sim0.train_rollouts == 8 * 8 * 8  # steps × batch_size × num_generations
    assert sim0.pool_shares["corrupted"] == 0.5


def test_report_numbers(bench_dir):
    res = build_report(bench_dir)
    acc = res["final_accuracy"]["noisy"]
    assert acc["sim"]["mean"] == pytest.approx(0.2, abs=1e-12)
    assert acc["sim"]["ci95"] == pytest.approx(0.248414, abs=1e-6)
    assert acc["accgreedy"]["n"] == 2  # the failed seed does not count
    assert acc["accgreedy"]["mean"] == pytest.approx(0.4, abs=1e-12)
    assert acc["accgreedy"]["ci95"] == pytest.approx(1.2706205, abs=1e-6)
    assert "dot" not in acc  # incomplete runs do not count
    vs = res["vs_rand"]["noisy"]
    assert vs["sim"]["mean"] == pytest.approx(0.2 / 3, abs=1e-12)
    assert vs["sim"]["ci95"] == pytest.approx(4.302653 / 30, abs=1e-6)
    assert vs["sim"]["seeds"] == {
        "0": pytest.approx(0.0),
        "1": pytest.approx(0.1),
        "2": pytest.approx(0.1),
    }
    assert vs["accgreedy"]["mean"] == pytest.approx(0.3, abs=1e-12)
    assert vs["accgreedy"]["n"] == 2 and vs["accgreedy"]["ci95"] == pytest.approx(
        1.2706205, abs=1e-6
    )
    assert "rand" not in vs
    assert res["vs_rand"]["imbalance"] == {}  # no rand there
    imb = res["final_accuracy"]["imbalance"]["sim"]
    assert imb["mean"] == pytest.approx(0.4) and imb["ci95"] is None and imb["n"] == 1
    corrupted = res["shares"]["corrupted"]
    assert corrupted["sim"]["mean_per_round"] == pytest.approx([0.25, 0.5], abs=1e-12)
    assert corrupted["rand"]["mean_per_round"] == pytest.approx([0.5, 0.5])
    assert res["shares"]["minority"]["sim"]["mean_per_round"] == pytest.approx([0.75, 0.0])
    assert res["shares"]["minority"]["sim"]["n"] == 1
    # over all rounds: sim's per-seed means 0.375, 0.125, 0.625 -> 0.375 ± t(2) * 0.25 / sqrt 3
    everything = corrupted["sim"]["all_rounds"]
    assert everything["mean"] == pytest.approx(0.375) and everything["n"] == 3
    assert everything["ci95"] == pytest.approx(4.302653 * 0.25 / math.sqrt(3), abs=1e-6)
    auc = res["auc_clean"]["noisy"]
    assert set(auc) == {"sim"}  # only sim recorded one
    assert auc["sim"]["mean_per_round"] == pytest.approx([0.8, 0.65])
    assert auc["sim"]["all_rounds"]["mean"] == pytest.approx(2.3 / 3)
    assert auc["sim"]["all_rounds"]["ci95"] == pytest.approx(
        4.302653 * 0.11547005 / math.sqrt(3), abs=1e-6
    )
    split = res["split_half_cos"]["noisy"]["sim"]
    assert split["positive_share"] == pytest.approx(0.8)
    assert split["mean_per_round"] == pytest.approx([0.4, 0.5 / 3])
    assert res["final_mean_at_k"]["noisy"]["sim"]["mean"] == pytest.approx(0.4)
    assert res["final_mean_at_k"]["noisy"]["accgreedy"]["n"] == 2
    # accuracy over the rounds [0.0, final]: sim 0.05, 0.1, 0.15; rand 0.05, 0.05, 0.1
    assert res["curve_accuracy"]["noisy"]["sim"]["mean"] == pytest.approx(0.1)
    assert res["curve_vs_rand"]["noisy"]["sim"]["mean"] == pytest.approx(0.1 / 3)
    paired = res["mean_at_k_vs_rand"]["noisy"]["sim"]
    assert paired["mean"] == pytest.approx(0.4 / 3) and paired["n"] == 3
    assert read_json(bench_dir / "report" / "results.json") == res


def test_report_markdown_and_plots(bench_dir):
    build_report(bench_dir)
    out = bench_dir / "report"
    md = (out / "report.md").read_text()
    assert "0.200 ± 0.248 (n=3)" in md
    assert "+0.067 ± 0.143 (n=3)" in md
    assert "0.400 ± n/a (n=1)" in md
    assert "18%" in md and "80%" in md  # the paper's reference line
    assert "| sim | 3 | 38% ± 62% | 25% | 50% |" in md
    assert "| (pool) |  | 50% | 50% | 50% |" in md
    assert "| sim | 1 | 38% ± n/a | 75% | 0% |" in md  # minority share, imbalance
    assert "| sim | 3 | 0.77 ± 0.29 | 100% | 0.80 | 0.65 |" in md  # AUC per round
    assert "| sim | 3 | +0.28 ± 0.26 | 80% | +0.40 | +0.17 |" in md  # split-half
    assert "| sim | 0.400 ± 0.248 (n=3) | +0.133 ± 0.143 (n=3) |" in md  # mean@k
    assert "RuntimeError: boom" in md and "exit 1" in md
    assert "the same for every run" in md
    for name in ("accuracy.png", "shares.png", "auc.png"):
        data = (out / name).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000


def test_report_of_one_run_directory(bench_dir):
    run_dir = bench_dir / "noisy" / "sim" / "seed1"
    res = build_report(run_dir)
    assert res["final_accuracy"] == {
        "noisy": {"sim": {"mean": 0.2, "ci95": None, "n": 1, "seeds": {"1": 0.2}}}
    }
    text = (run_dir / "report" / "report.md").read_text()  # its rounds, not a benchmark
    assert text.startswith("# GradAlign run report") and "Difference to `rand`" not in text
    # SIM_SPLIT[1] = [0.3, 0.2]: both > 0; no round fell back
    assert "Split-half validation cosine > 0 in 2 of 2 rounds (0 without one)" in text
    assert "Selection fell back to rand in 0 of 2 rounds" in text
    assert "| round | eval accuracy | split-half cos | AUC clean | corrupted share |" in text
    assert "| 1 | 0.000 | +0.30 | 0.90 | 0% |\n| 2 | 0.200 | +0.20 | – | 25% |" in text
    assert [r["round"] for r in res["rounds"]] == [1, 2]
    assert (run_dir / "report" / "accuracy.png").is_file()


def test_report_command_rebuilds_without_running(bench_dir):
    from gradalign.cli import app

    result = CliRunner().invoke(app, ["report", str(bench_dir)])
    assert result.exit_code == 0, result.output
    assert (bench_dir / "report" / "report.md").is_file()
    assert "final eval accuracy" in result.output
    missing = CliRunner().invoke(app, ["report", str(bench_dir / "nothing")])
    assert missing.exit_code == 2
