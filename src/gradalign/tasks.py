"""Built-in synthetic task families with programmatic answer checking.

Each family draws problems from a seeded generator and knows one reference solution per
problem (used only by the supervised warm start):

- ``addition``: ``"47+38"`` → ``"85"`` (exact match);
- ``countdown``: ``"make 26 from 3 5 7"`` → any expression over 3, 5, 7, each used at most
  once, equal to 26, e.g. ``"3*7+5"`` (checked with `gradalign.rewards.countdown`).

`make_task` builds the pool, validation set and eval set of the default task: disjoint
prompts, ids unique across the three sets.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from gradalign.problems import Problem

Draw = tuple[str, str, str, str]  # (prompt, answer, solution, reward name)


def draw_addition(rng: np.random.Generator) -> Draw:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return f"{a}+{b}", str(a + b), str(a + b), "exact"


def draw_countdown(rng: np.random.Generator) -> Draw:
    while True:
        nums = [int(x) for x in rng.integers(1, 16, size=3)]
        ops = [str(o) for o in rng.choice(["+", "-", "*"], size=2)]
        solution = f"{nums[0]}{ops[0]}{nums[1]}{ops[1]}{nums[2]}"
        target = int(eval(solution, {"__builtins__": {}}))  # digits and + - * only
        if 1 <= target <= 99:
            break
    shown = sorted(nums)
    prompt = f"make {target} from {' '.join(map(str, shown))}"
    answer = f"{' '.join(map(str, shown))}={target}"
    return prompt, answer, solution, "countdown"


FAMILIES: dict[str, Callable[[np.random.Generator], Draw]] = {
    "addition": draw_addition,
    "countdown": draw_countdown,
}


def draw_problems(
    family: str,
    n: int,
    rng: np.random.Generator,
    first_id: int,
    exclude: set[str],
    at_most: bool = False,
) -> tuple[list[Problem], list[str]]:
    """Draw n problems with prompts not in `exclude` (updated in place); also return
    their reference solutions. With `at_most`, stop early when new prompts run out."""
    draw = FAMILIES[family]
    problems, solutions = [], []
    misses = 0
    while len(problems) < n:
        if misses > 2000:
            if at_most:
                break
            raise ValueError(f"task family '{family}' cannot supply {n} distinct problems")
        prompt, answer, solution, reward = draw(rng)
        if prompt in exclude:
            misses += 1  # consecutive draws of known prompts
            continue
        misses = 0
        exclude.add(prompt)
        problems.append(Problem(first_id + len(problems), prompt, answer, family, reward))
        solutions.append(solution)
    return problems, solutions


@dataclass(frozen=True)
class TaskSets:
    pool: list[Problem]
    validation: list[Problem]
    eval: list[Problem]


def make_task(
    families: list[str],
    pool_size: int,
    val_size: int,
    eval_size: int,
    seed: int,
) -> TaskSets:
    """The default task: each set split evenly over `families`, prompts disjoint across sets.

    Ids: pool 0.., validation 1_000_000.., eval 2_000_000.. (unique across the three).
    """
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    sets = []
    for base, size in ((2_000_000, eval_size), (1_000_000, val_size), (0, pool_size)):
        problems: list[Problem] = []
        for i, family in enumerate(families):
            share = size // len(families) + (1 if i < size % len(families) else 0)
            drawn, _ = draw_problems(family, share, rng, base + len(problems), seen)
            problems.extend(drawn)
        sets.append(problems)
    eval_set, validation, pool = sets
    return TaskSets(pool=pool, validation=validation, eval=eval_set)


def warmstart_examples(
    families: list[str], n: int, seed: int, exclude: set[str]
) -> list[tuple[str, str]]:
    """Up to n (prompt, solution) pairs for the supervised warm start, disjoint from
    `exclude` (fewer when a family runs out of distinct prompts)."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    seen = set(exclude)
    for i, family in enumerate(families):
        share = n // len(families) + (1 if i < n % len(families) else 0)
        problems, solutions = draw_problems(family, share, rng, 0, seen, at_most=True)
        out.extend((p.prompt, s) for p, s in zip(problems, solutions))
    order = np.random.default_rng(seed + 1).permutation(len(out))
    return [out[i] for i in order]
