"""Tables on stdout that fit: an 80-column terminal as well as a log file.

A table's title lines (what it shows, the run or sweep folder) are printed whole above it, each on
its own line: a folder is never cut or wrapped into a column. In a terminal, a table wider than the
screen is shown as blocks of columns, its first column (the run label) repeated in each block; the
label column alone may wrap. Off a terminal (a CI log, `| tee`) every row is one line at the table's
natural width, so the log holds every value whole. No cell is ever shortened with an ellipsis.
"""

from __future__ import annotations

from collections.abc import Sequence

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.measure import Measurement
from rich.table import Table

MIN_LABEL_WIDTH = 12  # a wrapped label column keeps at least this width (or its own, if narrower)


def print_table(columns: Sequence[str], rows: Sequence[Sequence[str]], title: Sequence[str] = (),
                console: Console | None = None) -> None:
    """Print `title` lines, then the table (cells as strings; the first column labels the rows)."""
    console = console or Console()
    for line in title:
        console.print(escape(line), soft_wrap=True, highlight=False)
    if not rows:
        return
    if not console.is_terminal:  # a log: one line per row, however wide
        table = make_table(columns, rows, range(1, len(columns)))
        console.width = max(console.width, natural_width(console, table))  # print's width= cannot widen
        console.print(table)
        return
    whole = make_table(columns, rows, range(1, len(columns)))
    spare = console.width - natural_width(console, whole)  # < 0: something must give
    label_width = max(len(str(r[0])) for r in [columns, *rows])
    if spare >= 0 or label_width + spare >= MIN_LABEL_WIDTH:  # the label wraps, the columns stay together
        console.print(make_table(columns, rows, range(1, len(columns)), label_width + min(spare, 0)))
        return
    label_cap = max(MIN_LABEL_WIDTH, console.width // 3)
    for block in column_blocks(console, columns, rows, label_cap):
        console.print(make_table(columns, rows, block, label_cap))


def column_blocks(console: Console, columns: Sequence[str], rows, label_cap: int) -> list[list[int]]:
    """The value columns (indices from 1) in consecutive blocks that fit the console beside the
    label column wrapped to `label_cap` (a block of one column too wide still shows it whole)."""
    blocks: list[list[int]] = []
    for index in range(1, len(columns)):
        if blocks and natural_width(console, make_table(columns, rows, [*blocks[-1], index], label_cap)) <= console.width:
            blocks[-1].append(index)
        else:
            blocks.append([index])
    return blocks


def make_table(columns: Sequence[str], rows, block, label_cap: int | None = None) -> Table:
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, collapse_padding=True)
    label_width = max(len(str(r[0])) for r in [columns, *rows])
    table.add_column(escape(columns[0]), overflow="fold", min_width=min(label_width, MIN_LABEL_WIDTH), max_width=label_cap)
    for index in block:
        table.add_column(escape(columns[index]), no_wrap=True)
    for row in rows:
        table.add_row(escape(str(row[0])), *(escape(str(row[i])) for i in block))
    return table


def natural_width(console: Console, table: Table) -> int:
    """The width the table takes with nothing wrapped."""
    return Measurement.get(console, console.options.update_width(10**6), table).maximum


def frame_rows(frame, digits: int = 4) -> list[list[str]]:
    """A DataFrame's rows as strings (floats to `digits` decimals)."""
    return [[f"{v:.{digits}f}" if isinstance(v, float) else str(v) for v in row] for row in frame.itertuples(index=False)]
