"""GradAlignCallback in a user-built TRL GRPOTrainer, and its sampler's index stream."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
import torch

from gradalign.config import ConfigError, RolloutConfig, SelectConfig
from gradalign.data.problems import Problem
from gradalign.engine.policy import OFFLINE_ENV
from gradalign.engine.rollout import SamplingConfig, generate
from gradalign.integrations.round_sampler import RoundSampler
from gradalign.integrations.trl_callback import GradAlignCallback
from gradalign.integrations.trl_rows import trl_prompt_ids, trl_rewards


def _relabel(stream: list[int]) -> list[int]:
    """Each index replaced by the order of its first appearance (layout without labels)."""
    first: dict[int, int] = {}
    return [first.setdefault(i, len(first)) for i in stream]


def test_round_sampler_matches_trl_layout_and_selects_lazily():
    from trl.trainer.utils import RepeatSampler

    calls: list[int] = []

    def rows_of(r: int) -> list[int]:
        return [100 * r + j for j in range(4)]

    def pick(r: int) -> list[int]:
        calls.append(r)
        return rows_of(r)

    g, b, repeat, batches = 2, 2, 3, 2  # 4 selected rows fill exactly 2 batches of 2
    sampler = RoundSampler(pick, g, b, repeat, batches, rounds=2, seed=0)
    per_round = batches * repeat * b * g
    assert len(sampler) == 2 * per_round
    it = iter(sampler)
    assert calls == []  # nothing chosen before the first index is asked for
    first = [next(it) for _ in range(per_round)]
    assert calls == [0]  # the whole of round 0 without choosing round 1
    second = [next(it)]
    assert calls == [0, 1]
    second += list(it)
    assert set(first) == set(rows_of(0)) and set(second) == set(rows_of(1))
    trl = list(RepeatSampler(range(4), g, batch_size=b, repeat_count=repeat, shuffle=False))
    assert _relabel(first) == _relabel(trl) and _relabel(second) == _relabel(trl)
    # round numbers continue in the next iteration (the next epoch)
    assert len(list(sampler)) == 2 * per_round and calls == [0, 1, 2, 3]


def test_round_sampler_cycles_a_small_selection_in_whole_groups():
    sampler = RoundSampler(lambda r: [7, 8, 9], 4, 2, 1, 5, rounds=1, seed=3)
    stream = list(sampler)
    assert len(stream) == 5 * 2 * 4
    groups = [stream[i : i + 4] for i in range(0, len(stream), 4)]
    assert all(len(set(grp)) == 1 for grp in groups)  # each prompt 4 times in a row
    counts = Counter(grp[0] for grp in groups)  # 10 slots over 3 rows: cycled permutations
    assert set(counts) == {7, 8, 9} and max(counts.values()) - min(counts.values()) <= 1


def test_string_prompts_are_tokenised_as_trl_does(tokenizer, tiny_model):
    trainer = SimpleNamespace(processing_class=tokenizer, args=SimpleNamespace())
    prompts = ["12+3=", "7+40="]
    ids = trl_prompt_ids(trainer, prompts)
    assert ids == [list(x) for x in tokenizer(text=prompts)["input_ids"]]
    problems = [Problem(0, "a", "", "trl"), Problem(1, "b", "", "trl")]
    sampling = SamplingConfig(max_new_tokens=3)
    ro = generate(tiny_model, tokenizer, problems, 2, sampling, seed=0, prompt_ids=ids)
    assert ro.prompt_ids == ids and len(ro.texts) == 4


def test_trl_rewards_pass_columns_and_sum_with_weights(tokenizer, tiny_model):
    rows = [
        {"prompt": [{"role": "user", "content": "1+1"}], "answer": "2"},
        {"prompt": [{"role": "user", "content": "2+2"}], "answer": "4"},
    ]
    problems = [Problem(0, "1+1", "", "trl"), Problem(1, "2+2", "", "trl")]
    ro = generate(tiny_model, tokenizer, problems, 3, SamplingConfig(max_new_tokens=2), seed=0)
    seen: dict[str, Any] = {}

    def by_answer(completions, answer, **kwargs):
        seen.update(completions=completions, answer=answer, kwargs=kwargs)
        return [float(a == "4") for a in answer]

    def sometimes_none(completions, **_):
        return [None if i % 2 else 1.0 for i in range(len(completions))]

    out = trl_rewards([by_answer, sometimes_none], [2.0, 1.0], rows, ro, trainer_state="s")
    assert seen["answer"] == ["2"] * 3 + ["4"] * 3
    assert seen["completions"][0] == [{"role": "assistant", "content": ro.texts[0]}]
    assert seen["kwargs"]["trainer_state"] == "s" and len(seen["kwargs"]["prompts"]) == 6
    np.testing.assert_allclose(out, [1, 0, 1, 2, 3, 2])


def test_the_callback_is_a_public_name_of_the_package():
    import gradalign

    assert gradalign.GradAlignCallback is GradAlignCallback
    assert all(getattr(gradalign, name) is not None for name in gradalign.__all__)


def test_train_without_attach_is_refused():
    cb = GradAlignCallback([{"prompt": "1+1"}], reward_funcs=[lambda **_: [0.0]])
    with pytest.raises(RuntimeError, match="attach"):
        cb.on_train_begin(None, SimpleNamespace(global_step=0), None)


@pytest.mark.parametrize(
    "settings,message",
    [
        ({"rollout": RolloutConfig(k_r=1)}, r"rollout.k_r: needs >= 2 rollouts per group"),
        ({"rollout": RolloutConfig(top_p=1.5)}, r"rollout.top_p: must be in \(0, 1\], got 1.5"),
        (
            {"select": SelectConfig(chunk_size=8, k=16)},
            r"select.k \(16\) leaves 0 problems from chunk_size 8; lower k or raise chunk_size",
        ),
        (
            {"select": SelectConfig(features="output", params="last:1")},
            r"select.params: 'last:1' does not apply with select.features=output",
        ),
    ],
)
def test_the_callback_refuses_what_the_config_refuses(settings, message):
    with pytest.raises(ConfigError, match=message):
        GradAlignCallback([{"prompt": "1+1"}], **settings)


def fake_trainer(rows: int) -> SimpleNamespace:
    """What `attach` and a round without rollouts read of a TRL trainer."""
    args = SimpleNamespace(
        dataloader_num_workers=0, reward_weights=None, temperature=1.0, top_p=1.0,
        max_completion_length=4,
    )  # fmt: skip
    return SimpleNamespace(
        args=args,
        train_dataset=[{"prompt": f"{i}+1"} for i in range(rows)],
        accelerator=SimpleNamespace(num_processes=1, unwrap_model=lambda m: m),
        model=torch.nn.Linear(1, 1),
        reward_funcs=[lambda **_: [0.0]],
        callback_handler=SimpleNamespace(callbacks=[]),
        state=SimpleNamespace(global_step=0),
        processing_class=None,
        _get_train_sampler=lambda dataset=None: None,  # the hook `attach` replaces
    )


def test_mode_none_trains_on_the_whole_dataset_as_the_loop_trains_on_the_pool():
    cb = GradAlignCallback([], select=SelectConfig(mode="none", chunk_size=4, k=2)).attach(
        fake_trainer(10)
    )
    assert cb.select_round(0) == list(range(10))  # not just the chunk: plain GRPO
    assert cb.history[0]["metrics"]["select/n"] == 10
    assert len(cb.history[0]["chunk"]) == 4 and np.isnan(cb.history[0]["scores"]).all()


def test_importing_the_callback_changes_no_environment_variable():
    """A library import changes nothing outside it: only the `gradalign` command goes offline.
    The third-party modules it builds on are imported first (transformers' trainer sets
    TORCHINDUCTOR_CACHE_DIR itself)."""
    code = """
