"""Rollouts: `group_size` sampled completions per problem with HF `generate`, and their rewards.

Notation: P problems · G = group_size rollouts per problem (k_r for candidates, k_v for
validation problems, 1 for greedy eval) · N = P*G sequences.
The sampled token ids are kept exactly as generated (EOS included when it was sampled; the
padding after it dropped), so scoring never re-tokenises text.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from gradalign.core.grpo import (
    SequenceBatch,
    group_advantages,
    pack_sequences,
    zero_variance_groups,
)
from gradalign.data.problems import Problem
from gradalign.data.rewards import RewardWarning, check_failures, checked_reward
from gradalign.engine.policy import format_prompt


@dataclass(frozen=True)
class Rollouts:
    problems: list[Problem]  # [P]
    prompt_ids: list[list[int]]  # [P] chat-formatted prompt token ids
    completion_ids: list[list[int]]  # [N] sampled token ids (EOS included when sampled)
    texts: list[str]  # [N] decoded completions (special tokens dropped)
    rewards: np.ndarray  # float [N], always finite
    group: np.ndarray  # int [N], index into `problems`
    bad_rewards: int = 0  # rewards that raised or were not finite, scored 0 (`checked_reward`)
    clipped: int = 0  # completions that hit max_new_tokens without EOS (answers cut off)

    @property
    def num_groups(self) -> int:
        return len(self.problems)

    def pass_rates(self) -> np.ndarray:
        """a_p: mean reward of each problem's rollouts. # [P]"""
        count = np.bincount(self.group, minlength=self.num_groups)
        return np.bincount(self.group, self.rewards, self.num_groups) / np.maximum(count, 1)

    def zero_variance(self) -> np.ndarray:
        """True where all of a problem's rewards are equal. # [P]"""
        group = torch.as_tensor(self.group, dtype=torch.long)
        return zero_variance_groups(torch.as_tensor(self.rewards), group, self.num_groups).numpy()

    def to_batch(self, pad_id: int, scale_advantages: bool = False) -> SequenceBatch:
        prompts = [self.prompt_ids[g] for g in self.group]
        input_ids, attention_mask, completion_mask = pack_sequences(
            prompts, self.completion_ids, pad_id
        )
        group = torch.as_tensor(self.group, dtype=torch.long)
        adv = group_advantages(
            torch.as_tensor(self.rewards), group, self.num_groups, scale_advantages
        )
        return SequenceBatch(
            input_ids, attention_mask, completion_mask, adv, group, self.num_groups
        )

    def records(self, role: str) -> list[dict]:
        return [
            {
                "role": role,
                "problem_id": self.problems[g].id,
                "sample": int(j),
                "tokens": self.completion_ids[i],
                "text": self.texts[i],
                "reward": float(self.rewards[i]),
            }
            for i, (g, j) in enumerate(zip(self.group, _sample_index(self.group)))
        ]


def _sample_index(group: np.ndarray) -> np.ndarray:
    out = np.zeros(len(group), dtype=int)
    seen: dict[int, int] = {}
    for i, g in enumerate(group):
        out[i] = seen.get(int(g), 0)
        seen[int(g)] = out[i] + 1
    return out


@dataclass(frozen=True)
class SamplingConfig:
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 12
    prompts_per_batch: int = 64


def stage_of(salt: str) -> str:
    """The stage a rollout salt names, without its seed: "candidate rollouts:9012" ->
    "candidate rollouts" (messages show the stage, never the salt's internal number)."""
    stage, sep, seed = salt.rpartition(":")
    return (stage if sep and seed.isdigit() else salt) or "rollouts"


