"""The trained policy as a Hugging Face directory: RUN_DIR/final/ (written at the end of a
run, and by `gradalign export RUN_DIR [--round N] [--merge]` from a round's checkpoint).

The directory holds `save_pretrained` files that `AutoModelForCausalLM.from_pretrained`,
`AutoTokenizer.from_pretrained` and vLLM load: config.json, model.safetensors,
generation_config.json and the tokenizer (the built-in models' character-level tokenizer
included). A LoRA run whose base is a local model directory writes the adapter alone
(adapter_config.json names the base directory; `AutoModelForCausalLM` loads it through peft),
or, with ``--merge``, the merged full weights. A built-in base exists only in the warm-start
cache, so a built-in LoRA run always writes merged weights.
"""

from __future__ import annotations

import copy
import dataclasses
import shutil
import tempfile
from pathlib import Path
from typing import Any

from gradalign.config import Config, ConfigError, load_config
from gradalign.engine.policy import quiet_libraries, quiet_transformers
from gradalign.progress import log


class ExportError(RuntimeError):
    """The run directory or the round asked for cannot be exported; one line."""


def is_lora(model: Any) -> bool:
    return hasattr(model, "peft_config")


def save_policy(
    model: Any, tokenizer: Any, dest: Path, cfg: Config, merge: bool, whole: dict | None = None
) -> str:
    """Write `model` and `tokenizer` to `dest` (replaced whole, atomically); returns what
    was written ("full weights", "LoRA adapter" or "merged LoRA weights"). With `merge` on a
    LoRA model a merged copy is written; `model` itself is left as it is. `whole`: an
    FSDP-sharded model's weights gathered whole (`sharded_state.full_weights`)."""
    builtin = cfg.model.name.startswith("builtin:")
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    quiet_transformers()  # no "Writing model shards" bar in the run's log
    try:
        with quiet_libraries():
            what = _save(model, tokenizer, tmp, cfg, merge or builtin, whole)
        if dest.exists():
            shutil.rmtree(dest)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return what


def _save(
    model: Any, tokenizer: Any, dest: Path, cfg: Config, merge: bool, whole: dict | None
) -> str:
    if is_lora(model) and not merge:
        for adapter in model.peft_config.values():  # found wherever final/ is read from
            adapter.base_model_name_or_path = str(Path(cfg.model.name).expanduser().resolve())
        model.save_pretrained(dest)
        what = "LoRA adapter"
    elif is_lora(model):
        copy.deepcopy(model).merge_and_unload().save_pretrained(dest)
        what = "merged LoRA weights"
    else:
        model.save_pretrained(dest, state_dict=whole)
        what = "full weights"
    tokenizer.save_pretrained(dest)
    return what


def save_final(
    out: Path, model: Any, tokenizer: Any, cfg: Config, whole: dict | None = None
) -> None:
    """RUN_DIR/final/ at the end of a run (LoRA on a local model: the adapter); `whole` as
    `save_policy`."""
    what = save_policy(model, tokenizer, Path(out) / "final", cfg, merge=False, whole=whole)
    log(f"[{cfg.select.mode}] trained policy ({what}): {Path(out) / 'final'}")


def _kept(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").glob("round-*") if p.is_dir())


def _checkpoint_path(run_dir: Path, round_: int | None) -> Path:
    from gradalign.run.checkpoint import KEEP, latest_checkpoint

    kept = _kept(run_dir)
    if not kept:
        raise ExportError(f"{run_dir} has no checkpoint (no round has finished yet)")
    if round_ is None:
        ckpt = latest_checkpoint(run_dir, lambda msg: log(f"warning: {msg}"))
        if ckpt is None:
            raise ExportError(f"{run_dir}: no checkpoint verifies ({', '.join(kept)})")
        return ckpt.path
    name = f"round-{round_:04d}"
    if name not in kept:
        raise ExportError(
            f"{run_dir}: round {round_} has no checkpoint; kept: {', '.join(kept)} (a run keeps "
            f"the checkpoints of its last {KEEP} rounds)"
        )
    return run_dir / "checkpoints" / name


def policy_for_export(cfg: Config) -> tuple[Any, Any]:
    """The policy `cfg` trains, on the CPU, to load a checkpoint into; built from the model
    section alone, so the training data need not be there: a local directory (with its LoRA
    adapters), or a built-in model's architecture, whose weights all come from the checkpoint.
    Only a built-in LoRA run needs its warm-started base again (from the cache, or trained
    anew), and with it the data its warm start excluded."""
    from gradalign.engine.policy import build_model, build_tokenizer
    from gradalign.run.setup import build_policy, build_sets
    from gradalign.run.sources import policy_from_config

    cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, device="cpu"))
    kind, _, size = cfg.model.name.partition(":")
    if kind != "builtin":
        return policy_from_config(cfg)
    if cfg.model.lora_r == 0:
        tokenizer = build_tokenizer()
        return build_model(tokenizer, size, seed=cfg.model.warmstart_seed), tokenizer
    return build_policy(cfg, build_sets(cfg))


def export_run(
    run_dir: Path, round_: int | None = None, merge: bool = False, dest: Path | None = None
) -> tuple[Path, str]:
    """Rebuild the policy of `run_dir`'s config (`policy_for_export`: the model section and
    the checkpoint, not the training data), load the checkpoint of round `round_` (its
    number in checkpoints/round-NNNN; None: the newest) and save it to `dest` (default
    RUN_DIR/final, or RUN_DIR/final-round-NNNN for a given round). Returns (dest, what)."""
    from gradalign.run.checkpoint import load_weights, read_checkpoint

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").is_file():
        raise ExportError(f"{run_dir} is not a run directory (it has no config.yaml)")
    try:
        cfg = load_config(run_dir / "config.yaml")
    except ConfigError as err:
        raise ExportError(f"{run_dir / 'config.yaml'}: {err}") from None
    path = _checkpoint_path(run_dir, round_)
    try:
        ckpt = read_checkpoint(path)
    except ValueError as err:
        raise ExportError(str(err)) from None
    model, tokenizer = policy_for_export(cfg)
    load_weights(ckpt, model)
    if dest is None:
        dest = run_dir / ("final" if round_ is None else f"final-round-{round_:04d}")
    return Path(dest), save_policy(model, tokenizer, Path(dest), cfg, merge)
