"""What the core modules and the config share, without torch (so the config imports no torch).

Method: docs/method.md.
"""

from __future__ import annotations

import typing
from typing import Literal

EPS = 1e-5  # every unit vector g / (||g|| + EPS) and cosine <g, d> / (||g|| + EPS)

# How the validation groups' gradients are combined: g_V = sum_v g_v, or sum_v unit(g_v)
ValAggregate = Literal["sum", "mean_of_unit"]
VAL_AGGREGATES: tuple[str, ...] = typing.get_args(ValAggregate)


def check_val_aggregate(aggregate: str) -> None:
    """Raise for a `val_aggregate` outside `ValAggregate`."""
    if aggregate not in VAL_AGGREGATES:
        expected = " or ".join(f"'{a}'" for a in VAL_AGGREGATES)
        raise ValueError(f"val_aggregate='{aggregate}': expected {expected}")


def parse_output_dims(text: str) -> tuple[int, int] | None:
    """``select.output_dims``: 'exact' -> None; 'AxB' (A, B >= 1) -> (A, B); else ValueError."""
    if text == "exact":
        return None
    a, sep, b = text.partition("x")
    if not (sep and a.isascii() and a.isdigit() and b.isascii() and b.isdigit()):
        raise ValueError(f"{text!r}: expected 'exact' or 'AxB' with whole numbers, e.g. 64x128")
    if int(a) < 1 or int(b) < 1:
        raise ValueError(f"{text!r}: both dimensions must be >= 1")
    return int(a), int(b)
