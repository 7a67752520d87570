"""Built-in synthetic task families with programmatic answer checking.

Each family draws problems from a seeded generator and knows one reference solution per
problem (used only by the supervised warm start):

- ``addition``: ``"47+38"`` → ``"85"`` (exact match);
- ``countdown``: ``"make 26 from 3 5 7"`` → any expression over 3, 5, 7, each used at most
  once, equal to 26, e.g. ``"3*7+5"`` (checked with `gradalign.data.rewards.countdown`);
- ``addition_steps``: ``"47+38 in steps"`` → a column-addition scratchpad then the sum,
  ``"7+8=15,4+3+1=8:85"``; only the sum after the last ``:`` is checked
  (`gradalign.data.rewards.final_answer`, an outcome reward), so completions are 9–19
  characters instead of 1–3 and the steps are the model's own.

`make_task` builds the pool, validation set and eval set of the default task: disjoint
prompts, ids unique across the three sets.

Every prompt belongs to one fixed *partition* by a hash of its text (`partition_of`): the
validation and eval sets are drawn from ``heldout``, pools from ``pool`` and the supervised
warm start from ``warmstart``. So the warm start never sees a validation or eval prompt nor a
pool prompt, whatever the data seed or regime, and one cached warm start serves every regime
and data seed of a family set.

The warm start can be given a systematic *target flaw* (`flaw_examples`): a share of its
supervised answers differ from what the reward accepts, as a pretrained model's habits differ
from a task's reward. RL then has a direction shared by all problems to learn along (repair
the flaw), which is what gradient alignment needs to see anything; on a warm start fitted to
exactly what the reward checks, the gradients of disjoint problems cancel.
"""

from __future__ import annotations

import hashlib
import typing
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Literal

import numpy as np

from gradalign.data.problems import Problem

Draw = tuple[str, str, str, str]  # (prompt, answer, solution, reward name)


def draw_addition(rng: np.random.Generator) -> Draw:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return f"{a}+{b}", str(a + b), str(a + b), "exact"


def draw_countdown(rng: np.random.Generator, count: int = 3, high: int = 15) -> Draw:
    while True:
        nums = [int(x) for x in rng.integers(1, high + 1, size=count)]
        ops = [str(o) for o in rng.choice(["+", "-", "*"], size=count - 1)]
        solution = "".join(f"{o}{n}" for o, n in zip(ops, nums[1:]))
        solution = f"{nums[0]}{solution}"
        target = int(eval(solution, {"__builtins__": {}}))  # digits and + - * only
        if 1 <= target <= 99:
            break
    shown = sorted(nums)
    prompt = f"make {target} from {' '.join(map(str, shown))}"
    answer = f"{' '.join(map(str, shown))}={target}"
    return prompt, answer, solution, "countdown"


def draw_countdown2(rng: np.random.Generator) -> Draw:
    """Countdown with two numbers from 1..99: ``"make 61 from 23 38"`` → ``"38+23"`` (an
    easier family: one operator to choose; enough distinct prompts for every set)."""
    return draw_countdown(rng, count=2, high=99)


def column_steps(a: int, b: int) -> str:
    """The scratchpad of a + b (0 ≤ a, b ≤ 99): units column, tens column with its carry,
    then ``:`` and the sum. ``column_steps(47, 38) == "7+8=15,4+3+1=8:85"``."""
    units = a % 10 + b % 10
    carry = f"+{units // 10}" if units >= 10 else ""
    tens = a // 10 + b // 10 + units // 10
    return f"{a % 10}+{b % 10}={units},{a // 10}+{b // 10}{carry}={tens}:{a + b}"


def draw_addition_steps(rng: np.random.Generator) -> Draw:
    a, b = (int(x) for x in rng.integers(0, 100, size=2))
    return f"{a}+{b} in steps", str(a + b), column_steps(a, b), "final"


FAMILIES: dict[str, Callable[[np.random.Generator], Draw]] = {
    "addition": draw_addition,
    "countdown": draw_countdown,
    "countdown2": draw_countdown2,
    "addition_steps": draw_addition_steps,
}


def family_of(prompt: str) -> str:
    """The built-in family a prompt was drawn from, read off its form (`FAMILIES`):
    ``"47+38"`` addition, ``"47+38 in steps"`` addition_steps, ``"make 26 from 3 5 7"``
    countdown, ``"make 61 from 23 38"`` countdown2."""
    if prompt.startswith("make "):
        return "countdown2" if len(prompt.split(" from ", 1)[1].split()) == 2 else "countdown"
    return "addition_steps" if prompt.endswith(" in steps") else "addition"


