"""Candidate rollouts at a fraction of the full budget: successive halving.

Notation: P chunk problems · k_r0 first-stage rollouts per candidate · k_r rollouts in all
for a survivor (``rollout.k_r``) · S survivors.

``select.budget=halving`` (`halving_rollouts`) samples in two stages:

1. every candidate gets k_r0 rollouts, seeded `round_seed(seed, round, Stream.CANDIDATES)`;
2. a candidate whose k_r0 rewards are all equal *stops*: its group has zero variance, so
   g_p = 0 and it is scored by ``select.zero_variance`` like any zero-variance group
   (default: score 0.0), with the pass rate of its k_r0 rollouts (0 or 1). Every other
   candidate *survives* and gets k_r - k_r0 more rollouts, seeded `round_seed(seed, round,
   Stream.HALVING)`; its group gradient and pass rate use all k_r of its rollouts.

Rollouts generated: P·k_r0 + S·(k_r - k_r0) instead of P·k_r. The one approximation is
that a problem whose pass rate is near 0 or 1 can look zero-variance after k_r0 rollouts
and would not have after k_r: it stops with score 0 where the full budget might have given
it a small score of either sign.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradalign.data.problems import Stream, round_seed
from gradalign.engine.rollout import Rollouts

# (items, rollouts per item, seed, what) -> rollouts: `round_scoring.Sample`
Sample = Callable[[Sequence[Any], int, int, str], Rollouts]


def halving_rollouts(
    chunk: Sequence[Any], k_r: int, k_r0: int, seed: int, round_: int, sample: Sample
) -> tuple[Rollouts, np.ndarray]:
    """The chunk's candidate rollouts under successive halving (module docstring) and the
    survivors (bool [P]): k_r0 rollouts per candidate, k_r per survivor, problem-major."""
    first = sample(chunk, k_r0, round_seed(seed, round_, Stream.CANDIDATES), "candidate rollouts")
    survive = ~first.zero_variance()  # [P]
    idx = np.flatnonzero(survive)  # [S]
    if not len(idx):
        return first, survive
    more = sample(
        [chunk[int(i)] for i in idx],
        k_r - k_r0,
        round_seed(seed, round_, Stream.HALVING),
        "candidate rollouts, second stage",
    )
    return extend(first, more, idx), survive


def extend(first: Rollouts, more: Rollouts, idx: np.ndarray) -> Rollouts:
    """`first` with `more`'s rollouts added to its problems `idx` (more's group g is
    first's problem idx[g]), problem-major: each problem's first-stage rollouts, then its
    second-stage ones."""
    group = np.concatenate([first.group, idx[more.group]])  # [N1 + N2]
    order = np.argsort(group, kind="stable")
    completions = first.completion_ids + more.completion_ids
    texts = first.texts + more.texts
    return Rollouts(
        first.problems,
        first.prompt_ids,
        [completions[i] for i in order],
        [texts[i] for i in order],
        np.concatenate([first.rewards, more.rewards])[order],
        group[order],
        first.bad_rewards + more.bad_rewards,
        first.clipped + more.clipped,
    )
