"""One record of a problem file read into `Problem` fields (`gradalign.data.files`).

A record's prompt is ``prompt`` (a string, or chat messages: the last ``user`` message's
content is the prompt text and the whole chat is kept), ``question`` or ``problem``; its answer
``reward_model.ground_truth`` or ``answer``, read by an extractor (`extract_reference`).
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from gradalign.data.rewards import last_boxed

AnswerExtractor = Literal["auto", "gsm8k", "boxed", "plain"]


class RecordSpec(Protocol):
    """How to read a record: the fields of a `gradalign.data.files.FileSpec` it uses."""

    @property
    def prompt_field(self) -> str | None: ...
    @property
    def answer_field(self) -> str | None: ...
    @property
    def answer_extractor(self) -> AnswerExtractor: ...
    @property
    def source(self) -> str | None: ...


_PROMPT_FIELDS = ("prompt", "question", "problem")
_ANSWER_FIELDS = ("reward_model.ground_truth", "answer")
_GSM8K_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")


_MISSING = object()


def _get(rec: dict[str, Any], dotted: str) -> Any:
    value: Any = rec
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return _MISSING
        value = value[part]
    return value


def _pick(rec: dict[str, Any], given: str | None, defaults: tuple[str, ...], what: str) -> str:
    """The field to read: `given`, else the first default present; raises ValueError."""
    if given is not None:
        if _get(rec, given) is _MISSING:
            raise ValueError(f"missing field '{given}'")
        return given
    for name in defaults:
        if _get(rec, name) is not _MISSING:
            return name
    raise ValueError(f"no {what} field (looked for {', '.join(repr(n) for n in defaults)})")


def _check_unicode(text: str, name: str) -> str:
    """`text`, unless it holds an unpaired surrogate (JSON "\\ud800"), which cannot be written
    as UTF-8 or tokenised; raises ValueError naming the field."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"field '{name}' is not valid Unicode (unpaired surrogate at character {err.start})"
        ) from None
    return text


def _chat(value: list[Any], name: str) -> list[dict[str, str]]:
    """Chat messages as {role, content} strings; raises ValueError naming the field."""
    chat = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ValueError(f"field '{name}' message {i} is not a {{role, content}} message")
        content = m.get("content")
        if not isinstance(content, str):
            where = f"{name}[user].content" if m["role"] == "user" else f"{name}[{m['role']}]"
            raise ValueError(
                f"field '{where}' must be a string or chat messages, got {content!r:.60}"
            )
        chat.append({"role": m["role"], "content": _check_unicode(content, name)})
    return chat


def _prompt_text(value: Any, name: str) -> tuple[str, list[dict[str, str]] | None]:
    """(the prompt text, the whole chat or None): for chat messages, the last user
    message's content and every message."""
    chat = None
    if isinstance(value, list):  # chat messages: the last user message is the prompt
        chat = _chat(value, name)
        users = [m for m in chat if m["role"] == "user"]
        if not users:
            raise ValueError(f"field '{name}' has no user message")
        value, name = users[-1]["content"], f"{name}[user].content"
    if not isinstance(value, str):
        raise ValueError(f"field '{name}' must be a string or chat messages, got {value!r:.60}")
    if not value.strip():
        raise ValueError(f"field '{name}' is empty")
    return _check_unicode(value, name), chat


def extract_reference(value: Any, name: str, extractor: AnswerExtractor) -> str:
    """The reference answer in field `name` (value `value`) under `extractor`; raises
    ValueError naming the field when there is none."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ValueError(f"field '{name}' must be a string or number, got {value!r:.60}")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"field '{name}' must be a finite number, got {value!r}")
    if isinstance(value, float):
        text = str(int(value)) if value.is_integer() else repr(value)
    else:
        text = _check_unicode(str(value).strip(), name)
    if extractor == "auto":
        extractor = "gsm8k" if "####" in text else "boxed" if "\\boxed" in text else "plain"
    if extractor == "gsm8k":
        found = _GSM8K_NUMBER.fullmatch(text.rpartition("####")[2].strip())
        if "####" not in text or not found:
            raise ValueError(f"field '{name}' has no '#### <number>' line")
        text = found.group().replace(",", "")
    elif extractor == "boxed":
        text = last_boxed(text) or ""
        if not text:
            raise ValueError(f"field '{name}' has no \\boxed{{}} answer")
    if not text:
        raise ValueError(f"field '{name}' is empty")
    return text


@dataclass(frozen=True)
class Record:
    """The fields read from one file record."""

    prompt: str  # the raw prompt text (before the template)
    chat: list[dict[str, str]] | None  # the whole chat, when the prompt is chat messages
    answer: str
    source: str
    index: Any  # extra_info.index, or None
    data_source: Any  # the record's data_source, or None
    extra_info: Any = None  # the record's extra_info (verl rewards are given it), or None
    columns: dict[str, Any] | None = None  # every field but the prompt (TRL rewards get them)


def read_record(rec: Any, spec: RecordSpec, default_source: str) -> Record:
    """One record's fields; raises ValueError with the reason."""
    if not isinstance(rec, dict):
        raise ValueError(f"expected an object, got {type(rec).__name__}")
    prompt_name = _pick(rec, spec.prompt_field, _PROMPT_FIELDS, "prompt")
    prompt, chat = _prompt_text(_get(rec, prompt_name), prompt_name)
    answer_name = _pick(rec, spec.answer_field, _ANSWER_FIELDS, "answer")
    answer = extract_reference(_get(rec, answer_name), answer_name, spec.answer_extractor)
    source = spec.source
    if source is None:
        source = rec.get("data_source")
        source = default_source if source is None else source
        if not isinstance(source, str) or not source:
            raise ValueError(f"field 'data_source' must be a non-empty string, got {source!r:.60}")
        _check_unicode(source, "data_source")
    index = _get(rec, "extra_info.index")
    data_source = rec.get("data_source")
    index = None if index is _MISSING else index
    extra = rec.get("extra_info")
    extra = extra if isinstance(extra, dict) else None
    columns = {k: v for k, v in rec.items() if k != prompt_name}
    return Record(prompt, chat, answer, source, index, data_source, extra, columns)


def problem_fields(
    r: Record, template: str | None, name: str, fmt: str, pos: int
) -> dict[str, Any]:
    """The Problem fields of a record at line / row `pos`: the template wraps the prompt
    (in the chat: the last user message); meta holds the provenance."""
    meta: dict[str, Any] = {"file": name, "line" if fmt == "jsonl" else "row": pos}
    if r.index is not None:
        meta["index"] = r.index
    if isinstance(r.data_source, str):
        meta["data_source"] = r.data_source
    if r.extra_info is not None:
        meta["extra_info"] = r.extra_info
    text = template.replace("{prompt}", r.prompt) if template else r.prompt
    messages = None
    if r.chat is not None:
        last = max(i for i, m in enumerate(r.chat) if m["role"] == "user")
        chat = [dict(m) for m in r.chat]
        chat[last]["content"] = text
        messages = tuple(chat)
    return {
        "prompt": text, "answer": r.answer, "source": r.source, "meta": meta,
        "messages": messages, "columns": r.columns or None,
    }  # fmt: skip
