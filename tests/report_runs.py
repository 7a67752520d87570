"""Run directories as `gradalign run` leaves them, written by hand for the report tests."""

from __future__ import annotations

from gradalign.config import load_config
from gradalign.storage import write_json, write_yaml


def write_run(
    path, regime, mode, seed, finals, shares, mixes=None, extra=(), finished=True,
    auc=None, split=None, mean_at_k=None,
):  # fmt: skip
    """A run directory as `gradalign run` leaves it: config.yaml, rounds/*, summary.json."""
    cfg = load_config(
        None,
        [
            f"data.regime={regime}",
            f"select.mode={mode}",
            f"seed={seed}",
            f"data.seed={seed}",
            f"rounds={len(finals)}",
            "train.steps_per_round=4",
            f"out_dir={path}",
            *extra,
        ],
    )
    write_yaml(path / "config.yaml", cfg.to_dict())
    for r, (acc, share) in enumerate(zip(finals, shares)):
        mix = (mixes or [{"addition": 4, "countdown": 4}] * len(finals))[r]
        metrics = {
            "round": r,
            "train/steps": 4,
            "eval/accuracy": acc,
            "select/n": 8,
            "select/source_mix": mix,
            "select/corrupted_share": share,
        }
        if auc is not None:
            metrics["select/auc_clean"] = auc[r]
        if split is not None:
            metrics["val/split_half_cos"] = split[r]
        write_json(path / "rounds" / f"{r:04d}" / "metrics.json", metrics)
    if finished:
        summary = {
            "mode": mode,
            "initial_eval_accuracy": 0.05,
            "final_eval_accuracy": finals[-1],
            "eval_accuracy": finals,
            "wall_s": 12.5,
        }
        if mean_at_k is not None:
            summary |= {"initial_eval_mean_at_k": 0.1, "final_eval_mean_at_k": mean_at_k}
        write_json(path / "summary.json", summary)