# The longest answer, in characters (= built-in tokens), of the families whose answers have
# one form; a countdown target can be reached by shorter expressions than its reference.
LONGEST_ANSWER = {"addition": 3, "addition_steps": 19}


Partition = Literal["heldout", "pool", "warmstart"]
# eighths of the prompt space by hash: 1 held out (validation, eval), 3 pool, 4 warm start
PARTITION_EIGHTHS: tuple[tuple[Partition, int], ...] = (
    ("heldout", 1),
    ("pool", 3),
    ("warmstart", 4),
)


def partition_of(prompt: str) -> Partition:
    """The fixed partition of a prompt, from a hash of its text (independent of any seed)."""
    eighth = hashlib.blake2b(prompt.encode(), digest_size=2).digest()[0] % 8
    for name, width in PARTITION_EIGHTHS:
        if eighth < width:
            return name
        eighth -= width
    raise AssertionError("PARTITION_EIGHTHS covers 8 eighths")


def draw_problems(
    family: str,
    n: int,
    rng: np.random.Generator,
    first_id: int,
    exclude: set[str],
    at_most: bool = False,
    partition: Partition | None = None,
    met: set[str] | None = None,
) -> tuple[list[Problem], list[str]]:
    """Draw n problems with prompts not in `exclude` (updated in place) and, if given, in
    `partition`; also return their reference solutions. With `at_most`, stop early when new
    prompts run out. `met` collects the drawn prompts skipped for being in `exclude`."""
    draw = FAMILIES[family]
    problems: list[Problem] = []
    solutions: list[str] = []
    misses = 0
    while len(problems) < n:
        if misses > 2000:
            if at_most:
                break
            where = f" in the {partition} partition" if partition else ""
            raise ValueError(f"task family '{family}' cannot supply {n} distinct problems{where}")
        prompt, answer, solution, reward = draw(rng)
        if partition is not None and partition_of(prompt) != partition:
            misses += 1  # consecutive draws of known or other-partition prompts
            continue
        if prompt in exclude:
            misses += 1
            if met is not None:
                met.add(prompt)
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
    """The default task: each set split evenly over `families`, prompts disjoint across sets;
    validation and eval from the ``heldout`` partition, the pool from ``pool``.

    Ids: pool 0.., validation 1_000_000.., eval 2_000_000.. (unique across the three).
    """
    rng = np.random.default_rng(seed)
    seen: set[str] = set()
    sets = []
    parts: tuple[tuple[int, int, Partition], ...] = (
        (2_000_000, eval_size, "heldout"),
        (1_000_000, val_size, "heldout"),
        (0, pool_size, "pool"),
    )
    for base, size, part in parts:
        problems: list[Problem] = []
        for i, family in enumerate(families):
            share = size // len(families) + (1 if i < size % len(families) else 0)
            drawn, _ = draw_problems(family, share, rng, base + len(problems), seen, partition=part)
            problems.extend(drawn)
        sets.append(problems)
    eval_set, validation, pool = sets
    return TaskSets(pool=pool, validation=validation, eval=eval_set)


def warmstart_examples(
    families: list[str], n: int, seed: int, exclude: set[str], met: set[str] | None = None
) -> list[tuple[str, str]]:
    """Up to n (prompt, solution) pairs for the supervised warm start, from the
    ``warmstart`` partition and disjoint from `exclude` (fewer when a family runs out of
    distinct prompts). `met` collects the prompts of `exclude` the draw came across: only
    they made the examples differ from those of an empty `exclude`."""
    rng = np.random.default_rng(seed)
    out: list[tuple[str, str]] = []
    seen, skipped = set(exclude), set[str]()
    for i, family in enumerate(families):
        share = n // len(families) + (1 if i < n % len(families) else 0)
        problems, solutions = draw_problems(
            family, share, rng, 0, seen, at_most=True, partition="warmstart", met=skipped
        )
        out.extend((p.prompt, s) for p, s in zip(problems, solutions))
    if met is not None:
        met |= skipped & exclude  # not the draw's own repeats
    order = np.random.default_rng(seed + 1).permutation(len(out))
    return [out[i] for i in order]


