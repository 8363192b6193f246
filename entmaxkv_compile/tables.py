"""Plain-text tables of the reports (``explain``, ``bench``), laid out by ``rich``.

One function, so every table the package prints has the same look: a header line, a rule, one
line per row, columns as wide as their longest cell (never wrapped, so a line stays greppable),
no colour and no trailing spaces.
"""

from __future__ import annotations

from typing import Sequence

from rich import box
from rich.console import Console
from rich.table import Table

__all__ = ["render_table"]


def render_table(columns: Sequence[str], rows: Sequence[Sequence[str]], *,
                 right: Sequence[str] = ()) -> str:
    """The table of ``rows`` under the header ``columns`` as text; columns named in ``right``
    (numbers) are right-aligned."""
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, highlight=False)
    for name in columns:
        table.add_column(name, justify="right" if name in right else "left", no_wrap=True)
    for row in rows:
        table.add_row(*row)
    console = Console(width=1 << 16, color_system=None, force_terminal=False, highlight=False)
    with console.capture() as captured:
        console.print(table)
    return "\n".join(line.rstrip() for line in captured.get().splitlines() if line.strip())
