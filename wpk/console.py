"""The console every command and benchmark prints its tables on.

On a terminal, rich's tables, with cells that fold onto more lines instead of ending in '…'
(a value folded at 80 columns can still be read; one cut short cannot). Piped into a
file or another program, plain text: no colours, no box drawing, never wrapped or cut, one
line per row, so `benchmark > file` and `grep` see every value whole.
"""
from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

# wide enough that no row of ours is ever wrapped when nothing limits the width
PIPED_WIDTH = 1000


class WpkConsole(Console):
    """A rich Console that prints tables for whoever reads them (see the module's doc)."""

    def print(self, *objects: Any, **kwargs: Any) -> None:
        piped = not self.is_terminal
        for item in objects:
            if isinstance(item, Table):
                _readable(item, piped)
                if piped and item.title:   # a table's title wraps at the table's width
                    super().print(item.title, soft_wrap=True)
                    item.title = None
        super().print(*objects, **kwargs)


def _readable(table: Table, piped: bool) -> None:
    for column in table.columns:
        if column.overflow == "ellipsis":
            column.overflow = "fold"
    if piped:
        table.box = None
        table.show_edge = False
        table.pad_edge = False
        table.padding = (0, 2, 0, 0)
        for column in table.columns:
            column.no_wrap = True


def make_console(stderr: bool = False, **kwargs: Any) -> WpkConsole:
    """`WpkConsole(...)`, as wide as it needs to be when its stream is not a terminal."""
    probe = Console(stderr=stderr, file=kwargs.get("file"),
                    force_terminal=kwargs.get("force_terminal"))
    if not probe.is_terminal:
        kwargs.setdefault("width", PIPED_WIDTH)
        kwargs.setdefault("no_color", True)
        kwargs.setdefault("highlight", False)
    return WpkConsole(stderr=stderr, **kwargs)

