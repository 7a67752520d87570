"""The invariants of a `Config`: each number's range, the one-field rules a later stage
relies on (device names, ``select.params``, seeds) and the cross-field arithmetic of a round.

`check` runs when a `Config` is constructed (from YAML, overrides or Python) and again when
the loop starts; every message names the field, the value and a fix.
"""

from __future__ import annotations

import dataclasses
import re
import warnings
from typing import TYPE_CHECKING, Any

from gradalign.messages import show

if TYPE_CHECKING:  # the types only: `gradalign.config` imports this module
    from gradalign.config import Config, DataConfig, RolloutConfig, SelectConfig, TrainConfig


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


SEED_MAX = 2**32 - 1  # the largest seed numpy's legacy seeding (TRL, transformers) accepts

# Fields for which 0 is a valid value; every other number must be > 0.
_ZERO_OK = (
    "seed",
    "groups_per_micro",
    "warmstart_seed",
    "warmstart_steps",
    "eval_samples",
    "eval_samples_every",
    "beta",
    "lora_r",
    "project_dim",
)
_FRACTIONS = ("corrupt_frac", "majority_frac", "lowutility_frac", "warmstart_flaw_frac")  # [0, 1]
_DEVICE = re.compile(r"cpu|auto|cuda(:\d+)?")


def _positive(cfg: Config) -> None:
    for section, obj in [("", cfg)] + [
        (f"{f}.", getattr(cfg, f)) for f in ("model", "data", "rollout", "select", "train")
    ]:
        _positive_fields(section, obj)
    for name, seed in (
        ("seed", cfg.seed),
        ("data.seed", cfg.data.seed),
        ("model.warmstart_seed", cfg.model.warmstart_seed),
    ):
        if seed > SEED_MAX:
            raise ConfigError(
                f"{name}: must be in 0 .. 2**32-1 (= {SEED_MAX}, what numpy and torch both "
                f"accept), got {seed}"
            )


