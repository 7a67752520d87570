"""Reward functions: math answers, countdown safety, user rewards, the registry."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gradalign.data.problems import Problem
from gradalign.data.rewards import (
    REWARDS,
    RewardError,
    coinflip,
    countdown,
    exact_match,
    extract_answer,
    last_boxed,
    math_equal,
    math_reward,
    resolve_reward,
    reward_of,
    score_completion,
)


def problem(answer: str, reward: str = "math", pid: int = 0) -> Problem:
    return Problem(pid, "q", answer, "test", reward)


# --- math ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reference", "candidate"),
    [
        ("\\frac{1}{2}", "\\dfrac{1}{2}"),
        ("\\frac{1}{2}", "0.5"),
        ("0.5", "\\frac{1}{2}"),
        ("\\dfrac{1}{2}", "\\frac12"),
        ("27.0", "27"),  # AMC answers
        ("27", "27.0"),
        ("025", "25"),  # AIME answers keep leading zeros
        ("1,000", "1000"),
        ("\\left( 3, \\frac{\\pi}{2} \\right)", "(3,\\frac{\\pi}{2})"),
        ("10\\%", "10"),
        ("\\text{(C)}", "C"),
        ("x^2+1", "1+x^2"),
    ],
)
def test_math_equal_accepts_equivalent_forms(reference: str, candidate: str) -> None:
    assert math_equal(reference, candidate)


@pytest.mark.parametrize(
    ("reference", "candidate"),
    [("\\frac{1}{2}", "0.25"), ("27", "27.5"), ("\\text{(C)}", "\\text{(B)}"), ("3", "")],
)
def test_math_equal_rejects_different_answers(reference: str, candidate: str) -> None:
    assert not math_equal(reference, candidate)


@pytest.mark.parametrize(
    ("completion", "expected"),
    [
        ("so $\\boxed{\\frac{\\sqrt{3}}{2}}$.", "\\frac{\\sqrt{3}}{2}"),  # nested braces
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces do not close
        ("first \\boxed{3}, then \\boxed{4}", "4"),  # the last boxed answer wins
        ("\\boxed{3} and a cut-off \\boxed{4", "3"),  # ... of those whose braces balance
        ("We get \\boxed {7}.", "7"),
        ("The answer is 42", "42"),
        ("The answer is 42 apples.", "42"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("**Answer:** -0.25\nCheck: 1 + 1 = 2", "-0.25"),
        ("0.5", "0.5"),
        ("$\\frac{1}{2}$", "\\frac{1}{2}"),
        ("so x = 3 and y = 4", "4"),
        ("it costs 1,250 dollars", "1250"),
        ("it is 3/4", "3/4"),
        ("no numbers here", None),
        ("", None),
    ],
)
def test_extract_answer(completion: str, expected: str | None) -> None:
    assert extract_answer(completion) == expected


def test_last_boxed_without_balanced_braces() -> None:
    assert last_boxed("\\boxed{1") is None
    assert last_boxed("no box") is None


@pytest.mark.parametrize(
    ("answer", "completion", "reward"),
    [
        ("\\frac{1}{2}", "Half of one is \\boxed{\\dfrac{1}{2}}.", 1.0),
        ("\\frac{1}{2}", "\\boxed{0.5}", 1.0),
        ("0.5", "The answer is $\\frac{1}{2}$.", 1.0),
        ("\\frac{1}{2}", "0.5", 1.0),
        ("27.0", "\\boxed{27}", 1.0),
        ("42", "The answer is 42", 1.0),
        ("4", "\\boxed{4} is wrong; it is \\boxed{3}", 0.0),  # last boxed wins
        ("3", "\\boxed{4} is wrong; it is \\boxed{3}", 1.0),
        ("5", "I cannot tell.", 0.0),
        ("601", "\\boxed{" + "1+" * 600 + "1}", 0.0),  # over MAX_ANSWER_CHARS: not parsed
    ],
)
def test_math_reward(answer: str, completion: str, reward: float) -> None:
    assert math_reward(problem(answer), completion) == reward


def test_math_reward_in_a_worker_thread() -> None:
    # math-verify's signal-based timeout only works in the main thread
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(1) as pool:
        assert pool.submit(math_reward, problem("\\frac{1}{2}"), "\\boxed{0.5}").result() == 1.0


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=-(10**12), max_value=10**12), st.text(max_size=20))
def test_boxed_integer_is_extracted(n: int, prefix: str) -> None:
    prefix = prefix.replace("\\", "").replace("{", "").replace("}", "")
    completion = f"{prefix} so the result is \\boxed{{{n}}}"
    assert extract_answer(completion) == str(n)
    assert math_reward(problem(str(n)), completion) == 1.0
    assert math_reward(problem(str(n + 1)), completion) == 0.0


@settings(max_examples=80, deadline=None)
@given(st.text(alphabet=st.characters(codec="utf-8"), max_size=80))
def test_random_text_never_raises(text: str) -> None:
    found = extract_answer(text)
    assert found is None or isinstance(found, str)
    assert math_reward(problem("7"), text) in (0.0, 1.0)


# --- countdown -------------------------------------------------------------------------------

COUNTDOWN = problem("3 7 5 5=26", reward="countdown")


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("3*7+5", 1.0),
        (" (5+5)*3-7+3 ", 0.0),  # 3 used twice
        ("3*7+5+0", 0.0),  # 0 is not given
        ("26", 0.0),  # 26 is not given
        ("5*5+3-7+5", 0.0),  # 5 is given twice, used three times
        ("5*5+(7-3)/(7-3)", 0.0),  # 7 and 3 reused
        ("5*5+7/7", 0.0),
        ("3*7+5.0", 0.0),  # float literals are not numbers of the problem
        ("3*7--5", 0.0),  # unary minus is not an operation of the game
        ("3*7+5/0", 0.0),
        ("", 0.0),
    ],
)
def test_countdown(completion: str, reward: float) -> None:
    assert countdown(COUNTDOWN, completion) == reward


@pytest.mark.parametrize(
    "completion",
    [
        "__import__('os').system('touch pwned')",
        "2**100000",
        "3**7",
        "x",
        "abs(26)",
        "(26).real",
        "[26][0]",
        "lambda: 26",
        "3*7+5 if 1 else 0",
        "True*26",
        "(" * 40 + "26" + ")" * 40,
    ],
)
def test_countdown_rejects_unsafe_expressions(
    completion: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    assert countdown(problem("26 1=26", reward="countdown"), completion) == 0.0
    assert list(tmp_path.iterdir()) == []


# --- registry, exact, coinflip, user rewards -------------------------------------------------


def test_registry_and_exact() -> None:
    assert set(REWARDS) == {"math", "exact", "final", "countdown", "coinflip"}
    assert resolve_reward("math") is math_reward
    assert exact_match(problem("1 2"), " 12. ") == 1.0
    assert exact_match(problem("12"), "0.5") == 0.0


@pytest.mark.parametrize(
    ("completion", "reward"),
    [
        ("7+8=15,4+3+1=8:85", 1.0),
        ("garbage steps: 85 ", 1.0),  # only the text after the last ':' is checked
        ("7+8=15:4+3+1=8:85", 1.0),
        ("7+8=15,4+3+1=8:86", 0.0),
        ("7+8=15,4+3+1=8:85x", 0.0),
        ("85", 0.0),  # no ':'
        ("85:", 0.0),
    ],
)
def test_final_answer(completion, reward) -> None:
    assert resolve_reward("final")(problem("85"), completion) == reward


def test_score_completion_passes_the_salt_to_coinflip() -> None:
    p = problem("1", reward="coinflip", pid=3)
    flips = [score_completion(p, "same", salt=str(i)) for i in range(64)]
    assert flips == [coinflip(p, "same", str(i)) for i in range(64)]
    assert 0 < sum(flips) < 64
    assert score_completion(problem("\\frac{1}{2}"), "\\boxed{0.5}") == 1.0


USER_MODULE = """
NOT_CALLABLE = 3

