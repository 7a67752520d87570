"""The real-model path: a local Hugging Face directory (a small random Qwen2 with a Qwen-style
chat template and byte-level BPE tokenizer, saved with save_pretrained), problem files in verl
and plain formats, LoRA, the vLLM backend's error path and the example config."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from local_qwen import qwen_tokenizer

from gradalign.config import ConfigError, config_from_dict, load_config
from gradalign.core import alignment
from gradalign.data.problems import PROVENANCE, Problem, provenance
from gradalign.engine import policy, vllm_backend
from gradalign.engine.policy import apply_lora, build_model, build_tokenizer, format_prompt
from gradalign.engine.rollout import SamplingConfig, generate
from gradalign.run import loop
from gradalign.run.sources import policy_from_config, sets_from_files
from gradalign.storage import read_json, read_jsonl

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "qwen2.5-math-1.5b.yaml"
ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def _write(path: Path, rows: list) -> str:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return str(path)


def _verl(i: int) -> dict:
    return {
        "data_source": "dapo",
        "prompt": [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": f"What is {i} + {i}?"},
        ],
        "reward_model": {"ground_truth": str(2 * i), "style": "rule"},
        "extra_info": {"index": f"v{i}"},
    }


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> dict[str, list[dict]]:
    """data.*_files entries: a verl pool file (10 problems), a plain GSM8K-style pool file
    (6 usable + 1 rejected + 1 duplicate + the first validation prompt), validation and eval."""
    d = tmp_path_factory.mktemp("problems")
    verl = _write(d / "verl.jsonl", [_verl(i) for i in range(10)])
    plain_rows: list = [
        {"question": f"Add 1 and {i}.", "answer": f"1 + {i} = {1 + i}\n#### {1 + i}"}
        for i in range(6)
    ]
    plain_rows += [
        {"question": "No answer here."},  # rejected: no answer field
        plain_rows[0],  # duplicate prompt: dropped
        {"question": "Double 11.", "answer": "#### 22"},  # a validation prompt: dropped
    ]
    plain = _write(d / "plain.jsonl", plain_rows)
    val = _write(
        d / "val.jsonl",
        [{"problem": f"Double {i}.", "answer": 2 * i} for i in range(11, 15)],
    )
    evl = _write(
        d / "eval.jsonl",
        [{"problem": f"Triple {i}.", "answer": float(3 * i)} for i in range(4)],
    )
    return {
        # coinflip on half the pool and on the validation set: a random model gets varied
        # rewards, so group gradients and the validation direction are not zero
        "pool_files": [
            {"path": verl, "reward": "coinflip"},
            {"path": plain, "reward": "exact", "source": "gsm8k-like"},
        ],
        "validation_files": [{"path": val, "reward": "coinflip", "source": "val"}],
        "eval_files": [{"path": evl, "reward": "math"}],
    }


def _cfg(qwen_dir: Path, files: dict, tmp_path: Path, **sections) -> object:
    data = {
        "rounds": 1,
        "out_dir": str(tmp_path / "run"),
        "model": {"name": str(qwen_dir), "device": "cpu", **sections.get("model", {})},
        "data": dict(files),
        "rollout": {"k_r": 2, "k_v": 2, "max_new_tokens": 8},
        "select": {"mode": "sim", "chunk_size": 8, "k": 2, **sections.get("select", {})},
        "train": {"steps_per_round": 1, "batch_size": 2, "num_generations": 2},
    }
    return config_from_dict(data)


# ---------------------------------------------------------------- loading a local checkpoint


def test_local_qwen_dir_loads_with_its_chat_template(qwen_dir, files, tmp_path):
    from transformers import Qwen2ForCausalLM

    model, tokenizer = policy_from_config(_cfg(qwen_dir, files, tmp_path))
    assert isinstance(model, Qwen2ForCausalLM)
    assert (tokenizer.eos_token, tokenizer.pad_token) == ("<|im_end|>", "<|endoftext|>")
    assert tokenizer.padding_side == "left"
    ids = format_prompt(tokenizer, "What is 30 + 4?")
    assert tokenizer.decode(ids, skip_special_tokens=False) == (
        "<|im_start|>user\nWhat is 30 + 4?<|im_end|>\n<|im_start|>assistant\n"
    )
    assert ids[0] == tokenizer.convert_tokens_to_ids("<|im_start|>")
    # the checkpoint's repetition_penalty 1.05 would make rollouts off-policy: reset
    assert model.generation_config.repetition_penalty == 1.0
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id


def test_verl_system_message_reaches_the_prompt(qwen_dir, files, tmp_path):
    cfg = _cfg(qwen_dir, files, tmp_path)
    _, tokenizer = policy_from_config(cfg)
    sets = sets_from_files(cfg, log=lambda _: None)
    verl = next(p for p in sets.pool if p.source == "dapo")
    assert verl.chat[0] == {"role": "system", "content": "Be brief."}
    assert tokenizer.decode(format_prompt(tokenizer, verl.chat), skip_special_tokens=False) == (
        f"<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n{verl.prompt}<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    plain = qwen_tokenizer()
    plain.chat_template = None  # a base model's tokenizer: the documented plain rendering
    assert format_prompt(plain, verl.chat) == plain(f"Be brief.\n\n{verl.prompt}")["input_ids"]
    assert format_prompt(plain, "What is 1 + 1?") == plain("What is 1 + 1?")["input_ids"]


def test_rollouts_on_local_qwen_keep_sampled_ids(qwen_dir, files, tmp_path):
    cfg = _cfg(qwen_dir, files, tmp_path)
    model, tokenizer = policy_from_config(cfg)
    sets = sets_from_files(cfg, log=lambda _: None)
    problems = sets.pool[:3]
    ro = generate(model, tokenizer, problems, 2, SamplingConfig(max_new_tokens=8), seed=0)
    assert ro.prompt_ids == [format_prompt(tokenizer, p.chat) for p in problems]
    assert ro.group.tolist() == [0, 0, 1, 1, 2, 2]
    eos = tokenizer.eos_token_id
    for ids, text in zip(ro.completion_ids, ro.texts):
        assert 1 <= len(ids) <= 8
        assert eos not in ids[:-1]  # cut at the first EOS, which is kept
        assert text == tokenizer.decode(ids, skip_special_tokens=True)
    assert set(ro.rewards.tolist()) <= {0.0, 1.0}
    again = generate(model, tokenizer, problems, 2, SamplingConfig(max_new_tokens=8), seed=0)
    assert again.completion_ids == ro.completion_ids


def test_directory_without_config_json_is_a_clear_error(tmp_path, files):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match=r"model.name: .*empty has no config.json"):
        policy_from_config(_cfg(tmp_path / "empty", files, tmp_path))
    with pytest.raises(ConfigError, match=r"model.name: .*is not a directory"):
        policy_from_config(_cfg(tmp_path / "missing", files, tmp_path))


# ---------------------------------------------------------------- problem files


def test_sets_from_files_ids_summaries_and_leak_check(qwen_dir, files, tmp_path):
    lines: list[str] = []
    sets = sets_from_files(_cfg(qwen_dir, files, tmp_path), log=lines.append)
    assert [p.id for p in sets.pool] == list(range(16))
    assert [p.id for p in sets.validation] == [1_000_000 + i for i in range(4)]
    assert [p.id for p in sets.eval] == [2_000_000 + i for i in range(4)]
    assert {p.source for p in sets.pool} == {"dapo", "gsm8k-like"}
    assert sets.pool[0].prompt == "What is 0 + 0?" and sets.pool[0].meta["index"] == "v0"
    assert sets.pool[0].reward == "coinflip" and sets.pool[10].reward == "exact"
    assert sets.pool[10].answer == "1"  # "#### 1" read by the gsm8k extractor
    assert sets.eval[1].answer == "3"  # 3.0 read as 3
    assert "Double 11." not in {p.prompt for p in sets.pool}
    pool_line = next(line for line in lines if line.startswith("pool set"))
    assert "1 duplicates" in pool_line and "1 record(s) rejected" in pool_line
    assert "no answer field" in pool_line
    assert any("dropped 1 problem(s) whose prompt is in the validation" in x for x in lines)


@pytest.mark.parametrize(
    ("entry", "message"),
    [
        ("pool.jsonl", r"data.pool_files\[1\]: expected a mapping"),
        ({"source": "x"}, r"data.pool_files\[1\]: missing 'path'"),
        ({"path": "{verl}", "colour": "red"}, r"data.pool_files\[1\].colour: unknown key"),
        ({"path": "/nonexistent/pool.jsonl"}, r"data.pool_files\[1\].path: .* is not a file"),
        ({"path": "{verl}", "reward": "nope"}, r"data.pool_files\[1\].reward: .*nope"),
        ({"path": "{verl}", "count": "ten"}, r"data.pool_files\[1\].count: expected an integer"),
        ({"path": "{verl}", "answer_extractor": "regex"}, r"data.pool_files\[1\]: .*regex"),
        ({"path": "{verl}", "count": 99}, r"data.pool_files: .*count 99 exceeds"),
    ],
)
def test_bad_pool_files_entry_names_the_field(qwen_dir, files, tmp_path, entry, message):
    verl = files["pool_files"][0]["path"]
    if isinstance(entry, dict):
        entry = {k: v.format(verl=verl) if isinstance(v, str) else v for k, v in entry.items()}
    bad = {**files, "pool_files": [files["pool_files"][0], entry]}
    with pytest.raises(ConfigError, match=message):
        sets_from_files(_cfg(qwen_dir, bad, tmp_path), log=lambda _: None)


def test_shared_validation_and_eval_prompt_and_small_pool_are_errors(qwen_dir, files, tmp_path):
    both = {**files, "eval_files": files["eval_files"] + files["validation_files"]}
    with pytest.raises(ConfigError, match="data.validation_files and data.eval_files: .*share 4"):
        sets_from_files(_cfg(qwen_dir, both, tmp_path), log=lambda _: None)
    cfg = _cfg(qwen_dir, files, tmp_path, select={"chunk_size": 32})
    with pytest.raises(ConfigError, match=r"select.chunk_size \(32\) exceeds the 16 pool"):
        sets_from_files(cfg, log=lambda _: None)


# ---------------------------------------------------------------- LoRA


def test_lora_leaves_only_adapters_trainable_and_scored(qwen_dir, files, tmp_path):
    cfg = _cfg(qwen_dir, files, tmp_path, model={"lora_r": 4, "lora_targets": ATTENTION})
    model, _ = policy_from_config(cfg)
    trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable) == 2 * 4 * 2  # (A, B) x 4 projections x 2 layers
    assert all("lora_A" in n or "lora_B" in n for n, _ in trainable)
    scored = policy.scored_parameters(model, "lora")
    assert [id(p) for p in scored] == [id(p) for _, p in trainable]
    a = dict(trainable)["base_model.model.model.layers.0.self_attn.k_proj.lora_A.default.weight"]
    assert a.shape == (4, 64)
    with pytest.raises(ValueError, match=r"model.lora_targets: \['qkv'\] name no linear layer"):
        apply_lora(build_model(build_tokenizer(), "tiny"), 4, 8, ["qkv"])


def test_lora_on_builtin_model(tokenizer):
    model = apply_lora(build_model(tokenizer, "tiny", seed=1), 4, 8, ATTENTION)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(names) == 16 and all("lora_" in n for n in names)
    problem = Problem(0, "12+3", "15", "addition")
    ro = generate(model, tokenizer, [problem], 2, SamplingConfig(max_new_tokens=4), seed=0)
    assert len(ro.completion_ids) == 2 and all(1 <= len(c) <= 4 for c in ro.completion_ids)


def _independent_group_gradients(model, params, ro, pad_id: int) -> list[torch.Tensor]:
    """g_p by the formula of docs/method.md, one unpadded sequence at a time, all in float64:
    L_p = -(1/T_p) sum_i A_i sum_t log pi(y_it | x, y_i<t), gradient over `params` only."""
    out = []
    for g in range(ro.num_groups):
        rows = np.nonzero(ro.group == g)[0]
        adv = ro.rewards[rows] - ro.rewards[rows].mean()
        total, tokens = 0.0, 0
        for i, a in zip(rows, adv):
            prompt, completion = ro.prompt_ids[g], ro.completion_ids[i]
            ids = torch.tensor([prompt + completion])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
            targets = ids[0, len(prompt) :]
            picked = logp[len(prompt) - 1 :].gather(1, targets[:, None]).sum()
            total = total + float(a) * picked
            tokens += len(completion)
        grads = torch.autograd.grad(-total / tokens, params)
        out.append(torch.cat([gr.reshape(-1) for gr in grads]).double())
    return out


def test_exact_alignment_over_adapters_matches_autograd(qwen_dir, files, tmp_path):
    cfg = _cfg(qwen_dir, files, tmp_path, model={"lora_r": 4, "lora_targets": ATTENTION})
    model, tokenizer = policy_from_config(cfg)
    model = model.double()
    with torch.no_grad(), torch.random.fork_rng():
        torch.manual_seed(1)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # B starts at 0, which would zero every gradient of A
                p.normal_(0, 0.1)
    sets = sets_from_files(cfg, log=lambda _: None)
    sampling = SamplingConfig(max_new_tokens=6)
    cand = generate(model, tokenizer, sets.pool[:3], 3, sampling, seed=1)
    val = generate(model, tokenizer, sets.validation[:2], 3, sampling, seed=2)
    # hand-set rewards: group 1 has zero variance, so its gradient is exactly 0
    cand = dataclasses.replace(cand, rewards=np.array([1, 0, 0, 1, 1, 1, 0, 1, 1], float))
    val = dataclasses.replace(val, rewards=np.array([0, 1, 0, 1, 0, 0], float))
    params = policy.scored_parameters(model, "lora")
    pad = tokenizer.pad_token_id
    direction = alignment.validation_direction(model, params, val.to_batch(pad))
    got = alignment.exact_alignment(model, params, cand.to_batch(pad), direction)

    g_cand = _independent_group_gradients(model, params, cand, pad)
    g_val = _independent_group_gradients(model, params, val, pad)
    g_v, g_c = sum(g_val), sum(g_cand)
    unit_v, unit_c = g_v / (g_v.norm() + 1e-5), g_c / (g_c.norm() + 1e-5)
    assert g_cand[1].abs().max() == 0.0 and got.norm[1] == 0.0
    assert all(g.norm() > 1e-3 for g in (g_cand[0], g_cand[2], g_v))
    np.testing.assert_allclose(got.norm, [float(g.norm()) for g in g_cand], rtol=1e-6)
    np.testing.assert_allclose(got.dot_val, [float(g @ unit_v) for g in g_cand], rtol=1e-6)
    np.testing.assert_allclose(got.dot_chunk, [float(g @ unit_c) for g in g_cand], rtol=1e-6)


# ---------------------------------------------------------------- one round end to end


@pytest.mark.slow
@pytest.mark.parametrize("lora_r", [0, 4])
def test_one_round_on_local_qwen(qwen_dir, files, tmp_path, lora_r):
    model_cfg = {"lora_r": lora_r, "lora_targets": ATTENTION}
    select_cfg = {"params": "lora" if lora_r else "all"}
    cfg = _cfg(qwen_dir, files, tmp_path, model=model_cfg, select=select_cfg)
    model, tokenizer = policy_from_config(cfg)
    sets = sets_from_files(cfg, log=lambda _: None)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    summary = loop.run(cfg, loop.Setup(cfg, model, tokenizer, sets))

    out = tmp_path / "run" / "rounds" / "0001"
    metrics = read_json(out / "metrics.json")
    scores, selected = read_jsonl(out / "scores.jsonl"), read_jsonl(out / "selected.jsonl")
    assert summary["rounds"] == 1 and len(summary["eval_accuracy"]) == 1
    assert metrics["select/n"] == 4 and metrics["train/steps"] == 1
    assert {s["id"] for s in scores} <= {p.id for p in sets.pool} and len(scores) == 8
    best = sorted(scores, key=lambda s: (-s["score"], s["id"]))[:4]
    assert [s["id"] for s in selected] == [s["id"] for s in best]
    by_id = {p.id: p for p in sets.pool}  # every row joins back on its file and line
    for row in scores + selected:
        assert {k: row[k] for k in PROVENANCE} == provenance(by_id[row["id"]])
        assert row["file"] == by_id[row["id"]].meta["file"] and row["line"] >= 1
    rows = read_jsonl(out / "rollouts.jsonl")
    assert sum(r["role"] == "candidate" for r in rows) == 8 * 2
    assert sum(r["role"] == "validation" for r in rows) == 4 * 2
    assert all(1 <= len(r["tokens"]) <= 8 for r in rows)
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, frozen[n])}
    if lora_r:  # only adapters move (base weights frozen)
        assert changed and all("lora_" in n for n in changed)
    else:
        assert any("embed_tokens" in n for n in changed)
    _final_loads_as_the_policy(tmp_path / "run", model, tokenizer, lora_r)


def _final_loads_as_the_policy(run_dir: Path, model, tokenizer, lora_r: int) -> None:
    """final/ (the adapter for LoRA) and `gradalign export --merge` load with transformers'
    Auto classes and give the trained policy's logits."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from typer.testing import CliRunner

    from gradalign.cli import app

    final = run_dir / "final"
    assert (final / "adapter_config.json").is_file() == bool(lora_r)
    assert (final / "model.safetensors").is_file() == (not lora_r)
    ids = torch.tensor([format_prompt(tokenizer, "What is 2 + 3?")])
    with torch.no_grad():
        want = model(input_ids=ids).logits
        loaded = AutoModelForCausalLM.from_pretrained(final)
        torch.testing.assert_close(loaded(input_ids=ids).logits, want, rtol=0, atol=0)
        assert (
            AutoTokenizer.from_pretrained(final)("2 + 3")["input_ids"]
            == tokenizer("2 + 3")["input_ids"]
        )
        res = CliRunner().invoke(app, ["export", str(run_dir), "--merge"])
        assert res.exit_code == 0, res.output
        what = "merged LoRA weights" if lora_r else "full weights"
        assert res.output.splitlines()[-1] == f"{what}: {final}"
        merged = AutoModelForCausalLM.from_pretrained(final)
        assert not (final / "adapter_config.json").exists()
        torch.testing.assert_close(merged(input_ids=ids).logits, want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- vLLM backend (error path)


@pytest.mark.skipif(vllm_backend.available(), reason="vLLM and a GPU are present")
def test_vllm_backend_without_vllm_or_gpu_says_what_to_install(qwen_dir, files, tmp_path):
    cfg = _cfg(qwen_dir, files, tmp_path)
    hint = r"rollout.backend='vllm' needs the vllm extra \(pip install gradalign\[vllm\]\)"
    with pytest.raises(vllm_backend.VLLMUnavailable, match=hint + " and a CUDA GPU; here "):
        vllm_backend.require()
    with pytest.raises(vllm_backend.VLLMUnavailable, match=hint):
        vllm_backend.engine_from_config(cfg, None, None)


def test_vllm_weights_merge_lora_under_plain_names(qwen_dir, files, tmp_path):
    cfg = _cfg(qwen_dir, files, tmp_path)
    plain, _ = policy_from_config(cfg)
    with vllm_backend.vllm_weights(plain) as weights:
        assert [n for n, _ in weights] == [n for n, _ in plain.named_parameters()]
    lora_cfg = _cfg(qwen_dir, files, tmp_path, model={"lora_r": 4, "lora_alpha": 8})
    model, _ = policy_from_config(lora_cfg)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_(0, 0.1)
    base = layer.base_layer.weight.detach().clone()
    delta = 8 / 4 * layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    with vllm_backend.vllm_weights(model) as weights:
        named = dict(weights)
        assert list(named) == [n for n, _ in plain.named_parameters()]
        merged = named["model.layers.0.self_attn.q_proj.weight"].clone()
    torch.testing.assert_close(merged, base + delta, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(layer.base_layer.weight, base, rtol=0, atol=1e-6)  # unmerged


# ---------------------------------------------------------------- the example config


def test_example_config_loads_and_its_files_parse(tmp_path, monkeypatch):
    cfg = load_config(EXAMPLE, [f"model.name={tmp_path}"])
    assert cfg.model.name == str(tmp_path) and cfg.model.dtype == "bfloat16"
    assert (cfg.model.lora_r, cfg.select.params, cfg.select.mode) == (16, "lora", "sim")
    assert cfg.n_select == 16 == cfg.train.batch_size * cfg.train.steps_per_round
    monkeypatch.chdir(ROOT)  # the example's paths are relative to the repository root
    lines: list[str] = []
    sets = sets_from_files(cfg, log=lines.append)  # the slices shipped in examples/data
    assert (len(sets.pool), len(sets.validation), len(sets.eval)) == (256, 40, 64)
    assert all("0 record(s) rejected" in line for line in lines)
    assert sets.validation[0].answer == "27" and sets.pool[0].answer == "72"
    assert sets.pool[0].prompt.endswith("put your final answer within \\boxed{}.")
