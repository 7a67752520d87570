"""A tiny run reports to TensorBoard and writes metrics.jsonl and final/; `gradalign export`
writes a checkpoint's policy that transformers loads back as the run's policy."""

from __future__ import annotations

import io
import json
import warnings
from contextlib import redirect_stdout
from pathlib import Path

import pytest
import torch
from gradalign_runs import TWO_ROUNDS
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import ConfigError, load_config
from gradalign.run.loop import run
from gradalign.run.tracking import Tracker, check_trackers, scalars, trl_scalars

TINY = TWO_ROUNDS


def test_scalars_flatten_and_drop_what_is_no_number():
    m = {"eval/accuracy": 0.25, "select/source_mix": {"addition": 3}, "x": None, "t": "a"}
    assert scalars(m | {"nan": float("nan"), "b": True}) == {
        "eval/accuracy": 0.25,
        "select/source_mix/addition": 3.0,
        "b": 1.0,
    }
    assert trl_scalars({"loss": 0.5, "completions/mean_length": 7}) == {
        "trl/loss": 0.5,
        "trl/completions/mean_length": 7.0,
    }


def test_a_missing_tracker_package_is_a_config_error(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    cfg = load_config(None, ["train.report_to=tensorboard,wandb"])
    with pytest.raises(ConfigError) as err:
        check_trackers(cfg)
    assert str(err.value) == (
        "train.report_to: wandb needs the wandb package, which is not installed "
        "(pip install wandb, or gradalign[wandb])"
    )


def test_report_to_names_are_checked():
    with pytest.raises(ConfigError, match=r"train.report_to: 'tensorbord' is not one of none, "):
        load_config(None, ["train.report_to=tensorbord"])
    with pytest.raises(ConfigError, match="'none' cannot be combined with a tracker"):
        load_config(None, ["train.report_to=[none, mlflow]"])


def test_tracker_steps_are_grpo_steps(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = load_config(None, ["train.report_to=tensorboard", "train.steps_per_round=4"])
    tracker = Tracker(cfg, tmp_path)
    tracker.initial({"eval/accuracy": 0.1})
    for r in range(2):
        for s in (1, 2, 3, 4):
            tracker.trl_step(r, s, {"loss": float(10 * r + s)})
        tracker.round_done(r, {"eval/accuracy": 0.2 + r / 10, "select/n": 4})
    tracker.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    assert [(e.step, round(e.value, 6)) for e in acc.Scalars("eval/accuracy")] == [
        (0, 0.1),
        (4, 0.2),
        (8, 0.3),
    ]
    assert [(e.step, e.value) for e in acc.Scalars("trl/loss")] == [
        (s, v) for s, v in zip(range(1, 9), [1, 2, 3, 4, 11, 12, 13, 14])
    ]
    (text,) = acc.Tensors("config/text_summary")
    assert "report_to:\n  - tensorboard" in text.tensor_proto.string_val[0].decode()


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory) -> Path:
    """A 2-round run with report_to=tensorboard (and LoRA-free full weights in final/)."""
    base = tmp_path_factory.mktemp("tracked")
    cfg = load_config(
        None,
        TINY
        + [
            "train.report_to=tensorboard",
            f"out_dir={base / 'run'}",
            f"model.cache_dir={base / 'cache'}",
        ],
    )
    with warnings.catch_warnings(record=True) as caught, redirect_stdout(io.StringIO()) as out:
        warnings.simplefilter("always")
        run(cfg)
    RUN_OUTPUT["warnings"], RUN_OUTPUT["stdout"] = caught, out.getvalue()
    return base / "run"


RUN_OUTPUT: dict = {}  # what the tracked run warned and printed


@pytest.mark.slow
def test_the_run_prints_round_numbers_of_its_directories_and_no_library_warnings(tracked_run):
    libraries = ("transformers", "trl", "peft", "accelerate")
    noise = [
        f"{w.filename}: {w.message}"
        for w in RUN_OUTPUT["warnings"]
        if issubclass(w.category, (FutureWarning, DeprecationWarning))
        and any(f"/{lib}/" in w.filename for lib in libraries)
    ]
    assert noise == []
    lines = RUN_OUTPUT["stdout"].splitlines()
    assert [line.split(":")[0] for line in lines if line.startswith("[sim] round ")] == [
        "[sim] round 1/2",
        "[sim] round 2/2",
    ]
    assert sorted(p.name for p in (tracked_run / "rounds").iterdir()) == ["0001", "0002"]


@pytest.mark.slow
def test_run_reports_round_and_step_metrics_to_tensorboard(tracked_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tracked_run / "tb"))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    # the eval before training (step 0) and after each round (GRPO steps 2 and 4)
    assert [e.step for e in acc.Scalars("eval/accuracy")] == [0, 2, 4]
    # select/source_mix/SOURCE has a point in the rounds that selected from SOURCE
    selects = [t for t in tags if t.startswith("select/") and "source_mix" not in t]
    assert {"select/n", "select/corrupted_share"} <= set(selects)
    for tag in selects:
        assert [e.step for e in acc.Scalars(tag)] == [2, 4], tag
    assert [e.step for e in acc.Scalars("trl/loss")] == [1, 2, 3, 4]
    assert acc.Tags()["tensors"] == ["config/text_summary"]