def half(problem, completion):
    return 0.5

class Scorers:
    @staticmethod
    def length(problem, completion):
        return float(len(completion))
"""


@pytest.fixture
def user_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    (tmp_path / "ga_user_rewards.py").write_text(USER_MODULE)
    (tmp_path / "ga_broken_rewards.py").write_text("raise RuntimeError('boom')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield "ga_user_rewards"
    for name in ("ga_user_rewards", "ga_broken_rewards"):
        sys.modules.pop(name, None)


def test_user_rewards(user_module: str) -> None:
    fn = resolve_reward(f"{user_module}:half")
    assert fn(problem("1"), "x") == 0.5
    assert score_completion(problem("1", reward=f"{user_module}:Scorers.length"), "abc") == 3.0
    assert reward_of(problem("1", reward=f"{user_module}:half")) is fn


@pytest.mark.parametrize(
    ("name", "message"),
    [
        (
            "nope",
            "unknown reward 'nope': not one of math, exact, final, countdown, coinflip and not a "
            "'module:function' string",
        ),
        ("ga_user_rewards:", "reward 'ga_user_rewards:': expected 'module:function'"),
        (
            "ga_no_such_module:fn",
            "reward 'ga_no_such_module:fn': cannot import module "
            "'ga_no_such_module' (ModuleNotFoundError: No module named 'ga_no_such_module')",
        ),
        (
            "ga_broken_rewards:fn",
            "reward 'ga_broken_rewards:fn': cannot import module "
            "'ga_broken_rewards' (RuntimeError: boom)",
        ),
        (
            "ga_user_rewards:missing",
            "reward 'ga_user_rewards:missing': 'ga_user_rewards' has no attribute 'missing'",
        ),
        (
            "ga_user_rewards:NOT_CALLABLE",
            "reward 'ga_user_rewards:NOT_CALLABLE': 'NOT_CALLABLE' is not callable (int)",
        ),
    ],
)
def test_bad_user_rewards(user_module: str, name: str, message: str) -> None:
    with pytest.raises(RewardError) as err:
        resolve_reward(name)
    assert str(err.value) == message
    with pytest.raises(KeyError) as err2:  # RewardError is a KeyError, as before
        reward_of(problem("1", reward=name, pid=9))
    assert str(err2.value) == f"problem 9: {message}"
