"""Hostile numbers never turn into scores (issue 7): non-finite inputs are skipped and counted,
a zero validation gradient falls back to a seeded uniform draw (`gradalign.core.selection`, the
scorers)."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest

from gradalign.core.selection import Candidates, SelectionWarning, select

# --- non-finite scores and a zero validation gradient ----------------------------------------


def candidates(**overrides: Any) -> Candidates:
    base: dict[str, Any] = dict(
        ids=np.array([10, 11, 12, 13, 14]),
        pass_rate=np.array([0.5, 0.25, 0.5, 0.75, 0.5]),
        zero_variance=np.zeros(5, dtype=bool),
        dot_val=np.array([0.1, 0.4, 0.3, 0.2, -0.1]),
        dot_chunk=np.array([0.2, 0.1, 0.3, 0.0, 0.5]),
        norm=np.array([1.0, 1.0, 1.0, 1.0, 1.0]),
    )
    return Candidates(**(base | overrides))


@pytest.mark.parametrize("mode", ["sim", "dot", "negsim", "simacc", "norm", "align", "accgreedy"])
def test_nonfinite_inputs_are_skipped_counted_and_do_not_spread(mode: str) -> None:
    clean = select(mode, candidates(), 5, np.random.default_rng(0))
    hostile = candidates(
        dot_val=np.array([0.1, np.nan, 0.3, 0.2, -0.1]),
        dot_chunk=np.array([0.2, 0.1, 0.3, np.inf, 0.5]),
        norm=np.array([1.0, 1.0, 1.0, 1.0, -np.inf]),
        pass_rate=np.array([0.5, 0.25, np.nan, 0.75, 0.5]),
    )
    bad = {  # the ids whose inputs for the mode are not finite
        "sim": {11, 14}, "dot": {11}, "negsim": {11, 14}, "simacc": {11, 12, 14},
        "norm": {14}, "align": {13, 14}, "accgreedy": {12},
    }[mode]  # fmt: skip
    with pytest.warns(SelectionWarning, match=f"skipped {len(bad)} of 5 candidates"):
        sel = select(mode, hostile, 5, np.random.default_rng(0))
    assert sel.skipped_nonfinite == len(bad)
    assert sel.ids.tolist() == [i for i in clean.ids.tolist() if i not in bad]
    kept = np.array([i not in bad for i in hostile.ids])
    assert np.isnan(sel.scores[~kept]).all()
    assert sel.scores[kept].tolist() == clean.scores[kept].tolist()
    assert sel.fallback is None


def test_acc_never_draws_a_nonfinite_pass_rate() -> None:
    c = candidates(pass_rate=np.array([np.nan, 0.5, np.inf, 0.0, 1.0]))
    for seed in range(20):
        with pytest.warns(SelectionWarning, match="problem ids 10, 12"):
            sel = select("acc", c, 3, np.random.default_rng(seed))
        assert sorted(sel.ids.tolist()) == [11, 13, 14] and sel.skipped_nonfinite == 2


@pytest.mark.parametrize("val_norm", [0.0, float("nan"), float("inf")])
@pytest.mark.parametrize("mode", ["sim", "dot", "negsim", "simacc"])
def test_zero_validation_gradient_falls_back_to_a_seeded_uniform_draw(
    mode: str, val_norm: float
) -> None:
    c = candidates(val_norm=val_norm)
    with pytest.warns(SelectionWarning, match=f"mode '{mode}': the validation gradient direction"):
        sel = select(mode, c, 3, np.random.default_rng(5))
    assert sel.fallback == "zero_validation_gradient"
    rand = select("rand", c, 3, np.random.default_rng(5))
    assert sel.ids.tolist() == rand.ids.tolist() and np.isnan(sel.scores).all()


@pytest.mark.parametrize("mode", ["norm", "align", "accgreedy", "acc", "rand"])
def test_modes_without_the_validation_direction_ignore_its_norm(mode: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sel = select(mode, candidates(val_norm=0.0), 3, np.random.default_rng(1))
        same = select(mode, candidates(), 3, np.random.default_rng(1))
    assert sel.fallback is None and sel.ids.tolist() == same.ids.tolist()


def test_a_healthy_validation_direction_ranks_as_before() -> None:
    sel = select("sim", candidates(val_norm=0.99999), 2, np.random.default_rng(0))
    assert sel.ids.tolist() == [11, 12] and sel.fallback is None


def scoring_batch(rewards: list[list[float]], seed: int) -> Any:
    import torch

    from gradalign.core.grpo import SequenceBatch, group_advantages, pack_sequences

    rng = np.random.default_rng(seed)
    group = [g for g, rs in enumerate(rewards) for _ in rs]
    prompts = [rng.integers(4, 80, size=5).tolist() for _ in rewards]
    completions = [rng.integers(4, 80, size=4).tolist() for _ in group]
    ids, mask, comp = pack_sequences([prompts[g] for g in group], completions, pad_id=0)
    flat = torch.tensor([r for rs in rewards for r in rs], dtype=torch.float64)
    adv = group_advantages(flat, torch.tensor(group), len(rewards))
    return SequenceBatch(ids, mask, comp, adv, torch.tensor(group), len(rewards))


@pytest.mark.parametrize("val_rewards", [[[1, 1, 1], [0, 0, 0]], [[1, 0, 1], [0, 0, 1]]])
def test_scorers_report_the_validation_norm_and_selection_falls_back(
    tiny_model: Any, val_rewards: list[list[float]]
) -> None:
    import torch

    from gradalign.core import alignment
    from gradalign.engine import policy
    from gradalign.scoring import fastscore, precondition

    params = policy.scored_parameters(tiny_model)
    cand, val = scoring_batch([[1, 0, 0], [1, 1, 0], [0, 1, 1]], 0), scoring_batch(val_rewards, 1)
    zero = all(len(set(rs)) == 1 for rs in val_rewards)  # every validation advantage is 0
    exact = alignment.exact_alignment(
        tiny_model, params, cand, alignment.validation_direction(tiny_model, params, val)
    )
    direction = fastscore.batched_validation_direction(tiny_model, params, val)
    fast = fastscore.batched_alignment(tiny_model, params, cand, direction)
    ones = {q: torch.ones_like(q) for q in params}
    pre = precondition.exact_preconditioned_alignment(tiny_model, params, cand, direction, ones)
    for al in (exact, fast, pre):
        assert al.val_norm == 0.0 if zero else abs(al.val_norm - 1.0) < 1e-3
    c = Candidates(
        np.arange(3),
        np.full(3, 0.5),
        np.zeros(3, bool),
        fast.dot_val,
        fast.dot_chunk,
        fast.norm,
        val_norm=fast.val_norm,
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sel = select("sim", c, 1, np.random.default_rng(0))
    assert sel.fallback == ("zero_validation_gradient" if zero else None)
    assert len(caught) == int(zero)