import json, os
import numpy, torch.func, torch.utils.data, yaml
from transformers import TrainerCallback
before = dict(os.environ)
import gradalign.integrations.trl_callback
changed = [k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)]
print(json.dumps(changed))
"""
    env = {k: v for k, v in os.environ.items() if k not in OFFLINE_ENV}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout.splitlines()[-1]) == []


def _digit_reward(completions, **_):
    """1 when the completion contains a digit: about half of a random tiny model's samples."""
    return [float(any(ch.isdigit() for ch in c[0]["content"])) for c in completions]


@pytest.mark.slow
@pytest.mark.parametrize("features", ["full", "output"])
def test_callback_trains_each_round_on_its_selection(tmp_path, tokenizer, features):
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from gradalign.data.tasks import make_task
    from gradalign.engine.policy import build_model

    sets = make_task(["addition"], pool_size=24, val_size=4, eval_size=0, seed=0)

    def rows(problems):
        return [
            {"prompt": [{"role": "user", "content": p.prompt}], "answer": p.answer}
            for p in problems
        ]

    pool = rows(sets.pool)
    seen: list[tuple[int, list[str]]] = []  # (optimizer step, prompts of one reward call)

    def train_reward(prompts, completions, answer, trainer_state, **kwargs):
        seen.append((trainer_state.global_step, [p[0]["content"] for p in prompts]))
        return _digit_reward(completions)

    g, spr, rounds = 4, 2, 3
    # transformers 5 calls it activation_checkpointing, transformers 4 gradient_checkpointing
    NO_CHECKPOINTING = (  # noqa: N806
        "activation_checkpointing"
        if hasattr(GRPOConfig, "activation_checkpointing")
        else "gradient_checkpointing"
    )
    args = GRPOConfig(
        output_dir=str(tmp_path),
        use_cpu=True,
        bf16=False,
        **{NO_CHECKPOINTING: False},  # off: slower on CPU
        report_to="none",
        save_strategy="no",
        per_device_train_batch_size=8,  # 2 prompts x 4 generations per step
        num_generations=g,
        max_completion_length=4,
        max_steps=rounds * spr,
        learning_rate=1e-3,
        logging_steps=1,
        seed=0,
        disable_tqdm=True,
    )
    cb = GradAlignCallback(
        validation=Dataset.from_list(rows(sets.validation)),
        reward_funcs=[_digit_reward],  # same reward, but not recording: the spy sees training only
        select=SelectConfig(mode="sim", chunk_size=8, k=4, features=features),  # 2 of 8 rows
        rollout=RolloutConfig(k_r=4, k_v=4, max_new_tokens=4),
        steps_per_round=spr,
        seed=0,
    )
    trainer = GRPOTrainer(
        model=build_model(tokenizer, "tiny", seed=0),
        processing_class=tokenizer,
        reward_funcs=[train_reward],
        args=args,
        train_dataset=Dataset.from_list(pool),
        callbacks=[cb],
    )
    cb.attach(trainer)
    trainer.train()

    assert [h["round"] for h in cb.history] == list(range(1, rounds + 1))  # from 1, as runs
    prompt = [row["prompt"][0]["content"] for row in pool]
    for h in cb.history:  # sim: the top-2 of the chunk by cosine, ties by ascending row
        scores = np.array(h["scores"])
        assert np.isfinite(scores).all() and np.ptp(scores) > 0  # real gradient scores
        top = np.lexsort((h["chunk"], -scores))[:2]
        assert h["selected"] == [h["chunk"][i] for i in top]
    assert sorted({step for step, _ in seen}) == list(range(rounds * spr))
    for step, prompts in seen:
        r = step // spr
        assert set(prompts) <= {prompt[i] for i in cb.history[r]["selected"]}, (step, prompts)
        groups = [prompts[i : i + g] for i in range(0, len(prompts), g)]
        assert len(prompts) == 8 and all(len(set(grp)) == 1 for grp in groups)
    chunks = [set(h["chunk"]) for h in cb.history]
    assert chunks[0].isdisjoint(chunks[1]) and chunks[1].isdisjoint(chunks[2])  # chunks move
    assert len({tuple(h["selected"]) for h in cb.history}) == rounds
    # rounds >= 1 are scored when the prefetch reads their first batch: one step early
    assert [h["scored_at_step"] for h in cb.history] == [0, spr - 1, 2 * spr - 1]
    logged = [e["gradalign/round"] for e in trainer.state.log_history if "gradalign/round" in e]
    assert logged == [1, 1, 2, 2, 3, 3]
