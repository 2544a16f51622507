"""A transient rich progress bar over a known number of steps, or nothing when disabled."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def steps(enabled: bool, total: int, description: str):
    """Yields `advance()`: one step done."""
    if not enabled:
        yield lambda: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(description, total=total)
        yield lambda: bar.advance(task)
