"""GradAlign in your own TRL GRPO script: `GradAlignCallback` on the built-in tiny model.

The training pool is the built-in addition task with unreliable rewards: half of the
problems reward a coin flip instead of the answer (`gradalign.data.tasks.make_regime("noisy")`).
A short supervised warm start (cached after the first run) gives the tiny model a
non-zero pass rate; then a plain TRL `GRPOTrainer` trains with the callback, which every
round scores a chunk of the pool against a small trusted validation set and trains on the
best-aligned problems. About a minute on 2 CPU cores; the first run adds the 300-step warm
start (1-2 minutes, then cached)::

    python examples/trl_callback.py [--mode sim] [--rounds 4]
    accelerate launch --num_processes 2 examples/trl_callback.py --fsdp    # GPUs: FSDP2
"""

from __future__ import annotations

import argparse
import itertools
import tempfile

import numpy as np
import torch
from datasets import Dataset
from trl import GRPOConfig, GRPOTrainer

from gradalign.config import SelectConfig
from gradalign.data.problems import Problem
from gradalign.data.rewards import score_completion
from gradalign.data.tasks import make_regime
from gradalign.engine.rollout import SamplingConfig, generate
from gradalign.engine.trl_args import FSDP2_SETTINGS
from gradalign.engine.warmstart import load_or_warmstart
from gradalign.integrations.trl_callback import GradAlignCallback

# transformers 5 calls it activation_checkpointing, transformers 4 gradient_checkpointing
NO_CHECKPOINTING = (
    "activation_checkpointing"
    if hasattr(GRPOConfig, "activation_checkpointing")
    else "gradient_checkpointing"
)


def rows(problems: list[Problem]) -> list[dict]:
    """TRL rows: a conversational prompt plus the columns the reward function reads."""
    return [
        {
            "prompt": [{"role": "user", "content": p.prompt}],
            "answer": p.answer,
            "reward_name": p.reward,  # "exact", or "coinflip" for a corrupted problem
            "problem_id": p.id,
        }
        for p in problems
    ]


_calls = itertools.count()


def reward(completions, answer, reward_name, problem_id, **_) -> list[float]:
    """A TRL reward function: exact match, or a coin flip for the corrupted problems."""
    call = next(_calls)
    return [
        score_completion(Problem(pid, "-", a, "addition", name), c[0]["content"], f"{call}:{i}")
        for i, (c, a, name, pid) in enumerate(zip(completions, answer, reward_name, problem_id))
    ]


def accuracy(model, tokenizer, problems: list[Problem]) -> float:
    ro = generate(model, tokenizer, problems, 1, SamplingConfig(max_new_tokens=4), 0, greedy=True)
    return float(ro.rewards.mean())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--mode", default="sim")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--warmstart-steps", type=int, default=300)
    ap.add_argument(
        "--fsdp", action="store_true", help="FSDP2 through accelerate (GPUs, under a launcher)"
    )
    opt = ap.parse_args()

    sets = make_regime("noisy", ["addition"], 256, 16, 128, seed=0, corrupt_frac=0.5)
    exclude = {p.prompt for p in sets.pool + sets.validation + sets.eval}
    model, tokenizer = load_or_warmstart(
        "tiny", ["addition"], opt.warmstart_steps, 3e-3, 128, 0, exclude
    )
    print(f"eval accuracy before GRPO: {accuracy(model, tokenizer, sets.eval):.3f}")

    steps_per_round = 4
    cb = GradAlignCallback(
        validation=Dataset.from_list(rows(sets.validation)),
        reward_funcs=[reward],
        select=SelectConfig(mode=opt.mode, chunk_size=64, k=4),  # 16 of 64 rows per round
        steps_per_round=steps_per_round,  # k_r = k_v = 8 rollouts at the trainer's sampling
        seed=0,
    )
    with tempfile.TemporaryDirectory() as out:
        args = GRPOConfig(
            output_dir=out,
            use_cpu=not torch.cuda.is_available(),
            bf16=False,
            **{NO_CHECKPOINTING: False},  # off: slower on CPU
            report_to="none",
            save_strategy="no",
            per_device_train_batch_size=64,  # 8 problems x 8 completions per step
            num_generations=8,
            max_completion_length=4,
            max_steps=opt.rounds * steps_per_round,
            learning_rate=2e-5,
            logging_steps=steps_per_round,
            seed=0,
            disable_tqdm=True,
            **(FSDP2_SETTINGS if opt.fsdp else {}),  # the callback then scores sharded
        )
        trainer = GRPOTrainer(
            model=model,
            processing_class=tokenizer,
            reward_funcs=[reward],
            args=args,
            train_dataset=Dataset.from_list(rows(sets.pool)),
            callbacks=[cb],
        )
        cb.attach(trainer)  # installs the round sampler
        trainer.train()

    corrupted = {i for i, p in enumerate(sets.pool) if p.meta.get("corruption")}
    print(f"\n[{opt.mode}] round | corrupted share: chunk -> selected | cos mean | scoring s")
    for h in cb.history:
        chunk = np.mean([i in corrupted for i in h["chunk"]])
        chosen = np.mean([i in corrupted for i in h["selected"]])
        cos = h["metrics"].get("score/cos_mean", float("nan"))
        print(f"  {h['round']:5d} | {chunk:.2f} -> {chosen:.2f} | {cos:+.3f} | {h['seconds']:.1f}")
    print(f"eval accuracy after GRPO: {accuracy(model, tokenizer, sets.eval):.3f}")


if __name__ == "__main__":
    main()