@pytest.mark.slow
def test_metrics_jsonl_has_one_line_per_round(tracked_run):
    lines = (tracked_run / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["round"] for r in rows] == [1, 2]
    for r in rows:
        on_disk = json.loads(
            (tracked_run / "rounds" / f"{r['round']:04d}" / "metrics.json").read_text()
        )
        assert r == on_disk
    assert sorted((tracked_run / "checkpoints").iterdir())[-1].name == "round-0002"


def _greedy(model, tokenizer, prompts: list[str]) -> list[list[int]]:
    from gradalign.engine.policy import format_prompt

    out = []
    for p in prompts:
        ids = torch.tensor([format_prompt(tokenizer, p)])
        with torch.no_grad():
            gen = model.generate(ids, max_new_tokens=8, do_sample=False)
        out.append(gen[0, ids.shape[1] :].tolist())
    return out


@pytest.mark.slow
def test_final_dir_loads_with_auto_classes_as_the_policy(tracked_run):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gradalign.engine.policy import build_model, build_tokenizer
    from gradalign.run.checkpoint import load_weights, read_checkpoint

    tok = AutoTokenizer.from_pretrained(tracked_run / "final")
    model = AutoModelForCausalLM.from_pretrained(tracked_run / "final")
    ours_tok = build_tokenizer()
    prompts = ["12+34=", "7+8=", "what is 3+4?"]
    for p in prompts:
        assert tok(p)["input_ids"] == ours_tok(p)["input_ids"]
    assert (
        tok.apply_chat_template(
            [{"role": "user", "content": "1+2"}], tokenize=False, add_generation_prompt=True
        )
        == "Q:1+2\nA:"
    )
    policy = build_model(ours_tok, "tiny")
    load_weights(read_checkpoint(tracked_run / "checkpoints" / "round-0002"), policy)
    ids = torch.tensor([ours_tok("Q:12+34=\nA:")["input_ids"]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, policy(ids).logits, rtol=0, atol=0)
    assert _greedy(model, tok, prompts) == _greedy(policy, ours_tok, prompts)


@pytest.mark.slow
def test_export_round_writes_that_checkpoint_and_names_what_is_kept(tracked_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from gradalign.engine.policy import build_model, build_tokenizer
    from gradalign.run.checkpoint import load_weights, read_checkpoint

    runner = CliRunner()
    res = runner.invoke(
        app, ["export", str(tracked_run), "--round", "1", "--out", str(tmp_path / "r1")]
    )
    assert res.exit_code == 0, res.output
    assert res.output.splitlines()[-1] == f"full weights: {tmp_path / 'r1'}"
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "r1")
    policy = build_model(build_tokenizer(), "tiny")
    load_weights(read_checkpoint(tracked_run / "checkpoints" / "round-0001"), policy)
    for (name, a), (_, b) in zip(exported.state_dict().items(), policy.state_dict().items()):
        assert torch.equal(a, b), name

    res = runner.invoke(app, ["export", str(tracked_run), "--round", "7"])
    assert res.exit_code == 2
    assert " ".join(res.output.split()) == (
        f"export error: {tracked_run}: round 7 has no checkpoint; kept: round-0001, round-0002 "
        "(a run keeps the checkpoints of its last 2 rounds)"
    )


def test_export_of_a_directory_that_is_no_run_fails_in_one_line(tmp_path):
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nothing")])
    assert res.exit_code == 2
    assert " ".join(res.output.split()) == (
        f"export error: {tmp_path / 'nothing'} is not a run directory (it has no config.yaml)"
    )


@pytest.mark.slow
def test_a_run_directory_with_names_from_0_resumes_under_its_own_names(tmp_path):
    """A run directory written before names counted from 1 (rounds/0000, round-0000)."""
    settings = TINY + [f"out_dir={tmp_path / 'run'}", f"model.cache_dir={tmp_path / 'cache'}"]
    run(load_config(None, [*settings, "rounds=1"]))
    out = tmp_path / "run"
    (out / "rounds" / "0001").rename(out / "rounds" / "0000")
    (out / "checkpoints" / "round-0001").rename(out / "checkpoints" / "round-0000")
    summary = run(load_config(None, [*settings, "rounds=2"]))
    assert len(summary["eval_accuracy"]) == 2
    assert sorted(p.name for p in (out / "rounds").iterdir()) == ["0000", "0001"]
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["round-0000", "round-0001"]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["round"] for m in lines] == [1, 2]
    assert lines[1] == json.loads((out / "rounds" / "0001" / "metrics.json").read_text())
