"""Everything the user sees on screen (rank 0 only): config tree, progress, result tables."""
from __future__ import annotations

import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.syntax import Syntax
from rich.table import Table

console = Console(highlight=False)
errors = Console(stderr=True, highlight=False)


def print_config(yaml_text: str) -> None:
    console.print(Syntax(yaml_text, "yaml", theme="ansi_dark", background_color="default"))


def print_table(title: str, columns: list[str], rows: list[list[object]],
                show_header: bool = True) -> None:
    table = Table(title=title, show_lines=False, show_header=show_header)
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def print_error(message: str) -> None:
    errors.print(f"[bold red]error:[/] {message}", markup=True, soft_wrap=True)


class RequestProgress:
    """Requests finished and tokens/s: a rich bar on a terminal, plain lines otherwise (CI)."""

    def __init__(self, total: int, label: str, enabled: bool = True):
        self.total = total
        self.label = label
        self.enabled = enabled
        self.done = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self._last_line = 0.0
        self._bar = None
        if enabled and console.is_terminal:
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                                 TimeElapsedColumn(), console=console, transient=True)
            self._task = self._bar.add_task(label, total=total, rate="")
            self._bar.start()

    def update(self, num_finished: int, num_tokens: int) -> None:
        self.done += num_finished
        self.tokens += num_tokens
        if not self.enabled:
            return
        rate = f"{self.tokens / max(time.perf_counter() - self.start, 1e-9):.1f} tok/s"
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done, rate=rate)
        elif num_finished and (time.perf_counter() - self._last_line > 2
                               or self.done == self.total):
            self._last_line = time.perf_counter()
            print(f"{self.label}: {self.done}/{self.total} requests, {rate}", file=sys.stdout,
                  flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
