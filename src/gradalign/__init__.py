"""gradalign: GradAlign gradient-aligned problem selection for GRPO (arXiv 2602.21492).

Layers, each importing only from those below it in this list (`lint-imports` checks it, with
the contracts in pyproject.toml):

- `gradalign.cli`: the `gradalign` command;
- `gradalign.integrations` (the TRL callback, its train sampler and TRL rows) and
  `gradalign.analysis` (benchmarks and reports: offline, it reads run directories and runs
  no model);
- `gradalign.run`: building a run (`Setup`), the round loop, run directory, checkpoints,
  `gradalign score` and `gradalign diagnose`;
- `gradalign.engine`: the policy, warm start, rollouts, scoring a round's chunk
  (`ChunkScorer`: the one path of the loop, score, diagnose and the TRL callback), GRPO
  training;
- `gradalign.scoring`: the batched scorer (capture hooks, parameter uses, sketches, LESS)
  and its sharding over ranks;
- `gradalign.config` and its checks `gradalign.config_rules`;
- `gradalign.data` (problems, problem files, built-in tasks and regimes, rewards) and
  `gradalign.core` (the algorithm: advantages, group gradients, the validation direction,
  selection modes; pure functions);
- `gradalign.progress`, `gradalign.storage` (atomic writes, strict YAML), `gradalign.ranks`
  (the process group), `gradalign.messages`.

The method they implement: docs/method.md. The public names below are re-exported lazily:
``import gradalign`` imports neither torch nor TRL until one of them is used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_PUBLIC = {
    "Config": "gradalign.config",
    "ConfigError": "gradalign.config",
    "load_config": "gradalign.config",
    "Problem": "gradalign.data.problems",
    "group_advantages": "gradalign.core.grpo",
    "exact_alignment": "gradalign.core.alignment",
    "validation_direction": "gradalign.core.alignment",
    "Candidates": "gradalign.core.selection",
    "Selection": "gradalign.core.selection",
    "MODES": "gradalign.core.selection",
    "select": "gradalign.core.selection",
    "batched_alignment": "gradalign.scoring.fastscore",
    "GradAlignCallback": "gradalign.integrations.trl_callback",
    "score": "gradalign.run.score",
    "ScoreResult": "gradalign.run.score",
}

__all__ = sorted(_PUBLIC)


def __getattr__(name: str) -> Any:
    if name not in _PUBLIC:
        raise AttributeError(f"module 'gradalign' has no attribute '{name}'")
    return getattr(importlib.import_module(_PUBLIC[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_PUBLIC])