def score_rollouts(
    tokenizer,
    problems: list[Problem],
    prompt_ids: list[list[int]],
    completions: list[list[int]],
    group_size: int,
    salt: str,
) -> Rollouts:
    """Decode `group_size` completions per problem (problem-major order) and reward each with its
    problem's reward function; rollout i gets the salt "{salt}:{i}" (coin-flip rewards).

    A reward function that raises or returns NaN / Inf / a non-number scores that rollout 0.0
    (a check that cannot be made is not a pass; training sees the same through
    `score_completion`); such rollouts are counted in `Rollouts.bad_rewards` and one
    `RewardWarning` per call names the first (problem id, source, reward) and the count. A
    reward function that failed on every one of its completions here raises `RewardFailed`
    (`rewards.check_failures`). Completions without EOS ran to the length limit: counted in
    `Rollouts.clipped`."""
    group = np.repeat(np.arange(len(problems)), group_size)
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    checked = [
        checked_reward(problems[g], t, salt=f"{salt}:{i}")
        for i, (g, t) in enumerate(zip(group, texts))
    ]
    stage = stage_of(salt)
    check_failures([problems[g] for g in group], [error for _, error in checked], stage)
    rewards = np.array([reward for reward, _ in checked], dtype=np.float64)
    errors = [error for _, error in checked if error is not None]
    if errors:
        warnings.warn(
            f"{len(errors)} of {len(checked)} rewards ({stage}) could not be computed and "
            f"scored 0; first: {errors[0]}",
            RewardWarning,
            stacklevel=2,
        )
    eos = tokenizer.eos_token_id
    clipped = sum(not c or c[-1] != eos for c in completions)
    return Rollouts(problems, prompt_ids, completions, texts, rewards, group, len(errors), clipped)


def _left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    return ids, mask


def _trim(row: list[int], eos_id: int) -> list[int]:
    """Sampled tokens up to and including the first EOS (generation pads only after it);
    a row without EOS ran to max_new_tokens and is kept whole."""
    return row[: row.index(eos_id) + 1] if eos_id in row else row


def generate(
    model,
    tokenizer,
    problems: list[Problem],
    group_size: int,
    sampling: SamplingConfig,
    seed: int,
    greedy: bool = False,
    salt: str = "",
    progress: Callable[[int], None] | None = None,
    prompt_ids: list[list[int]] | None = None,
) -> Rollouts:
    """`group_size` completions for each problem (greedy: 1), rewarded by each problem's
    reward function. Seeded: the same model, problems and seed give the same rollouts.
    `prompt_ids` gives the prompts' tokens directly (default: the chat-formatted prompt)."""
    if prompt_ids is None:
        prompt_ids = [format_prompt(tokenizer, p.chat) for p in problems]
    completions = sample_completions(
        model, tokenizer, prompt_ids, group_size, sampling, seed, greedy, progress
    )
    return score_rollouts(tokenizer, problems, prompt_ids, completions, group_size, salt)


def num_batches(n_prompts: int, sampling: SamplingConfig) -> int:
    return -(-n_prompts // sampling.prompts_per_batch)


@torch.no_grad()
def sample_completions(
    model,
    tokenizer,
    prompt_ids: list[list[int]],
    group_size: int,
    sampling: SamplingConfig,
    seed: int,
    greedy: bool = False,
    progress: Callable[[int], None] | None = None,
    batches: range | None = None,
) -> list[list[int]]:
    """`group_size` completions per prompt (prompt-major), in batches of
    `sampling.prompts_per_batch` prompts; batch b samples with seed + b, so any run of `batches`
    (one rank's share) gives exactly the completions the whole would give for those prompts."""
    if greedy and group_size != 1:
        raise ValueError("greedy decoding gives one completion per problem (group_size=1)")
    device = next(model.parameters()).device
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    size = sampling.prompts_per_batch
    if batches is None:
        batches = range(num_batches(len(prompt_ids), sampling))
    kwargs = (
        {"do_sample": False}
        if greedy
        else {
            "do_sample": True,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": 0,
        }
    )
    completions: list[list[int]] = []
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for b in batches:
            torch.manual_seed(seed + b)
            batch = prompt_ids[b * size : (b + 1) * size]
            ids, mask = _left_pad(batch, pad_id)
            out = model.generate(
                input_ids=ids.to(device),
                attention_mask=mask.to(device),
                max_new_tokens=sampling.max_new_tokens,
                num_return_sequences=group_size,
                pad_token_id=pad_id,
                eos_token_id=eos_id,
                **kwargs,
            )
            for row in out[:, ids.shape[1] :].tolist():
                completions.append(_trim(row, eos_id))
            if progress is not None:
                progress(len(batch))
    model.train(was_training)
    return completions
