"""Typed configuration: dataclasses loaded from YAML with ``section.field=value`` overrides.

Each field is documented once, in its `doc(...)` help text; `gradalign fields` prints them.
A bad value is rejected at load time with a message naming the field, the value and a fix.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from gradalign.core.common import ValAggregate
from gradalign.core.selection import Mode, ZeroVariance
from gradalign.data.tasks import Flaw


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field."""


def doc(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best here
    if isinstance(default, list):
        return field(default_factory=lambda: list(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


@dataclass
class ModelConfig:
    name: str = doc(
        "builtin:tiny", "'builtin:tiny' (0.5M), 'builtin:small' (5M) or a local HF model directory"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "weights dtype")
    device: str = doc("cpu", "'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
    warmstart_steps: int = doc(1000, "supervised warm-start steps for built-in models (0 = none)")
    warmstart_lr: float = doc(3e-3, "warm-start peak learning rate (cosine decay)")
    warmstart_batch_size: int = doc(128, "warm-start batch size (sequences)")
    warmstart_seed: int = doc(
        0, "seed of the built-in model's init and warm start (not of the data)"
    )
    warmstart_flaw: Flaw = doc(
        "junk",
        "systematic flaw in a share of the warm-start targets, which GRPO then repairs: 'junk' "
        "(a character before EOS that the reward rejects), 'lastdigit' (a wrong last digit / "
        "last operator: a content flaw) or 'none' (see docs/testbed.md)",
    )
    warmstart_flaw_frac: float = doc(0.6, "share of warm-start targets with the flaw, in [0, 1]")
    lora_r: int = doc(0, "LoRA rank (0 = full fine-tuning); with LoRA, scoring uses the adapters")
    lora_alpha: int = doc(16, "LoRA alpha")
    lora_targets: list[str] = doc(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters"
    )
    cache_dir: str = doc("", "warm-start cache ('' = $GRADALIGN_CACHE or ~/.cache/gradalign)")


@dataclass
class DataConfig:
    families: list[str] = doc(["addition", "countdown"], "built-in task families in every set")
    pool_size: int = doc(1024, "candidate training problems in the pool")
    val_size: int = doc(32, "trusted validation problems (gradient reference, never trained on)")
    eval_size: int = doc(256, "held-out eval problems (accuracy only; disjoint from validation)")
    seed: int = doc(0, "seed of the task generator and of the regime's corruption")
    regime: Literal["clean", "noisy", "imbalance", "lowutility"] = doc(
        "noisy", "built-in data regime: clean | noisy (unreliable rewards) | imbalance | lowutility"
    )
    corrupt_frac: float = doc(0.5, "noisy: fraction of pool problems corrupted")
    corruption: Literal["coinflip", "labelflip"] = doc(
        "coinflip", "noisy: coin-flip reward (reference mechanism) or wrong reference answer"
    )
    majority_frac: float = doc(0.9, "imbalance: share of the pool from the majority families")
    minority: str = doc("countdown", "imbalance: family of the validation and eval sets")
    lowutility_frac: float = doc(0.8, "lowutility: fraction of the pool that is garbled filler")
    pool_files: list[dict] = doc(
        [],
        "problem files for the pool (replaces the built-in task); "
        "each {path, count, prompt_field, answer_field, answer_extractor, source, reward, template}",
    )
    val_files: list[dict] = doc([], "problem files for the validation set (with pool_files)")
    eval_files: list[dict] = doc([], "problem files for the eval set (with pool_files)")


@dataclass
class RolloutConfig:
    k_r: int = doc(8, "rollouts per candidate problem (k_r)")
    k_v: int = doc(8, "rollouts per validation problem (k_v)")
    temperature: float = doc(1.0, "sampling temperature for candidate and validation rollouts")
    top_p: float = doc(1.0, "nucleus sampling threshold")
    eval_samples: int = doc(
        8,
        "k samples per eval problem for the sampled accuracy eval/mean_at_k (verl's mean@k: "
        "the mean reward of k samples at rollout.temperature), at the start and after the last "
        "round; 0 = greedy pass@1 only",
    )
    max_new_tokens: int = doc(12, "completion length limit (also GRPO's max_completion_length)")
    backend: Literal["hf", "vllm"] = doc(
        "hf", "rollout engine: HF generate, or vLLM (GPU, optional extra)"
    )
    prompts_per_batch: int = doc(64, "prompts per `generate` call (each with k_r or k_v samples)")


@dataclass
class SelectConfig:
    mode: Mode = doc(
        "sim", "how a chunk is ranked (docs/method.md); 'none' = plain GRPO on the whole pool"
    )
    chunk_size: int = doc(64, "pool problems scored per round (M)")
    k: int = doc(4, "selection ratio: keep n = chunk_size // k problems per round")
    zero_variance: ZeroVariance = doc(
        "zero", "score of all-equal-reward groups: zero | last | exclude"
    )
    val_aggregate: ValAggregate = doc("sum", "g_V = sum of g_v, or of unit g_v")
    scale_advantages: bool = doc(False, "divide scoring advantages by the group std")
    params: str = doc("all", "scored parameters: 'all', 'lora' or 'last:N' blocks")
    scorer: Literal["batched", "exact"] = doc(
        "batched",
        "gradient scorer: one batched backward (default) or 'exact', one backward per group",
    )
    precondition: Literal["none", "adam"] = doc(
        "none", "'adam': score g_p / (sqrt(v) + 1e-8) with the trainer's Adam second moment (LESS)"
    )
    project_dim: int = doc(
        0, "save seeded random-projection features [P, project_dim] of each g_p per round (0 = off)"
    )
    groups_per_micro: int = doc(16, "groups per forward/backward micro-batch when scoring")

    @property
    def n_select(self) -> int:
        """n = chunk_size // k problems trained on per round."""
        return self.chunk_size // self.k


@dataclass
class TrainConfig:
    steps_per_round: int = doc(8, "GRPO optimizer steps per round")
    batch_size: int = doc(8, "problems per GRPO step (each with num_generations completions)")
    num_generations: int = doc(8, "completions per problem in GRPO training")
    learning_rate: float = doc(2e-5, "GRPO learning rate (AdamW, constant)")
    beta: float = doc(0.0, "KL coefficient to the initial policy (0 = no reference model)")
    micro_batch: int = doc(64, "sequences per forward/backward in training")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = doc("dapo", "TRL GRPO loss type")
    scale_rewards: Literal["group", "batch", "none"] = doc("group", "TRL advantage scaling")
    max_grad_norm: float = doc(1.0, "gradient clipping")


@dataclass
class Config:
    rounds: int = doc(10, "rounds of score → select → train")
    seed: int = doc(0, "seed of every random choice of the run (rollouts, sampling, training)")
    out_dir: str = doc("runs/default", "run directory")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    @property
    def n_select(self) -> int:
        """n = chunk_size // k problems trained on per round (`SelectConfig.n_select`)."""
        return self.select.n_select

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and checking


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        if value not in typing.get_args(typ):
            choices = ", ".join(map(str, typing.get_args(typ)))
            raise ConfigError(f"{name}: {value!r} is not one of {choices}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if typ is dict or typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return value
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if typ in (int, float):
        if isinstance(value, str):
            try:
                value = yaml.safe_load(value)
            except yaml.YAMLError:
                pass
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if isinstance(value, float) and not math.isfinite(value):
            raise ConfigError(f"{name}: expected a finite number, got {value!r}")
        if typ is int and ok and (isinstance(value, int) or value.is_integer()):
            return int(value)
        if typ is float and ok:
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(
                    f"{name}: {len(str(value))} digits, too large for a float"
                ) from None
        raise ConfigError(f"{name}: expected {typ.__name__}, got {value!r}")
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {typ}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field (known in {prefix.rstrip('.') or 'config'}: "
            f"{', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        if dataclasses.is_dataclass(typ):
            kwargs[name] = _build(typ, value, f"{prefix}{name}.")
        elif isinstance(typ, types.UnionType):  # pragma: no cover - none at present
            kwargs[name] = value
        else:
            kwargs[name] = _coerce(value, typ, f"{prefix}{name}")
    return cls(**kwargs)


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings (values parsed as YAML scalars)."""
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r}: expected FIELD=VALUE, e.g. select.mode=dot")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{part}' is not a section")
        try:
            node[leaf] = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            node[leaf] = raw
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    cfg = _build(Config, data, "")
    check(cfg)
    return cfg


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise ConfigError(f"config file {path} does not exist") from None
        except UnicodeDecodeError as err:
            raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
        except OSError as err:
            raise ConfigError(f"config file {path}: cannot read it ({err.strerror})") from None
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: invalid YAML ({err})") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return config_from_dict(apply_overrides(data, overrides or []))


def _positive(cfg: Config) -> None:
    for section, obj in [("", cfg)] + [
        (f"{f}.", getattr(cfg, f)) for f in ("model", "data", "rollout", "select", "train")
    ]:
        _positive_fields(section, obj)


def _positive_fields(section: str, obj: Any) -> None:
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if f.name in (
            "seed",
            "warmstart_seed",
            "warmstart_steps",
            "warmstart_flaw_frac",
            "beta",
            "lora_r",
            "project_dim",
        ):
            if isinstance(value, (int, float)) and value < 0:
                raise ConfigError(f"{section}{f.name}: must be >= 0, got {value}")
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and value <= 0:
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
    if s.n_select < 1:
        raise ConfigError(
            f"select.k ({s.k}) leaves 0 problems from chunk_size {s.chunk_size}; "
            "lower k or raise chunk_size"
        )
    if not (s.params in ("all", "lora") or s.params.startswith("last:")):
        raise ConfigError(f"select.params: expected 'all', 'lora' or 'last:N', got {s.params!r}")


def check(cfg: Config) -> None:
    """Cross-field invariants of the round arithmetic, with messages naming field and fix."""
    _positive(cfg)
    s, t, d, r = cfg.select, cfg.train, cfg.data, cfg.rollout
    if s.params == "lora" and cfg.model.lora_r == 0:
        raise ConfigError("select.params: 'lora' needs LoRA adapters; set model.lora_r > 0")
    if not d.pool_files and s.chunk_size > d.pool_size:  # file pools are checked once loaded
        raise ConfigError(
            f"select.chunk_size ({s.chunk_size}) exceeds data.pool_size ({d.pool_size}); "
            "lower chunk_size or grow the pool"
        )
    check_select(s)
    trained_on = d.pool_size if s.mode == "none" else cfg.n_select
    if t.batch_size > trained_on and not (d.pool_files and s.mode == "none"):
        raise ConfigError(
            f"train.batch_size ({t.batch_size}) exceeds the {trained_on} problems trained on per "
            f"round (chunk_size // k = {s.chunk_size} // {s.k}); lower batch_size or k"
        )
    check_rollout(r)
    _group_size("train.num_generations", t.num_generations)
    from gradalign.data.tasks import FAMILIES

    for fam in d.families:
        if fam not in FAMILIES:
            raise ConfigError(
                f"data.families: unknown family {fam!r} (known: {', '.join(FAMILIES)})"
            )
    for name in ("corrupt_frac", "majority_frac", "lowutility_frac"):
        if not 0 <= getattr(d, name) <= 1:
            raise ConfigError(f"data.{name}: must be in [0, 1], got {getattr(d, name)}")
    if not 0 <= cfg.model.warmstart_flaw_frac <= 1:
        raise ConfigError(
            f"model.warmstart_flaw_frac: must be in [0, 1], got {cfg.model.warmstart_flaw_frac}"
        )
    if d.regime == "imbalance" and d.minority not in d.families:
        raise ConfigError(
            f"data.minority: {d.minority!r} is not in data.families {d.families}; add it or pick one"
        )
    if bool(d.pool_files) != bool(d.val_files) or bool(d.pool_files) != bool(d.eval_files):
        raise ConfigError(
            "data.pool_files, data.val_files and data.eval_files: give all three or none"
        )
    if not d.families:
        raise ConfigError("data.families: give at least one task family")


def field_docs() -> list[tuple[str, str, str]]:
    """(name, default, help) of every field, for `gradalign fields`."""
    rows = []
    cfg = Config()
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            for g in dataclasses.fields(value):
                rows.append(
                    (f"{f.name}.{g.name}", repr(getattr(value, g.name)), g.metadata["help"])
                )
        else:
            rows.append((f.name, repr(value), f.metadata["help"]))
    return rows


# ---------------------------------------------------------------- comparing configs

# Where a run lives, not what it computes: a bench reuses a finished run across these.
LOCATION_FIELDS = ("out_dir", "model.cache_dir")
# What may change when a run is resumed: where it lives, and how many rounds it runs.
RESUMABLE_FIELDS = (*LOCATION_FIELDS, "rounds")
# What a bench sets per run (with its out_dir): `--set` may not, and a report lists the fields
# beyond these and LOCATION_FIELDS that differ between the runs it compares.
BENCH_FIELDS = ("data.regime", "select.mode", "seed", "data.seed")


def flatten_config(cfg: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"section.field": value} of a nested config mapping (`Config.to_dict`, config.yaml)."""
    out: dict[str, Any] = {}
    for key, value in cfg.items():
        if isinstance(value, Mapping):
            out |= flatten_config(value, f"{prefix}{key}.")
        else:
            out[f"{prefix}{key}"] = value
    return out


def differing_fields(
    configs: Sequence[Mapping[str, Any]], ignore: Collection[str] = (), absent: Any = None
) -> dict[str, list[Any]]:
    """The dotted fields whose values are not all equal among `configs` (nested mappings),
    in name order, each with its value in every config (`absent` where one lacks it);
    the fields named in `ignore` (one of the lists above) are left out."""
    flat = [flatten_config(c) for c in configs]
    out = {}
    for name in sorted({key for f in flat for key in f} - set(ignore)):
        values = [f.get(name, absent) for f in flat]
        if any(v != values[0] for v in values[1:]):
            out[name] = values
    return out
