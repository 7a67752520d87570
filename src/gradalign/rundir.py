"""Atomic writes of run-directory artifacts (JSON, JSONL, YAML).

Every file is written to a temporary name in the same folder and renamed over the target,
so a reader never sees a half-written artifact.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import yaml


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_text(path: str | Path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_npy(path: str | Path, array: Any) -> None:
    buf = io.BytesIO()
    np.save(buf, np.asarray(array))
    write_bytes(path, buf.getvalue())


def _default(obj: Any) -> Any:
    if hasattr(obj, "item"):  # numpy / torch scalars
        return obj.item()
    if hasattr(obj, "tolist"):
        return obj.tolist()
    raise TypeError(f"cannot serialise {type(obj).__name__}")


def _finite(obj: Any) -> Any:
    """NaN / inf -> None (JSON has no NaN; a missing value reads as null)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if hasattr(obj, "tolist") or hasattr(obj, "item"):
        return _finite(_default(obj))
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def write_json(path: str | Path, obj: Any) -> None:
    write_text(path, json.dumps(_finite(obj), indent=2, allow_nan=False) + "\n")


def write_jsonl(path: str | Path, rows: Iterable[Any]) -> None:
    write_text(path, "".join(json.dumps(_finite(r), allow_nan=False) + "\n" for r in rows))


def write_yaml(path: str | Path, obj: Any) -> None:
    write_text(path, yaml.safe_dump(obj, sort_keys=False))


def read_json(path: str | Path) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))


def read_jsonl(path: str | Path) -> list[Any]:
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
