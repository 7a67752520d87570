"""`gradalign score`: a verl Parquet pool (system messages) scored, its chosen rows exported
with the file's own schema; a JSONL pool's chosen lines byte for byte; resuming an
interrupted score; the command line and its refusals."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from gradalign_runs import SCORED
from typer.testing import CliRunner

import gradalign
from gradalign.cli import app
from gradalign.config import ConfigError, config_from_dict
from gradalign.engine.round_scoring import ChunkScorer
from gradalign.run.checkpoint import ResumeError
from gradalign.run.setup import build_setup
from gradalign.storage import read_json, read_jsonl

SYSTEM = {"role": "system", "content": "Add the numbers."}


def _verl_rows(n: int) -> list[dict]:
    return [
        {
            "data_source": "addition",
            "prompt": [SYSTEM, {"role": "user", "content": f"{i}+{i + 3}"}],
            "ability": "math",
            "reward_model": {"ground_truth": str(2 * i + 3), "style": "rule"},
            "extra_info": {"index": 100 + i, "split": "train"},
        }
        for i in range(n)
    ]


def _jsonl(path: Path, rows: list[str]) -> str:
    path.write_text("".join(r + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict:
    """A verl Parquet pool of 20 (system message in every prompt), a plain JSONL pool of 12
    with irregular spacing, validation and eval JSONL files."""
    d = tmp_path_factory.mktemp("score-data")
    pq.write_table(pa.Table.from_pylist(_verl_rows(20)), d / "pool.parquet")
    plain = [f'{{"question": "{i}+{i + 7}",   "answer": "{2 * i + 7}"}}' for i in range(12)]
    return {
        "parquet": str(d / "pool.parquet"),
        "jsonl": _jsonl(d / "plain.jsonl", plain),
        "plain_lines": plain,
        "validation": _jsonl(
            d / "val.jsonl", [json.dumps({"question": f"{i}+{i}", "answer": 2 * i}) for i in range(40, 48)]
        ),
        "eval": _jsonl(
            d / "eval.jsonl", [json.dumps({"question": f"{i}+1", "answer": i + 1}) for i in range(50, 54)]
        ),
        "cache": str(d / "cache"),
    }  # fmt: skip


def _cfg(data: dict, pool: str, **select) -> object:
    return config_from_dict(
        {
            "model": {"warmstart_steps": 60, "warmstart_flaw": "none", "cache_dir": data["cache"]},
            "data": {
                "families": ["addition"],
                # coin-flip rewards: a weakly warm-started model gets varied rewards, so
                # group gradients and the validation direction are not zero
                "pool_files": [{"path": pool, "reward": "coinflip"}],
                "validation_files": [{"path": data["validation"], "reward": "coinflip"}],
                "eval_files": [{"path": data["eval"], "reward": "exact"}],
            },
            "rollout": {"k_r": 4, "k_v": 4, "max_new_tokens": 6},
            "select": {"chunk_size": 8, "k": 2, **select},
            "train": {"batch_size": 2, "num_generations": 2},
        }
    )


@pytest.fixture(scope="module")
def parquet_setup(data):
    return build_setup(_cfg(data, data["parquet"]))


def test_verl_parquet_scored_and_exported_with_its_schema(data, parquet_setup, tmp_path):
    cfg = parquet_setup.cfg
    result = gradalign.score(cfg, tmp_path, top=5, setup=parquet_setup)
    rows = read_jsonl(tmp_path / "scores.jsonl")
    assert (result.n_scored, result.n_selected) == (20, 5) and len(rows) == 20
    assert result.selected == [tmp_path / "selected.parquet"]
    assert [r["row"] for r in rows] == list(range(20))  # pool order, joined on the file's rows
    assert {r["file"] for r in rows} == {data["parquet"]}
    assert [r["index"] for r in rows] == list(range(100, 120))
    assert {r["data_source"] for r in rows} == {"addition"} and {r["line"] for r in rows} == {None}
    assert sorted(read_json(tmp_path / "chunks" / "manifest.json")["chunks"]) == [
        list(range(0, 8)), list(range(8, 16)), list(range(16, 20))
    ]  # fmt: skip
    for r in rows:  # sim: cos(g_p, g^_V) = dot / (norm + 1e-5), 0 for zero-variance groups
        want = 0.0 if r["zero_variance"] else r["dot_val"] / (r["norm"] + 1e-5)
        assert r["score"] == pytest.approx(want, rel=1e-9, abs=1e-12)
    assert any(r["score"] != 0 for r in rows)
    best = sorted(rows, key=lambda r: (-r["score"], r["id"]))
    assert [r["rank"] for r in best] == list(range(20))
    chosen = [r["row"] for r in best[:5]]

    original = pq.read_table(data["parquet"])
    selected = pq.read_table(tmp_path / "selected.parquet")
    assert selected.schema.equals(original.schema, check_metadata=True)
    assert selected.to_pylist() == original.take(chosen).to_pylist()
    # what verl's RLHFDataset reads: `prompt` a list of {role, content} (system message
    # kept), `data_source`, `reward_model.ground_truth`, `extra_info`
    assert pa.types.is_list(selected.schema.field("prompt").type)
    first = selected.to_pylist()[0]
    assert first["prompt"][0] == SYSTEM and first["prompt"][1]["role"] == "user"
    assert first["reward_model"]["ground_truth"] == str(2 * chosen[0] + 3)
    assert first["extra_info"] == {"index": 100 + chosen[0], "split": "train"}


def test_every_chunk_is_scored_against_one_validation_direction(data, parquet_setup, tmp_path):
    gradalign.score(parquet_setup.cfg, tmp_path, setup=parquet_setup)
    norms = [
        {r["val_norm"] for r in read_jsonl(tmp_path / "chunks" / f"{c:04d}.jsonl")}
        for c in range(3)
    ]
    assert len(norms[0]) == 1 and norms[0] == norms[1] == norms[2]
    metrics = [read_json(tmp_path / "chunks" / f"{c:04d}.metrics.json") for c in range(3)]
    val = [{k: v for k, v in m.items() if k.startswith("val/")} for m in metrics]
    assert val[0] == val[1] == val[2] and "val/split_half_cos" in val[0]  # one g^_V
    assert metrics[0]["score/val_norm"] == pytest.approx(1.0, abs=1e-4)
    assert all(0.0 <= m["select/chunk_pass_rate"] <= 1.0 for m in metrics)


def test_interrupted_score_resumes_from_finished_chunks(data, parquet_setup, tmp_path, monkeypatch):
    cfg = parquet_setup.cfg
    gradalign.score(cfg, tmp_path / "whole", top=4, setup=parquet_setup)
    real = ChunkScorer.score
    calls = []

    def crash_at_chunk_1(self, chunk, ids, round_, timings=None):  # chunk 1's first scoring
        calls.append(round_)
        if calls == [0, 1]:
            raise RuntimeError("killed")
        return real(self, chunk, ids, round_, timings)

    monkeypatch.setattr(ChunkScorer, "score", crash_at_chunk_1)
    with pytest.raises(RuntimeError, match="killed"):
        gradalign.score(cfg, tmp_path / "cut", top=4, setup=parquet_setup)
    assert calls == [0, 1]
    assert sorted(p.name for p in (tmp_path / "cut" / "chunks").iterdir()) == [
        "0000.jsonl", "0000.metrics.json", "manifest.json"
    ]  # fmt: skip
    calls.clear()
    gradalign.score(cfg, tmp_path / "cut", top=4, setup=parquet_setup)
    assert calls == [1, 2]  # chunk 0 read back, not scored again
    for name in ("scores.jsonl", "selected.parquet"):
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()


def test_another_config_in_the_same_directory_is_refused(
    data, parquet_setup, tmp_path, monkeypatch
):
    gradalign.score(parquet_setup.cfg, tmp_path, setup=parquet_setup)
    trained = _cfg(data, data["parquet"])
    trained.train.learning_rate = 1e-3  # training fields do not change scores: resumed
    calls = []
    monkeypatch.setattr(ChunkScorer, "score", lambda self, *a, **k: calls.append(a))
    gradalign.score(trained, tmp_path, setup=parquet_setup)
    assert calls == []
    other = _cfg(data, data["parquet"], mode="dot")
    with pytest.raises(
        ResumeError,
        match=r"holds the scores of another config .*select.mode: 'sim' there, 'dot' now",
    ):
        gradalign.score(other, tmp_path, setup=parquet_setup)


def test_jsonl_pool_selected_lines_byte_for_byte(data, tmp_path):
    cfg = _cfg(data, data["jsonl"], mode="accgreedy")
    result = gradalign.score(cfg, tmp_path, fraction=0.25)
    rows = read_jsonl(tmp_path / "scores.jsonl")
    assert result.n_selected == 3 and result.selected == [tmp_path / "selected.jsonl"]
    assert [r["line"] for r in rows] == list(range(1, 13)) and {r["row"] for r in rows} == {None}
    for r in rows:  # accgreedy: -|a_p - 0.5|
        assert r["score"] == pytest.approx(-abs(r["pass_rate"] - 0.5), abs=1e-12)
    chosen = sorted(rows, key=lambda r: r["rank"])[:3]
    lines = (tmp_path / "selected.jsonl").read_text().splitlines()
    assert lines == [data["plain_lines"][r["line"] - 1] for r in chosen]


def test_score_command_line(data, tmp_path, monkeypatch):
    config = tmp_path / "config.yaml"
    cfg = _cfg(data, data["jsonl"], mode="acc")
    config.write_text(json.dumps(cfg.to_dict()))
    runner = CliRunner()
    out = tmp_path / "out"
    result = runner.invoke(app, ["score", str(config), "--out", str(out), "--top", "2"])
    assert result.exit_code == 0, result.output
    assert f"selected 2: {out / 'selected.jsonl'}" in " ".join(result.output.split())
    assert len((out / "selected.jsonl").read_text().splitlines()) == 2
    ranks = [r["rank"] for r in read_jsonl(out / "scores.jsonl")]
    assert (
        sorted(ranks) == list(range(12))
        and np.isnan(  # acc draws: no scores
            [np.nan if r["score"] is None else r["score"] for r in read_jsonl(out / "scores.jsonl")]
        ).all()
    )
    both = runner.invoke(app, ["score", str(config), "--out", str(out), "--top", "2", "--fraction", "0.5"])  # fmt: skip
    assert both.exit_code == 2
    assert both.output.strip() == "config error: --top and --fraction: give one of them"
    none = runner.invoke(
        app, ["score", str(config), "--set", "select.mode=none", "--out", str(out)]
    )
    assert none.exit_code == 2 and "Traceback" not in none.output
    assert "select.mode: 'none' selects nothing to score" in none.output


def test_score_refuses_bad_selection_sizes(data):
    cfg = _cfg(data, data["jsonl"])
    with pytest.raises(ConfigError, match=r"^--fraction: expected a share in \(0, 1\], got 0.0$"):
        gradalign.score(cfg, "unused", fraction=0.0)
    with pytest.raises(ConfigError, match=r"^--top: expected at least 1 problem, got 0$"):
        gradalign.score(cfg, "unused", top=0)


def _score_process(out: Path, cache: Path, nproc: int) -> subprocess.CompletedProcess:
    launcher = ["-m", "gradalign.cli"]
    if nproc > 1:
        launcher = ["-m", "torch.distributed.run", "--standalone",
                    f"--nproc_per_node={nproc}", *launcher]  # fmt: skip
    sets = [
        f"--set={s}" for s in [*SCORED, "rollout.prompts_per_batch=4", f"model.cache_dir={cache}"]
    ]
    cmd = [sys.executable, *launcher, "score", *sets, "--out", str(out), "--top", "6"]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, env=env, capture_output=True, text=True)


@pytest.mark.slow
def test_two_processes_score_as_one(tmp_path):
    one = _score_process(tmp_path / "one", tmp_path / "cache", 1)
    assert one.returncode == 0, one.stdout + one.stderr
    two = _score_process(tmp_path / "two", tmp_path / "cache", 2)
    assert two.returncode == 0, two.stdout + two.stderr
    assert two.stdout.count("chunk 1/3:") == 1  # rank 0 alone logs
    a, b = (
        read_jsonl(tmp_path / "one" / "scores.jsonl"),
        read_jsonl(tmp_path / "two" / "scores.jsonl"),
    )
    assert [r["id"] for r in a] == [r["id"] for r in b] and len(a) == 48
    assert [r["pass_rate"] for r in a] == [r["pass_rate"] for r in b]
    for key in ("score", "dot_val", "norm"):
        x, y = (np.array([r[key] for r in rows], dtype=float) for rows in (a, b))
        assert np.abs(x).max() > 0
        np.testing.assert_allclose(y, x, rtol=1e-5, atol=1e-7 * np.abs(x).max())
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".lock", "chunks", "scores.jsonl", "selected.jsonl"
    ]  # fmt: skip
