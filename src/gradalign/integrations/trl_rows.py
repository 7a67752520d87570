"""TRL rows as the TRL callback scores them: prompt tokens and rewards as `GRPOTrainer` has them.

A row is TRL's dataset row: ``prompt`` (a string, or a conversational list of messages) plus
any other columns, which reward functions receive as keyword arguments.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from gradalign.engine.rollout import Rollouts

Row = Mapping[str, Any]
RewardFunc = Callable[..., Sequence[float | None]]


def trl_prompt_ids(trainer: Any, prompts: list[Any]) -> list[list[int]]:
    """Prompt token ids as TRL 1.16's `GRPOTrainer` builds them: the chat template with the
    generation prompt for conversational prompts, plain tokenisation for strings."""
    from trl import is_conversational

    tok = trainer.processing_class
    if is_conversational({"prompt": prompts[0]}):
        enc = tok.apply_chat_template(
            conversation=prompts,
            add_generation_prompt=True,
            tokenize=True,
            return_dict=True,
            chat_template=getattr(trainer, "chat_template", None),
            **(trainer.args.chat_template_kwargs or {}),
        )
        return [list(ids) for ids in enc["input_ids"]]
    return [list(ids) for ids in tok(text=prompts)["input_ids"]]


def _ignore(*_: Any, **__: Any) -> None:
    """Stands in for TRL's `log_extra` / `log_metric` hooks during the callback's rollouts."""


def trl_rewards(
    reward_funcs: Sequence[RewardFunc],
    weights: Sequence[float],
    rows: Sequence[Row],
    rollouts: Rollouts,
    trainer_state: Any = None,
) -> np.ndarray:
    """Rewards of rollouts of `rows` under TRL-style reward functions: each is called once
    with ``prompts``, ``completions`` (text, or ``[{"role": "assistant", "content": ...}]``
    for conversational prompts), ``completion_ids``, ``trainer_state`` and every other
    column of the rows, one entry per rollout; like TRL, the weighted sum over functions with
    None counted as missing (nansum). # [N]"""
    from trl import is_conversational

    group = rollouts.group
    prompts = [rows[g]["prompt"] for g in group]
    completions: list[Any] = list(rollouts.texts)
    if is_conversational({"prompt": prompts[0]}):
        completions = [[{"role": "assistant", "content": t}] for t in rollouts.texts]
    skip = ("prompt", "completion", "completion_ids")
    columns = {k: [rows[g][k] for g in group] for k in rows[0] if k not in skip}
    table = np.zeros((len(prompts), len(reward_funcs)))
    for c, fn in enumerate(reward_funcs):
        out = list(
            fn(
                prompts=prompts,
                completions=completions,
                completion_ids=[list(ids) for ids in rollouts.completion_ids],
                trainer_state=trainer_state,
                log_extra=_ignore,
                log_metric=_ignore,
                **columns,
            )
        )
        if len(out) != len(prompts):
            name = getattr(fn, "__name__", repr(fn))
            raise ValueError(
                f"reward function {name} returned {len(out)} rewards for {len(prompts)}"
            )
        table[:, c] = [math.nan if v is None else float(v) for v in out]
    return np.nansum(table * np.asarray(weights, dtype=np.float64), axis=1)
