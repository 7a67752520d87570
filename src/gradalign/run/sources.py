"""Where a run's problems and policy come from when the user brings their own: problem files
(``data.pool_files`` / ``validation_files`` / ``eval_files``) and a local Hugging Face model
directory (``model.name``), optionally wrapped with LoRA (``model.lora_r > 0``).

Every error names the config field it comes from (``data.pool_files[0].path: ...``), so a bad
YAML entry is found without reading a traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any

from gradalign.config import Config, ConfigError
from gradalign.data.files import FileSpec, LoadResult, load_files, summarise
from gradalign.data.problems import Problem, ProblemError, check_disjoint
from gradalign.data.rewards import RewardError, resolve_reward
from gradalign.data.tasks import TaskSets

# First problem id of each set: ids stay unique across the three sets (as in `tasks.make_task`).
SET_FIELDS = (
    ("pool_files", "pool", 0),
    ("validation_files", "validation", 1_000_000),
    ("eval_files", "eval", 2_000_000),
)
_SPEC_KEYS = [f.name for f in dataclasses.fields(FileSpec)]


_INTEGERS = ("count", "offset", "limit", "seed")


def _check_value(where: str, key: str, value: Any) -> None:
    """Reject a value of the wrong type: `count`, `offset`, `limit` and `seed` are integers,
    `fraction` a number, every other key a string."""
    if key in _INTEGERS:
        if (value is not None or key in ("offset", "seed")) and (
            isinstance(value, bool) or not isinstance(value, int)
        ):
            raise ConfigError(f"{where}.{key}: expected an integer, got {value!r}")
    elif key == "fraction":
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise ConfigError(f"{where}.fraction: expected a number in [0, 1], got {value!r}")
    elif not isinstance(value, str) and not (value is None and key != "path"):
        raise ConfigError(f"{where}.{key}: expected a string, got {value!r}")


def file_specs(entries: list[Any], name: str, reward_style: str = "auto") -> list[FileSpec]:
    """`FileSpec`s of a ``data.*_files`` list; errors name the entry (``name[i].key``). A
    ``module:function`` reward gets `reward_style` (``data.reward_style``) unless it names
    its own (``mod:fn@verl``)."""
    specs = []
    for i, entry in enumerate(entries):
        where = f"{name}[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{where}: expected a mapping with at least 'path', got {entry!r}")
        unknown = sorted(set(entry) - set(_SPEC_KEYS))
        if unknown:
            raise ConfigError(f"{where}.{unknown[0]}: unknown key (known: {', '.join(_SPEC_KEYS)})")
        if "path" not in entry:
            raise ConfigError(f"{where}: missing 'path' (the JSONL or Parquet file to read)")
        for key, value in entry.items():
            _check_value(where, key, value)
        fields = {**entry, "path": Path(entry["path"]).expanduser()}
        reward = fields.get("reward", "math")
        if reward_style != "auto" and ":" in reward and "@" not in reward:
            fields["reward"] = f"{reward}@{reward_style}"
        try:
            spec = FileSpec(**fields)
            spec.resolved_format  # noqa: B018 - raises for an unknown suffix
        except ProblemError as err:
            raise ConfigError(f"{where}: {err}") from None
        if not spec.path.is_file():
            raise ConfigError(
                f"{where}.path: {spec.path} is not a file "
                f"(relative paths are read from the working directory {Path.cwd()})"
            )
        try:
            resolve_reward(spec.reward)
        except RewardError as err:
            raise ConfigError(f"{where}.reward: {err}") from None
        specs.append(spec)
    return specs


def load_set(
    entries: list[Any], name: str, seed: int, first_id: int, reward_style: str = "auto"
) -> LoadResult:
    """Load the files of one ``data.*_files`` field; an unusable result names the field."""
    specs = file_specs(entries, name, reward_style)
    if not specs:
        raise ConfigError(f"{name}: give at least one file")
    try:
        result = load_files(specs, seed=seed, first_id=first_id)
    except ProblemError as err:
        raise ConfigError(f"{name}: {err}") from None
    if not result.problems:
        raise ConfigError(f"{name}: no usable problems ({summarise(result)})")
    return result


def _drop_shared(pool: list[Problem], held_out: list[Problem]) -> tuple[list[Problem], int]:
    """The pool without prompts of the validation or eval sets (never trained on)."""
    shared = {p.prompt for p in held_out}
    kept = [p for p in pool if p.prompt not in shared]
    return kept, len(pool) - len(kept)


def sets_from_files(cfg: Config, log: Callable[[str], None] | None = None) -> TaskSets:
    """Pool, validation and eval sets from ``data.pool_files`` / ``validation_files`` /
    ``eval_files``.

    Ids: pool 0.., validation 1_000_000.., eval 2_000_000..; each set's `count` samples use
    ``data.seed``. Each set's load summary (files, sources, rejected records, duplicates) is
    passed to `log`. The validation and eval sets must not share a prompt; pool problems whose
    prompt is in either are dropped (and counted), so the pool never trains on them.
    """
    if log is None:
        from gradalign.progress import log as print_log

        log = print_log
    d = cfg.data
    loaded: dict[str, list[Problem]] = {}
    for field, role, first_id in SET_FIELDS:
        result = load_set(getattr(d, field), f"data.{field}", d.seed, first_id, d.reward_style)
        log(f"{role} set (data.{field}): {summarise(result)}")
        loaded[role] = result.problems
    try:
        check_disjoint(loaded["validation"], loaded["eval"], ("validation", "eval"))
    except ProblemError as err:
        raise ConfigError(f"data.validation_files and data.eval_files: {err}") from None
    pool, dropped = _drop_shared(loaded["pool"], loaded["validation"] + loaded["eval"])
    if dropped:
        log(f"pool: dropped {dropped} problem(s) whose prompt is in the validation or eval set")
    check_pool_size(cfg, len(pool))
    return TaskSets(pool=pool, validation=loaded["validation"], eval=loaded["eval"])


def check_pool_size(cfg: Config, size: int) -> None:
    s = cfg.select
    if s.chunk_size > size:
        raise ConfigError(
            f"select.chunk_size ({s.chunk_size}) exceeds the {size} pool problems loaded from "
            "data.pool_files; lower chunk_size or add problems"
        )
    if s.mode == "none" and cfg.train.batch_size > size:
        raise ConfigError(
            f"train.batch_size ({cfg.train.batch_size}) exceeds the {size} pool problems "
            "loaded from data.pool_files"
        )


_CONTEXT_FIELDS = ("max_position_embeddings", "n_positions", "max_sequence_length")


def model_context(model: Any) -> int | None:
    """The model's context length in tokens from its config (``max_position_embeddings``,
    ``n_positions`` or ``max_sequence_length``), or None when it states none."""
    config = getattr(model, "config", None)
    for name in _CONTEXT_FIELDS:
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def check_prompt_lengths(
    problems: list[Problem],
    tokenizer: Any,
    max_context: int | None,
    max_new_tokens: int,
    what: str,
) -> tuple[list[Problem], list[str]]:
    """The problems whose chat-formatted prompt plus ``max_new_tokens`` fits in
    ``max_context`` tokens (in order), and one message per problem dropped, naming the set
    `what`, the problem id, its file and line/row (or source) and the lengths. ``max_context``
    None (unknown) keeps every problem."""
    from gradalign.engine.policy import format_prompt

    if max_context is None:
        return list(problems), []
    kept, messages = [], []
    for p in problems:
        n = len(format_prompt(tokenizer, p.chat))
        if n + max_new_tokens <= max_context:
            kept.append(p)
            continue
        meta = p.meta
        where = f"source {p.source!r}"
        if "file" in meta:
            pos = f":{meta['line']}" if "line" in meta else f" row {meta.get('row')}"
            where = f"{meta['file']}{pos}, {where}"
        messages.append(
            f"{what} problem {p.id} ({where}): prompt of {n} tokens + rollout.max_new_tokens "
            f"{max_new_tokens} exceeds the model context of {max_context} tokens; dropped"
        )
    return kept, messages


def model_device(device: str) -> str:
    """``model.device`` resolved ('auto': cuda when a GPU is visible) and checked against the
    GPUs this process sees; ConfigError naming the field otherwise (the name's form is
    checked with the config)."""
    import torch

    from gradalign.engine.policy import resolve_device

    resolved = resolve_device(device)
    if resolved.startswith("cuda"):
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(
                f"model.device: {device!r} but no CUDA GPU is visible; use cpu or auto"
            )
        index = int(resolved.partition(":")[2] or 0)
        if index >= count:
            raise ConfigError(
                f"model.device: {device!r} but this process sees {count} CUDA GPU(s) "
                f"(cuda:0 .. cuda:{count - 1})"
            )
    return resolved


def check_model(cfg: Config) -> None:
    """What can be checked of ``model.*`` before loading anything: the device, and the size
    of a built-in model (a local directory is checked as it loads, `policy_from_config`)."""
    from gradalign.engine.policy import BUILTIN_SIZES

    model_device(cfg.model.device)
    kind, _, size = cfg.model.name.partition(":")
    if kind == "builtin" and size not in BUILTIN_SIZES:
        known = ", ".join(f"'builtin:{s}'" for s in BUILTIN_SIZES)
        raise ConfigError(
            f"model.name: {cfg.model.name!r} is not a built-in model ({known}); "
            "or give a local Hugging Face model directory"
        )


def with_lora(model: Any, cfg: Config) -> Any:
    """`model` wrapped with ``model.lora_r`` LoRA adapters on ``model.lora_targets``; targets
    that name no linear layer are a ConfigError naming the field and the model's layers."""
    from gradalign.engine.policy import apply_lora

    m = cfg.model
    try:
        return apply_lora(model, m.lora_r, m.lora_alpha, m.lora_targets, seed=cfg.seed)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def check_scored_params(cfg: Config, model: Any) -> None:
    """``select.params`` must pick parameters of this model ('last:N': at most its blocks);
    ``select.features=output`` needs a head `logprobs.split_head` can read."""
    from gradalign.core.logprobs import split_head
    from gradalign.engine.policy import scored_parameters

    if cfg.select.features == "output" and split_head(model) is None:
        raise ConfigError(
            f"select.features: 'output' needs logits that are a plain linear head on the last "
            f"hidden state, which {type(model).__name__} is not known to have; use 'full'"
        )
    try:
        scored_parameters(model, cfg.select.params)
    except ValueError as err:
        raise ConfigError(
            f"select.params: {cfg.select.params!r} does not fit this model ({err})"
        ) from None


