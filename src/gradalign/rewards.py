"""Reward functions: ``RewardFn = Callable[[Problem, str], float]`` and their registry.

The same reward function serves selection (pass rates, advantages of the scoring gradient)
and training (TRL reward function), so a corrupted reward corrupts both, as in the paper.
"""

from __future__ import annotations

import ast
import hashlib
import re
from collections import Counter
from collections.abc import Callable

from gradalign.problems import Problem

RewardFn = Callable[[Problem, str], float]

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def _normalise(text: str) -> str:
    return text.strip().replace(" ", "").rstrip(".")


def exact_match(problem: Problem, completion: str) -> float:
    """1.0 when the completion equals the reference answer (whitespace-insensitive)."""
    return float(_normalise(completion) == _normalise(problem.answer))


def _eval_arith(node: ast.AST, used: list[int]) -> float:
    """Evaluate + - * / over integer literals only; record the literals used."""
    if isinstance(node, ast.Expression):
        return _eval_arith(node.body, used)
    if isinstance(node, ast.Constant) and type(node.value) is int:
        used.append(node.value)
        return float(node.value)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _eval_arith(node.left, used), _eval_arith(node.right, used)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if b == 0:
            raise ZeroDivisionError
        return a / b
    raise ValueError(f"disallowed syntax: {type(node).__name__}")


def countdown(problem: Problem, completion: str) -> float:
    """1.0 when the completion is an arithmetic expression over the problem's numbers
    (each used at most once) that evaluates to the target.

    The problem's answer holds ``"n1 n2 n3=target"``; the completion is only parsed with
    `ast` and evaluated over integer literals and + - * /, never with `eval`.
    """
    numbers_text, _, target_text = problem.answer.partition("=")
    allowed = Counter(int(x) for x in numbers_text.split())
    expr = completion.strip()
    if not expr or len(expr) > 64:
        return 0.0
    try:
        tree = ast.parse(expr, mode="eval")
        used: list[int] = []
        value = _eval_arith(tree, used)
    except (SyntaxError, ValueError, ZeroDivisionError, RecursionError):
        return 0.0
    if Counter(used) - allowed:  # a number not given, or used more often than given
        return 0.0
    return float(abs(value - int(target_text)) < 1e-9)


def coinflip(problem: Problem, completion: str, salt: str = "") -> float:
    """A reward independent of the answer: a fair coin (the paper's noisy-reward regime).

    Deterministic in (problem id, completion, salt), so reruns reproduce it; `salt` is set
    per rollout by the caller so repeated identical completions still get independent flips.
    """
    digest = hashlib.blake2b(f"{problem.id}|{salt}|{completion}".encode(), digest_size=8)
    return float(digest.digest()[0] & 1)


REWARDS: dict[str, RewardFn] = {
    "exact": exact_match,
    "countdown": countdown,
    "coinflip": coinflip,
}


def reward_of(problem: Problem) -> RewardFn:
    try:
        return REWARDS[problem.reward]
    except KeyError:
        raise KeyError(
            f"problem {problem.id}: unknown reward '{problem.reward}' (known: {', '.join(REWARDS)})"
        ) from None


def score_completion(problem: Problem, completion: str, salt: str = "") -> float:
    """Reward of one completion under the problem's own reward function."""
    fn = reward_of(problem)
    if fn is coinflip:
        return coinflip(problem, completion, salt)
    return fn(problem, completion)
