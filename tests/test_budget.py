"""Successive halving (``select.budget=halving``, `engine.budget`): who gets the second stage,
what a stopped candidate scores, seeds and determinism, and the config checks."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from torch import nn

from gradalign.config import Config, ConfigError, RolloutConfig, SelectConfig, check_budget
from gradalign.core.selection import select
from gradalign.data.problems import Problem, Stream, round_seed
from gradalign.engine import round_scoring
from gradalign.engine.budget import extend, halving_rollouts
from gradalign.engine.policy import build_model, build_tokenizer
from gradalign.engine.rollout import Rollouts

pytestmark = pytest.mark.usefixtures("one_thread")

SEED, ROUND = 7, 2
FIRST = round_seed(SEED, ROUND, Stream.CANDIDATES)
SECOND = round_seed(SEED, ROUND, Stream.HALVING)
# k_r0 = 2 first-stage rewards of problems 10..14: 11 and 13 have variance, 10/12/14 stop
STAGE1 = {10: [0, 0], 11: [1, 0], 12: [1, 1], 13: [0, 1], 14: [0, 0]}
# the k_r - k_r0 = 3 second-stage rewards of the survivors
STAGE2 = {11: [1, 1, 0], 13: [0, 0, 0]}
PROBLEMS = [Problem(i, f"{i}+1=", str(i + 1), "addition") for i in STAGE1]
VAL = {100: [1, 0, 0, 1], 101: [0, 1, 1, 1], 102: [1, 1, 0, 0], 103: [0, 0, 1, 0]}


class FakeSample:
    """`round_scoring.Sample` from the tables above, keyed by the stage's seed; random
    completion tokens seeded by (seed, problem id); records every call."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[int], int, int, str]] = []

    def __call__(self, items: list[Problem], k: int, seed: int, what: str) -> Rollouts:
        self.calls.append(([p.id for p in items], k, seed, what))
        table = {FIRST: STAGE1, SECOND: STAGE2, 99: VAL}[seed]
        rewards = np.array([table[p.id][j] for p in items for j in range(k)], dtype=float)
        comps = [
            np.random.default_rng([seed, p.id, j]).integers(4, 40, size=3 + j % 3).tolist()
            for p in items
            for j in range(k)
        ]
        group = np.repeat(np.arange(len(items)), k)
        prompts = [[1, 5 + p.id % 7, 9] for p in items]
        return Rollouts(list(items), prompts, comps, [str(c) for c in comps], rewards, group)


def test_only_candidates_with_reward_variance_get_the_second_stage() -> None:
    sample = FakeSample()
    cand, survive = halving_rollouts(PROBLEMS, 5, 2, SEED, ROUND, sample)
    assert survive.tolist() == [False, True, False, True, False]
    assert sample.calls == [
        ([10, 11, 12, 13, 14], 2, FIRST, "candidate rollouts"),
        ([11, 13], 3, SECOND, "candidate rollouts, second stage"),
    ]
    # problem-major: 2 rollouts of each stopped candidate, 2 + 3 of each survivor
    assert cand.group.tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 2, 3, 3, 3, 3, 3, 4, 4]
    assert cand.rewards.tolist() == [0, 0, 1, 0, 1, 1, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0]
    assert cand.pass_rates().tolist() == [0.0, 0.6, 1.0, 0.2, 0.0]
    assert cand.zero_variance().tolist() == [True, False, True, False, True]
    # each survivor's first-stage completions come first, then its second-stage ones
    assert cand.completion_ids[2:7] == [
        np.random.default_rng([s, 11, j]).integers(4, 40, size=3 + j % 3).tolist()
        for s, j in [(FIRST, 0), (FIRST, 1), (SECOND, 0), (SECOND, 1), (SECOND, 2)]
    ]
    assert [r["sample"] for r in cand.records("candidate")][:7] == [0, 1, 0, 1, 2, 3, 4]


def test_no_survivor_means_no_second_stage() -> None:
    sample = FakeSample()
    chunk = [p for p in PROBLEMS if p.id in (10, 12, 14)]
    cand, survive = halving_rollouts(chunk, 5, 2, SEED, ROUND, sample)
    assert not survive.any() and len(sample.calls) == 1
    assert cand.rewards.tolist() == [0, 0, 1, 1, 0, 0]


def test_extend_adds_rollouts_to_the_given_problems_only() -> None:
    first = FakeSample()(PROBLEMS[:3], 2, FIRST, "x")
    more = FakeSample()(PROBLEMS[1:2], 3, SECOND, "y")
    out = extend(first, more, np.array([1]))
    assert out.group.tolist() == [0, 0, 1, 1, 1, 1, 1, 2, 2]
    assert out.problems == first.problems and out.prompt_ids == first.prompt_ids


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, object]:
    tok = build_tokenizer()
    return build_model(tok, "tiny", seed=4).eval(), tok


