"""User rewards as people already write them: ours, verl's `compute_score` and TRL reward
functions, told apart by parameter names or named with `@style` / data.reward_style; the
working directory importable; functions that fit no signature refused naming them."""

from __future__ import annotations

import dataclasses
import sys

import pytest

from gradalign.data.problems import Problem
from gradalign.data.rewards import RewardError, checked_reward, resolve_reward
from gradalign.data.rewards_style import SIGNATURES, detect
from gradalign.run.sources import file_specs

MODULE = """
CALLS = []

def ours(problem, completion):
    return float(completion == problem.answer)

def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    CALLS.append(("verl", data_source, solution_str, ground_truth, extra_info))
    return float(solution_str.strip() == ground_truth)

def compute_score_dict(data_source, solution_str, ground_truth, extra_info=None):
    return {"score": 0.25, "acc": True}

def compute_score_no_extra(data_source, solution_str, ground_truth):
    return 0.5

def compute_score_bad_dict(data_source, solution_str, ground_truth, extra_info=None):
    return {"acc": 1.0}

def trl_reward(completions, **kwargs):
    CALLS.append(("trl", completions, kwargs))
    return [float(c == a) for c, a in zip(completions, kwargs["answer"])]

def trl_named(prompts, completions, answer):
    return [len(p) + len(c) + len(a) for p, c, a in zip(prompts, completions, answer)]

def trl_none(completions, **kwargs):
    return [None]

def trl_two(completions, **kwargs):
    return [1.0, 1.0]

def one_arg(x):
    return 1.0

def only_kwargs(**kwargs):
    return 1.0

def pair(a, b):
    return 0.75
"""


@pytest.fixture
def user_module(reward_module) -> str:
    """ga_styled_rewards.py in a fresh working directory, importable only as the cwd."""
    return reward_module("ga_styled_rewards", MODULE, cwd=True)


def problem(reward: str, answer: str = "7", **meta) -> Problem:
    return Problem(3, "3+4", answer, "addition", reward, meta)


def test_the_working_directory_is_importable(user_module, tmp_path):
    assert str(tmp_path) not in sys.path
    fn = resolve_reward(f"{user_module}:ours")
    assert sys.path[0] == str(tmp_path)
    assert fn(problem(f"{user_module}:ours"), "7") == 1.0  # ours: the function itself
    assert fn is sys.modules[user_module].ours


def test_verl_compute_score_gets_data_source_ground_truth_and_extra_info(user_module):
    name = f"{user_module}:compute_score"
    p = problem(name, data_source="openai/gsm8k", extra_info={"index": 5, "split": "train"})
    assert checked_reward(p, " 7 ") == (1.0, None)
    assert checked_reward(p, "8") == (0.0, None)
    calls = sys.modules[user_module].CALLS
    assert calls[0] == ("verl", "openai/gsm8k", " 7 ", "7", {"index": 5, "split": "train"})
    # a built-in or plain problem: its source as data_source, an empty extra_info
    assert checked_reward(problem(name), "7") == (1.0, None)
    assert calls[-1] == ("verl", "addition", "7", "7", {})


def test_verl_dict_scores_and_no_extra_info(user_module):
    assert checked_reward(problem(f"{user_module}:compute_score_dict"), "x") == (0.25, None)
    assert checked_reward(problem(f"{user_module}:compute_score_no_extra"), "x") == (0.5, None)
    reward, why = checked_reward(problem(f"{user_module}:compute_score_bad_dict"), "x")
    assert reward == 0.0  # a dict without 'score' is a failed reward, counted
    assert why == (
        f"problem 3 (source 'addition'): reward '{user_module}:compute_score_bad_dict' "
        "raised KeyError: 'score'"
    )


