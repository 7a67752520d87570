"""Hand-built scoring batches: random token groups with given rewards, shared by the scorer
tests (`test_fastscore.py`) and the distributed scoring worker (`distributed_worker.py`)."""

from __future__ import annotations

import numpy as np
import torch

from gradalign.core.grpo import SequenceBatch, group_advantages, pack_sequences

Group = tuple[list[int], list[list[int]], list[float]]  # prompt, completions, rewards


def batch_of(groups: list[Group]) -> SequenceBatch:
    prompts, completions, rewards, group = [], [], [], []
    for p, (prompt, comps, rs) in enumerate(groups):
        prompts += [prompt] * len(comps)
        completions += comps
        rewards += rs
        group += [p] * len(comps)
    input_ids, attention_mask, completion_mask = pack_sequences(prompts, completions, pad_id=0)
    group_t = torch.tensor(group)
    adv = group_advantages(torch.tensor(rewards, dtype=torch.float64), group_t, len(groups))
    return SequenceBatch(input_ids, attention_mask, completion_mask, adv, group_t, len(groups))


def tokens(rng: np.random.Generator, lo: int, hi: int) -> list[int]:
    return rng.integers(4, 85, size=int(rng.integers(lo, hi + 1))).tolist()


def make_batch(rewards: list[list[float]], seed: int) -> SequenceBatch:
    """Random prompts (3-8 tokens, one per group) and completions (2-12 tokens)."""
    rng = np.random.default_rng(seed)
    return batch_of([(tokens(rng, 3, 8), [tokens(rng, 2, 12) for _ in rs], rs) for rs in rewards])