# ---------------------------------------------------------------- warm-start target flaws
Flaw = Literal["none", "junk", "junk2", "lead", "lastdigit"]
FLAWS: tuple[str, ...] = typing.get_args(Flaw)
JUNK = "x"  # after an answer, every built-in reward rejects it (exact match, countdown)
JUNK2 = "z"  # the same flaw with another character (`junk2`)
LEAD = "y"  # before an answer (`lead`): rejected by every built-in reward


def flaw_target(solution: str, kind: Flaw) -> str:
    """A supervised target with the flaw: ``junk`` appends `JUNK` and ``junk2`` `JUNK2` (a
    format flaw: one token before EOS); ``lead`` puts `LEAD` before the answer (a format
    flaw on the first answer token; before a scratchpad's final sum); ``lastdigit`` adds 1
    (mod 10) to an addition answer's last digit (a scratchpad's final sum: its steps stay
    right) and turns the last + / - of a countdown expression into the other (a content
    flaw: a wrong value)."""
    if kind in ("junk", "junk2"):
        return solution + (JUNK if kind == "junk" else JUNK2)
    steps, colon, final = solution.rpartition(":")
    if kind == "lead":
        return steps + colon + LEAD + final
    if kind == "lastdigit":
        if colon and final.isdigit():
            return steps + colon + flaw_target(final, kind)
        if solution.isdigit():
            return solution[:-1] + str((int(solution[-1]) + 1) % 10)
        for i in range(len(solution) - 1, 0, -1):
            if solution[i] in "+-":
                return solution[:i] + ("-" if solution[i] == "+" else "+") + solution[i + 1 :]
        return solution  # a*b*c has no + or - to flip: left correct
    return solution


def flaw_examples(
    examples: list[tuple[str, str]], kind: Flaw, frac: float, seed: int
) -> list[tuple[str, str]]:
    """`frac` of the (prompt, solution) pairs, chosen with `seed`, get `flaw_target`."""
    if kind == "none" or frac <= 0:
        return examples
    rng = np.random.default_rng(seed)
    chosen = set(
        rng.choice(len(examples), size=round(frac * len(examples)), replace=False).tolist()
    )
    return [(p, flaw_target(s, kind) if i in chosen else s) for i, (p, s) in enumerate(examples)]


FamilyFlaws = dict[str, tuple[Flaw, float]]  # family -> (flaw, share of its targets)


def parse_family_flaws(items: list[str], default_frac: float) -> FamilyFlaws:
    """``["addition:lastdigit:0.4", "countdown2:junk2"]`` → {family: (flaw, share)}; a share
    left out is `default_frac`. Raises ValueError naming the bad item."""
    out: FamilyFlaws = {}
    for item in items:
        family, _, rest = item.partition(":")
        kind, _, frac_text = rest.partition(":")
        if family not in FAMILIES:
            raise ValueError(f"{item!r}: unknown family {family!r} (known: {', '.join(FAMILIES)})")
        if kind not in FLAWS:
            raise ValueError(f"{item!r}: unknown flaw {kind!r} (known: {', '.join(FLAWS)})")
        if family in out:
            raise ValueError(f"{item!r}: family {family!r} is given twice")
        try:
            frac = float(frac_text) if frac_text else default_frac
        except ValueError:
            raise ValueError(f"{item!r}: the share {frac_text!r} is not a number") from None
        if not 0 <= frac <= 1:
            raise ValueError(f"{item!r}: the share {frac_text} is not in [0, 1]")
        out[family] = (kind, frac)  # type: ignore[assignment]
    return out


def flaw_examples_by_family(
    examples: list[tuple[str, str]],
    kind: Flaw,
    frac: float,
    by_family: FamilyFlaws,
    seed: int,
) -> list[tuple[str, str]]:
    """`flaw_examples` family by family (`family_of` each prompt): a family in `by_family`
    gets its own (flaw, share), the others (`kind`, `frac`); each family's share of its own
    examples, chosen with its own seed. Without `by_family`, exactly `flaw_examples`."""
    if not by_family:
        return flaw_examples(examples, kind, frac, seed)
    out = list(examples)
    for j, family in enumerate(sorted({family_of(p) for p, _ in examples})):
        at = [i for i, (p, _) in enumerate(examples) if family_of(p) == family]
        fam_kind, fam_frac = by_family.get(family, (kind, frac))
        flawed = flaw_examples([examples[i] for i in at], fam_kind, fam_frac, seed + 1 + j)
        for i, pair in zip(at, flawed):
            out[i] = pair
    return out


# ---------------------------------------------------------------- data regimes (paper §5)
# Each regime is built from a seed; what was done to a problem is recorded in its `meta`
# ("corruption", "utility") for measurement only: selection never reads `meta`.

