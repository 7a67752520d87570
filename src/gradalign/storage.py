"""Atomic writes of run-directory artifacts (JSON, JSONL, YAML), and YAML read strictly.

Every file is written to a temporary name in the same folder and renamed over the target,
so a reader never sees a half-written artifact. A write the operating system refuses (full
disk, read-only or missing folder, I/O error) raises `StorageError`, one line naming the
file and the cause; the temporary file is removed, the target keeps its previous content.
"""

from __future__ import annotations

import errno
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

# What to do about an operating-system error, by errno.
_FIXES = {
    errno.ENOSPC: "free some space, then run the same command again: it resumes",
    errno.EDQUOT: "free some space, then run the same command again: it resumes",
    errno.EROFS: "make it writable, or choose another out_dir",
    errno.EACCES: "make it writable, or choose another out_dir",
    errno.EPERM: "make it writable, or choose another out_dir",
    errno.EIO: "the device reported an I/O error; check it, then run the same command again",
    errno.EEXIST: "a file stands where a folder is needed; remove it or choose another out_dir",
    errno.ENOTDIR: "a file stands where a folder is needed; remove it or choose another out_dir",
}


class StorageError(RuntimeError):
    """A file cannot be written or read because of the operating system: the message is one
    line naming the path, the cause (strerror and errno name) and what to do."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_

    @classmethod
    def of(cls, action: str, path: str | Path, err: OSError) -> StorageError:
        """`StorageError` for `err` raised while trying to `action` `path` ("write", ...)."""
        return cls(f"cannot {action} {path}: {describe(err)}", err.errno)


def describe(err: OSError) -> str:
    """'No space left on device [ENOSPC]; free some space, ...' for an OSError."""
    code = errno.errorcode.get(err.errno or 0)
    text = (err.strerror or str(err) or type(err).__name__) + (f" [{code}]" if code else "")
    fix = _FIXES.get(err.errno or 0)
    return f"{text}; {fix}" if fix else text


def write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise StorageError.of("create the folder of", path, err) from None
    try:
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as err:
        raise StorageError.of("write", path, err) from None
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except OSError as err:
        Path(tmp).unlink(missing_ok=True)
        raise StorageError.of("write", path, err) from None
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


# ---------------------------------------------------------------- YAML without surprises


class DuplicateKeyError(yaml.MarkedYAMLError):
    """A mapping gives the same key twice (YAML would silently keep the last)."""

    def __init__(self, field: str, first_line: int, mark: Any) -> None:
        super().__init__(None, None, f"{field}: given twice", mark)
        self.field, self.first_line, self.line = field, first_line, mark.line + 1


class _StrictLoader(yaml.SafeLoader):
    """PyYAML's safe loader without aliases: `*name` can repeat a node exponentially often
    (a few hundred bytes that expand to gigabytes), and no config or artifact needs one."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, f"alias *{event.anchor} (write the value out instead)", event.start_mark
            )
        return super().compose_node(parent, index)


def _check_keys(node: Any, name: str) -> None:
    """Raise DuplicateKeyError at the first mapping key given twice, with its dotted name."""
    if isinstance(node, yaml.MappingNode):
        seen: dict[tuple[str, Any], int] = {}
        for key, value in node.value:
            field = f"{name}.{key.value}" if name else str(key.value)
            if isinstance(key, yaml.ScalarNode):
                if (key.tag, key.value) in seen:
                    raise DuplicateKeyError(field, seen[key.tag, key.value], key.start_mark)
                seen[key.tag, key.value] = key.start_mark.line + 1
            _check_keys(value, field)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _check_keys(item, f"{name}[{i}]")


def read_yaml(text: str) -> Any:
    """Parse YAML text with the safe loader, refusing aliases and duplicate keys.

    Raises yaml.YAMLError (`DuplicateKeyError` for a key given twice), ValueError (an
    integer over Python's 4300-digit limit) or RecursionError (nested too deeply)."""
    loader = _StrictLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_keys(node, "")
        return loader.construct_document(node)
    finally:
        loader.dispose()


def yaml_reason(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where ('mapping values are not allowed here, line 3
    column 8')."""
    if isinstance(err, DuplicateKeyError):
        return f"{err.field}: given twice (lines {err.first_line} and {err.line}); keep one"
    if isinstance(err, yaml.MarkedYAMLError) and err.problem:
        mark = err.problem_mark
        where = f", line {mark.line + 1} column {mark.column + 1}" if mark else ""
        return f"{err.problem}{where}"
    return " ".join(str(err).split())
