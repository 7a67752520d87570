"""The regimes bench: run planning, skip and failure bookkeeping, and a tiny real bench."""

from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import pytest
from gradalign_runs import ROUND
from typer.testing import CliRunner

from gradalign.analysis import bench
from gradalign.config import load_config
from gradalign.storage import read_json, write_json, write_yaml

TINY = [
    *ROUND,
    "rounds=1",
    "model.warmstart_steps=10",
    "data.pool_size=32",
    "data.val_size=4",
    "data.eval_size=8",
    "rollout.k_v=4",
]


def test_plan_runs_layout_and_seeds(tmp_path):
    specs = bench.plan_runs(tmp_path, ["noisy", "imbalance"], ["sim", "rand"], 2, ["rounds=2"])
    assert [s.name for s in specs[:4]] == [
        "noisy/sim/seed0",
        "noisy/rand/seed0",
        "noisy/sim/seed1",
        "noisy/rand/seed1",
    ]
    assert len(specs) == 8
    s = specs[2]
    assert s.out_dir == tmp_path / "noisy" / "sim" / "seed1"
    assert s.overrides[0] == "rounds=2"  # shared first, the run's own last
    assert {"seed=1", "data.seed=1", "select.mode=sim", "data.regime=noisy"} <= set(s.overrides)
    cmd = s.command()
    assert cmd[:4] == [sys.executable, "-m", "gradalign.cli", "run"]
    assert cmd[4::2] == ["--set"] * len(s.overrides) and cmd[5::2] == list(s.overrides)
    cfg = load_config(None, list(s.overrides))
    assert (cfg.seed, cfg.data.seed, cfg.data.regime, cfg.out_dir) == (
        1,
        1,
        "noisy",
        str(s.out_dir),
    )
    pinned = bench.plan_runs(tmp_path, ["noisy"], ["sim"], 3, data_seed=7)
    assert [(p.seed, p.data_seed) for p in pinned] == [(0, 7), (1, 7), (2, 7)]


def test_plan_runs_rejects_fields_the_bench_sets(tmp_path):
    with pytest.raises(bench.BenchError, match="--modes"):
        bench.plan_runs(tmp_path, ["noisy"], ["sim"], 1, ["select.mode=dot"])


def _finish(spec: bench.RunSpec, overrides: list[str]) -> None:
    """Leave a finished run of `overrides` in the spec's directory."""
    write_yaml(spec.out_dir / "config.yaml", load_config(None, overrides).to_dict())
    write_json(spec.out_dir / "summary.json", {"wall_s": 42.0})


def test_finished_runs_are_skipped_and_other_configs_refused(tmp_path):
    (spec,) = bench.plan_runs(tmp_path, ["noisy"], ["rand"], 1, ["rounds=2"])
    assert not bench.is_finished(spec)
    _finish(spec, list(spec.overrides) + ["model.cache_dir=/elsewhere"])  # cache: same run
    assert bench.is_finished(spec)
    (result,) = bench.run_bench([spec])
    assert (result.status, result.wall_s) == ("skipped", 42.0)
    (other,) = bench.plan_runs(tmp_path, ["noisy"], ["rand"], 1, ["rounds=3"])
    with pytest.raises(bench.BenchError, match="different config \\(rounds: 2 there, 3 now\\)"):
        bench.run_bench([other])


def test_config_changes_names_fields_and_ignores_new_ones():
    old = {"rounds": 2, "out_dir": "a", "model": {"cache_dir": "x", "name": "t"}, "gone": 1}
    new = {"rounds": 2, "out_dir": "b", "model": {"cache_dir": "y", "name": "u"}, "added": 0}
    assert bench.config_changes(old, new) == ["model.name: 't' there, 'u' now"]


def test_parallel_bench_runs_the_first_run_of_each_warm_start_first(tmp_path, monkeypatch):
    order: list[str] = []

    def fake_run_one(spec, threads=None):
        order.append(spec.name)
        return bench.RunResult(spec, "done", 0.0, 0)

    monkeypatch.setattr(bench, "run_one", fake_run_one)
    specs = bench.plan_runs(tmp_path, ["noisy", "lowutility"], ["sim", "rand"], 2)
    results = bench.run_bench(specs, jobs=2)
    assert [r.spec for r in results] == specs  # in plan order, whatever the finish order
    # regimes and data seeds share the warm start: one run goes first, alone
    assert order[0] == "noisy/sim/seed0" and sorted(order) == sorted(s.name for s in specs)
    order.clear()
    wide = [
        *specs[:2],
        *bench.plan_runs(tmp_path, ["noisy"], ["sim"], 1, ["data.families=[addition]"]),
    ]
    wide[2] = dataclasses.replace(wide[2], out_dir=tmp_path / "other")
    bench.run_bench(wide, jobs=2)
    assert set(order[:2]) == {"noisy/sim/seed0"} and order[2] == "noisy/rand/seed0"
    assert bench.warmstart_group(specs[0]) == bench.warmstart_group(specs[-1])
    assert bench.warmstart_group(specs[0]) != bench.warmstart_group(wide[2])


@pytest.mark.slow
def test_tiny_bench_end_to_end(tmp_path):
    """2 modes × 1 regime × 1 seed through the CLI; a re-run skips both; a failing run is
    recorded and the run after it still runs."""
    from gradalign.cli import app

    out = tmp_path / "bench"
    sets = [x for item in TINY + [f"model.cache_dir={tmp_path / 'cache'}"] for x in ("--set", item)]
    args = ["bench", "regimes", "--regimes", "noisy", "--modes", "sim,rand", "--seeds", "1"]
    args += ["--out", str(out), *sets]
    first = CliRunner().invoke(app, args)
    assert first.exit_code == 0, first.output
    for mode in ("sim", "rand"):
        run_dir = out / "noisy" / mode / "seed0"
        assert (run_dir / "summary.json").is_file() and (
            run_dir / "rounds/0001/metrics.json"
        ).is_file()
        assert read_json(run_dir / "bench-run.json")["status"] == "done"
    res = read_json(out / "report" / "results.json")
    assert set(res["final_accuracy"]["noisy"]) == {"sim", "rand"}
    assert set(res["vs_rand"]["noisy"]) == {"sim"}
    assert (out / "report" / "report.md").is_file() and (out / "report" / "accuracy.png").is_file()
    assert [r["status"] for r in read_json(out / "bench.json")["runs"]] == ["done", "done"]
    stamp = (out / "noisy" / "sim" / "seed0" / "summary.json").stat().st_mtime_ns

    again = CliRunner().invoke(app, args)
    assert again.exit_code == 0, again.output
    assert again.output.count("skipped (finished earlier)") == 2
    assert (out / "noisy" / "sim" / "seed0" / "summary.json").stat().st_mtime_ns == stamp

    overrides = TINY + [f"model.cache_dir={tmp_path / 'cache'}"]
    results, _ = bench.run_regimes(out, ["noisy"], ["bogus", "accgreedy"], 1, overrides)
    bad, good = results
    assert bad.status == "failed" and bad.returncode == 2
    assert "select.mode" in bad.stderr_tail
    assert good.status == "done"
    record = read_json(out / "noisy" / "bogus" / "seed0" / "bench-run.json")
    assert record["status"] == "failed" and "select.mode" in record["stderr_tail"]
    from gradalign.analysis.report import build_report

    build_report(out)
    md = Path(out / "report" / "report.md").read_text()
    assert "noisy/bogus/seed0 (exit 2)" in md and "accgreedy" in md
