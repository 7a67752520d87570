"""Typed configuration: dataclasses loaded from YAML with ``section.field=value`` overrides.

Each field is documented once, in its `doc(...)` help text; `gradalign fields` prints them.
A bad value is rejected at load time with a message naming the field, the value and a fix.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import typing
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, cast

import yaml

from gradalign.config_rules import (  # noqa: F401 - the checks and ConfigError, re-exported
    SEED_MAX,
    ConfigError,
    check,
    check_budget,
    check_rollout,
    check_select,
    data_aliases,
)
from gradalign.core.common import ValAggregate
from gradalign.core.selection import Mode, ZeroVariance
from gradalign.data.rewards_style import RewardStyle
from gradalign.data.tasks import Flaw
from gradalign.messages import show
from gradalign.storage import DuplicateKeyError, read_yaml, yaml_reason


def doc(default: Any, help: str) -> Any:  # noqa: A002 - `help` reads best here
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


INT_MAX = 2**63 - 1  # every integer field must fit an int64 (torch, numpy)


class Section:
    """A config section whose fields are coerced and type-checked on construction, so a
    section built in Python is checked as one loaded from YAML (messages name the field)."""

    prefix: ClassVar[str] = ""

    def __post_init__(self) -> None:
        hints = _hints(type(self))
        for f in dataclasses.fields(cast(Any, self)):  # every Section is a dataclass
            name, value, typ = f"{self.prefix}{f.name}", getattr(self, f.name), hints[f.name]
            if isinstance(typ, type) and dataclasses.is_dataclass(typ):
                if not isinstance(value, typ):
                    raise ConfigError(f"{name}: expected a {typ.__name__}, got {show(value)}")
            else:
                setattr(self, f.name, _coerce(value, typ, name))


@dataclass
class ModelConfig(Section):
    prefix: ClassVar[str] = "model."
    name: str = doc(
        "builtin:tiny", "'builtin:tiny' (0.5M), 'builtin:small' (5M) or a local HF model directory"
    )
    dtype: Literal["float32", "bfloat16", "float16"] = doc("float32", "weights dtype")
    device: str = doc("cpu", "'cpu', 'cuda', 'cuda:N' or 'auto' (cuda when available)")
    warmstart_steps: int = doc(1000, "supervised warm-start steps for built-in models (0 = none)")
    warmstart_lr: float = doc(3e-3, "warm-start peak learning rate (cosine decay)")
    warmstart_batch_size: int = doc(128, "warm-start batch size (sequences)")
    warmstart_seed: int = doc(
        0, "seed of the built-in model's init and warm start (not of the data); 0 .. 2**32-1"
    )
    warmstart_flaw: Flaw = doc(
        "junk",
        "systematic flaw in a share of the warm-start targets, which GRPO then repairs: 'junk' "
        "(a character before EOS that the reward rejects; 'junk2' another one), 'lead' (a "
        "character before the answer), 'lastdigit' (a wrong last digit / last operator: a "
        "content flaw) or 'none' (see docs/testbed.md)",
    )
    warmstart_flaw_frac: float = doc(0.6, "share of warm-start targets with the flaw, in [0, 1]")
    warmstart_family_flaws: list[str] = doc(
        ["countdown2:junk2:0.6"],
        "per-family warm-start flaws, each 'family:flaw' or 'family:flaw:share' (e.g. "
        "addition:lastdigit:0.4, countdown2:junk2): each listed family of data.families gets "
        "its own flaw (junk, junk2, lead, lastdigit, none), the others warmstart_flaw and "
        "warmstart_flaw_frac; items for families not in data.families are unused (see "
        "docs/testbed.md)",
    )
    lora_r: int = doc(0, "LoRA rank (0 = full fine-tuning); with LoRA, scoring uses the adapters")
    lora_alpha: int = doc(16, "LoRA alpha")
    lora_targets: list[str] = doc(
        ["q_proj", "k_proj", "v_proj", "o_proj"], "module names that get LoRA adapters"
    )
    cache_dir: str = doc("", "warm-start cache ('' = $GRADALIGN_CACHE or ~/.cache/gradalign)")


@dataclass
class DataConfig(Section):
    prefix: ClassVar[str] = "data."
    families: list[str] = doc(
        ["addition", "countdown2"],
        "built-in task families in every set: addition, countdown, countdown2 (two numbers "
        "from 1..99), addition_steps (a column-addition scratchpad then the sum; needs "
        "rollout.max_new_tokens >= 20)",
    )
    pool_size: int = doc(1024, "candidate training problems in the pool")
    val_size: int = doc(32, "trusted validation problems (gradient reference, never trained on)")
    eval_size: int = doc(256, "held-out eval problems (accuracy only; disjoint from validation)")
    seed: int = doc(
        0, "seed of the task generator and of the regime's corruption; 0 .. 2**32-1, as `seed`"
    )
    regime: Literal["clean", "noisy", "imbalance", "lowutility"] = doc(
        "noisy", "built-in data regime: clean | noisy (unreliable rewards) | imbalance | lowutility"
    )
    corrupt_frac: float = doc(0.5, "noisy: fraction of pool problems corrupted")
    corruption: Literal["coinflip", "labelflip"] = doc(
        "coinflip", "noisy: coin-flip reward (reference mechanism) or wrong reference answer"
    )
    majority_frac: float = doc(0.88, "imbalance: share of the pool from the majority families")
    minority: str = doc("countdown2", "imbalance: family of the validation and eval sets")
    lowutility_frac: float = doc(0.8, "lowutility: fraction of the pool that is garbled filler")
    pool_files: list[dict] = doc(
        [],
        "problem files for the pool (replaces the built-in task); each {path, count, "
        "prompt_field, answer_field, answer_extractor, source, reward, template, offset, "
        "limit, fraction, seed, take} (docs/real-models.md: problem files)",
    )
    validation_files: list[dict] = doc(
        [],
        "problem files for the trusted validation set, the gradient reference (never trained "
        "on; not verl's val_files, a test set: that is eval_files); with pool_files",
    )
    eval_files: list[dict] = doc([], "problem files for the eval set (with pool_files)")
    reward_style: RewardStyle = doc(
        "auto",
        "how a 'module:function' reward is called: auto (by its parameter names), gradalign "
        "(problem, completion), verl (data_source, solution_str, ground_truth, extra_info) or "
        "trl (completions, **kwargs); docs/real-models.md: rewards",
    )
    val_files: list[dict] = doc([], "deprecated name of validation_files (warns)")

    def __post_init__(self) -> None:
        super().__post_init__()
        data_aliases(self)  # gradalign.config_rules: val_files -> validation_files, warned


@dataclass
class RolloutConfig(Section):
    prefix: ClassVar[str] = "rollout."
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
    eval_samples_every: int = doc(
        0,
        "also sample eval/mean_at_k after every N-th round (verl's trainer.test_freq), for a "
        "per-round learning curve; 0 = only at the start and after the last round",
    )
    max_new_tokens: int = doc(12, "completion length limit (also GRPO's max_completion_length)")
    backend: Literal["hf", "vllm"] = doc(
        "hf", "rollout engine: HF generate, or vLLM (GPU, optional extra)"
    )
    prompts_per_batch: int = doc(64, "prompts per `generate` call (each with k_r or k_v samples)")


@dataclass
class SelectConfig(Section):
    prefix: ClassVar[str] = "select."
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
    features: Literal["full", "output"] = doc(
        "full",
        "what g_p is: 'full' = the gradient of the scored parameters (select.params, one "
        "backward); 'output' = the LM head's gradient, from the forward pass alone, of the "
        "head's use only (tied or frozen heads included: docs/output-features.md)",
    )
    output_dims: str = doc(
        "exact",
        "select.features=output: 'exact' (the V x d head gradient, one group's at a time) or "
        "'AxB', its seeded two-sided random projection to A x B numbers per problem (64x128)",
    )
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
    groups_per_micro: int = doc(
        0,
        "groups per forward/backward micro-batch when scoring; 0 = auto: as many whole groups "
        "(1..16) as keep the scored blocks' activations within 512 MiB, estimated as rows x "
        "padded length x (blocks from the first scored one up x (16 hidden + 8 intermediate) "
        "+ 2 vocab when the LM head is scored) x dtype bytes; 16 with select.features=output "
        "(docs/output-features.md)",
    )
    budget: Literal["full", "halving"] = doc(
        "full",
        "candidate rollouts: 'full' = rollout.k_r each; 'halving' = select.k_r0 each, then "
        "k_r in all for those whose rewards differ (the others stop as zero-variance groups)",
    )
    k_r0: int = doc(2, "select.budget=halving: first-stage rollouts per candidate, 2 .. k_r - 1")

    @property
    def n_select(self) -> int:
        """n = chunk_size // k problems trained on per round."""
        return self.chunk_size // self.k


