"""Loading problem files: the slices of real public sets in examples/data, verl and plain
fixtures."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from gradalign.data.files import (
    BOXED_INSTRUCTION,
    FileSpec,
    LoadResult,
    Rejection,
    extract_reference,
    load_file,
    load_files,
    summarise,
)
from gradalign.data.problems import Problem, ProblemError, provenance
from gradalign.data.rewards import math_reward

FIXTURES = Path(__file__).parent / "fixtures"
REPO = Path(__file__).resolve().parents[1]


DATA = REPO / "examples" / "data"  # slices of the public sets, shipped with the repository


# --- the real public sets ----------------------------------------------------------------

PUBLIC = {  # file: (records, documented options)
    "gsm8k/test.jsonl": (150, {}),
    "gsm8k/train.jsonl": (256, {}),
    "math500/test.jsonl": (64, {"template": "{prompt}\n" + BOXED_INSTRUCTION}),
    "aime24/test.jsonl": (30, {}),
    "amc23/test.jsonl": (40, {}),
}


@pytest.fixture(scope="module")
def public() -> dict[str, LoadResult]:
    return {name: load_file(FileSpec(DATA / name, **opts)) for name, (_, opts) in PUBLIC.items()}


@pytest.mark.parametrize("name", PUBLIC)
def test_public_set_loads_completely(public: dict[str, LoadResult], name: str) -> None:
    result = public[name]
    assert result.rejected == [] and result.duplicates_dropped == 0
    assert len(result.problems) == PUBLIC[name][0]
    assert [p.id for p in result.problems] == list(range(PUBLIC[name][0]))
    assert {p.source for p in result.problems} == {name.split("/")[0]}
    assert {p.reward for p in result.problems} == {"math"}


def test_public_spot_checks(public: dict[str, LoadResult]) -> None:
    gsm = public["gsm8k/test.jsonl"].problems
    assert gsm[0].prompt.startswith("Janet’s ducks lay 16 eggs per day.")
    assert gsm[0].answer == "18"
    assert gsm[146].answer == "2125"  # "#### 2,125": thousands comma dropped
    assert gsm[146].meta == {"file": str(DATA / "gsm8k/test.jsonl"), "line": 147}
    math = public["math500/test.jsonl"].problems
    assert math[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math[0].prompt.endswith("0 \\le \\theta < 2 \\pi.$\n" + BOXED_INSTRUCTION)
    assert public["aime24/test.jsonl"].problems[7].answer == "025"
    assert public["amc23/test.jsonl"].problems[0].answer == "27"  # JSON 27.0


def test_math500_boxed_solution_matches_answer_field(public: dict[str, LoadResult]) -> None:
    from_solution = load_file(
        FileSpec(DATA / "math500/test.jsonl", answer_field="solution")
    ).problems
    assert [p.answer for p in from_solution] == [
        p.answer for p in public["math500/test.jsonl"].problems
    ]


@pytest.mark.parametrize("name", PUBLIC)
def test_every_reference_answer_passes_its_own_reward(
    public: dict[str, LoadResult], name: str
) -> None:
    failed = [
        p.answer for p in public[name].problems if math_reward(p, f"\\boxed{{{p.answer}}}") != 1.0
    ]
    assert failed == []


def test_math500_reward_rejects_other_problems_answers(public: dict[str, LoadResult]) -> None:
    problems = public["math500/test.jsonl"].problems
    shifted = zip(problems, problems[1:] + problems[:1])
    accepted = [
        (p.answer, q.answer)
        for p, q in shifted
        if p.answer.replace(" ", "") != q.answer.replace(" ", "")
        and math_reward(p, f"\\boxed{{{q.answer}}}") == 1.0
    ]
    assert accepted == [("5", "x=5")]  # math-verify reads the assignment x=5 as 5


def test_mixed_public_pool_is_seeded() -> None:
    root = DATA
    specs = [
        FileSpec(root / "gsm8k/train.jsonl", count=50),
        FileSpec(root / "math500/test.jsonl", count=20),
        FileSpec(root / "gsm8k/test.jsonl", count=10, source="gsm8k-test"),
    ]
    first = load_files(specs, seed=3, first_id=100)
    assert first.problems == load_files(specs, seed=3, first_id=100).problems
    assert [p.id for p in first.problems] == list(range(100, 180))
    assert [p.source for p in first.problems] == ["gsm8k"] * 50 + ["math500"] * 20 + [
        "gsm8k-test"
    ] * 10
    lines = [p.meta["line"] for p in first.problems[:50]]
    assert lines == sorted(lines)  # a sample keeps file order
    other = load_files(specs, seed=4, first_id=100).problems
    assert [p.prompt for p in other] != [p.prompt for p in first.problems]
    assert summarise(first) == (
        "Loaded 80 problems from 3 file(s) (gsm8k/train.jsonl: 50 of 256 records; "
        "math500/test.jsonl: 20 of 64 records; gsm8k/test.jsonl: 10 of 150 records). "
        "Sources: gsm8k 50, gsm8k-test 10, math500 20. "
        "0 duplicate prompt(s) dropped; 0 record(s) rejected."
    )


# --- verl and plain fixtures -------------------------------------------------------------

VERL = FIXTURES / "verl_small.jsonl"
PLAIN = FIXTURES / "plain_small.jsonl"

VERL_REJECTIONS = [
    (4, "invalid JSON (Expecting ',' delimiter)"),
    (5, "expected an object, got list"),
    (6, "no answer field (looked for 'reward_model.ground_truth', 'answer')"),
    (7, "field 'prompt' has no user message"),
    (8, "field 'prompt[user].content' is empty"),
    (9, "field 'reward_model.ground_truth' must be a string or number, got ['1']"),
    (11, "field 'data_source' must be a non-empty string, got 3"),
]


def test_verl_jsonl() -> None:
    result = load_file(FileSpec(VERL))
    system = {"role": "system", "content": "Be brief."}
    assert result.problems == [
        Problem(0, "What is 30 + 4?", "34", "dapo", "math", messages=(
            system, {"role": "user", "content": "What is 30 + 4?"}
        )),
        Problem(1, "Halve 1.", "\\frac{1}{2}", "dapo", "math", messages=(
            {"role": "user", "content": "Halve 1."},
        )),
        Problem(2, "Seven as a float.", "7", "amc", "math", messages=(
            {"role": "user", "content": "Seven as a float."},
        )),
    ]  # fmt: skip
    assert result.problems[0].chat == [system, {"role": "user", "content": "What is 30 + 4?"}]
    columns = result.problems[0].columns  # the record's fields but the prompt (TRL rewards)
    assert columns is not None and "prompt" not in columns
    assert columns["data_source"] == "dapo" and columns["extra_info"] == {"index": "a1"}
    assert "reward_model" in columns
    assert [p.meta for p in result.problems] == [
        {"file": str(VERL), "line": 1, "index": "a1", "data_source": "dapo",
         "extra_info": {"index": "a1"}},
        {"file": str(VERL), "line": 2, "index": "a2", "data_source": "dapo",
         "extra_info": {"index": "a2"}},
        {"file": str(VERL), "line": 12, "index": 12, "data_source": "amc",
         "extra_info": {"index": 12}},
    ]  # fmt: skip
    assert [provenance(p) for p in result.problems][2] == {
        "file": str(VERL),
        "line": 12,
        "row": None,
        "index": 12,
        "data_source": "amc",
    }
    assert result.duplicates_dropped == 2  # lines 3 and 13 repeat the prompts of lines 1 and 2
    assert result.rejected == [Rejection(str(VERL), n, None, why) for n, why in VERL_REJECTIONS]
    assert str(result.rejected[0]) == f"{VERL}:4: invalid JSON (Expecting ',' delimiter)"


def test_strict_raises_on_first_rejection() -> None:
    with pytest.raises(ProblemError) as err:
        load_file(FileSpec(VERL), strict=True)
    assert str(err.value) == f"{VERL}:4: invalid JSON (Expecting ',' delimiter)"


def test_plain_jsonl() -> None:
    result = load_file(FileSpec(PLAIN, reward="exact"))
    assert [(p.prompt[:20], p.answer, p.source, p.reward) for p in result.problems] == [
        ("A shop sells 1,000 p", "1080", "plain_small", "exact"),
        ("Compute $\\sin 60^\\ci", "\\frac{\\sqrt{3}}{2}", "plain_small", "exact"),
        ("Cities are 45 miles ", "27", "plain_small", "exact"),
    ]
    assert [(r.line, r.reason) for r in result.rejected] == [
        (4, "field 'question' must be a string or chat messages, got 12"),
        (5, "no answer field (looked for 'reward_model.ground_truth', 'answer')"),
        (6, "field 'answer' must be a string or number, got None"),
        (7, "field 'answer' is empty"),
    ]


def test_field_mapping_and_extractors() -> None:
    boxed = load_file(FileSpec(PLAIN, prompt_field="problem", answer_field="solution"))
    assert [(r.line, r.reason) for r in boxed.rejected] == [
        (1, "missing field 'problem'"),
        (3, "missing field 'solution'"),
        (4, "missing field 'problem'"),
        (5, "missing field 'problem'"),
        (6, "missing field 'problem'"),
        (7, "missing field 'problem'"),
    ]
    assert [p.answer for p in boxed.problems] == ["\\frac{\\sqrt{3}}{2}"]
    gsm = load_file(FileSpec(PLAIN, answer_extractor="gsm8k"))
    assert [p.answer for p in gsm.problems] == ["1080"]
    assert [(r.line, r.reason) for r in gsm.rejected][:2] == [
        (2, "field 'answer' has no '#### <number>' line"),
        (3, "field 'answer' has no '#### <number>' line"),
    ]


@pytest.mark.parametrize(
    ("value", "extractor", "expected"),
    [
        ("Work.\n#### 18", "auto", "18"),
        ("#### -1,250.5", "gsm8k", "-1250.5"),
        ("So $\\boxed{\\frac{1}{2}}$ and \\boxed{\\dfrac{3}{4}}.", "auto", "\\dfrac{3}{4}"),
        (" \\text{(C)} ", "plain", "\\text{(C)}"),
        (27.0, "auto", "27"),
        (0.25, "plain", "0.25"),
        (42, "auto", "42"),
    ],
)
def test_extract_reference(value: object, extractor: str, expected: str) -> None:
    assert extract_reference(value, "answer", extractor) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("value", "extractor", "reason"),
    [
        ("#### eighteen", "gsm8k", "field 'answer' has no '#### <number>' line"),
        ("no marker", "gsm8k", "field 'answer' has no '#### <number>' line"),
        ("\\boxed{1", "boxed", "field 'answer' has no \\boxed{} answer"),
        ("\\boxed{ }", "auto", "field 'answer' has no \\boxed{} answer"),
        (True, "auto", "field 'answer' must be a string or number, got True"),
    ],
)
def test_extract_reference_rejects(value: object, extractor: str, reason: str) -> None:
    with pytest.raises(ValueError) as err:
        extract_reference(value, "answer", extractor)  # type: ignore[arg-type]
    assert str(err.value) == reason


def test_invalid_utf8_is_reported(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    good = json.dumps({"question": "Fine?", "answer": "1"}).encode()
    path.write_bytes(good + b"\n" + b'{"question": "caf\xe9", "answer": "2"}\n' + good + b"\n")
    result = load_file(FileSpec(path))
    assert [p.prompt for p in result.problems] == ["Fine?"]
    assert result.duplicates_dropped == 1
    assert [str(r) for r in result.rejected] == [
        f"{path}:2: invalid UTF-8 (invalid continuation byte)"
    ]


def _verl_row(prompt: str, answer: object, source: str = "dapo", index: int = 0) -> dict:
    return {
        "data_source": source,
        "prompt": [{"role": "user", "content": prompt}],
        "reward_model": {"ground_truth": answer, "style": "rule"},
        "extra_info": {"index": index},
    }


def test_verl_parquet_with_repeats(tmp_path: Path) -> None:
    rows = [_verl_row(f"Problem {i % 3}?", str(i % 3), index=i) for i in range(9)]
    rows[4] = _verl_row("   ", "1", index=4)
    rows[7] = _verl_row("Problem 7?", None, index=7)
    path = tmp_path / "dapo-like.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path)
    result = load_file(FileSpec(path))
    assert [
        (p.id, p.prompt, p.answer, p.meta["row"], p.meta["index"]) for p in result.problems
    ] == [
        (0, "Problem 0?", "0", 0, 0),
        (1, "Problem 1?", "1", 1, 1),
        (2, "Problem 2?", "2", 2, 2),
    ]
    assert result.duplicates_dropped == 4  # rows 3, 5, 6, 8
    assert [str(r) for r in result.rejected] == [
        f"{path} row 4: field 'prompt[user].content' is empty",
        f"{path} row 7: field 'reward_model.ground_truth' must be a string or number, got None",
    ]
    assert summarise(result) == (
        f"Loaded 3 problems from 1 file(s) ({path.parent.name}/dapo-like.parquet: 3 of 9 records, "
        "2 rejected, "
        f"4 duplicates). Sources: dapo 3. 4 duplicate prompt(s) dropped; 2 record(s) rejected: "
        f"{result.rejected[0]}; {result.rejected[1]}."
    )


def test_mixed_pool_drops_cross_file_duplicates(tmp_path: Path) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.parquet"
    a.write_text("".join(json.dumps(_verl_row(f"Q{i}", str(i))) + "\n" for i in range(10)))
    pq.write_table(pa.Table.from_pylist([{"question": f"Q{i}", "answer": i} for i in range(20)]), b)
    full = load_files([FileSpec(a), FileSpec(b, source="web", reward="exact")], seed=0)
    assert [p.id for p in full.problems] == list(range(20))
    assert [p.source for p in full.problems] == ["dapo"] * 10 + ["web"] * 10
    assert full.problems[10] == Problem(10, "Q10", "10", "web", "exact")
    assert full.duplicates_dropped == 10
    # Prompts a sample leaves out of the pool are not duplicates for later files.
    sampled = load_files([FileSpec(a, count=4), FileSpec(b)], seed=0)
    assert len(sampled.problems) == 20 and sampled.duplicates_dropped == 4
    assert len({p.prompt for p in sampled.problems}) == 20


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (dict(path="x.csv"), "x.csv: cannot tell the format from suffix '.csv'; set format"),
        (dict(path="x.jsonl", template="no placeholder"), "x.jsonl: template has no '{prompt}'"),
        (dict(path="x.jsonl", count=-1), "x.jsonl: count (-1) must be >= 0"),
        (dict(path="x.jsonl", reward="nope"), "x.jsonl: reward: unknown reward 'nope'"),
        (dict(path="missing.jsonl"), "missing.jsonl: no such file"),
        (dict(path=str(PLAIN), count=4), f"{PLAIN}: count 4 exceeds the 3 usable problems"),
    ],
)
def test_bad_specs_are_rejected(spec: dict, message: str) -> None:
    with pytest.raises(ProblemError, match="^" + re.escape(message)):
        load_files([FileSpec(**spec)])
