"""Property-based tests (hypothesis) for record parsing and answer extraction: arbitrary input
only ever takes the rejection path, and valid generated input round-trips exactly."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gradalign.data.files import FileSpec, extract_reference, load_file
from gradalign.data.records import read_record
from gradalign.data.rewards import extract_answer, last_boxed

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

STRINGS = st.text(max_size=20) | st.text(st.characters(categories=["Cs"]), max_size=2)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | STRINGS,  # unpaired surrogates too, as JSON "\ud800" escapes decode
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(STRINGS, inner, max_size=4),
    max_leaves=12,
)
KEYS = st.sampled_from(
    ["prompt", "question", "problem", "answer", "data_source", "reward_model", "extra_info"]
)
RECORDS = st.dictionaries(KEYS, JSON, max_size=5)  # objects with the fields the reader looks at
TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)  # no unpaired surrogates
NONBLANK = TEXT.filter(lambda s: s.strip() != "")


def spec_for(path: str = "x.jsonl", **kw: Any) -> FileSpec:
    return FileSpec(Path(path), **kw)


@SETTINGS
@given(st.one_of(JSON, RECORDS), st.sampled_from(["auto", "gsm8k", "boxed", "plain"]))
def test_any_json_value_is_read_or_rejected_with_a_reason(rec: Any, extractor: str) -> None:
    try:
        got = read_record(rec, spec_for(answer_extractor=extractor), "x")
        prompt, answer, source = got.prompt, got.answer, got.source
    except ValueError as err:  # the rejection path: a reason that names the problem
        assert str(err)
        return
    assert prompt.strip() and answer and source
    for text in (prompt, answer, source):
        text.encode("utf-8")  # writable to a run directory


FIELD = STRINGS | st.integers() | st.floats() | st.none() | st.lists(st.integers(), max_size=2)


@SETTINGS
@given(FIELD, FIELD, FIELD)
def test_plain_fields_are_read_exactly_or_rejected_naming_the_field(
    question: Any, answer: Any, source: Any
) -> None:
    rec = {"question": question, "answer": answer, "data_source": source}
    try:
        record = read_record(rec, spec_for(answer_extractor="plain"), "x")
    except ValueError as err:
        assert any(f"'{name}'" in str(err) for name in rec), str(err)
        return
    got = (record.prompt, record.answer, record.source, record.index)
    assert got == (question, plain(answer), "x" if source is None else source, None)
    for text in got[:3]:
        text.encode("utf-8")


LINE = st.binary(max_size=60).map(lambda b: b.replace(b"\n", b""))


@SETTINGS
@given(st.lists(LINE | st.one_of(JSON, RECORDS).map(lambda r: json.dumps(r).encode()), max_size=8))
def test_arbitrary_lines_never_raise_and_every_record_is_accounted_for(lines: list[bytes]) -> None:
    sentinel = b'{"question": "sentinel?", "answer": "42"}'
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_bytes(b"\n".join([*lines, sentinel]) + b"\n")
        result = load_file(FileSpec(path))
    report = result.files[0]
    assert report.records == report.loaded + report.rejected + report.duplicates
    assert len(result.problems) == report.loaded and len(result.rejected) == report.rejected
    assert [p.id for p in result.problems] == list(range(report.loaded))
    assert any(p.prompt == "sentinel?" and p.answer == "42" for p in result.problems)
    for rej in result.rejected:
        assert rej.line is not None and 1 <= rej.line <= len(lines)
        assert str(rej).startswith(f"{path}:{rej.line}: ") and rej.reason


ANSWERS = (
    NONBLANK.filter(lambda s: "####" not in s and "\\boxed" not in s)
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
)


def plain(value: str | int | float) -> str:
    if isinstance(value, float):
        return str(int(value)) if value.is_integer() else repr(value)
    return str(value).strip()


@SETTINGS
@given(
    st.lists(st.tuples(NONBLANK, ANSWERS, NONBLANK), min_size=1, max_size=6),
    st.booleans(),
    st.booleans(),
)
def test_valid_records_round_trip_exactly(
    rows: list[tuple[str, Any, str]], chat: bool, ascii_only: bool
) -> None:
    def record(prompt: str, answer: Any, source: str) -> dict[str, Any]:
        if chat:  # verl layout
            return {
                "prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": prompt}],
                "reward_model": {"ground_truth": answer},
                "data_source": source,
            }
        return {"question": prompt, "answer": answer, "data_source": source}

    text = "\n".join(json.dumps(record(*row), ensure_ascii=ascii_only) for row in rows)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "f.jsonl"
        path.write_bytes(text.encode("utf-8") + b"\n")
        result = load_file(FileSpec(path))
    assert not result.rejected
    first: dict[str, tuple[Any, str]] = {}
    for prompt, answer, source in rows:
        first.setdefault(prompt, (answer, source))  # repeated prompts: the first is kept
    assert [(p.prompt, p.answer, p.source) for p in result.problems] == [
        (prompt, plain(answer), source) for prompt, (answer, source) in first.items()
    ]
    assert result.duplicates_dropped == len(rows) - len(first)


# --- answer extraction -----------------------------------------------------------------------

ATOM = st.text(alphabet=st.characters(codec="utf-8", exclude_characters="{}\\"), max_size=6)
BALANCED = st.recursive(
    ATOM,
    lambda inner: (
        st.lists(inner, min_size=1, max_size=3).map("".join)
        | inner.map(lambda s: "{" + s + "}")
        | st.tuples(inner, inner).map(lambda ab: f"\\frac{{{ab[0]}}}{{{ab[1]}}}")
    ),
    max_leaves=8,
)  # brace-balanced text, with nested braces and LaTeX commands
NO_BOXED = st.text(max_size=30).map(lambda s: s.replace("\\", "/"))  # no \boxed can start here


@SETTINGS
@given(st.text(max_size=30), BALANCED, NO_BOXED)
def test_last_boxed_extracts_a_balanced_answer_exactly(
    before: str, answer: str, after: str
) -> None:
    text = f"{before}\\boxed{{{answer}}}{after}"
    assert last_boxed(text) == answer.strip()
    assert extract_answer(text) == answer.strip()
    earlier = f"\\boxed{{decoy}} {text}"  # the last boxed answer wins
    assert last_boxed(earlier) == answer.strip()


@SETTINGS
@given(NO_BOXED.filter(lambda s: "####" not in s), BALANCED)
def test_reference_extractors_read_generated_answers(text: str, answer: str) -> None:
    solution = f"{text} so \\boxed{{{answer}}}."
    if answer.strip():
        assert extract_reference(solution, "solution", "boxed") == answer.strip()
        assert extract_reference(solution, "solution", "auto") == answer.strip()
    else:
        try:
            extract_reference(solution, "solution", "boxed")
        except ValueError as err:
            assert str(err) == "field 'solution' has no \\boxed{} answer"
        else:
            raise AssertionError("an empty boxed answer was accepted")


@SETTINGS
@given(NO_BOXED.filter(lambda s: "####" not in s), st.integers(-(10**15), 10**15))
def test_gsm8k_reference_is_the_number_after_the_marker(text: str, n: int) -> None:
    assert extract_reference(f"{text}\n#### {n:,}", "answer", "gsm8k") == str(n)
    assert extract_reference(f"{text}\n#### {n}", "answer", "auto") == str(n)


@SETTINGS
@given(
    st.text(alphabet="\\{} boxedanswrI:$*().,/-0123456789\n", max_size=80) | st.text(max_size=80)
)
def test_extraction_never_raises_on_arbitrary_text(text: str) -> None:
    found = extract_answer(text)
    boxed = last_boxed(text)
    assert found is None or isinstance(found, str)
    if boxed is not None:  # a balanced boxed answer always wins, and is part of the text
        assert found == boxed and boxed in text