def _score(tiny, s: SelectConfig, sample) -> round_scoring.RoundScores:  # noqa: ANN001
    model, tok = tiny
    val = [Problem(100 + i, f"{i}+2=", str(i + 2), "addition") for i in range(4)]

    def with_val(items, k, seed, what):  # noqa: ANN001, ANN202
        return sample(items, k, seed, what) if seed != round_seed(SEED, ROUND, Stream.VALIDATION) else (
            FakeSample()(items, k, 99, what)
        )  # fmt: skip

    ids = np.array([p.id for p in PROBLEMS])
    scorer = round_scoring.ChunkScorer(
        model, tok, val, RolloutConfig(k_r=5, k_v=4), s, SEED, with_val
    )
    return scorer.score(PROBLEMS, ids, ROUND)


@pytest.mark.parametrize("scorer", ["batched", "exact"])
def test_stopped_candidates_score_as_zero_variance_and_survivors_use_all_rollouts(
    tiny, scorer: str
) -> None:
    s = SelectConfig(mode="sim", budget="halving", k_r0=2, k=2, chunk_size=5, scorer=scorer)
    sample = FakeSample()
    halved = _score(tiny, s, sample)
    c = halved.candidates
    assert c.zero_variance.tolist() == [True, False, True, False, True]
    assert c.dot_val[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]  # g_p = 0: stopped
    assert c.norm[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    assert (c.norm[[1, 3]] > 0).all()
    assert halved.metrics["rollouts/candidates"] == 16  # 5 x 2 + 2 x 3, not 5 x 5
    assert halved.metrics["rollouts/validation"] == 16
    assert halved.metrics["select/stopped_frac"] == pytest.approx(0.6, rel=1e-12)
    # the same merged rollouts scored with the full budget give the same statistics
    merged = halved.rollouts[0]
    full = _score(tiny, dataclasses.replace(s, budget="full"), lambda *a: merged)
    np.testing.assert_allclose(full.candidates.dot_val, c.dot_val, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(full.candidates.norm, c.norm, rtol=1e-9, atol=1e-12)
    assert "select/stopped_frac" not in full.metrics
    # the mode's zero-variance rule applies to the stopped ones: 0.0 ("zero"), or out
    sel = select("sim", c, 2, np.random.default_rng(0), "zero")
    assert sel.scores[[0, 2, 4]].tolist() == [0.0, 0.0, 0.0]
    excl = select("sim", c, 2, np.random.default_rng(0), "exclude")
    assert excl.excluded == 3 and sorted(excl.ids.tolist()) == [11, 13]


def test_halving_is_deterministic(tiny) -> None:
    s = SelectConfig(mode="sim", budget="halving", k_r0=2, k=2, chunk_size=5)
    a, b = _score(tiny, s, FakeSample()), _score(tiny, s, FakeSample())
    assert a.candidates.dot_val.tolist() == b.candidates.dot_val.tolist()
    assert a.rollouts[0].completion_ids == b.rollouts[0].completion_ids


def test_halving_without_gradients_gives_pass_rates_from_all_rollouts() -> None:
    s = SelectConfig(mode="accgreedy", budget="halving", k_r0=2, k=2, chunk_size=5)
    scorer = round_scoring.ChunkScorer(None, None, [], RolloutConfig(k_r=5), s, SEED, FakeSample())
    scored = scorer.score(PROBLEMS, np.arange(10, 15), ROUND)
    assert scored.candidates.pass_rate.tolist() == [0.0, 0.6, 1.0, 0.2, 0.0]
    assert select("accgreedy", scored.candidates, 1, np.random.default_rng(0)).ids.tolist() == [11]


@pytest.mark.parametrize(
    ("sets", "message"),
    [
        (
            {"budget": "halving", "k_r0": 8},
            "select.k_r0 (8) must be below rollout.k_r (8) with select.budget=halving "
            "(k_r0 first-stage rollouts, then k_r in all for the survivors); lower k_r0 or "
            "raise k_r",
        ),
        ({"k_r0": 1}, "select.k_r0: needs >= 2 rollouts per group for an advantage, got 1"),
    ],
)
def test_config_rejects_a_budget_without_a_second_stage(sets: dict, message: str) -> None:
    with pytest.raises(ConfigError) as err:
        Config(select=SelectConfig(**sets))
    assert str(err.value) == message


def test_full_budget_ignores_k_r0_and_the_callback_check_matches() -> None:
    Config(select=SelectConfig(k_r0=8))  # full budget: k_r0 is not used
    with pytest.raises(ConfigError, match=r"select.k_r0 \(4\) must be below rollout.k_r \(4\)"):
        check_budget(SelectConfig(budget="halving", k_r0=4), RolloutConfig(k_r=4))
