"""GRPO pieces as pure tensor functions (the method: docs/method.md).

Notation: N sequences (rollouts) · P groups (problems) · L padded sequence length ·
T = L - 1 next-token positions. `group[i]` is the group (problem) index of sequence i.
Mask convention, used everywhere: ``completion_mask: bool [N, T]``, True = the token at
position t+1 is a sampled completion token (EOS included) and counts in the loss.

Scoring loss of group p (GradAlign, arXiv 2602.21492, on-policy so the ratio is 1, no
clipping, no KL):

    A_i = r_i - mean_{j in p} r_j
    L_p = -(1 / T_p) * sum_{i in p} sum_t A_i * log pi(y_{i,t} | x, y_{i,<t})

with T_p the number of completion tokens in the whole group (token mean over the group).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from gradalign.core.logprobs import token_logprobs as chunked_logprobs


@dataclass(frozen=True)
class SequenceBatch:
    """Right-padded prompt+completion sequences of several groups."""

    input_ids: Tensor  # long [N, L]
    attention_mask: Tensor  # long [N, L], 1 = real token
    completion_mask: Tensor  # bool [N, T], True = token t+1 counts in the loss
    advantages: Tensor  # float [N]
    group: Tensor  # long [N], group index in 0..P-1
    num_groups: int  # P

    def to(self, device: torch.device | str) -> SequenceBatch:
        return SequenceBatch(
            self.input_ids.to(device),
            self.attention_mask.to(device),
            self.completion_mask.to(device),
            self.advantages.to(device),
            self.group.to(device),
            self.num_groups,
        )

    def select(self, rows: Tensor, num_groups: int, group: Tensor) -> SequenceBatch:
        """Rows `rows` with their groups renumbered to `group` (0..num_groups-1)."""
        length = int(self.attention_mask[rows].sum(1).max())  # trim common padding
        return SequenceBatch(
            self.input_ids[rows, :length],
            self.attention_mask[rows, :length],
            self.completion_mask[rows, : length - 1],
            self.advantages[rows],
            group,
            num_groups,
        )

    def group_rows(self) -> list[Tensor]:
        """The row indices of each group, ascending. # P x [rows of p]"""
        counts = torch.bincount(self.group, minlength=self.num_groups)  # [P]
        return list(torch.split(torch.argsort(self.group, stable=True), counts.tolist()))

    def take_groups(
        self, groups: Sequence[int], rows_of: Sequence[Tensor] | None = None
    ) -> SequenceBatch:
        """The rows of `groups`, group by group in that order, renumbered 0..len(groups)-1.
        `rows_of` is `group_rows()` when the caller already has it."""
        rows_of = self.group_rows() if rows_of is None else rows_of
        chosen = [rows_of[g] for g in groups]
        rows = torch.cat(chosen)
        sizes = torch.tensor([len(r) for r in chosen], device=rows.device)
        group = torch.arange(len(chosen), device=rows.device).repeat_interleave(sizes)
        return self.select(rows, len(chosen), group)


def pack_sequences(
    prompts: list[list[int]], completions: list[list[int]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """Right-pad prompt+completion token ids; returns input_ids [N, L],
    attention_mask [N, L] and completion_mask [N, L-1]."""
    lengths = [len(p) + len(c) for p, c in zip(prompts, completions)]
    n, length = len(lengths), max(lengths)
    input_ids = torch.full((n, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((n, length), dtype=torch.long)
    completion_mask = torch.zeros((n, length - 1), dtype=torch.bool)
    for i, (p, c) in enumerate(zip(prompts, completions)):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c, dtype=torch.long)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) - 1 : len(p) + len(c) - 1] = True  # predicts tokens of c
    return input_ids, attention_mask, completion_mask


def group_advantages(
    rewards: Tensor, group: Tensor, num_groups: int, scale: bool = False
) -> Tensor:
    """A_i = r_i - mean_{j in group(i)} r_j; with `scale`, divided by the group's std + 1e-4
    (unbiased std, as TRL's `scale_rewards="group"`). # [N] -> [N]"""
    rewards = rewards.double()
    count = torch.zeros(num_groups, dtype=torch.double).index_add_(
        0, group, torch.ones_like(rewards)
    )
    total = torch.zeros(num_groups, dtype=torch.double).index_add_(0, group, rewards)
    mean = total / count  # [P]
    adv = rewards - mean[group]  # [N]
    if scale:
        sq = torch.zeros(num_groups, dtype=torch.double).index_add_(0, group, adv**2)
        std = (sq / (count - 1).clamp(min=1)).sqrt()  # [P]
        adv = adv / (std[group] + 1e-4)
    return adv.float()


def zero_variance_groups(rewards: Tensor, group: Tensor, num_groups: int) -> Tensor:
    """True for groups whose rewards are all equal (their scoring gradient is 0). # [P]"""
    hi = torch.full((num_groups,), -torch.inf, dtype=torch.double)
    lo = torch.full((num_groups,), torch.inf, dtype=torch.double)
    hi = hi.scatter_reduce(0, group, rewards.double(), "amax")
    lo = lo.scatter_reduce(0, group, rewards.double(), "amin")
    return hi == lo


def token_logprobs(
    model: torch.nn.Module, input_ids: Tensor, attention_mask: Tensor, head_module: bool = False
) -> Tensor:
    """log pi(x_{t+1} | x_{<=t}) for every position, computed in chunks of tokens (never the
    whole [N, T, V] in fp32: `logprobs.token_logprobs`). # [N, L] -> [N, T]"""
    return chunked_logprobs(model, input_ids, attention_mask, head_module=head_module)


def group_losses(
    logprobs: Tensor, completion_mask: Tensor, advantages: Tensor, group: Tensor, num_groups: int
) -> Tensor:
    """L_p = -(1/T_p) sum_{i in p} A_i sum_t mask_{i,t} logprob_{i,t}. # [N, T] -> [P]"""
    mask = completion_mask.to(logprobs.dtype)
    seq_sum = (logprobs * mask).sum(1)  # [N]
    tokens = torch.zeros(num_groups, dtype=logprobs.dtype, device=logprobs.device)
    tokens = tokens.index_add(0, group, mask.sum(1))  # [P] T_p
    weighted = torch.zeros_like(tokens).index_add(0, group, advantages * seq_sum)  # [P]
    return -weighted / tokens.clamp(min=1)


def scoring_loss(model: torch.nn.Module, batch: SequenceBatch) -> Tensor:
    """sum_p L_p over the batch's groups; its gradient is sum_p g_p."""
    logprobs = token_logprobs(model, batch.input_ids, batch.attention_mask)
    losses = group_losses(
        logprobs, batch.completion_mask, batch.advantages, batch.group, batch.num_groups
    )
    return losses.sum()
