"""The calling conventions a user's ``module:function`` reward may follow, and their adapters
to ``RewardFn = (problem, completion) -> float``.

- ``gradalign``: ``fn(problem, completion) -> float`` (`gradalign.data.problems.Problem`);
- ``verl``: ``compute_score(data_source, solution_str, ground_truth, extra_info=None) ->
  float | dict`` (a dict's ``score`` is the reward), called with keywords as verl's reward
  manager calls it: ``data_source`` is the record's ``data_source`` (else the problem's
  source), ``ground_truth`` the reference answer as read, ``extra_info`` the record's
  ``extra_info`` (a dict, ``{}`` when it has none);
- ``trl``: ``fn(completions, **kwargs) -> list[float]``, called with one completion as TRL
  calls it for the same dataset: for a problem whose prompt is a string, ``prompts=[prompt]``
  and ``completions=[completion]`` (TRL's standard format: strings); for one whose prompt is
  chat messages (verl-style records), ``prompts=[messages]`` and
  ``completions=[[{"role": "assistant", "content": completion}]]`` (TRL's conversational
  format, so ``completions[0][0]["content"]`` works under `gradalign run` as under TRL);
  then the columns ``answer`` and ``ground_truth`` (the reference answer), ``data_source`` and
  ``source``, then the record's own fields as TRL passes a dataset's columns (a file's
  ``answer`` column, say, as written there, overriding ours), each a one-item list (a
  function without ``**kwargs`` gets the ones it names).

``auto`` tells them apart by parameter names: ``solution_str`` means verl, ``completions``
means TRL, any other function callable with two positional arguments is ours. A function
that fits none (or not the style asked for) is a `RewardError` naming it and these
signatures. Whatever the style, a reward that raises or returns a non-number scores 0 and is
counted (`rewards.checked_reward`).
"""

from __future__ import annotations

import inspect
import typing
from collections.abc import Callable
from typing import Any, Literal

RewardStyle = Literal["auto", "gradalign", "verl", "trl"]
STYLES: tuple[str, ...] = typing.get_args(RewardStyle)
SIGNATURES = (
    "(problem, completion) -> float [gradalign]; "
    "(data_source, solution_str, ground_truth, extra_info=None) -> float | dict [verl]; "
    "(completions, **kwargs) -> list[float] [trl]"
)


class StyleError(ValueError):
    """A function that does not fit the reward signatures (the message says which)."""


def _signature(fn: Callable[..., Any]) -> inspect.Signature | None:
    try:
        return inspect.signature(fn)
    except (TypeError, ValueError):  # some builtins have none: called as ours
        return None


def _binds(sig: inspect.Signature | None, *args: Any, **kwargs: Any) -> bool:
    if sig is None:
        return True
    try:
        sig.bind(*args, **kwargs)
    except TypeError:
        return False
    return True


_VERL = {"data_source": 0, "solution_str": 0, "ground_truth": 0}
TRL_COLUMNS = ("prompts", "completions", "answer", "ground_truth", "data_source", "source")


def _fits_trl(sig: inspect.Signature | None) -> bool:
    """Callable as ``fn(completions=..., **columns)``: it takes ``completions`` and needs no
    argument beyond `TRL_COLUMNS`."""
    if sig is None:
        return True
    params = list(sig.parameters.values())
    if not any(p.name == "completions" or p.kind is p.VAR_KEYWORD for p in params):
        return False
    return _binds(sig, **{p.name: [] for p in params if p.name in TRL_COLUMNS})


def detect(fn: Callable[..., Any], style: RewardStyle = "auto") -> str:
    """The style `fn` is called with: `style`, or (``auto``) the one its parameter names
    show; raises StyleError when it fits none, or not `style`."""
    sig = _signature(fn)
    names = set(sig.parameters) if sig is not None else set()
    fits = {
        "verl": _binds(sig, **_VERL),
        "trl": _fits_trl(sig),
        "gradalign": _binds(sig, None, ""),
    }
    if style == "auto":
        style = "verl" if "solution_str" in names else "trl" if "completions" in names else (
            "gradalign"
        )  # fmt: skip
    if not fits[style]:
        raise StyleError(
            f"{getattr(fn, '__name__', 'the function')}{sig or '(...)'} does not fit the "
            f"{style} reward signature; accepted: {SIGNATURES} (data.reward_style chooses one)"
        )
    return style


def adapt(fn: Callable[..., Any], style: RewardStyle = "auto") -> Callable[..., Any]:
    """`fn` as a ``(problem, completion) -> float`` reward (itself for our style)."""
    kind = detect(fn, style)
    if kind == "verl":
        return _verl(fn)
    if kind == "trl":
        return _trl(fn)
    return fn


def _verl(fn: Callable[..., Any]) -> Callable[..., Any]:
    takes_extra = _binds(_signature(fn), **_VERL, extra_info=None)

    def reward(problem: Any, completion: str) -> Any:
        extra = problem.meta.get("extra_info")
        kwargs = {
            "data_source": problem.meta.get("data_source", problem.source),
            "solution_str": completion,
            "ground_truth": problem.answer,
        }
        if takes_extra:
            kwargs["extra_info"] = dict(extra) if isinstance(extra, dict) else {}
        value = fn(**kwargs)
        return value["score"] if isinstance(value, dict) else value

    return reward


def _trl(fn: Callable[..., Any]) -> Callable[..., Any]:
    sig = _signature(fn)
    params = sig.parameters.values() if sig is not None else []
    open_kwargs = sig is None or any(p.kind is p.VAR_KEYWORD for p in params)
    named = {p.name for p in params}

    def reward(problem: Any, completion: str) -> Any:
        ours = {
            "answer": [problem.answer],
            "ground_truth": [problem.answer],
            "data_source": [problem.meta.get("data_source", problem.source)],
            "source": [problem.source],
        }
        dataset = {k: [v] for k, v in (getattr(problem, "columns", None) or {}).items()}
        chat = getattr(problem, "messages", None) is not None  # conversational in and out
        columns = {
            "prompts": [problem.chat if chat else problem.prompt],
            "completions": [[{"role": "assistant", "content": completion}] if chat else completion],
            **ours,
            **{k: v for k, v in dataset.items() if k not in ("prompts", "completions")},
        }
        kwargs = columns if open_kwargs else {k: v for k, v in columns.items() if k in named}
        values = fn(**kwargs)
        if isinstance(values, (str, bytes)) or len(values) != 1:
            raise ValueError(f"expected a list of 1 reward, got {values!r:.60}")
        return values[0]

    return reward
