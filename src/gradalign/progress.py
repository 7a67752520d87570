"""Progress bars and log lines (rich), kept out of the algorithm modules.

The core takes plain `advance(n)` callables; this module turns them into rich progress
bars on a terminal, and into progress lines when output is not a terminal (CI, nohup, SLURM
logs): a step (warm start, rollouts, scoring, GRPO steps) prints ``  NAME: DONE/TOTAL (P%),
T s`` when it passes a tenth of its total, and at least every `HEARTBEAT_S` seconds while it
runs (a background thread checks, so a single long step still shows life). Lines at the
tenths are held back within `QUIET_S` seconds of the last line: a step done in seconds
prints nothing. Log lines are never wrapped (`log`: one line per message, for grep), and the
`gradalign` command shows Python warnings in one line each (`one_line_warning`).
"""

from __future__ import annotations

import os
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

# under torchrun / accelerate launch only rank 0 shows progress, logs and tables
QUIET = int(os.environ.get("RANK", "0")) != 0
if QUIET:  # the same warnings come from rank 0
    warnings.simplefilter("ignore")
console = Console(highlight=False, quiet=QUIET)
if not console.is_terminal:  # logs and pipes: wide enough for the comparison tables
    console.width = 160

HEARTBEAT_S = 30.0  # the longest a running step stays silent in a log
QUIET_S = 5.0  # no line at a tenth within this many seconds of the previous line


class LineProgress:
    """`advance(n)` of a step in a log: a line at each tenth of `total` (after `quiet_s` of
    silence) and, through `tick`, one at least every `heartbeat_s` seconds. `note` (e.g.
    the loss) is appended to the lines. `clock` and `emit` are injectable for tests."""

    def __init__(
        self,
        description: str,
        total: int,
        clock: Callable[[], float] = time.monotonic,
        emit: Callable[[str], None] | None = None,
        heartbeat_s: float = HEARTBEAT_S,
        quiet_s: float = QUIET_S,
    ) -> None:
        self.description, self.total, self.done, self.note = description, max(total, 0), 0, ""
        self.clock, self.emit = clock, emit or log
        self.heartbeat_s, self.quiet_s = heartbeat_s, quiet_s
        self.start = self.last_line = clock()
        self.tenths = 0  # tenths of the total already passed
        self.lock = threading.Lock()

    def __call__(self, n: int = 1) -> None:
        with self.lock:
            self.done += n
            tenths = 10 * self.done // self.total if self.total else 0
            passed, self.tenths = tenths > self.tenths, max(tenths, self.tenths)
            now = self.clock()
            if passed and now - self.last_line >= self.quiet_s:
                self._line(now)
            elif now - self.last_line >= self.heartbeat_s:
                self._line(now)

    def tick(self) -> None:
        """The heartbeat: a line when `heartbeat_s` have passed since the last one."""
        with self.lock:
            now = self.clock()
            if now - self.last_line >= self.heartbeat_s:
                self._line(now)

    def _line(self, now: float) -> None:
        self.last_line = now
        share = f" ({100 * self.done // self.total}%)" if self.total else ""
        note = f", {self.note}" if self.note else ""
        self.emit(
            f"  {self.description}: {self.done}/{self.total}{share}, {now - self.start:.0f} s{note}"
        )


@contextmanager
def _heartbeat(progress: LineProgress, every_s: float = 1.0) -> Iterator[None]:
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(every_s):
            progress.tick()

    thread = threading.Thread(target=beat, name="gradalign-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


class Advance(Protocol):
    """What `bar` yields: `advance(n)` counts n steps done; `note` is shown in log lines."""

    note: str

    def __call__(self, n: int = 1) -> None: ...


class _RichAdvance:
    def __init__(self, progress: Progress, task: TaskID) -> None:
        self.progress, self.task, self.note = progress, task, ""

    def __call__(self, n: int = 1) -> None:
        self.progress.advance(self.task, n)


class _Silent:
    note = ""

    def __call__(self, n: int = 1) -> None:
        pass


@contextmanager
def bar(description: str, total: int) -> Iterator[Advance]:
    """A transient progress bar on a terminal, progress lines in a log; yields `advance(n)`
    (with a settable `note` string shown in the log lines)."""
    if QUIET:
        yield _Silent()
        return
    if not console.is_terminal:
        lines = LineProgress(description, total)
        with _heartbeat(lines):
            yield lines
        return
    with Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        yield _RichAdvance(progress, progress.add_task(description, total=total))


def log(message: str) -> None:
    """One line of the run's log, never wrapped (a file or pipe gets it whole, for grep)."""
    console.print(message, markup=False, soft_wrap=True)


def one_line_warning(
    message: Warning | str, category: type[Warning], filename: str, lineno: int, line=None
) -> str:
    """A Python warning as one line, ``file.py:12: FutureWarning: text``, without the source
    line `warnings.formatwarning` prints under it (set by the `gradalign` command)."""
    text = " ".join(str(message).split())
    return f"{Path(filename).name}:{lineno}: {category.__name__}: {text}\n"
