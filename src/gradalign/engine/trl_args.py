"""The `GRPOConfig` a run trains with: the fields gradalign sets from its own config, plus
``train.trl_args``, any other field of the installed TRL's `GRPOConfig`, passed through.

`check_trl_args` runs when a run starts, before any model loads: a name that is no field of
GRPOConfig, a field gradalign sets itself, or a value GRPOConfig refuses is a `ConfigError`
naming ``train.trl_args.NAME``. Importing TRL is slow, so `Config` construction does not do it.
"""

from __future__ import annotations

import dataclasses
import difflib
import tempfile
import types
import typing
from collections.abc import Collection
from typing import Any

from gradalign.config import ConfigError, TrainConfig
from gradalign.engine.policy import quiet_libraries
from gradalign.messages import show
from gradalign.ranks import world

# The GRPOConfig fields gradalign passes (`grpo_settings` sets exactly these), each with the
# field (or the reason) that governs it.
SET_BY_GRADALIGN = {
    "output_dir": "the run directory holds what a run produces (out_dir)",
    "use_cpu": "model.device",
    "bf16": "model.dtype",
    "report_to": "train.report_to",
    "save_strategy": "the run directory's checkpoints (checkpoints/round-NNNN)",
    "per_device_train_batch_size": "train.batch_size and train.micro_batch",
    "gradient_accumulation_steps": "train.batch_size and train.micro_batch",
    "num_generations": "train.num_generations",
    "max_completion_length": "rollout.max_new_tokens",
    "max_steps": "train.steps_per_round (and rounds)",
    "learning_rate": "train.learning_rate",
    "beta": "train.beta",
    "loss_type": "train.loss_type",
    "scale_rewards": "train.scale_rewards",
    "max_grad_norm": "train.max_grad_norm",
    "temperature": "train.temperature",
    "seed": "seed (every round trains from its own seed)",
    "logging_steps": "every step's metrics are read back into the round metrics",
    "disable_tqdm": "gradalign's progress lines",
}
# Fields gradalign does not pass but decides otherwise; `train.trl_args` may set neither kind.
DECIDED_BY_GRADALIGN = SET_BY_GRADALIGN | {
    "fp16": "model.dtype",
    "num_train_epochs": "train.steps_per_round (and rounds)",
    "fsdp": "train.fsdp",  # passed only with train.fsdp (`FSDP2_SETTINGS`)
    "fsdp_config": "train.fsdp",
    "optim": "gradalign creates the AdamW optimizer (weight_decay, adam_* fields pass through)",
}

# Defaults gradalign gives GRPOConfig that train.trl_args may override.
TRL_DEFAULTS = {
    "activation_checkpointing": False,
    "gradient_checkpointing": False,
    "ddp_find_unused_parameters": False,  # under torchrun: every trained weight is used
}

TORCH_ADAMW_WEIGHT_DECAY = 0.01  # torch.optim.AdamW's default, what gradalign trains with


# transformers 5 folded warmup_ratio into warmup_steps (a float in [0, 1) is a ratio): a
# config written for transformers 4 keeps working with either.
RENAMED = {"warmup_ratio": "warmup_steps"}


def trl_kwargs(given: dict[str, Any], fields: Collection[str]) -> dict[str, Any]:
    """`given` (train.trl_args) in the installed GRPOConfig's names (`RENAMED`)."""
    out = {}
    for name, value in given.items():
        new = RENAMED.get(name, name)
        out[new if name not in fields and new in fields else name] = value
    return out


def grpo_fields() -> dict[str, dataclasses.Field]:
    with quiet_libraries():
        from trl import GRPOConfig
    return {f.name: f for f in dataclasses.fields(GRPOConfig)}


def _name_error(name: str, fields: dict[str, dataclasses.Field]) -> ConfigError:
    import trl

    if name in DECIDED_BY_GRADALIGN:
        return ConfigError(
            f"train.trl_args.{name}: gradalign sets this GRPOConfig field itself; "
            f"use {DECIDED_BY_GRADALIGN[name]}"
        )
    close = difflib.get_close_matches(name, [f for f in fields if f not in DECIDED_BY_GRADALIGN], 3)
    hint = f"; did you mean {', '.join(close)}?" if close else ""
    return ConfigError(
        f"train.trl_args.{name}: not a field of GRPOConfig in the installed TRL "
        f"{trl.__version__}{hint}"
    )


