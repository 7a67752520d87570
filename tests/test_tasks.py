"""Built-in task families and the data regimes (fractions, records, determinism, disjointness)."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from gradalign.data.rewards import score_completion
from gradalign.data.tasks import (
    FAMILIES,
    LONGEST_ANSWER,
    column_steps,
    draw_problems,
    family_of,
    flaw_examples,
    flaw_examples_by_family,
    flaw_target,
    make_regime,
    make_task,
    parse_family_flaws,
    partition_of,
    warmstart_examples,
)
from gradalign.engine.warmstart import warmstart_key

FAMS = ["addition", "countdown"]


def _prompts(problems):
    return {p.prompt for p in problems}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_reference_solutions_earn_reward_one(family):
    problems, solutions = draw_problems(family, 50, np.random.default_rng(0), 0, set())
    for p, s in zip(problems, solutions):
        assert score_completion(p, s) == 1.0, (p, s)
        assert score_completion(p, s + "1") == 0.0


@pytest.mark.parametrize(
    ("a", "b", "steps"),
    [
        (47, 38, "7+8=15,4+3+1=8:85"),
        (5, 3, "5+3=8,0+0=0:8"),
        (20, 31, "0+1=1,2+3=5:51"),
        (99, 99, "9+9=18,9+9+1=19:198"),
        (0, 0, "0+0=0,0+0=0:0"),
    ],
)
def test_column_steps(a, b, steps):
    assert column_steps(a, b) == steps


def test_longest_answer_bounds_every_reference_solution():
    assert max(len(column_steps(a, b)) for a in range(100) for b in range(100)) == 19
    assert max(len(str(a + b)) for a in range(100) for b in range(100)) == 3
    for family, longest in LONGEST_ANSWER.items():
        problems, solutions = draw_problems(family, 400, np.random.default_rng(2), 0, set())
        assert max(map(len, solutions)) <= longest
        assert all(len(p.answer) <= longest for p in problems)


def test_make_task_sizes_ids_and_disjoint_sets():
    sets = make_task(FAMS, 100, 10, 20, seed=3)
    assert (len(sets.pool), len(sets.validation), len(sets.eval)) == (100, 10, 20)
    assert Counter(p.source for p in sets.pool) == {"addition": 50, "countdown": 50}
    ids = [p.id for p in sets.pool + sets.validation + sets.eval]
    assert len(set(ids)) == len(ids)
    assert not _prompts(sets.pool) & _prompts(sets.validation)
    assert not _prompts(sets.validation) & _prompts(sets.eval)
    assert not _prompts(sets.pool) & _prompts(sets.eval)


@pytest.mark.parametrize("regime", ["clean", "noisy", "imbalance", "lowutility"])
def test_regimes_are_deterministic_by_seed_and_keep_sets_disjoint(regime):
    a = make_regime(regime, FAMS, 200, 16, 32, seed=5)
    b = make_regime(regime, FAMS, 200, 16, 32, seed=5)
    c = make_regime(regime, FAMS, 200, 16, 32, seed=6)
    assert a == b
    assert [p.meta for p in a.pool] == [p.meta for p in b.pool]
    assert [p.prompt for p in a.pool] != [p.prompt for p in c.pool]
    assert len(a.pool) == 200 and len({p.id for p in a.pool}) == 200
    assert not _prompts(a.validation) & _prompts(a.eval)
    assert not _prompts(a.pool) & (_prompts(a.validation) | _prompts(a.eval))
    for p in a.validation + a.eval:
        assert not p.meta and p.reward in ("exact", "countdown")  # trusted sets stay clean


@pytest.mark.parametrize("frac", [0.0, 0.3, 0.5, 1.0])
def test_noisy_coinflip_corrupts_the_given_fraction_and_records_it(frac):
    clean = make_task(FAMS, 100, 8, 8, seed=1)
    sets = make_regime("noisy", FAMS, 100, 8, 8, seed=1, corrupt_frac=frac)
    bad = [p for p in sets.pool if p.meta.get("corruption") == "coinflip"]
    assert len(bad) == round(frac * 100)
    assert all(p.reward == "coinflip" for p in bad)
    by_id = {p.id: p for p in clean.pool}
    for p in sets.pool:  # only the reward changed; prompts and answers are those of the clean task
        assert (p.prompt, p.answer) == (by_id[p.id].prompt, by_id[p.id].answer)
    if bad:  # the coin ignores the answer: the right answer earns 0 about half of the time
        flips = [score_completion(p, p.answer, salt=str(s)) for p in bad for s in range(20)]
        assert 0.3 < np.mean(flips) < 0.7


def test_noisy_labelflip_moves_the_reference_answer():
    sets = make_regime("noisy", FAMS, 100, 8, 8, seed=2, corruption="labelflip")
    bad = [p for p in sets.pool if p.meta.get("corruption") == "labelflip"]
    assert len(bad) == 50
    for p in bad:
        true = p.meta["true_answer"]
        assert p.answer != true
        if p.source == "addition":
            assert score_completion(p, true) == 0.0 and 1 <= abs(int(p.answer) - int(true)) <= 3


def test_imbalance_mixes_the_pool_and_draws_trusted_sets_from_the_minority():
    sets = make_regime(
        "imbalance", FAMS, 200, 16, 32, seed=0, majority_frac=0.9, minority="countdown"
    )
    assert Counter(p.source for p in sets.pool) == {"addition": 180, "countdown": 20}
    assert {p.source for p in sets.validation + sets.eval} == {"countdown"}
    with pytest.raises(ValueError, match="minority"):
        make_regime("imbalance", ["addition"], 10, 2, 2, seed=0, minority="countdown")


def test_lowutility_garbles_the_given_fraction():
    sets = make_regime("lowutility", FAMS, 100, 8, 8, seed=4, lowutility_frac=0.8)
    filler = [p for p in sets.pool if p.meta.get("utility") == "garbled"]
    assert len(filler) == 80
    for p in filler:  # unanswerable: '#' is not even in the built-in tokenizer's alphabet
        assert p.answer == "#" and p.prompt.endswith("?")


def test_unknown_regime_and_corruption_are_errors():
    with pytest.raises(ValueError, match="unknown regime"):
        make_regime("chaos", FAMS, 10, 2, 2, seed=0)
    with pytest.raises(ValueError, match="unknown corruption"):
        make_regime("noisy", FAMS, 10, 2, 2, seed=0, corruption="shuffle")


# --- prompt partitions and warm-start target flaws -------------------------------------------


@pytest.mark.parametrize("regime", ["clean", "noisy", "imbalance", "lowutility"])
@pytest.mark.parametrize("seed", [0, 5])
def test_sets_come_from_their_partitions(regime, seed):
    sets = make_regime(regime, FAMS, 200, 16, 64, seed)
    assert {partition_of(p.prompt) for p in sets.validation + sets.eval} == {"heldout"}
    untouched = [p for p in sets.pool if not p.meta.get("utility")]  # garbling moves a prompt
    assert {partition_of(p.prompt) for p in untouched} == {"pool"}


def test_warmstart_examples_never_meet_a_regime_and_serve_every_data_seed():
    examples = warmstart_examples(FAMS, 3000, seed=17, exclude=set())
    assert {partition_of(p) for p, _ in examples} == {"warmstart"}
    for regime in ("imbalance", "lowutility"):  # garbled filler lands in any partition
        sets = make_regime(regime, FAMS, 300, 16, 64, seed=2)
        exclude = _prompts(sets.pool + sets.validation + sets.eval)
        assert any(partition_of(p) == "warmstart" for p in exclude) == (regime == "lowutility")
        met: set[str] = set()
        assert warmstart_examples(FAMS, 3000, 17, exclude, met) == examples and met == set()
    a_warmstart_prompt = examples[5][0]  # a user file holding one: that changes the examples
    met = set()
    changed = warmstart_examples(FAMS, 3000, 17, {a_warmstart_prompt, "never drawn"}, met)
    assert met == {a_warmstart_prompt} and a_warmstart_prompt not in {p for p, _ in changed}
    assert warmstart_key("tiny", FAMS, 500, 3e-3, 128, 0, met) != warmstart_key(
        "tiny", FAMS, 500, 3e-3, 128, 0, set()
    )


def test_flaw_changes_the_key_only_when_it_changes_the_targets():
    key = lambda flaw, frac: warmstart_key("tiny", FAMS, 500, 3e-3, 128, 0, set(), flaw, frac)  # noqa: E731
    assert key("none", 0.6) == key("junk", 0.0) == key("none", 0.0)
    assert len({key("none", 0.0), key("junk", 0.6), key("junk", 0.4), key("lastdigit", 0.6)}) == 4


@pytest.mark.parametrize(
    ("solution", "kind", "flawed"),
    [
        ("85", "junk", "85x"),
        ("85", "lastdigit", "86"),
        ("109", "lastdigit", "100"),  # 9 + 1 wraps to 0
        ("3*7+5", "lastdigit", "3*7-5"),
        ("3-7-5", "lastdigit", "3-7+5"),
        ("2*3*4", "lastdigit", "2*3*4"),  # no + or - to flip
        ("3*7+5", "junk", "3*7+5x"),
        ("85", "none", "85"),
        ("7+8=15,4+3+1=8:85", "lastdigit", "7+8=15,4+3+1=8:86"),  # the sum, not the steps
        ("7+8=15,4+3+1=8:85", "junk", "7+8=15,4+3+1=8:85x"),
        ("85", "junk2", "85z"),
        ("3*7", "junk2", "3*7z"),
        ("85", "lead", "y85"),
        ("3*7+5", "lead", "y3*7+5"),
        ("7+8=15,4+3+1=8:85", "lead", "7+8=15,4+3+1=8:y85"),  # before the checked sum
        ("7-3", "lastdigit", "7+3"),
        ("3*7", "lastdigit", "3*7"),
    ],
)
def test_flaw_target(solution, kind, flawed):
    assert flaw_target(solution, kind) == flawed


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("kind", ["junk", "junk2", "lead", "lastdigit"])
def test_flawed_targets_earn_no_reward(family, kind):
    problems, solutions = draw_problems(family, 60, np.random.default_rng(1), 0, set())
    rewards = [score_completion(p, flaw_target(s, kind)) for p, s in zip(problems, solutions)]
    kept = [
        family.startswith("countdown") and kind == "lastdigit" and not set("+-") & set(s)
        for s in solutions
    ]
    assert rewards == [float(k) for k in kept]  # only countdown's a*b(*c) keeps its value


def test_flaw_examples_alter_the_given_share_reproducibly():
    examples = [(f"{i}+0", str(i)) for i in range(10, 110)]
    flawed = flaw_examples(examples, "junk", 0.6, seed=4)
    assert sum(s.endswith("x") for _, s in flawed) == 60
    assert [p for p, _ in flawed] == [p for p, _ in examples]
    assert flawed == flaw_examples(examples, "junk", 0.6, seed=4)
    assert flawed != flaw_examples(examples, "junk", 0.6, seed=5)
    assert flaw_examples(examples, "none", 0.6, seed=4) == examples


def test_countdown2_draws_two_numbers_and_countdown_is_unchanged():
    problems, solutions = draw_problems("countdown2", 40, np.random.default_rng(3), 0, set())
    for p in problems:
        numbers, _, target = p.answer.partition("=")
        assert len(numbers.split()) == 2 and 1 <= int(target) <= 99
        assert p.source == "countdown2" and p.reward == "countdown"
        assert family_of(p.prompt) == "countdown2"

    # the three-number family draws what it drew before it took a count (the old code)
    def old_draw(rng):
        while True:
            nums = [int(x) for x in rng.integers(1, 16, size=3)]
            ops = [str(o) for o in rng.choice(["+", "-", "*"], size=2)]
            solution = f"{nums[0]}{ops[0]}{nums[1]}{ops[1]}{nums[2]}"
            target = int(eval(solution, {"__builtins__": {}}))
            if 1 <= target <= 99:
                shown = " ".join(map(str, sorted(nums)))
                return f"make {target} from {shown}", f"{shown}={target}", solution, "countdown"

    new_rng, old_rng = np.random.default_rng(5), np.random.default_rng(5)
    assert [FAMILIES["countdown"](new_rng) for _ in range(50)] == [
        old_draw(old_rng) for _ in range(50)
    ]


@pytest.mark.parametrize(
    ("prompt", "family"),
    [
        ("47+38", "addition"),
        ("47+38 in steps", "addition_steps"),
        ("make 26 from 3 5 7", "countdown"),
        ("make 21 from 3 7", "countdown2"),
    ],
)
def test_family_of(prompt, family):
    assert family_of(prompt) == family


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_family_of_every_drawn_prompt(family):
    problems, _ = draw_problems(family, 30, np.random.default_rng(2), 0, set())
    assert {family_of(p.prompt) for p in problems} == {family}


def test_parse_family_flaws():
    assert parse_family_flaws(["addition:lastdigit:0.4", "countdown2:junk2"], 0.6) == {
        "addition": ("lastdigit", 0.4),
        "countdown2": ("junk2", 0.6),
    }
    assert parse_family_flaws([], 0.6) == {}
    for bad, why in [
        (["algebra:junk"], "unknown family 'algebra'"),
        (["addition:typo"], "unknown flaw 'typo'"),
        (["addition:junk", "addition:lead"], "given twice"),
        (["addition:junk:lots"], "'lots' is not a number"),
        (["addition:junk:1.5"], "not in [0, 1]"),
    ]:
        with pytest.raises(ValueError, match=why.replace("[", r"\[").replace("]", r"\]")):
            parse_family_flaws(bad, 0.6)


def test_flaw_examples_by_family_give_each_family_its_flaw_and_share():
    adds = [(f"{i}+1", str(i + 1)) for i in range(10, 110)]  # 100 addition examples
    cds = [(f"make {i + 1} from 1 {i}", f"{i}+1") for i in range(1, 51)]  # 50 countdown2
    examples = [e for pair in zip(adds[:50], cds) for e in pair] + adds[50:]
    flawed = flaw_examples_by_family(examples, "junk", 0.6, {"countdown2": ("lead", 0.4)}, seed=7)
    assert [p for p, _ in flawed] == [p for p, _ in examples]
    add_out = [s for p, s in flawed if family_of(p) == "addition"]
    cd_out = [s for p, s in flawed if family_of(p) == "countdown2"]
    assert sum(s.endswith("x") for s in add_out) == 60 and not any("y" in s for s in add_out)
    assert sum(s.startswith("y") for s in cd_out) == 20 and not any("x" in s for s in cd_out)
    assert flawed == flaw_examples_by_family(
        examples, "junk", 0.6, {"countdown2": ("lead", 0.4)}, 7
    )
    # without per-family flaws: exactly the one flaw over all examples, as before
    assert flaw_examples_by_family(examples, "junk", 0.6, {}, 7) == flaw_examples(
        examples, "junk", 0.6, 7
    )


def test_family_flaws_enter_the_key_only_when_given():
    key = lambda ff: warmstart_key("tiny", FAMS, 500, 3e-3, 128, 0, set(), "junk", 0.6, ff)  # noqa: E731
    assert (
        key(None) == key({}) == warmstart_key("tiny", FAMS, 500, 3e-3, 128, 0, set(), "junk", 0.6)
    )
    assert key({"addition": ("lastdigit", 0.4)}) not in (
        key(None),
        key({"addition": ("lastdigit", 0.5)}),
    )
    # a flaw for a family outside FAMS trains nothing and leaves the key as it was
    assert key({"countdown2": ("junk2", 0.6)}) == key(None)
    assert key({"addition": ("lastdigit", 0.4), "countdown2": ("junk2", 0.6)}) == key(
        {"addition": ("lastdigit", 0.4)}
    )