@dataclass
class TrainConfig(Section):
    prefix: ClassVar[str] = "train."
    steps_per_round: int = doc(8, "GRPO optimizer steps per round")
    batch_size: int = doc(8, "problems per GRPO step (each with num_generations completions)")
    num_generations: int = doc(8, "completions per problem in GRPO training")
    learning_rate: float = doc(2e-5, "GRPO learning rate (AdamW, constant)")
    beta: float = doc(0.0, "KL coefficient to the initial policy (0 = no reference model)")
    micro_batch: int = doc(64, "sequences per forward/backward in training")
    loss_type: Literal["grpo", "dapo", "dr_grpo", "bnpo"] = doc("dapo", "TRL GRPO loss type")
    scale_rewards: Literal["group", "batch", "none"] = doc("group", "TRL advantage scaling")
    max_grad_norm: float = doc(1.0, "gradient clipping")
    temperature: float = doc(
        1.0,
        "sampling temperature of the GRPO training completions (TRL's temperature); the "
        "scoring rollouts sample at rollout.temperature: keep the two equal so that a problem "
        "is scored under the distribution it is trained on",
    )
    report_to: list[str] = doc(
        ["none"],
        "experiment trackers for TRL's step metrics and the round metrics, as transformers "
        "names them: none | tensorboard (RUN_DIR/tb) | wandb | trackio | mlflow (offline "
        "unless their own environment variables say otherwise); a comma-separated list",
    )
    fsdp: bool = doc(
        False,
        "shard weights, gradients and Adam state 1/R per rank with FSDP2 (accelerate's FSDP v2 "
        "through TRL; run: GPUs, launched by accelerate launch or torchrun; score: CPU too); "
        "scoring holds its directions sharded too (docs/fsdp.md). Not with LoRA, vLLM or "
        "select.scorer=exact",
    )
    trl_args: dict = doc(
        {},
        "further GRPOConfig fields of the installed TRL, e.g. {num_iterations: 2, epsilon: 0.3, "
        "warmup_steps: 0.1, lr_scheduler_type: cosine} or --set train.trl_args.epsilon=0.3; "
        "the fields gradalign sets itself are refused, naming the field to use",
    )


