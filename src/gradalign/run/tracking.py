"""Experiment tracking of a run (``train.report_to``) and its ``metrics.jsonl``.

One writer per tracker carries both TRL's step metrics (``trl/loss``, ``trl/reward``, ...,
as TRL names them, under ``trl/``) and the round metrics (``eval/accuracy``, ``select/*``,
``score/*``, ``time/*``: the keys of ``rounds/NNNN/metrics.json``), plus the resolved config.

Step convention: the x-axis of every metric is the run's GRPO step. A TRL step metric is
logged at the steps done so far in the run (round r's step s, both counted from 0 as the run
directory counts them, is r * train.steps_per_round + s + 1); round r's metrics are logged at
the GRPO step that ends it, (r + 1) * train.steps_per_round, and the eval before any training
at step 0. transformers' own tracker integrations are not used: each round is one `train()`
call of TRL, whose step counter starts again at 0. TRL's running counters (`CUMULATIVE`:
``trl/num_tokens``, ``trl/epoch``) restart with every `train()` call too; the tracker adds the
totals of the rounds before, so they count over the whole run (the totals are kept in the
checkpoint's state, so a resumed run continues them).

Writers: tensorboard writes RUN_DIR/tb/ (`torch.utils.tensorboard`); wandb, trackio and
mlflow run offline into the run directory (RUN_DIR/wandb, trackio's local store, RUN_DIR/mlflow.db
or RUN_DIR/mlruns) unless their own environment variables (WANDB_MODE, MLFLOW_TRACKING_URI) say
otherwise. A tracker whose package is missing is a config error when the run starts.
"""

from __future__ import annotations

import hashlib
import importlib.util
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from gradalign.config import (
    BUILTIN_DATA_FIELDS,
    BUILTIN_MODEL_FIELDS,
    Config,
    ConfigError,
    flatten_config,
)
from gradalign.storage import write_jsonl

PACKAGES = {
    "tensorboard": "tensorboard",
    "wandb": "wandb",
    "trackio": "trackio",
    "mlflow": "mlflow",
}


def check_trackers(cfg: Config) -> None:
    """Each tracker in train.report_to has its package installed (before any model loads)."""
    for name in cfg.train.report_to:
        if name != "none" and importlib.util.find_spec(PACKAGES[name]) is None:
            raise ConfigError(
                f"train.report_to: {name} needs the {PACKAGES[name]} package, which is not "
                f"installed (pip install {PACKAGES[name]}, or gradalign[{name}])"
            )