def policy_from_config(cfg: Config):
    """(model, tokenizer) from the local Hugging Face directory ``model.name``, in
    ``model.dtype`` on ``model.device`` ('auto': cuda when available), wrapped with LoRA
    when ``model.lora_r > 0`` (then only the adapters are trainable)."""
    from gradalign.engine.policy import load_pretrained

    m = cfg.model
    path = Path(m.name).expanduser()
    if not path.is_dir():
        raise ConfigError(
            f"model.name: {m.name!r} is not a directory; give 'builtin:tiny', 'builtin:small' "
            "or a local Hugging Face model directory (config.json, weights, tokenizer)"
        )
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.name: {path} has no config.json; point it at a Hugging Face model "
            "directory (the one holding config.json, *.safetensors and the tokenizer files)"
        )
    device = model_device(m.device)
    check_weight_files(path)
    try:
        model, tokenizer = load_pretrained(path, m.dtype, device)
    except Exception as err:  # whatever a damaged file makes transformers or tokenizers raise
        why = " ".join(f"{type(err).__name__}: {err}".split())[:300]
        raise ConfigError(f"model.name: cannot load {path}: {why}") from err
    return (with_lora(model, cfg) if m.lora_r > 0 else model), tokenizer


def check_weight_files(path: Path) -> None:
    """Every ``*.safetensors`` file of a model directory has a readable header that fits its
    size; a truncated or damaged one (an interrupted download or copy) is a ConfigError naming
    the file, before transformers meets it."""
    from safetensors import safe_open

    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as f:
                f.keys()
        except Exception as err:
            why = " ".join(str(err).split())[:200]
            raise ConfigError(
                f"model.name: {weights} is not a readable safetensors file ({why}); it may be "
                "truncated or damaged: copy or download it again"
            ) from None
