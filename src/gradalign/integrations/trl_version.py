"""The TRL versions `GradAlignCallback` is tested on, and the check `attach` makes.

The callback overrides one private method of TRL's `GRPOTrainer`, ``_get_train_sampler``
(TRL's own override point for the train sampler; see `GradAlignCallback.attach`). A TRL
without it cannot work and is refused; a TRL outside the tested range that has it gets a
`TRLVersionWarning` naming what to do: a new TRL release has so far kept the hook, and
refusing it would stop a user on a patch release that works.
"""

from __future__ import annotations

import inspect
import warnings
from typing import Any

# The range of the pyproject's trl dependency; the callback tests pass at both ends.
TESTED_TRL = ("1.0.0", "1.16.0")


class TRLVersionWarning(UserWarning):
    """The installed TRL is outside the range GradAlignCallback is tested on."""


def _release(version: str) -> tuple[int, ...]:
    from packaging.version import Version

    return Version(version).release


def check_trl(trainer: Any, version: str | None = None) -> None:
    """Raise when `trainer` lacks the ``_get_train_sampler(dataset=None)`` hook; warn when
    the TRL `version` (default: the installed one) is outside `TESTED_TRL`."""
    if version is None:
        import trl

        version = trl.__version__
    hook = getattr(trainer, "_get_train_sampler", None)
    if hook is None or "dataset" not in inspect.signature(hook).parameters:
        raise ValueError(
            f"GradAlignCallback: TRL {version}'s GRPOTrainer has no "
            "_get_train_sampler(dataset) to install the round sampler through; install "
            f"trl>={TESTED_TRL[0]},<={TESTED_TRL[1]}"
        )
    low, high = TESTED_TRL
    if not _release(low) <= _release(version)[:3] <= _release(high):
        warnings.warn(
            f"GradAlignCallback is tested on TRL {low} to {high}, not {version}: it overrides "
            "GRPOTrainer._get_train_sampler, a private method TRL may change; if the selection "
            f"does not show in training, install trl>={low},<={high} (or run gradalign's "
            "tests/test_callback.py against this TRL)",
            TRLVersionWarning,
            stacklevel=3,
        )