@dataclass
class Config(Section):
    """The whole run configuration. Construction checks every field and the cross-field
    invariants (`check`): a `Config(...)` built in Python is refused as a bad YAML file is."""

    rounds: int = doc(10, "rounds of score → select → train")
    seed: int = doc(
        0,
        "seed of every random choice of the run (rollouts, sampling, training); "
        "0 .. 2**32-1, the range numpy and torch both accept",
    )
    out_dir: str = doc("runs/default", "run directory")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    select: SelectConfig = field(default_factory=SelectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        check(self)  # gradalign.config_rules

    @property
    def n_select(self) -> int:
        """n = chunk_size // k problems trained on per round (`SelectConfig.n_select`)."""
        return self.select.n_select

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading and checking


_HINTS: dict[type, dict[str, Any]] = {}


def _hints(cls: type) -> dict[str, Any]:
    """The resolved field types of a Section class (cached)."""
    if cls not in _HINTS:
        _HINTS[cls] = typing.get_type_hints(cls)
    return _HINTS[cls]


def _number(value: Any, typ: type, name: str) -> int | float:
    if isinstance(value, str):
        value = _yaml_or_text(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-5" (no dot) as a string
            try:
                value = float(value) if math.isfinite(float(value)) else value
            except ValueError:
                pass
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ConfigError(f"{name}: expected {typ.__name__}, got {show(value)}")
    if isinstance(value, numbers.Integral):
        value = int(value)
        if typ is float:
            try:
                return float(value)
            except OverflowError:
                raise ConfigError(f"{name}: {show(value)} is too large for a float") from None
        if abs(value) > INT_MAX:
            raise ConfigError(f"{name}: must be at most 2**63 - 1, got {show(value)}")
        return value
    value = float(value)
    if not math.isfinite(value):
        raise ConfigError(f"{name}: expected a finite number, got {value!r}")
    if typ is int:
        if not value.is_integer() or abs(value) > INT_MAX:
            raise ConfigError(f"{name}: expected int, got {value!r}")
        return int(value)
    return value


def _coerce(value: Any, typ: Any, name: str) -> Any:
    origin = typing.get_origin(typ)
    if origin is Literal:
        if not isinstance(value, (str, int, float)) or value not in typing.get_args(typ):
            choices = ", ".join(map(str, typing.get_args(typ)))
            raise ConfigError(f"{name}: {show(value)} is not one of {choices}")
        return value
    if origin in (list, typing.List):  # noqa: UP006
        if isinstance(value, str):
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{name}: expected a list, got {show(value)}")
        (item,) = typing.get_args(typ)
        return [_coerce(v, item, f"{name}[{i}]") for i, v in enumerate(value)]
    if typ is dict or typing.get_origin(typ) is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {show(value)}")
        return value
    if typ is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {show(value)}")
        return value
    if typ in (int, float):
        return _number(value, typ, name)
    if typ is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"{name}: expected a string, got {show(value)}")
        return str(value)
    raise ConfigError(f"{name}: unsupported type {typ}")  # pragma: no cover


def _build(cls: type, data: Any, prefix: str) -> Any:
    """A section (or the Config) from a mapping: unknown fields refused here, every value
    coerced and checked by the dataclass itself (`Section.__post_init__`)."""
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {data!r}")
    hints = _hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - known, key=str)
    if unknown:
        raise ConfigError(
            f"{prefix}{unknown[0]}: unknown field (known in {prefix.rstrip('.') or 'config'}: "
            f"{', '.join(sorted(known))})"
        )
    kwargs = {}
    for name, value in data.items():
        typ = hints[name]
        kwargs[name] = (
            _build(typ, value, f"{prefix}{name}.")
            if isinstance(typ, type) and dataclasses.is_dataclass(typ)
            else value
        )
    return cls(**kwargs)


