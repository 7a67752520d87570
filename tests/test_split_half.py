"""The split-half validation cosine (`round_scoring.direction_with_split_half`) against a plain
autograd reference, for both scorers and both aggregates, and its warning in `ChunkScorer.score`."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from scoring_batches import make_batch
from torch import nn

from gradalign.config import RolloutConfig, SelectConfig
from gradalign.core.alignment import (
    GroupAlignment,
    iter_group_gradients,
    unit,
    validation_direction,
)
from gradalign.core.selection import SelectionWarning
from gradalign.data.problems import Problem
from gradalign.engine import round_scoring
from gradalign.engine.policy import build_model, build_tokenizer, scored_parameters
from gradalign.engine.rollout import Rollouts
from gradalign.scoring.pieces import flatten_pieces

pytestmark = pytest.mark.usefixtures("one_thread")

# 5 validation groups: halves 0, 2, 4 | 1, 3 (even | odd); group 1 has zero variance (g_1 = 0)
VAL_REWARDS = [[1, 0, 1, 0], [0, 0, 0], [0, 0, 0, 1, 1], [1, 0, 0, 0], [0, 1, 1]]


@pytest.fixture(scope="module")
def tiny() -> nn.Module:
    return build_model(build_tokenizer(), "tiny", seed=3).eval()


@pytest.mark.parametrize("scorer", ["exact", "batched"])
@pytest.mark.parametrize("aggregate", ["sum", "mean_of_unit"])
@pytest.mark.parametrize("subset", ["all", "last:1"])
def test_split_half_cosine_is_the_cosine_of_the_two_halves(
    tiny, scorer: str, aggregate: str, subset: str
) -> None:
    params = scored_parameters(tiny, subset)
    val = make_batch(VAL_REWARDS, seed=2)
    s = SelectConfig(scorer=scorer, val_aggregate=aggregate, groups_per_micro=2)  # type: ignore[arg-type]
    direction, split = round_scoring.direction_with_split_half(tiny, params, val, s)
    # reference: one backward per validation group, halves summed by hand
    g = list(iter_group_gradients(tiny, params, val))
    terms = g if aggregate == "sum" else [unit(x) if x.norm() > 0 else x for x in g]
    a, b = terms[0] + terms[2] + terms[4], terms[1] + terms[3]
    want = float(a @ b / (a.norm() * b.norm()))
    assert split == pytest.approx(want, abs=1e-5)
    assert -1.0 < split < 1.0 and abs(split) > 1e-3  # a real cosine, not a degenerate 0 / 1
    flat = direction if isinstance(direction, torch.Tensor) else flatten_pieces(direction)
    ref = validation_direction(tiny, params, val, aggregate)  # type: ignore[arg-type]
    np.testing.assert_allclose(flat.double().numpy(), ref.double().numpy(), atol=2e-6)
    np.testing.assert_allclose(flat.double().numpy(), unit(a + b).numpy(), atol=2e-6)


@pytest.mark.parametrize("scorer", ["exact", "batched"])
def test_one_validation_problem_has_no_split_half_cosine(tiny, scorer: str) -> None:
    params = scored_parameters(tiny)
    val = make_batch(VAL_REWARDS[:1], seed=2)
    s = SelectConfig(scorer=scorer)  # type: ignore[arg-type]
    direction, split = round_scoring.direction_with_split_half(tiny, params, val, s)
    assert math.isnan(split)
    flat = direction if isinstance(direction, torch.Tensor) else flatten_pieces(direction)
    assert float(flat.norm()) == pytest.approx(1.0, abs=1e-4)


@pytest.mark.parametrize("scorer", ["exact", "batched"])
def test_a_half_without_gradient_has_no_split_half_cosine(tiny, scorer: str) -> None:
    params = scored_parameters(tiny)
    val = make_batch([[1, 0, 1], [1, 1, 1], [0, 0]], seed=2)  # halves 0-1 | 2: g_2 = 0
    s = SelectConfig(scorer=scorer)  # type: ignore[arg-type]
    direction, split = round_scoring.direction_with_split_half(tiny, params, val, s)
    assert math.isnan(split)
    flat = direction if isinstance(direction, torch.Tensor) else flatten_pieces(direction)
    assert float(flat.norm()) == pytest.approx(1.0, abs=1e-4)


def _rollouts(n: int) -> Rollouts:
    problems = [Problem(i, f"q{i}", "1", "addition") for i in range(n)]
    rewards = np.tile([1.0, 0.0], n)
    return Rollouts(
        problems, [[5]] * n, [[6]] * (2 * n), ["1", "0"] * n, rewards, np.repeat(np.arange(n), 2)
    )


@pytest.mark.parametrize(("split", "warns"), [(-0.25, True), (0.0, True), (0.4, False)])
def test_chunk_scorer_records_and_warns_about_the_split_half_cosine(
    monkeypatch: pytest.MonkeyPatch, split: float, warns: bool
) -> None:
    def fake_scores(*args, **kwargs):  # noqa: ANN002, ANN003
        ones = np.ones(4)
        return GroupAlignment(ones, ones, ones, 1.0), split, None

    monkeypatch.setattr(round_scoring, "_gradient_scores", fake_scores)
    chunk = _rollouts(4).problems
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = round_scoring.ChunkScorer(
            None, None, chunk[:2], RolloutConfig(), SelectConfig(mode="sim"), 0,
            lambda items, k, seed, what: _rollouts(len(items)),
        )  # fmt: skip
        scored = scorer.score(chunk, np.arange(4), 0)
    assert scored.metrics["val/split_half_cos"] == split
    mine = [w for w in caught if w.category is SelectionWarning]
    if warns:
        assert len(mine) == 1
        assert str(mine[0].message).startswith(
            f"split-half validation cosine {split:+.3f}: the two halves of the validation set "
            "pull in opposite directions"
        )
    else:
        assert mine == []
