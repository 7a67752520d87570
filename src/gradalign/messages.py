"""Values shown in error and warning messages."""

from __future__ import annotations

from typing import Any


def show(value: Any) -> str:
    """repr of a value for a message, cut at 60 characters (never fails)."""
    if isinstance(value, int) and value.bit_length() > 192:  # repr fails over 4300 digits
        return f"<a {value.bit_length()}-bit integer>"
    try:
        text = repr(value)
    except Exception:
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 60 else text[:57] + "..."