def _yaml_or_text(raw: str) -> Any:
    """`raw` read as YAML, or `raw` itself when it is not YAML."""
    try:
        return read_yaml(raw)
    except (yaml.YAMLError, ValueError, RecursionError):
        return raw


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
            node[leaf] = read_yaml(raw) if raw.strip() else ""
        except DuplicateKeyError as err:
            inner = err.field if err.field.startswith("[") else f".{err.field}"
            raise ConfigError(
                f"{key.strip()}{inner}: given twice in the override {item!r}; keep one"
            ) from None
        except (yaml.YAMLError, ValueError, RecursionError):
            node[leaf] = raw  # not YAML: the text itself
    return data


def config_from_dict(data: dict[str, Any]) -> Config:
    return _build(Config, data, "")


def _read_config_file(path: Path) -> dict[str, Any]:
    try:
        data = read_yaml(path.read_text(encoding="utf-8")) or {}
    except DuplicateKeyError as err:
        raise ConfigError(f"{path}: {yaml_reason(err)}") from None
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except UnicodeDecodeError as err:
        raise ConfigError(f"{path}: not UTF-8 text (byte {err.start}: {err.reason})") from None
    except OSError as err:
        raise ConfigError(f"config file {path}: cannot read it ({err.strerror})") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: invalid YAML ({yaml_reason(err)})") from None
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML (nested too deeply)") from None
    except ValueError as err:  # e.g. an integer over Python's 4300-digit limit
        raise ConfigError(f"{path}: invalid YAML ({' '.join(str(err).split())})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    data = _read_config_file(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))


# The defaults are sized for the built-in models (a 0.5M-parameter `builtin:tiny` on a CPU,
# answers of a few characters): what a local Hugging Face model on a GPU needs instead,
# shown by `gradalign fields` next to the default (examples/qwen2.5-math-1.5b.yaml uses them).
BUILTIN_MODEL_FIELDS = (
    "warmstart_steps", "warmstart_lr", "warmstart_batch_size", "warmstart_seed",
    "warmstart_flaw", "warmstart_flaw_frac", "warmstart_family_flaws", "cache_dir",
)  # fmt: skip
BUILTIN_DATA_FIELDS = (
    "families", "pool_size", "val_size", "eval_size", "regime", "corrupt_frac",
    "corruption", "majority_frac", "minority", "lowutility_frac",
)  # fmt: skip
_BUILTIN_DATA = "built-in data only (unused with data.*_files)"
_BUILTIN_MODEL = "built-in models only"
REAL_MODEL = {
    "model.name": "your local HF model directory",
    "model.dtype": "bfloat16 (LoRA); float32 for full fine-tuning",
    "model.device": "cuda (or auto)",
    **{f"model.{f}": _BUILTIN_MODEL for f in BUILTIN_MODEL_FIELDS},
    **{f"data.{f}": _BUILTIN_DATA for f in BUILTIN_DATA_FIELDS},
    "rollout.max_new_tokens": "512-1024: reasoning answers need hundreds of tokens",
    "rollout.prompts_per_batch": "8-32 (each prompt adds k samples to a generate call)",
    "train.micro_batch": "8 (one group of long sequences per forward/backward)",
    "train.learning_rate": "1e-5 with LoRA, about 1e-6 for full fine-tuning",
}  # fmt: skip


def field_docs() -> list[tuple[str, str, str]]:
    """(name, default, help) of every field, for `gradalign fields`; a `Literal` field's help
    ends with its choices."""
    rows = []
    cfg = Config()
    for f in dataclasses.fields(Config):
        value: Any = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            hints = _hints(type(value))
            for g in dataclasses.fields(value):
                help_ = _with_choices(g.metadata["help"], hints[g.name])
                rows.append((f"{f.name}.{g.name}", repr(getattr(value, g.name)), help_))
        else:
            help_ = _with_choices(f.metadata["help"], _hints(Config)[f.name])
            rows.append((f.name, repr(value), help_))
    return rows


def _with_choices(help_: str, typ: Any) -> str:
    if typing.get_origin(typ) is not Literal:
        return help_
    return f"{help_} (one of: {', '.join(map(str, typing.get_args(typ)))})"


def field_help(name: str) -> str:
    """The help text of field `name` ("section.field"), as `gradalign fields` prints it: the
    one place a field is documented, for the CLI options that set it."""
    return next(h for n, _, h in field_docs() if n == name)


# ---------------------------------------------------------------- comparing configs

# Where a run lives, not what it computes: a bench reuses a finished run across these.
LOCATION_FIELDS = ("out_dir", "model.cache_dir")
# What may change when a run is resumed: where it lives, how many rounds it runs, where it
# reports.
RESUMABLE_FIELDS = (*LOCATION_FIELDS, "rounds", "train.report_to")
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


def upgrade_saved(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A config saved by an older version, in today's names: ``data.val_files`` (before its
    rename) becomes ``data.validation_files``, so such a run directory still resumes."""
    out = dict(saved)
    data = dict(out.get("data") or {})
    if data.get("val_files") and not data.get("validation_files"):
        data["validation_files"], data["val_files"] = data["val_files"], []
        out["data"] = data
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