Regime = str  # "clean" | "noisy" | "imbalance" | "lowutility"


def corrupt(pool: list[Problem], frac: float, kind: str, seed: int) -> list[Problem]:
    """Unreliable rewards: `frac` of the pool, chosen with `seed`, gets a coin-flip reward
    independent of the answer (``coinflip``, the reference code's mechanism) or a wrong
    reference answer (``labelflip``)."""
    rng = np.random.default_rng(seed)
    chosen = set(rng.choice(len(pool), size=round(frac * len(pool)), replace=False).tolist())
    out = []
    for i, p in enumerate(pool):
        if i not in chosen:
            out.append(p)
        elif kind == "coinflip":
            out.append(replace(p, reward="coinflip", meta={**p.meta, "corruption": "coinflip"}))
        elif kind == "labelflip":
            out.append(
                replace(
                    p,
                    answer=_wrong_answer(p, rng),
                    meta={**p.meta, "corruption": "labelflip", "true_answer": p.answer},
                )
            )
        else:
            raise ValueError(f"unknown corruption '{kind}' (coinflip or labelflip)")
    return out


def _wrong_answer(p: Problem, rng: np.random.Generator) -> str:
    offset = int(rng.choice([-3, -2, -1, 1, 2, 3]))
    if p.reward == "countdown":  # "n1 n2 n3=target": move the target
        numbers, _, target = p.answer.partition("=")
        return f"{numbers}={int(target) + offset}"
    return str(int(p.answer) + offset) if p.answer.lstrip("-").isdigit() else p.answer + "x"


def garble(p: Problem, rng: np.random.Generator) -> Problem:
    """Low-utility filler: the prompt's characters shuffled, so no answer can be right."""
    chars = list(p.prompt)
    rng.shuffle(chars)
    return replace(
        p,
        prompt="".join(chars) + "?",
        answer="#",
        reward="exact",
        meta={**p.meta, "utility": "garbled"},
    )


def make_regime(
    regime: Regime,
    families: list[str],
    pool_size: int,
    val_size: int,
    eval_size: int,
    seed: int,
    corrupt_frac: float = 0.5,
    corruption: str = "coinflip",
    majority_frac: float = 0.9,
    minority: str = "countdown",
    lowutility_frac: float = 0.8,
) -> TaskSets:
    """The pool, validation and eval sets of a data regime.

    - ``clean``: `make_task`, nothing altered;
    - ``noisy``: `corrupt_frac` of the pool corrupted (`corrupt`); validation and eval clean;
    - ``imbalance``: `majority_frac` of the pool from the other families, the rest from
      `minority`; validation and eval sets from `minority` only;
    - ``lowutility``: `lowutility_frac` of the pool garbled (`garble`), the rest useful.
    """
    if regime == "imbalance":
        if minority not in families or len(families) < 2:
            raise ValueError(f"imbalance needs 2+ families including minority '{minority}'")
        majority = [f for f in families if f != minority]
        n_min = max(1, round((1 - majority_frac) * pool_size))
        base = make_task([minority], n_min, val_size, eval_size, seed)
        seen = {p.prompt for p in base.pool + base.validation + base.eval}
        rng = np.random.default_rng(seed + 1)
        extra: list[Problem] = []
        for i, fam in enumerate(majority):
            share = (pool_size - n_min) // len(majority) + (i < (pool_size - n_min) % len(majority))
            drawn, _ = draw_problems(fam, share, rng, 0, seen, partition="pool")
            extra.extend(drawn)
        pool = [replace(p, id=i) for i, p in enumerate(base.pool + extra)]
        order = np.random.default_rng(seed + 2).permutation(len(pool))
        return TaskSets([pool[i] for i in order], base.validation, base.eval)
    sets = make_task(families, pool_size, val_size, eval_size, seed)
    if regime == "clean":
        return sets
    if regime == "noisy":
        return replace(sets, pool=corrupt(sets.pool, corrupt_frac, corruption, seed + 3))
    if regime == "lowutility":
        rng = np.random.default_rng(seed + 4)
        chosen = set(
            rng.choice(pool_size, size=round(lowutility_frac * pool_size), replace=False).tolist()
        )
        pool = [garble(p, rng) if i in chosen else p for i, p in enumerate(sets.pool)]
        return replace(sets, pool=pool)
    raise ValueError(f"unknown regime '{regime}' (clean, noisy, imbalance, lowutility)")