def scalars(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """The finite numbers of a metrics dict, nested dicts flattened with '/'
    (``select/source_mix/addition``); None, text and NaN are left out."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out |= scalars(value, f"{name}/")
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            if math.isfinite(value):
                out[name] = float(value)
        elif isinstance(value, bool):
            out[name] = float(value)
    return out


CUMULATIVE = ("num_tokens", "epoch")  # TRL counters that restart with each train() call


def trl_scalars(logs: Mapping[str, Any]) -> dict[str, float]:
    """TRL's step logs under ``trl/``, in its own names (``trl/loss``, ``trl/reward``, ...)."""
    return {f"trl/{k}": v for k, v in scalars(logs).items()}


# Fields that describe nothing of a run on problem files (the built-in task and regime) or on
# a local model directory (the built-in model's warm start): left out of the logged config.
BUILTIN_DATA = (*BUILTIN_DATA_FIELDS, "val_files")  # and the deprecated name of validation_files


def logged_config(cfg: Config) -> dict[str, Any]:
    """The resolved config as the trackers log it: `Config.to_dict` without the fields that do
    not apply to this run (`BUILTIN_DATA` for problem files, `BUILTIN_MODEL_FIELDS` for a
    local model). config.yaml keeps every field."""
    out = cfg.to_dict()
    if cfg.data.pool_files:
        out["data"] = {k: v for k, v in out["data"].items() if k not in BUILTIN_DATA}
    if not cfg.model.name.startswith("builtin:"):
        out["model"] = {k: v for k, v in out["model"].items() if k not in BUILTIN_MODEL_FIELDS}
    return out


class _TensorBoard:
    def __init__(self, out: Path, cfg: Config) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(log_dir=str(out / "tb"))
        text = yaml.safe_dump(logged_config(cfg), sort_keys=False)
        self.writer.add_text("config", "```\n" + text + "\n```", 0)

    def log(self, values: dict[str, float], step: int) -> None:
        for name, value in values.items():
            self.writer.add_scalar(name, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    def __init__(self, out: Path, cfg: Config) -> None:
        import os

        import wandb

        self.run = wandb.init(
            project="gradalign",
            name=out.name,
            dir=str(out),
            config=logged_config(cfg),
            mode=os.environ.get("WANDB_MODE", "offline"),
            resume="allow",
            id="gradalign-" + hashlib.sha1(str(out.resolve()).encode()).hexdigest()[:12],
        )

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class _Trackio:
    def __init__(self, out: Path, cfg: Config) -> None:
        import trackio

        self.trackio = trackio
        trackio.init(project="gradalign", name=out.name, config=logged_config(cfg), resume="allow")

    def log(self, values: dict[str, float], step: int) -> None:
        self.trackio.log(values, step=step)

    def close(self) -> None:
        self.trackio.finish()


class _Mlflow:
    def __init__(self, out: Path, cfg: Config) -> None:
        import os

        import mlflow

        self.mlflow = mlflow
        if not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(_mlflow_uri(out))
        mlflow.set_experiment("gradalign")
        mlflow.start_run(run_name=out.name)
        params = {k: str(v)[:250] for k, v in flatten_config(logged_config(cfg)).items()}
        mlflow.log_params(params)

    def log(self, values: dict[str, float], step: int) -> None:
        self.mlflow.log_metrics(values, step=step)

    def close(self) -> None:
        self.mlflow.end_run()


def _mlflow_uri(out: Path) -> str:
    """RUN_DIR/mlflow.db (SQLite, mlflow's default store), or with mlflow-skinny, which has no
    SQL store, the file store RUN_DIR/mlruns (which mlflow 3 keeps only on request)."""
    import os

    if importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic"):
        return "sqlite:///" + str((out / "mlflow.db").resolve())
    os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
    return (out / "mlruns").resolve().as_uri()


WRITERS = {"tensorboard": _TensorBoard, "wandb": _Wandb, "trackio": _Trackio, "mlflow": _Mlflow}


class Tracker:
    """The run's trackers (none for report_to=none); rank 0 only. `counters` holds the
    `CUMULATIVE` TRL counters' totals over the finished rounds (the loop keeps it in the
    checkpoint's state)."""

    writers: list[Any]  # one writer per tracker: .log(values, step), .close()

    def __init__(self, cfg: Config, out: Path) -> None:
        self.steps_per_round = cfg.train.steps_per_round
        self.writers = [WRITERS[n](Path(out), cfg) for n in cfg.train.report_to if n != "none"]
        self.counters: dict[str, float] = {}
        self._this_round: dict[str, float] = {}  # the counters' last values in this round

    @classmethod
    def off(cls, cfg: Config) -> Tracker:
        """A tracker that writes nothing (ranks other than 0)."""
        tracker = cls.__new__(cls)
        tracker.steps_per_round, tracker.writers = cfg.train.steps_per_round, []
        tracker.counters, tracker._this_round = {}, {}
        return tracker

    def log(self, values: dict[str, float], step: int) -> None:
        for w in self.writers:
            w.log(values, step)

    def trl_step(self, round_: int, step: int, logs: Mapping[str, Any]) -> None:
        """TRL's logs of round `round_`'s `step`-th step (counted from 1 within the round),
        its `CUMULATIVE` counters continued from the rounds before."""
        values = trl_scalars(logs)
        for key in CUMULATIVE:
            if f"trl/{key}" in values:
                self._this_round[key] = values[f"trl/{key}"]
                values[f"trl/{key}"] += self.counters.get(key, 0.0)
        if values:
            self.log(values, round_ * self.steps_per_round + step)

    def settle(self) -> None:
        """Add this round's counters to the totals (the round's training is done)."""
        for key, value in self._this_round.items():
            self.counters[key] = self.counters.get(key, 0.0) + value
        self._this_round = {}

    def round_done(self, round_: int, metrics: Mapping[str, Any]) -> None:
        self.settle()
        self.log(scalars(metrics), (round_ + 1) * self.steps_per_round)

    def initial(self, metrics: Mapping[str, Any]) -> None:
        self.log(scalars(metrics), 0)

    def close(self) -> None:
        for w in self.writers:
            w.close()


def write_metrics_lines(out: Path, history: list[dict[str, Any]]) -> None:
    """RUN_DIR/metrics.jsonl: one line per finished round (the keys of metrics.json), written
    whole and atomically from the run's history, so a resumed run rewrites it from its
    checkpoint and never repeats or keeps a line of a round it redoes."""
    write_jsonl(Path(out) / "metrics.jsonl", history)
