"""Hostile user rewards never end in a traceback (issue 7): one that raises, returns NaN, Inf,
None or text scores 0, is named and counted (`gradalign.data.rewards`)."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from gradalign.data import rewards
from gradalign.data.problems import Problem
from gradalign.data.rewards import RewardError, RewardWarning, checked_reward, score_completion
from gradalign.engine.rollout import score_rollouts

# --- rewards ---------------------------------------------------------------------------------

USER_REWARDS = """
import math

def boom(problem, completion):
    raise ValueError("cannot grade " + completion)

def nan(problem, completion):
    return math.nan

def inf(problem, completion):
    return float("inf")

def nothing(problem, completion):
    return None

def words(problem, completion):
    return "one"

def half(problem, completion):
    return 0.5

def flaky(problem, completion):  # NaN for even completion numbers
    return math.nan if int(completion.split()[-1]) % 2 == 0 else 0.5
"""


@pytest.fixture
def user_rewards(reward_module) -> str:
    return reward_module("ga_hostile_rewards", USER_REWARDS)


def problem(pid: int, reward: str) -> Problem:
    return Problem(pid, f"prompt {pid}", "1", "src", reward)


@pytest.mark.parametrize(
    ("fn", "why"),
    [
        ("boom", "raised ValueError: cannot grade text"),
        ("nan", "returned nan, not a finite number"),
        ("inf", "returned inf, not a finite number"),
        ("nothing", "returned None, not a number"),
        ("words", "returned 'one', not a number"),
    ],
)
def test_a_failing_user_reward_scores_zero_and_says_why(
    user_rewards: str, fn: str, why: str
) -> None:
    name = f"{user_rewards}:{fn}"
    assert checked_reward(problem(7, name), "text") == (
        0.0,
        f"problem 7 (source 'src'): reward '{name}' {why}",
    )
    with pytest.warns(RewardWarning, match=f"problem 7 .*reward '{name}' .*; it scores 0"):
        assert score_completion(problem(7, name), "text") == 0.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # shown once per reward name, not once per completion
        assert score_completion(problem(8, name), "text") == 0.0


def test_missing_user_reward_functions_are_named(user_rewards: str) -> None:
    with pytest.raises(RewardError, match="'ga_hostile_rewards' has no attribute 'missing'"):
        checked_reward(problem(1, "ga_hostile_rewards:missing"), "x")
    with pytest.raises(RewardError, match="cannot import module 'ga_hostile_nope'"):
        score_completion(problem(1, "ga_hostile_nope:fn"), "x")


class FakeTokenizer:
    eos_token_id = 99

    def batch_decode(self, completions: list[list[int]], skip_special_tokens: bool) -> list[str]:
        return [f"completion {ids[0]}" for ids in completions]


def test_score_rollouts_counts_bad_rewards_and_never_returns_nan(user_rewards: str) -> None:
    problems = [problem(3, f"{user_rewards}:half"), problem(4, f"{user_rewards}:flaky")]
    problems.append(problem(5, f"{user_rewards}:flaky"))
    with pytest.warns(RewardWarning) as caught:
        ro = score_rollouts(
            FakeTokenizer(), problems, [[1]] * 3, [[i] for i in range(6)], 2, "cand:4242"
        )
    assert ro.rewards.tolist() == [0.5, 0.5, 0.0, 0.5, 0.0, 0.5]
    assert ro.bad_rewards == 2
    assert np.isfinite(ro.pass_rates()).all() and ro.zero_variance().tolist() == [1, 0, 0]
    (w,) = caught
    assert str(w.message) == (  # the stage, not its salt's seed
        "2 of 6 rewards (cand) could not be computed and scored 0; first: problem 4 "
        f"(source 'src'): reward '{user_rewards}:flaky' returned nan, not a finite number"
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clean = score_rollouts(FakeTokenizer(), problems[:1], [[1]], [[0], [1]], 2, "cand")
    assert clean.bad_rewards == 0


def test_a_reward_failing_on_every_completion_of_a_stage_stops(user_rewards: str) -> None:
    """One function failing on all its completions (here: beside one that works) is a
    RewardFailed naming it and its first failure, not a stage of all-zero rewards."""
    problems = [problem(3, f"{user_rewards}:half"), problem(4, f"{user_rewards}:boom")]
    problems.append(problem(5, f"{user_rewards}:boom"))
    with pytest.raises(rewards.RewardFailed) as caught:
        score_rollouts(
            FakeTokenizer(), problems, [[1]] * 3, [[i] for i in range(6)], 2,
            "candidate rollouts:901243215",
        )  # fmt: skip
    assert str(caught.value) == (
        f"{user_rewards}:boom: ValueError: cannot grade completion 2 (problem 4, source 'src'); "
        "it failed on all 4 completions of the candidate rollouts, so there is nothing to "
        "select or train on: fix the function (a reward that fails on some completions only "
        "scores them 0, counted as bad_rewards)"
    )