def test_trl_reward_functions_get_one_completion_and_the_columns(user_module):
    name = f"{user_module}:trl_reward"
    assert checked_reward(problem(name), "7") == (1.0, None)
    assert checked_reward(problem(name), "8") == (0.0, None)
    kind, completions, kwargs = sys.modules[user_module].CALLS[0]
    assert (kind, completions) == ("trl", ["7"])
    assert kwargs == {
        "prompts": ["3+4"],
        "answer": ["7"],
        "ground_truth": ["7"],
        "data_source": ["addition"],
        "source": ["addition"],
    }
    # a file record's own fields arrive as TRL passes a dataset's columns, as written there
    sys.modules[user_module].CALLS.clear()
    columns = {"answer": "#### 7", "solution": "3+4=7", "data_source": "gsm8k"}
    filed = dataclasses.replace(problem(name, data_source="gsm8k"), columns=columns)
    assert checked_reward(filed, "7") == (0.0, None)
    assert sys.modules[user_module].CALLS[0][2] == {
        "prompts": ["3+4"],
        "answer": ["#### 7"],
        "ground_truth": ["7"],
        "data_source": ["gsm8k"],
        "source": ["addition"],
        "solution": ["3+4=7"],
    }
    # without **kwargs: only the columns it names
    assert checked_reward(problem(f"{user_module}:trl_named"), "ab") == (6.0, None)
    reward, why = checked_reward(problem(f"{user_module}:trl_none"), "x")
    assert reward == 0.0 and why.endswith("returned None, not a number")
    reward, why = checked_reward(problem(f"{user_module}:trl_two"), "x")
    assert reward == 0.0 and why.endswith(
        "raised ValueError: expected a list of 1 reward, got [1.0, 1.0]"
    )


@pytest.mark.parametrize(
    ("function", "style"),
    [("ours", "gradalign"), ("pair", "gradalign"), ("compute_score", "verl"),
     ("compute_score_no_extra", "verl"), ("trl_reward", "trl"), ("trl_named", "trl")],
)  # fmt: skip
def test_auto_tells_the_style_by_parameter_names(user_module, function, style):
    resolve_reward(f"{user_module}:ours")  # imports the module from the working directory
    assert detect(getattr(sys.modules[user_module], function)) == style


@pytest.mark.parametrize(
    ("reward", "shown"),
    [
        ("one_arg", "one_arg(x) does not fit the gradalign reward signature"),
        ("only_kwargs", "only_kwargs(**kwargs) does not fit the gradalign reward signature"),
        ("pair@verl", "pair(a, b) does not fit the verl reward signature"),
        ("compute_score@trl", "compute_score(data_source, solution_str, ground_truth, "
         "extra_info=None) does not fit the trl reward signature"),
    ],
)  # fmt: skip
def test_a_function_that_fits_no_signature_is_refused_naming_them(user_module, reward, shown):
    with pytest.raises(RewardError) as err:
        resolve_reward(f"{user_module}:{reward}")
    assert str(err.value) == (
        f"reward '{user_module}:{reward}': {shown}; accepted: {SIGNATURES} "
        "(data.reward_style chooses one)"
    )


def test_explicit_style_and_the_config_field(user_module):
    # `pair` called as TRL would bind (completions=[...]) to nothing: refused; as ours it fits
    assert resolve_reward(f"{user_module}:pair@gradalign")(problem("x"), "y") == 0.75
    with pytest.raises(
        RewardError, match=r"style 'torch' is not one of auto, gradalign, verl, trl"
    ):
        resolve_reward(f"{user_module}:pair@torch")
    (spec,) = file_specs(
        [{"path": "ga_styled_rewards.py", "format": "jsonl", "reward": f"{user_module}:trl_named"}],
        "data.pool_files",
        reward_style="trl",
    )
    assert spec.reward == f"{user_module}:trl_named@trl"


def test_a_config_with_an_unfit_reward_names_the_field(user_module, tmp_path):
    from gradalign.config import ConfigError

    entry = {"path": "ga_styled_rewards.py", "format": "jsonl", "reward": f"{user_module}:one_arg"}
    with pytest.raises(ConfigError) as err:
        file_specs([entry], "data.pool_files")
    assert str(err.value).startswith(
        f"data.pool_files[0].reward: reward '{user_module}:one_arg': one_arg(x) does not fit"
    )