def _type_error(name: str, value: Any, hint: Any) -> ConfigError | None:
    """A value that cannot be of the field's declared type (bool / int / float / str and
    unions of them; other declared types are left to GRPOConfig itself)."""
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    allowed = set(typing.get_args(hint)) if union else {hint}
    if not allowed <= {bool, int, float, str, type(None)}:
        return None
    ok = (
        (value is None and type(None) in allowed)
        or (isinstance(value, bool) and bool in allowed)
        or (
            isinstance(value, int)
            and not isinstance(value, bool)
            and (int in allowed or float in allowed)
        )
        or (isinstance(value, float) and float in allowed)
        or (isinstance(value, str) and str in allowed)
    )
    if ok:
        return None
    names = " or ".join(sorted(t.__name__ if t is not type(None) else "null" for t in allowed))
    return ConfigError(f"train.trl_args.{name}: expected {names}, got {show(value)}")


def check_trl_args(t: TrainConfig) -> None:
    """Every ``train.trl_args`` name is a GRPOConfig field that gradalign leaves to the user,
    and every value has the field's type; GRPOConfig itself then accepts them
    (`build_grpo_config`). Raises ConfigError naming ``train.trl_args.NAME``."""
    if not t.trl_args:
        return
    fields = grpo_fields()
    with quiet_libraries():
        from trl import GRPOConfig

        try:
            hints = typing.get_type_hints(GRPOConfig)
        except Exception:  # a forward reference this Python cannot resolve: GRPOConfig checks
            hints = {}
    for name, value in t.trl_args.items():
        if name in RENAMED and name not in fields and RENAMED[name] in fields:
            if RENAMED[name] in t.trl_args:
                raise ConfigError(f"train.trl_args.{name}: give it or {RENAMED[name]}, not both")
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
                raise ConfigError(
                    f"train.trl_args.{name}: expected a ratio in [0, 1), got {show(value)}"
                )
            continue
        if name not in fields or name in DECIDED_BY_GRADALIGN:
            raise _name_error(name, fields)
        err = _type_error(name, value, hints.get(name, Any))
        if err is not None:
            raise err


def build_grpo_config(t: TrainConfig, own: dict[str, Any]) -> Any:
    """GRPOConfig(**own | t.trl_args): `own` is what gradalign sets (`grpo_settings`). A value
    GRPOConfig refuses is a ConfigError naming train.trl_args."""
    with quiet_libraries():
        from trl import GRPOConfig

        fields = grpo_fields()
        kwargs = {k: v for k, v in own.items() if k in fields}  # older TRL lacks a few
        try:  # trl_args may override the defaults gradalign does not own (checkpointing)
            return GRPOConfig(**(kwargs | trl_kwargs(t.trl_args, fields)))
        except (ValueError, TypeError, KeyError) as err:
            given = ", ".join(f"{k}={v!r}" for k, v in t.trl_args.items()) or "none"
            reason = " ".join(str(err).split())[:300]
            raise ConfigError(
                f"train.trl_args ({given}): GRPOConfig refuses this configuration: {reason}"
            ) from None


def check_grpo_config(t: TrainConfig, max_completion_length: int, seed: int, device: str) -> None:
    """The whole GRPOConfig of a run built once, with a throwaway output_dir, so that a value
    GRPOConfig refuses fails before any model loads (`check_trl_args` first)."""
    check_trl_args(t)
    if not t.trl_args:
        return
    with tempfile.TemporaryDirectory(prefix="gradalign-check-") as tmp:
        build_grpo_config(t, grpo_settings(t, max_completion_length, seed, device, False, tmp))


