"""Progress bars and log lines (rich), kept out of the algorithm modules.

The core takes plain `advance(n)` callables; this module turns them into rich progress
bars on a terminal, and into nothing when output is not a terminal (CI logs).
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

# under torchrun / accelerate launch only rank 0 shows progress, logs and tables
QUIET = int(os.environ.get("RANK", "0")) != 0
if QUIET:  # the same warnings come from rank 0
    warnings.simplefilter("ignore")
console = Console(highlight=False, quiet=QUIET)
if not console.is_terminal:  # logs and pipes: wide enough for the comparison tables
    console.width = 160


@contextmanager
def bar(description: str, total: int) -> Iterator[Callable[[int], None]]:
    """A transient progress bar; yields `advance(n)`."""
    if QUIET or not console.is_terminal:
        yield lambda n=1: None
        return
    with Progress(
        TextColumn("  {task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        console=console,
        transient=True,
    ) as progress:
        task = progress.add_task(description, total=total)
        yield lambda n=1: progress.advance(task, n)


def log(message: str) -> None:
    console.print(message, markup=False)
