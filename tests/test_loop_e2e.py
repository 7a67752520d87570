"""End-to-end: a 2-round run at tiny sizes writes the run directory (docs/run-directory.md)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gradalign_runs import TWO_ROUNDS

from gradalign.config import load_config
from gradalign.run.loop import run
from gradalign.run.setup import build_setup
from gradalign.storage import read_json, read_jsonl

TINY = TWO_ROUNDS


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sim", "accgreedy", "none"])
def test_two_round_run_writes_run_directory(tmp_path, mode, capsys):
    cfg = load_config(
        None,
        TINY
        + [
            f"select.mode={mode}",
            f"out_dir={tmp_path / 'run'}",
            f"model.cache_dir={tmp_path / 'cache'}",
        ],
    )
    summary = run(cfg)
    logged = " ".join(capsys.readouterr().out.split())
    out = tmp_path / "run"
    assert (out / "config.yaml").is_file()
    manifest = read_json(out / "chunks" / "manifest.json")
    assert manifest["chunk_size"] == 16 and len(manifest["chunks"]) == 2
    for r in range(2):
        d = out / "rounds" / f"{r + 1:04d}"
        metrics = read_json(d / "metrics.json")
        selected = read_jsonl(d / "selected.jsonl")
        scores = read_jsonl(d / "scores.jsonl")
        assert [s["id"] for s in scores] == manifest["chunks"][r] or mode == "none"
        for row in scores + selected:  # built-in problems: no file, a builtin data_source
            assert (row["file"], row["line"], row["row"], row["index"]) == (None,) * 4
            assert row["data_source"] in ("builtin:addition", "builtin:countdown2")
        expected_n = 48 if mode == "none" else 16 // 4
        assert len(selected) == expected_n == metrics["select/n"]
        assert metrics["train/steps"] == 2
        assert 0.0 <= metrics["eval/accuracy"] <= 1.0
        for phase in ("training", "eval"):
            assert metrics[f"time/{phase}_s"] > 0
        if mode == "sim":
            assert metrics["time/scoring_s"] > 0 and metrics["time/validation_rollouts_s"] > 0
            rows = read_jsonl(d / "rollouts.jsonl")
            assert {r["role"] for r in rows} == {"candidate", "validation"}
            assert len(rows) == 16 * 4 + 6 * 4
            picked = {s["id"] for s in selected}
            if metrics["val/zero_variance_frac"] == 1.0:  # g_V = 0: the documented fallback
                assert metrics["select/fallback"] == "zero_validation_gradient"
                assert metrics["score/val_norm"] == 0.0 and len(picked) == 4
                assert f"warning: round {r + 1}: selection mode 'sim': the validation" in logged
            else:
                assert metrics["select/fallback"] is None
                best = sorted(scores, key=lambda s: (-s["score"], s["id"]))[:4]
                assert picked == {s["id"] for s in best}
        if mode == "none":
            assert "time/scoring_s" not in metrics
    summary_file = json.loads((out / "summary.json").read_text())
    assert summary_file["eval_accuracy"] == summary["eval_accuracy"]
    picked = [
        s for r in range(2) for s in read_jsonl(out / "rounds" / f"{r + 1:04d}" / "selected.jsonl")
    ]
    for source, share in summary["selected_sources"].items():
        assert share == pytest.approx(
            sum(s["data_source"] == f"builtin:{source}" for s in picked) / len(picked)
        )
    last = read_json(out / "rounds" / "0002" / "metrics.json")
    assert summary["final_eval_accuracy_by_source"] == {
        k: last[f"eval/accuracy/{k}"] for k in ("addition", "countdown2")
    }
    assert len(summary["eval_accuracy"]) == 2


@pytest.mark.slow
def test_same_seed_same_selection(tmp_path):
    """Two runs with the same config select the same problems and reach the same metrics."""
    results = []
    for name in ("a", "b"):
        cfg = load_config(
            None,
            TINY
            + ["rounds=1", f"out_dir={tmp_path / name}", f"model.cache_dir={tmp_path / 'cache'}"],
        )
        run(cfg, build_setup(cfg))
        d = tmp_path / name / "rounds" / "0001"
        results.append(
            (
                read_jsonl(d / "selected.jsonl"),
                read_jsonl(d / "scores.jsonl"),
                read_json(d / "metrics.json")["eval/accuracy"],
            )
        )
    assert results[0] == results[1]


def test_warmstart_is_cached(tmp_path):
    from gradalign.engine.warmstart import load_or_warmstart

    logs: list[str] = []
    args = ("tiny", ["addition"], 3, 1e-3, 8, 0, set())
    m1, _ = load_or_warmstart(*args, cache_dir=str(tmp_path), log=logs.append)
    m2, _ = load_or_warmstart(*args, cache_dir=str(tmp_path), log=logs.append)
    assert "loaded from cache" in logs[-1] and "loaded from cache" not in logs[0]
    for (n, a), (_, b) in zip(m1.state_dict().items(), m2.state_dict().items()):
        assert (a == b).all(), n


def test_family_flaws_make_their_own_warm_start(tmp_path):
    """Per-family flaws train on other targets: another cache entry, other weights; the
    same per-family flaws again load that entry."""
    from gradalign.engine.warmstart import load_or_warmstart

    logs: list[str] = []
    args = ("tiny", ["addition", "countdown2"], 3, 1e-3, 8, 0, set())
    kw = {"cache_dir": str(tmp_path), "log": logs.append, "flaw": "junk", "flaw_frac": 0.6}
    plain, _ = load_or_warmstart(*args, **kw)
    own = {"countdown2": ("lead", 0.6)}
    m1, _ = load_or_warmstart(*args, **kw, family_flaws=own)
    m2, _ = load_or_warmstart(*args, **kw, family_flaws=own)
    assert len(list(tmp_path.glob("warmstart-tiny-*"))) == 2
    assert "loaded from cache" in logs[-1] and "loaded from cache" not in logs[1]
    same = [(a == b).all() for a, b in zip(m1.state_dict().values(), m2.state_dict().values())]
    other = [(a == b).all() for a, b in zip(m1.state_dict().values(), plain.state_dict().values())]
    assert all(same) and not all(other)


@pytest.mark.slow
def test_batched_scorer_matches_exact_in_the_loop(tmp_path):
    """The default batched scorer and the exact reference score the same round alike."""
    rows = {}
    for scorer in ("batched", "exact"):
        cfg = load_config(
            None,
            TINY
            + [
                "rounds=1",
                "select.mode=align",
                f"select.scorer={scorer}",
                f"out_dir={tmp_path / scorer}",
                f"model.cache_dir={tmp_path / 'cache'}",
            ],
        )
        run(cfg)
        d = tmp_path / scorer / "rounds" / "0001"
        rows[scorer] = (read_jsonl(d / "scores.jsonl"), read_jsonl(d / "selected.jsonl"))
    (fast, fast_sel), (ref, ref_sel) = rows["batched"], rows["exact"]
    assert [r["id"] for r in fast] == [r["id"] for r in ref]
    for a, b in zip(fast, ref):
        for key in ("dot_val", "dot_chunk", "norm", "score"):
            assert a[key] == pytest.approx(b[key], rel=1e-4, abs=1e-7), key
    assert fast_sel == ref_sel


@pytest.mark.slow
def test_projection_features_and_adam_preconditioning(tmp_path):
    cfg = load_config(
        None,
        TINY
        + [
            "select.project_dim=8",
            "select.precondition=adam",
            f"out_dir={tmp_path / 'run'}",
            f"model.cache_dir={tmp_path / 'cache'}",
        ],
    )
    run(cfg)
    for r in range(2):
        d = tmp_path / "run" / "rounds" / f"{r + 1:04d}"
        features = np.load(d / "features.npy")
        assert features.shape == (16, 8)
        zero = [s["zero_variance"] for s in read_jsonl(d / "scores.jsonl")]
        assert np.all(features[np.array(zero)] == 0.0)


def test_problems_longer_than_the_context_are_dropped_and_reported(capsys):
    from gradalign.config import ConfigError
    from gradalign.data.problems import Problem
    from gradalign.data.tasks import TaskSets
    from gradalign.engine.policy import build_model, build_tokenizer
    from gradalign.run.setup import fit_context

    tok = build_tokenizer()
    model = build_model(tok, "tiny")  # 256 positions
    cfg = load_config(
        None,
        ["rollout.max_new_tokens=16", "select.chunk_size=2", "select.k=1", "train.batch_size=2"],
    )
    ok = [Problem(i, f"{i}+1=", str(i + 1), "addition") for i in range(3)]
    long = Problem(9, "1+" * 150 + "1=", "151", "addition")
    sets = fit_context(cfg, model, tok, TaskSets(ok + [long], ok[:1], ok[1:]))
    assert [p.id for p in sets.pool] == [0, 1, 2] and sets.validation == ok[:1]
    out = " ".join(capsys.readouterr().out.split())
    assert "1 of 4 pool problems do not fit the context" in out and "pool problem 9" in out
    with pytest.raises(ConfigError, match="no validation problem fits the model context of 256"):
        fit_context(cfg, model, tok, TaskSets(ok, [long], ok))
    with pytest.raises(ConfigError, match=r"select.chunk_size \(4\) exceeds the 3 pool"):
        fit_context(_with_chunk(cfg, 4), model, tok, TaskSets(ok + [long], ok, ok))


def _with_chunk(cfg, size):
    import dataclasses

    return dataclasses.replace(cfg, select=dataclasses.replace(cfg.select, chunk_size=size))


def test_rollouts_go_through_the_setups_engine():
    """build_setup installs the vLLM engine as Setup.generate: the loop must sample with it."""
    from gradalign.data.problems import Problem
    from gradalign.data.tasks import TaskSets
    from gradalign.engine.policy import build_model, build_tokenizer
    from gradalign.engine.rollout import generate
    from gradalign.run.loop import evaluate
    from gradalign.run.setup import Setup

    calls = []

    def engine(*args, **kwargs):
        calls.append(len(args[2]))
        return generate(*args, **kwargs)

    tok = build_tokenizer()
    ok = [Problem(i, f"{i}+1=", str(i + 1), "addition") for i in range(3)]
    cfg = load_config(None, ["rollout.max_new_tokens=4"])
    setup = Setup(cfg, build_model(tok, "tiny"), tok, TaskSets(ok, ok, ok), generate=engine)
    assert "eval/accuracy" in evaluate(setup, 0) and calls == [3]


@pytest.mark.slow
def test_sampled_eval_every_round_changes_nothing_else(tmp_path):
    """rollout.eval_samples_every=1 adds eval/mean_at_k to every round; the run itself (its
    picks, its greedy evals, its final mean@k) is the same as without it."""
    runs = {}
    for every in (0, 1):
        cfg = load_config(
            None,
            TINY
            + [
                f"rollout.eval_samples_every={every}",
                f"out_dir={tmp_path / str(every)}",
                f"model.cache_dir={tmp_path / 'cache'}",
            ],
        )
        run(cfg)
        runs[every] = read_jsonl(tmp_path / str(every) / "metrics.jsonl")
    assert ["eval/mean_at_k" in m for m in runs[0]] == [False, True]
    assert ["eval/mean_at_k" in m for m in runs[1]] == [True, True]
    for a, b in zip(runs[0], runs[1]):
        for key in ("select/source_mix", "eval/accuracy", "train/loss"):
            assert a[key] == b[key]
    assert runs[0][-1]["eval/mean_at_k"] == runs[1][-1]["eval/mean_at_k"]
