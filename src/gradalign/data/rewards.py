"""Reward functions: ``RewardFn = Callable[[Problem, str], float]`` and their registry.

The same reward function serves selection (pass rates, advantages of the scoring gradient)
and training (TRL reward function), so a corrupted reward corrupts both, as in the paper.

A problem names its reward in ``Problem.reward``: a key of `REWARDS` (``"math"``, ``"exact"``,
``"final"``, ``"countdown"``, ``"coinflip"``) or a user function as
``"package.module:function"``, imported on first use by `resolve_reward`.

Failures: a reward that raises or returns no finite number scores that completion 0 and is
counted (`checked_reward`); a reward function that fails on *every* completion it is given in
one stage (a round's candidate, validation or eval rollouts, one GRPO step's completions)
stops the run with `RewardFailed` (`check_failures`): there is nothing to select or learn from,
and it is found at the first such stage, before the first GRPO step when the function scores
rollouts before training (as every reward of the pool, validation and eval sets does).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib
import math
import os
import re
import sys
import threading
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any, cast

from gradalign.data.problems import Problem
from gradalign.data.rewards_style import STYLES, RewardStyle, StyleError, adapt
from gradalign.messages import show

RewardFn = Callable[[Problem, str], float]


class RewardError(KeyError):
    """A reward name that is neither registered nor an importable ``module:function``."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return str(self.args[0]) if self.args else ""


def _normalise(text: str) -> str:
    return text.strip().replace(" ", "").rstrip(".")


def exact_match(problem: Problem, completion: str) -> float:
    """1.0 when the completion equals the reference answer (whitespace-insensitive)."""
    return float(_normalise(completion) == _normalise(problem.answer))


def final_answer(problem: Problem, completion: str) -> float:
    """1.0 when the text after the completion's last ``:`` equals the reference answer
    (whitespace-insensitive); what comes before it (a scratchpad) is not checked."""
    _, colon, final = completion.rpartition(":")
    return float(bool(colon) and _normalise(final) == _normalise(problem.answer))


# --- math: answer extraction, then math-verify --------------------------------------------

MATH_TIMEOUT_S = 5  # math-verify's per-parse / per-comparison limit (main thread only)
MAX_ANSWER_CHARS = 1000  # longer extracted answers score 0 without being parsed

_BOXED = re.compile(r"\\boxed\s*\{")
_ANSWER_IS = re.compile(r"answer\s*(?:is|:)", re.IGNORECASE)
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?|-?\.\d+")
_WRAPPERS = ("$", "**", "\\(", "\\)", "\\[", "\\]")