def _positive_fields(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            continue
        if f.name in _FRACTIONS:
            if not 0 <= value <= 1:
                raise ConfigError(f"{section}{f.name}: must be in [0, 1], got {value}")
        elif f.name in _ZERO_OK:
            if value < 0:
                raise ConfigError(f"{section}{f.name}: must be >= 0, got {value}")
        elif value <= 0:
            raise ConfigError(f"{section}{f.name}: must be > 0, got {value}")


def _group_size(name: str, value: int) -> None:
    if value < 2:
        raise ConfigError(f"{name}: needs >= 2 rollouts per group for an advantage, got {value}")


def check_rollout(r: RolloutConfig) -> None:
    """The `rollout` section's own invariants (the TRL callback checks its RolloutConfig so)."""
    _positive_fields("rollout.", r)
    _group_size("rollout.k_r", r.k_r)
    _group_size("rollout.k_v", r.k_v)
    if not 0 < r.top_p <= 1:
        raise ConfigError(f"rollout.top_p: must be in (0, 1], got {r.top_p}")


def check_select(s: SelectConfig) -> None:
    """The `select` section's own invariants (the TRL callback checks its SelectConfig so)."""
    _positive_fields("select.", s)
    _group_size("select.k_r0", s.k_r0)
    if s.n_select < 1:
        raise ConfigError(
            f"select.k ({s.k}) leaves 0 problems from chunk_size {s.chunk_size}; "
            "lower k or raise chunk_size"
        )
    if s.params.startswith("last:"):
        n = s.params.split(":", 1)[1]
        if not (n.isascii() and n.isdigit() and int(n) >= 1):
            raise ConfigError(
                f"select.params: {s.params!r}: N in 'last:N' must be a whole number >= 1 "
                "(the last N transformer blocks)"
            )
    elif s.params not in ("all", "lora"):
        raise ConfigError(f"select.params: expected 'all', 'lora' or 'last:N', got {s.params!r}")
    _check_features(s)


def _check_features(s: SelectConfig) -> None:
    """``select.features=output`` reads the LM head's gradient off the forward pass: the
    options of the full-gradient scorer do not apply to it, and are refused."""
    from gradalign.core.common import parse_output_dims

    try:
        parse_output_dims(s.output_dims)
    except ValueError as err:
        raise ConfigError(f"select.output_dims: {err}") from None
    if s.features == "full":
        if s.output_dims != "exact":
            raise ConfigError(
                f"select.output_dims: {s.output_dims!r} projects the output-layer feature; "
                "set select.features=output too, or leave output_dims at 'exact'"
            )
        return
    refused = {
        "select.scorer": (s.scorer, "batched", "it chooses how full gradients are computed"),
        "select.params": (s.params, "all", "the feature is the LM head's gradient"),
        "select.precondition": (s.precondition, "none", "LESS scaling needs the head's Adam "
                                "state, which a LoRA or frozen head has not"),
        "select.project_dim": (s.project_dim, 0, "it sketches full gradients; project the "
                               "feature with select.output_dims=AxB"),
    }  # fmt: skip
    for name, (value, default, why) in refused.items():
        if value != default:
            raise ConfigError(
                f"{name}: {value!r} does not apply with select.features=output ({why}); "
                f"leave it at {default!r} or set select.features=full"
            )


def check_budget(s: SelectConfig, r: RolloutConfig) -> None:
    """``select.budget=halving`` needs a second stage: k_r0 below k_r."""
    if s.budget == "halving" and s.k_r0 >= r.k_r:
        raise ConfigError(
            f"select.k_r0 ({s.k_r0}) must be below rollout.k_r ({r.k_r}) with "
            "select.budget=halving (k_r0 first-stage rollouts, then k_r in all for the "
            "survivors); lower k_r0 or raise k_r"
        )


def _check_fields(cfg: Config) -> None:
    """One-field rules beyond the type: values a later stage could not use."""
    m, s = cfg.model, cfg.select
    if not _DEVICE.fullmatch(m.device):
        raise ConfigError(
            f"model.device: {show(m.device)} is not 'cpu', 'cuda', 'cuda:N' or 'auto'"
        )
    if s.params == "lora" and m.lora_r == 0:
        raise ConfigError("select.params: 'lora' needs LoRA adapters; set model.lora_r > 0")
    if s.features == "output" and m.lora_r and "lm_head" in m.lora_targets:
        raise ConfigError(
            "model.lora_targets: select.features=output reads the plain LM head; "
            "remove 'lm_head' from the LoRA targets or set select.features=full"
        )
    if cfg.train.fsdp:
        _check_fsdp(cfg)


def _check_fsdp(cfg: Config) -> None:
    """What ``train.fsdp`` cannot run with (docs/fsdp.md); a run on CPU is refused when it
    starts (`run.sharded_state.check_training`): `gradalign score` shards on CPU too."""
    if cfg.model.lora_r > 0:
        raise ConfigError(
            "train.fsdp: not with LoRA (model.lora_r > 0): the frozen base is held whole on "
            "every rank anyway and the adapters are small, so drop train.fsdp (data "
            "parallelism) or train without LoRA"
        )
    if cfg.select.scorer == "exact":
        raise ConfigError(
            "train.fsdp: select.scorer=exact needs the whole flat gradient on one rank; use "
            "select.scorer=batched (the same scores, the directions sharded)"
        )
    if cfg.rollout.backend == "vllm":
        raise ConfigError(
            "train.fsdp: rollout.backend=vllm loads the whole policy into one engine per rank; "
            "use rollout.backend=hf"
        )
    if cfg.select.features == "output":
        raise ConfigError(
            "train.fsdp: select.features=output reads the whole LM head on each rank; "
            "use select.features=full (the sharded batched scorer)"
        )


def _check_family_flaws(cfg: Config) -> None:
    """model.warmstart_family_flaws: well-formed items, each for a known family. An item for
    a family that data.families leaves out is unused (the default names countdown2, and
    `data.families=[addition,countdown]` must not need it cleared)."""
    from gradalign.data.tasks import parse_family_flaws

    m = cfg.model
    try:
        parse_family_flaws(m.warmstart_family_flaws, m.warmstart_flaw_frac)
    except ValueError as err:
        raise ConfigError(
            f"model.warmstart_family_flaws: {err}; write each item as 'family:flaw' or "
            "'family:flaw:share'"
        ) from None


def _check_data(d: DataConfig, max_new_tokens: int) -> None:
    from gradalign.data.tasks import FAMILIES, LONGEST_ANSWER

    if not d.families:
        raise ConfigError("data.families: give at least one task family")
    for i, fam in enumerate(d.families):
        if fam not in FAMILIES:
            raise ConfigError(
                f"data.families: unknown family {fam!r} (known: {', '.join(FAMILIES)})"
            )
        if fam in d.families[:i]:
            raise ConfigError(f"data.families: {fam!r} is listed twice; list each family once")
        longest = LONGEST_ANSWER.get(fam, 0)
        if not d.pool_files and longest + 1 > max_new_tokens:
            raise ConfigError(
                f"rollout.max_new_tokens: {max_new_tokens} tokens cut the answers of family "
                f"{fam!r} (up to {longest} tokens plus EOS); set "
                f"rollout.max_new_tokens >= {longest + 1}"
            )
    if bool(d.pool_files) != bool(d.validation_files) or bool(d.pool_files) != bool(d.eval_files):
        raise ConfigError(
            "data.pool_files, data.validation_files and data.eval_files: give all three or none"
        )
    if d.regime == "imbalance" and not d.pool_files:
        if d.minority not in d.families:
            raise ConfigError(
                f"data.minority: {d.minority!r} is not in data.families {d.families}; "
                "add it or pick one"
            )
        if len(d.families) < 2:
            raise ConfigError(
                f"data.families: regime 'imbalance' needs two or more families (the minority "
                f"{d.minority!r} and a majority), got {d.families}; add one or change data.regime"
            )


TRACKERS = ("none", "tensorboard", "wandb", "trackio", "mlflow")  # transformers' names


def _check_train(t: TrainConfig) -> None:
    """train.report_to names and train.trl_args keys (the names are checked against the
    installed TRL's GRPOConfig when a run starts: `engine.trl_args.check_trl_args`)."""
    for name in t.report_to:
        if name not in TRACKERS:
            raise ConfigError(f"train.report_to: {show(name)} is not one of {', '.join(TRACKERS)}")
    if "none" in t.report_to and len(t.report_to) > 1:
        raise ConfigError(
            f"train.report_to: 'none' cannot be combined with a tracker, got {t.report_to}"
        )
    for key in t.trl_args:
        if not isinstance(key, str) or not key.isidentifier():
            raise ConfigError(f"train.trl_args: {show(key)} is not a GRPOConfig field name")


def check(cfg: Config) -> None:
    """Every field's range and the cross-field invariants of the round arithmetic, with
    messages naming field and fix. Run by `Config(...)` itself; again by the loop."""
    _positive(cfg)
    _check_fields(cfg)
    s, t, d, r = cfg.select, cfg.train, cfg.data, cfg.rollout
    if not d.pool_files and s.chunk_size > d.pool_size:  # file pools are checked once loaded
        raise ConfigError(
            f"select.chunk_size ({s.chunk_size}) exceeds data.pool_size ({d.pool_size}); "
            "lower chunk_size or grow the pool"
        )
    check_select(s)
    trained_on = d.pool_size if s.mode == "none" else cfg.n_select
    if t.batch_size > trained_on and not (d.pool_files and s.mode == "none"):
        per_round, fix = (
            ("data.pool_size with select.mode=none", "or grow the pool")
            if s.mode == "none"
            else (f"chunk_size // k = {s.chunk_size} // {s.k}", "or k")
        )
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) exceeds the {trained_on} problems trained on per "
            f"round ({per_round}); lower batch_size {fix}"
        )
    check_rollout(r)
    check_budget(s, r)
    _group_size("train.num_generations", t.num_generations)
    _check_train(t)
    _check_data(d, r.max_new_tokens)
    _check_family_flaws(cfg)


def data_aliases(d: DataConfig) -> None:
    """``data.val_files``, the deprecated name of ``data.validation_files``: moved there with
    a FutureWarning (verl's ``val_files`` is a test set, our ``eval_files``); both given is
    an error."""
    if not d.val_files:
        return
    if d.validation_files:
        raise ConfigError(
            "data.val_files and data.validation_files: both given; keep validation_files "
            "(val_files is its deprecated name)"
        )
    warnings.warn(
        "data.val_files is deprecated: it is the trusted validation set, now "
        "data.validation_files (verl's val_files, a test set, is our eval_files)",
        FutureWarning,
        stacklevel=4,
    )
    d.validation_files, d.val_files = d.val_files, []