def optimizer_settings(t: TrainConfig) -> dict[str, Any]:
    """AdamW's keyword arguments: torch's defaults, or the trl_args fields the user gave."""
    given = t.trl_args
    return {
        "lr": t.learning_rate,
        "betas": (given.get("adam_beta1", 0.9), given.get("adam_beta2", 0.999)),
        "eps": given.get("adam_epsilon", 1e-8),
        "weight_decay": given.get("weight_decay", TORCH_ADAMW_WEIGHT_DECAY),
    }


def schedule_settings(t: TrainConfig, args: Any, total_steps: int) -> tuple[str, int]:
    """(scheduler name, warm-up steps) over the run's `total_steps` GRPO steps: constant
    (what gradalign always trained with) unless trl_args sets lr_scheduler_type or warm-up."""
    name = str(t.trl_args.get("lr_scheduler_type", "constant_with_warmup"))
    if hasattr(args, "get_warmup_steps"):
        warmup = args.get_warmup_steps(total_steps)
    else:
        warmup = int(getattr(args, "warmup_steps", 0) or 0)
        ratio = getattr(args, "warmup_ratio", 0.0) or 0.0
        warmup = warmup or int(ratio * total_steps + 0.999999)
    return name, warmup


def micro_batching(batch_size: int, num_generations: int, micro_batch: int) -> tuple[int, int]:
    """(per-device batch in sequences, gradient accumulation steps) for a step of
    batch_size problems x num_generations completions, with micro-batches of at most
    `micro_batch` sequences that hold whole groups (TRL needs that divisibility)."""
    per_micro = max(
        d
        for d in range(1, batch_size + 1)
        if batch_size % d == 0 and (d * num_generations <= micro_batch or d == 1)
    )
    return per_micro * num_generations, batch_size // per_micro


def per_rank_batch(batch_size: int) -> int:
    """Problems per optimizer step on each rank: train.batch_size is the global batch, so a
    run under torchrun takes the same steps as one process."""
    size = world()[1]
    if batch_size % size:
        raise ConfigError(
            f"train.batch_size ({batch_size}) must be a multiple of the {size} processes"
        )
    return batch_size // size


def grpo_settings(
    cfg: TrainConfig,
    max_completion_length: int,
    seed: int,
    device: str,
    bf16: bool,
    output_dir: str,
) -> dict[str, Any]:
    """The GRPOConfig fields gradalign sets: exactly `SET_BY_GRADALIGN`'s, then `TRL_DEFAULTS`
    (which train.trl_args may override). TRL on CPU needs bf16 off
    and an explicit max_completion_length."""
    per_device, accum = micro_batching(
        per_rank_batch(cfg.batch_size), cfg.num_generations, cfg.micro_batch
    )
    return (
        {
            "output_dir": output_dir,
            "use_cpu": device == "cpu",
            "bf16": bf16,
            "report_to": "none",  # the run's tracker writes TRL's logs too (`run.tracking`)
            "save_strategy": "no",
            "per_device_train_batch_size": per_device,
            "gradient_accumulation_steps": accum,
            "num_generations": cfg.num_generations,
            "max_completion_length": max_completion_length,
            "max_steps": 1,
            "learning_rate": cfg.learning_rate,
            "beta": cfg.beta,
            "loss_type": cfg.loss_type,
            "scale_rewards": cfg.scale_rewards,
            "max_grad_norm": cfg.max_grad_norm,
            "logging_steps": 1,
            "seed": seed,
            "disable_tqdm": True,
            "temperature": cfg.temperature,
        }
        | TRL_DEFAULTS
        | (FSDP2_SETTINGS if cfg.fsdp else {})
    )


# train.fsdp: accelerate's FSDP v2 plugin, each transformer block sharded (its
# _no_split_modules) and the root; gradalign shards the policy itself first
# (`scoring.sharded.shard_model`), which accelerate then takes as it is.
FSDP2_SETTINGS = {
    "fsdp": True,
    "fsdp_config": {
        "version": 2,
        "reshard_after_forward": True,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "state_dict_type": "FULL_STATE_DICT",
        "cpu_ram_efficient_loading": False,
    },
}
