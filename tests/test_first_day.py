"""A new user's first day (issue 21), as they meet it: a local Qwen2-architecture checkpoint
with a BPE tokenizer, a verl-style Parquet pool with system messages, JSONL validation and
eval files, a TRL reward written for chat data, and the commands the README gives.

CLI cases check the exit code, the message line and that no traceback is printed."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from gradalign_runs import TWO_ROUNDS, command, gradalign_run
from typer.testing import CliRunner

from gradalign.cli import app
from gradalign.config import load_config
from gradalign.data import rewards
from gradalign.data.problems import Problem
from gradalign.data.rewards import checked_reward
from gradalign.engine.rollout import Rollouts
from gradalign.integrations.trl_rows import trl_rewards
from gradalign.run.diagnose import verdict
from gradalign.storage import read_json

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()

MODULE = "ga_first_day_rewards"
REWARDS = '''
CALLS = []

def chat_reward(prompts, completions, ground_truth, **kwargs):
    """Written for TRL's conversational format, as a TRL user writes it."""
    CALLS.append({"prompts": prompts, "completions": completions})
    return [float(c[0]["content"].strip() == g) for c, g in zip(completions, ground_truth)]

def always_fails(completions, **kwargs):
    raise ValueError("no grader configured")
'''
SYSTEM = {"role": "system", "content": "Answer with the number only."}


def verl_row(i: int) -> dict:
    return {
        "data_source": "toy",
        "prompt": [SYSTEM, {"role": "user", "content": f"What is {i} + {i}?"}],
        "ability": "math",
        "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
        "extra_info": {"index": i, "split": "train"},
    }


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def user(tmp_path_factory, qwen_dir) -> Iterator[dict]:
    """The user's working directory: their reward module, data/ (a verl Parquet pool of 16,
    JSONL validation and eval sets of 8) and my.yaml over them; runs go to runs/."""
    home = tmp_path_factory.mktemp("user")
    (home / f"{MODULE}.py").write_text(REWARDS)
    data = home / "data"
    data.mkdir()
    pq.write_table(pa.Table.from_pylist([verl_row(i) for i in range(16)]), data / "pool.parquet")
    write_jsonl(data / "val.jsonl", [{"question": f"What is {i} * 3?", "answer": str(3 * i)}
                                     for i in range(20, 28)])  # fmt: skip
    write_jsonl(data / "eval.jsonl", [{"question": f"What is {i} - 1?", "answer": str(i - 1)}
                                      for i in range(40, 48)])  # fmt: skip
    config = {
        "rounds": 2,
        "model": {"name": str(qwen_dir), "device": "cpu"},
        "data": {
            "pool_files": [{"path": str(data / "pool.parquet"), "reward": f"{MODULE}:chat_reward"}],
            "validation_files": [{"path": str(data / "val.jsonl"), "reward": "math"}],
            "eval_files": [{"path": str(data / "eval.jsonl"), "reward": "math"}],
        },
        "rollout": {"k_r": 2, "k_v": 2, "max_new_tokens": 8, "eval_samples": 2},
        "select": {"chunk_size": 8, "k": 2},
        "train": {"steps_per_round": 1, "batch_size": 2, "num_generations": 2,
                  "report_to": "tensorboard"},
    }  # fmt: skip
    (home / "my.yaml").write_text(yaml.safe_dump(config))
    sys.path.insert(0, str(home))
    yield {"home": home, "data": data, "config": home / "my.yaml", "qwen": qwen_dir}
    sys.path.remove(str(home))
    sys.modules.pop(MODULE, None)
    for name in [n for n in rewards._USER_REWARDS if n.startswith(f"{MODULE}:")]:
        del rewards._USER_REWARDS[name]


def cli(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, list(args))
    assert "Traceback" not in result.output
    return result.exit_code, result.output


@pytest.fixture(scope="module")
def run_dir(user) -> tuple[Path, str]:
    """`gradalign run my.yaml` to the end: the run directory and what it printed."""
    out = user["home"] / "runs" / "files"
    code, output = cli("run", str(user["config"]), "--set", f"out_dir={out}")
    assert code == 0, output
    return out, output


# ------------------------------------------------------------------ 1, 6, 11: diagnose


@pytest.mark.slow
def test_diagnose_runs_on_a_config_with_data_files(user, tmp_path) -> None:
    code, output = cli("diagnose", str(user["config"]), "--chunks", "1",
                       "--json", str(tmp_path / "d.json"))  # fmt: skip
    assert code == 0, output
    d = read_json(tmp_path / "d.json")
    assert d["data"] == str(user["data"] / "pool.parquet")  # the file, named
    assert d["clipped_share"] > 0.5 and d["max_new_tokens"] == 8  # a random model never stops
    (line,) = [x for x in output.splitlines() if x.startswith("verdict: ")]
    assert re.fullmatch(
        r"verdict: no: \d+% of the rollouts hit rollout.max_new_tokens=8 before ending, so "
        r"answers are cut off before the reward reads them; raise rollout.max_new_tokens "
        r"\(real models need hundreds of tokens\)",
        line,
    )
    assert re.search(r"cut off at max_new_tokens=8 +candidate \d+%, validation \d+%", output)


@pytest.mark.parametrize(
    ("measures", "advice"),
    [
        ({"val_pass_rate": 0.0}, "the policy solves almost none of the validation set (pass "
         "rate 0.00): an easier validation set or a stronger starting policy, or more rollouts"),
        ({"val_pass_rate": 1.0}, "the policy solves almost all of the validation set (pass "
         "rate 1.00): a harder validation set, or more rollouts"),
        ({"val_pass_rate": 0.4}, "the validation set's pass rate is 0.40: a larger validation "
         "set, or more rollouts"),
    ],
)  # fmt: skip
def test_diagnose_advice_follows_the_validation_pass_rate(measures: dict, advice: str) -> None:
    d = {"zero_variance_share": 0.2, "auc_clean": None, "k_r": 8, "transfer_cos": [0.9],
         "split_half_cos": [float("nan")], **measures}  # fmt: skip
    assert verdict(d) == f"no: the validation rollouts give no direction (in every diagnosed " \
        f"chunk a half of the validation set got equal rewards in all its rollouts): {advice} " \
        "(rollout.k_v)"  # fmt: skip


def test_diagnose_says_first_when_answers_are_cut_off_and_which_set_is_off() -> None:
    base = {"zero_variance_share": 0.95, "auc_clean": None, "k_r": 8, "transfer_cos": [0.9],
            "split_half_cos": [0.5], "max_new_tokens": 12}  # fmt: skip
    assert verdict(base | {"clipped_share": 1.0, "val_clipped_share": 0.4}).startswith(
        "no: 100% of the rollouts hit rollout.max_new_tokens=12 before ending"
    )
    assert "the policy solves almost none of the pool (pass rate 0.01): an easier pool or a " \
        "stronger starting policy" in verdict(base | {"chunk_pass_rate": 0.01})  # fmt: skip


# ------------------------------------------------------------------ 2: a reward that never works


@pytest.mark.slow
def test_a_reward_failing_on_every_call_stops_before_training(user) -> None:
    out = user["home"] / "runs" / "failing"
    code, output = cli(
        "run", str(user["config"]), "--set", f"out_dir={out}",
        "--set", f"data.pool_files=[{{path: {user['data'] / 'pool.parquet'}, "
        f"reward: '{MODULE}:always_fails'}}]",
    )  # fmt: skip
    assert code == 2, output
    (line,) = [x for x in output.splitlines() if x.startswith("reward error: ")]
    assert re.fullmatch(
        rf"reward error: {MODULE}:always_fails: ValueError: no grader configured \(problem "
        r"\d+, source 'toy'\); it failed on all 16 completions of the candidate rollouts, so "
        r"there is nothing to select or train on: fix the function \(a reward that fails on "
        r"some completions only scores them 0, counted as bad_rewards\)",
        line,
    )
    assert not (out / "checkpoints").exists() and "round 1/2" not in output  # no GRPO step


# ------------------------------------------------------------------ 3: chat completions


def test_one_chat_reward_module_through_the_run_path_and_the_trl_callback(user, qwen_dir):
    """The same TRL-style module, written for chat data, gets conversational prompts and
    completions under `gradalign run` (a verl record with a system message) as under the TRL
    callback (TRL rows with chat prompts), and gives the same rewards."""
    from gradalign.run.sources import sets_from_files

    cfg = load_config(user["config"])
    pool = sets_from_files(cfg, log=lambda _: None).pool
    p = next(q for q in pool if q.answer == "6")  # "What is 3 + 3?"
    module = sys.modules[MODULE]
    module.CALLS.clear()
    ours = [checked_reward(p, text) for text in ("6", " 7")]
    assert ours == [(1.0, None), (0.0, None)]
    run_calls = list(module.CALLS)
    chat = [SYSTEM, {"role": "user", "content": "What is 3 + 3?"}]
    assert run_calls[0] == {
        "prompts": [chat],
        "completions": [[{"role": "assistant", "content": "6"}]],
    }

    module.CALLS.clear()
    rows = [{"prompt": chat, "ground_truth": "6", "data_source": "toy"}]
    rollouts = Rollouts([Problem(0, "x", "", "trl")], [[1]], [[5], [6]], ["6", " 7"],
                        np.zeros(2), np.array([0, 0]))  # fmt: skip
    got = trl_rewards([module.chat_reward], [1.0], rows, rollouts)
    assert got.tolist() == [1.0, 0.0] == [r for r, _ in ours]
    (trl_call,) = module.CALLS  # TRL calls once with the batch: the same shapes per item
    assert trl_call["prompts"] == [chat, chat]
    assert trl_call["completions"] == run_calls[0]["completions"] + run_calls[1]["completions"]


@pytest.mark.slow
def test_the_run_scores_a_chat_reward_and_logs_lines_whole(run_dir) -> None:
    """3, 6, 9, 10 in one run on the user's files."""
    out, output = run_dir
    m = read_json(out / "rounds" / "0001" / "metrics.json")
    assert m["rollouts/bad_rewards"] == 0  # the chat-format reward never failed
    assert "select/corrupted_share" not in m and "select/low_utility_share" not in m  # 10
    assert read_json(out / "summary.json")["selected_share"] is None
    # 6: most rollouts of a random model run to max_new_tokens: said, each round, in one line
    warned = [x for x in output.splitlines() if "hit rollout.max_new_tokens=8" in x]
    assert [x.split(":")[1] for x in warned] == [" initial eval", " round 1", " round 2"]
    assert m["rollouts/clipped_frac"] > 0.5 and m["eval/clipped_frac"] > 0.5
    warned = warned[1:]
    assert re.fullmatch(
        r"warning: round 1: \d+% of the candidate rollouts and \d+% of the validation rollouts "
        r"hit rollout.max_new_tokens=8 before ending: answers are cut off before the reward "
        r"reads them; raise rollout.max_new_tokens \(its default of 12 is sized for the "
        r"built-in tasks; real models need hundreds of tokens\)",
        warned[0],
    )
    # 9: a log line longer than the 160 columns of a log stays one line
    (loaded,) = [x for x in output.splitlines() if x.startswith("pool set (data.pool_files)")]
    assert len(loaded) > 160 and loaded.endswith("0 record(s) rejected.")


@pytest.mark.slow
def test_tensorboard_counters_run_on_across_rounds_and_config_names_no_regime(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = run_dir
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    epoch = {e.step: e.value for e in acc.Scalars("trl/epoch")}  # TRL logs it twice a round
    assert list(epoch) == [1, 2] and epoch[1] > 0
    assert epoch[2] == pytest.approx(2 * epoch[1])  # the same round twice: twice as far
    tokens = [e.value for e in acc.Scalars("trl/num_tokens")]
    assert len(tokens) == 2 and tokens[1] > tokens[0] > 0
    state = read_json(out / "checkpoints" / "round-0002" / "state.json")
    assert state["trl_counters"]["num_tokens"] == pytest.approx(tokens[1])  # for a resume
    (text,) = acc.Tensors("config/text_summary")
    logged = text.tensor_proto.string_val[0].decode()
    assert "pool_files" in logged and "regime" not in logged and "warmstart" not in logged


@pytest.mark.slow
def test_report_of_one_run_reports_its_rounds(run_dir) -> None:
    out, _ = run_dir
    code, output = cli("report", str(out))
    assert code == 0, output
    assert "one run, per round" in output and "eval accuracy" in output
    # a random model solves nothing: no validation gradient, so every round fell back to rand
    assert "zero_validation_gradient" in output
    md = (out / "report" / "report.md").read_text()
    assert md.startswith("# GradAlign run report") and "mode `sim` on problem files" in md
    assert "Difference to `rand`" not in md and "Selection fell back to rand in 2 of 2" in md


# ------------------------------------------------------------------ 4: export without the data


@pytest.mark.slow
def test_export_needs_no_training_data(run_dir, user, tmp_path, monkeypatch) -> None:
    out, _ = run_dir
    moved = user["home"] / "data-moved"
    user["data"].rename(moved)  # the data moved away (or relative paths resolve elsewhere)
    try:
        monkeypatch.chdir(tmp_path)
        code, output = cli("export", str(out), "--round", "1")
    finally:
        moved.rename(user["data"])
    assert code == 0, output
    assert output.splitlines()[-1] == f"full weights: {out / 'final-round-0001'}"
    assert (out / "final-round-0001" / "model.safetensors").is_file()


# ------------------------------------------------------------------ 12: verl reads selected.parquet


@pytest.mark.slow
def test_selected_parquet_has_what_verl_reads(user, qwen_dir, tmp_path) -> None:
    from datasets import load_dataset
    from transformers import AutoTokenizer

    code, output = cli("score", str(user["config"]), "--out", str(tmp_path / "scores"),
                       "--top", "4")  # fmt: skip
    assert code == 0, output
    assert re.search(r"warning: \d+% of the candidate rollouts .*hit rollout.max_new_tokens=8",
                     output)  # 6: score warns too  # fmt: skip
    # as verl's RLHFDataset loads it: datasets' parquet reader, the chat template on `prompt`
    rows = load_dataset("parquet", data_files=str(tmp_path / "scores" / "selected.parquet"))
    rows = rows["train"]
    assert len(rows) == 4
    assert {"prompt", "data_source", "reward_model", "extra_info"} <= set(rows.column_names)
    tokenizer = AutoTokenizer.from_pretrained(qwen_dir)
    for row in rows:
        assert row["prompt"][0] == SYSTEM and row["prompt"][1]["role"] == "user"
        assert row["data_source"] == "toy"  # verl's reward manager picks the scorer by it
        assert row["reward_model"]["ground_truth"] == str(2 * row["extra_info"]["index"])
        text = tokenizer.apply_chat_template(row["prompt"], add_generation_prompt=True,
                                             tokenize=False)  # fmt: skip
        assert "Answer with the number only." in text
    docs = "".join(p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")])
    assert "data.train_files=scores/selected.parquet" in docs  # the recipe is written down


# ------------------------------------------------------------------ 5, 6: the docs and fields


def test_fields_say_which_defaults_are_for_the_built_in_models() -> None:
    code, output = cli("fields")
    assert code == 0
    assert "Defaults are sized for the built-in models" in " ".join(output.split())
    rows = {line.split()[0]: line for line in output.splitlines() if line.strip()}
    assert "512-1024: reasoning answers need" in rows["rollout.max_new_tokens"]
    assert "built-in data only" in rows["data.pool_size"]
    assert "your local HF model directory" in rows["model.name"]


def test_docs_install_into_an_existing_environment() -> None:
    docs = "".join(p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")])
    assert "pip install -e ./gradalign" in docs and "@ git+" in docs
    assert "pip install gradalign[" not in docs  # not on an index


# ------------------------------------------------------------------ 7: interruption


def test_ctrl_c_says_how_to_resume(monkeypatch) -> None:
    import gradalign.run.loop as loop

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(loop, "run", interrupted)
    code, output = cli("run")
    assert code == 130
    assert output.splitlines()[-1] == "interrupted; run the same command to resume"


@pytest.mark.slow
def test_ctrl_c_in_a_real_run_exits_130_and_the_same_command_resumes(tmp_path) -> None:
    out, cache = tmp_path / "run", tmp_path / "cache"
    env = os.environ | {"PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(command(TWO_ROUNDS, out, cache), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert proc.stdout is not None
    seen = []
    for line in proc.stdout:  # Ctrl-C once the run is past its start
        seen.append(line)
        if "initial eval accuracy" in line:
            proc.send_signal(signal.SIGINT)
            break
    rest, err = proc.communicate(timeout=600)
    printed = "".join(seen) + rest
    assert proc.returncode == 130, printed + err
    assert printed.splitlines()[-1] == "interrupted; run the same command to resume"
    assert "Traceback" not in printed + err
    again = gradalign_run(TWO_ROUNDS, out, cache)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "no usable checkpoint" not in again.stdout and "starting over" not in again.stdout
    assert "round 2/2" in again.stdout


def test_resuming_a_run_interrupted_in_round_1_warns_of_nothing(tmp_path, monkeypatch):
    import gradalign.run.loop as loop

    cfg = load_config(None, [f"out_dir={tmp_path}"])
    (tmp_path / "rounds" / "0001").mkdir(parents=True)  # staged, no checkpoint yet
    lines: list[str] = []
    monkeypatch.setattr(loop, "log", lines.append)
    assert loop.resume_point(cfg, tmp_path) is None
    (tmp_path / "checkpoints" / "round-0001").mkdir(parents=True)  # one that is damaged
    assert loop.resume_point(cfg, tmp_path) is None
    assert lines[0] == (
        f"[sim] {tmp_path}: no round had finished yet; starting round 1 (a selection it had "
        "staged is read back)"
    )
    assert lines[-1] == f"warning: {tmp_path}: no checkpoint verifies; starting again from round 1"


# ------------------------------------------------------------------ 9: warnings in a log


def test_python_warnings_print_in_one_line_without_their_source_line(tmp_path) -> None:
    cmd = [sys.executable, "-m", "gradalign.cli", "run", "--set",
           f"data.val_files=[{{path: {tmp_path / 'v.jsonl'}}}]"]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "Traceback" not in done.stderr + done.stdout
    warned = [x for x in done.stderr.splitlines() if "FutureWarning" in x]
    assert len(warned) == 1 and re.fullmatch(
        r"\w+\.py:\d+: FutureWarning: data.val_files is deprecated: it is the trusted "
        r"validation set, now data.validation_files \(verl's val_files, a test set, is our "
        r"eval_files\)",
        warned[0],
    )
    assert "cls(**kwargs)" not in done.stderr  # no source line under it


def test_a_long_log_line_is_not_wrapped(capsys) -> None:
    from gradalign.progress import log

    log("a long line" * 30)
    assert capsys.readouterr().out == "a long line" * 30 + "\n"


# ------------------------------------------------------------------ 13, 14: the repository's data


def test_nothing_reads_data_outside_the_repository() -> None:
    outside = "shared" + "/data"  # spelled so that this file does not match itself
    found = [
        str(p.relative_to(ROOT))
        for folder in ("src", "tests", "examples", "benchmarks")
        for p in (ROOT / folder).rglob("*")
        if p.is_file() and p.suffix in (".py", ".yaml", ".sh", ".md", ".json")
        and outside in p.read_text(errors="replace")
    ]  # fmt: skip
    assert found == []
    sizes = sum(p.stat().st_size for p in (ROOT / "examples" / "data").rglob("*.jsonl"))
    assert sizes < 400_000  # small slices, not the data sets


def test_my_yaml_is_the_one_in_the_docs_and_loads_as_written(monkeypatch) -> None:
    text = (ROOT / "examples" / "my.yaml").read_text()
    assert len(text.splitlines()) <= 14
    docs = [p.read_text() for p in [ROOT / "README.md", *ROOT.glob("docs/*.md")]]
    assert any(f"```yaml\n{text}```" in d for d in docs)  # shown whole, as the file holds it
    monkeypatch.chdir(ROOT)
    cfg = load_config(ROOT / "examples" / "my.yaml")
    assert cfg.model.name == "/path/to/your/hf-model"  # the one line a user must change
    from gradalign.run.sources import sets_from_files

    sets = sets_from_files(cfg, log=lambda _: None)  # the shipped slices
    assert (len(sets.pool), len(sets.validation), len(sets.eval)) == (256, 40, 64)


@pytest.mark.slow
def test_my_yaml_runs_on_the_shipped_data(tmp_path, monkeypatch) -> None:
    """examples/my.yaml with the user's model (a random Qwen2 with a 1,024-token context) and
    CPU-sized answers, rollouts and rounds: the data, the selection and training arithmetic,
    LoRA and every other setting as written."""
    from local_qwen import save_qwen

    model = save_qwen(tmp_path / "model", context=1024)
    monkeypatch.chdir(ROOT)
    cpu = ["model.dtype=float32", "rollout.max_new_tokens=8", "rollout.k_r=2", "rollout.k_v=2",
           "rollout.eval_samples=0", "rounds=1"]  # fmt: skip
    sets = [a for s in [f"model.name={model}", *cpu, f"out_dir={tmp_path / 'run'}"]
            for a in ("--set", s)]  # fmt: skip
    code, output = cli("run", "examples/my.yaml", *sets)
    assert code == 0, output
    assert read_json(tmp_path / "run" / "summary.json")["rounds"] == 1
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()  # LoRA, as written


# ------------------------------------------------------------------ hostile inputs


def test_a_truncated_safetensors_file_is_a_model_directory_error(user, qwen_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(qwen_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    code, output = cli("run", str(user["config"]), "--set", f"model.name={broken}",
                       "--set", f"out_dir={tmp_path / 'run'}")  # fmt: skip
    assert code == 2
    text = " ".join(output.split())
    assert f"config error: model.name: {weights} is not a readable safetensors file (" in text
    assert text.endswith("it may be truncated or damaged: copy or download it again")


def test_an_offset_past_the_end_says_it_skipped_every_record(user, tmp_path) -> None:
    pool = user["data"] / "pool.parquet"
    code, output = cli("run", str(user["config"]), "--set", f"out_dir={tmp_path / 'run'}",
                       "--set", f"data.pool_files=[{{path: {pool}, offset: 500}}]")  # fmt: skip
    assert code == 2
    assert " ".join(output.split()).endswith(
        f"config error: data.pool_files: {pool}: offset 500 skipped all 16 records of the "
        "file (records count from 0: offset must be below 16)"
    )