def _closing_brace(text: str, start: int) -> int | None:
    """Index of the brace closing the one opened just before `start`; `\\{` `\\}` are skipped."""
    depth, i = 1, start
    while i < len(text):
        ch = text[i]
        if ch == "\\":
            i += 2
            continue
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    return None


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` whose braces balance (nested braces allowed)."""
    for match in reversed(list(_BOXED.finditer(text))):
        end = _closing_brace(text, match.end())
        if end is not None:
            return text[match.end() : end].strip()
    return None


def _strip_wrappers(text: str) -> str:
    for token in _WRAPPERS:
        text = text.replace(token, "")
    return text.strip().rstrip(".").strip()


def _last_number(text: str) -> str | None:
    numbers = _NUMBER.findall(text)
    return numbers[-1].replace(",", "") if numbers else None


def extract_answer(completion: str) -> str | None:
    """The final answer a completion states, by the first rule that applies:

    1. the content of the last ``\\boxed{...}`` whose braces balance;
    2. after the last "answer is" / "answer:" (any case), the rest of that line without ``$``,
       ``**``, ``\\(`` ``\\)`` and a final period: whole if it is one token (``\\frac{1}{2}``),
       else its first number ("The answer is 42 apples." gives ``42``);
    3. the whole completion, stripped the same way, if it is one token (``0.5``, ``x^2+1``);
    4. the last number in the completion (``-3``, ``2.5``, ``3/4``, ``1,000`` read as ``1000``);

    else None. Rules 2-4 are the fallback for completions without a boxed answer.
    """
    boxed = last_boxed(completion)
    if boxed is not None:
        return boxed
    markers = list(_ANSWER_IS.finditer(completion))
    if markers:
        rest = _strip_wrappers(completion[markers[-1].end() :].split("\n", 1)[0].lstrip(" :"))
        if rest and not any(ch.isspace() for ch in rest):
            return rest
        found = _NUMBER.search(rest)
        if found:
            return found.group().replace(",", "")
    whole = _strip_wrappers(completion)
    if whole and not any(ch.isspace() for ch in whole):
        return whole
    return _last_number(completion)


def _timeout_s() -> int | None:
    # math-verify times out with signal.alarm, which only works in the main thread; elsewhere
    # (e.g. a reward computed in a worker thread) it must run without a timeout.
    return MATH_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list[Any]:
    from math_verify import parse  # imported lazily: it pulls in sympy

    try:
        return parse("\\boxed{" + text + "}", parsing_timeout=_timeout_s())
    except Exception:  # math-verify catches its own errors; this is a last guard
        return []


@functools.lru_cache(maxsize=4096)
def _parse_reference(answer: str) -> list[Any]:
    return _parse(answer)


def math_equal(reference: str, candidate: str) -> bool:
    """Whether `candidate` is mathematically the reference answer, by math-verify.

    Both are parsed as the content of a ``\\boxed{}`` (so ``\\frac{1}{2}``, ``\\dfrac12`` and
    ``0.5`` agree, as do ``27.0`` and ``27``), then compared with `math_verify.verify`
    (numeric, symbolic, set, interval and string comparison; timeouts count as False).
    """
    if len(candidate) > MAX_ANSWER_CHARS:
        return False
    gold, pred = _parse_reference(reference.strip()), _parse(candidate)
    if not gold or not pred:
        return False
    from math_verify import verify

    try:
        return bool(verify(gold, pred, timeout_seconds=_timeout_s()))
    except Exception:
        return False


def math_reward(problem: Problem, completion: str) -> float:
    """1.0 when the completion's final answer (`extract_answer`) equals the reference answer
    (`math_equal`), else 0.0; never raises on a completion."""
    candidate = extract_answer(completion)
    return float(candidate is not None and math_equal(problem.answer, candidate))


# --- countdown -------------------------------------------------------------------------------


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
    `ast` and evaluated over integer literals and + - * /, never with `eval`: names, calls,
    attributes, ``**`` and unary minus score 0, as do completions over 64 characters.
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


# --- registry and user rewards ---------------------------------------------------------------

REWARDS: dict[str, RewardFn] = {
    "math": math_reward,
    "exact": exact_match,
    "final": final_answer,
    "countdown": countdown,
    "coinflip": coinflip,
}

_USER_REWARDS: dict[str, RewardFn] = {}


def resolve_reward(name: str) -> RewardFn:
    """The reward function named `name`: a key of `REWARDS`, or ``"package.module:function"``
    (imported on first use; the function may be a dotted attribute path, ``"mod:Cls.fn"``),
    optionally with the calling convention it follows, ``"mod:fn@verl"`` (`rewards_style`:
    ``gradalign``, ``verl``, ``trl``; without one, told by the function's parameter names).
    The working directory is importable (put first on ``sys.path`` when absent).

    Raises `RewardError`, naming the string, when it is unknown, cannot be imported, is not
    callable, or fits no accepted signature.
    """
    if name in REWARDS:
        return REWARDS[name]
    if name in _USER_REWARDS:
        return _USER_REWARDS[name]
    target, _, style = name.partition("@")
    module_name, sep, attr = target.partition(":")
    if not sep:
        raise RewardError(
            f"unknown reward '{name}': not one of {', '.join(REWARDS)} "
            "and not a 'module:function' string"
        )
    if not module_name or not attr:
        raise RewardError(f"reward '{name}': expected 'module:function'")
    if style and style not in STYLES:
        raise RewardError(f"reward '{name}': style '{style}' is not one of {', '.join(STYLES)}")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())  # `module:function` from the directory of the command
    try:
        obj: Any = importlib.import_module(module_name)
    except Exception as err:
        raise RewardError(
            f"reward '{name}': cannot import module '{module_name}' ({type(err).__name__}: {err})"
        ) from err
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise RewardError(f"reward '{name}': '{module_name}' has no attribute '{attr}'")
        obj = getattr(obj, part)
    if not callable(obj):
        raise RewardError(f"reward '{name}': '{attr}' is not callable ({type(obj).__name__})")
    try:
        fn = adapt(obj, cast(RewardStyle, style or "auto"))  # one of STYLES, checked above
    except StyleError as err:
        raise RewardError(f"reward '{name}': {err}") from None
    _USER_REWARDS[name] = fn
    return fn


def reward_of(problem: Problem) -> RewardFn:
    try:
        return resolve_reward(problem.reward)
    except RewardError as err:
        raise RewardError(f"problem {problem.id}: {err}") from err.__cause__


class RewardWarning(UserWarning):
    """A reward function raised or returned a non-finite value; that completion scored 0."""


_WARNED: set[str] = set()  # reward names whose failure `score_completion` has shown


def forget_rewards(module_name: str) -> None:
    """Drop the rewards resolved from ``module_name`` (``"module:function"`` names) and their
    shown warnings, so that the next `resolve_reward` imports the module again."""
    for name in [n for n in _USER_REWARDS if n.partition(":")[0] == module_name]:
        del _USER_REWARDS[name]
    for name in [n for n in _WARNED if n.partition(":")[0] == module_name]:
        _WARNED.discard(name)


def _error_text(err: BaseException) -> str:
    """'ValueError: why' on one line, at most ~200 characters (never fails)."""
    if isinstance(err, SystemExit):
        return f"SystemExit (sys.exit({show(err.code)}))"
    try:
        text = " ".join(str(err).split())
    except Exception:
        text = ""
    text = text if len(text) <= 200 else text[:197] + "..."
    return f"{type(err).__name__}: {text}" if text else type(err).__name__


class RewardFailed(Exception):
    """A reward function failed on every completion of a stage (`check_failures`); the
    message names the function and its first failure. Not a RuntimeError: training's guard
    against NaN weights must not mistake it for divergence."""

    def __init__(self, reward: str, stage: str, calls: int, first: str, problem: Problem) -> None:
        super().__init__(
            f"{reward}: {first} (problem {problem.id}, source {problem.source!r}); it failed on "
            f"all {calls} completions of the {stage}, so there is nothing to select or train on: "
            "fix the function (a reward that fails on some completions only scores them 0, "
            "counted as bad_rewards)"
        )
        self.reward, self.stage, self.calls = reward, stage, calls


def _site(problem: Problem) -> str:
    return f"problem {problem.id} (source {problem.source!r}): reward '{problem.reward}'"


def checked_reward(problem: Problem, completion: str, salt: str = "") -> tuple[float, str | None]:
    """(reward, None) of one completion under the problem's reward function, or (0.0, why)
    when the function raised (`sys.exit` included: a user's reward never ends the run), or
    returned something other than a finite number (None, text, 10**400, NaN): a check that
    cannot be made is not a pass (as a math-verify timeout), and NaN never reaches a score.
    An unknown reward name still raises `RewardError` (a configuration error); Ctrl-C
    (KeyboardInterrupt) still stops the run."""
    fn = reward_of(problem)
    where = _site(problem)
    try:
        value = coinflip(problem, completion, salt) if fn is coinflip else fn(problem, completion)
    except (Exception, SystemExit) as err:
        return 0.0, f"{where} raised {_error_text(err)}"
    try:
        reward = float(value)
    except OverflowError:
        return 0.0, f"{where} returned {show(value)}, too large for a float"
    except Exception:  # TypeError, ValueError, or whatever a __float__ raises
        return 0.0, f"{where} returned {show(value)}, not a number"
    if not math.isfinite(reward):
        return 0.0, f"{where} returned {reward}, not a finite number"
    return reward, None


def check_failures(problems: Sequence[Problem], errors: Sequence[str | None], stage: str) -> None:
    """Raise `RewardFailed` when one reward function failed on every completion it scored in
    `stage` (`problems[i]` is completion i's problem, `errors[i]` its `checked_reward` error)."""
    calls = Counter(p.reward for p in problems)
    failed = Counter(p.reward for p, e in zip(problems, errors) if e is not None)
    for name, n in calls.items():
        if failed[name] == n:
            p, error = next((p, e) for p, e in zip(problems, errors) if p.reward == name)
            assert error is not None
            first = error.removeprefix(_site(p)).strip().removeprefix("raised ")
            raise RewardFailed(name, stage, n, first, p)


def warn_once(problem: Problem, error: str | None) -> None:
    """A `RewardWarning` for `error` (from `checked_reward`), shown once per reward name."""
    if error is not None and problem.reward not in _WARNED:
        _WARNED.add(problem.reward)
        warnings.warn(
            f"{error}; it scores 0 (later failures of this reward are not shown)",
            RewardWarning,
            stacklevel=3,
        )


def score_completion(problem: Problem, completion: str, salt: str = "") -> float:
    """Reward of one completion under the problem's own reward function (`checked_reward`:
    a failed reward scores 0.0 with a `RewardWarning`, shown once per reward name)."""
    reward, error = checked_reward(problem, completion, salt)
    warn_once(problem, error)
    return reward
