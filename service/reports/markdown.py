"""Markdown helpers of the reports: number formatting (NaN and None read "n/a") and pipe tables."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any


def fmt(value: float | None, digits: int = 2) -> str:
    """`value` with `digits` decimals; "n/a" for None or NaN (an AUC with one class missing, an empty mean)."""
    return "n/a" if value is None or value != value else f"{value:.{digits}f}"


def pct(share: float | None, digits: int = 1) -> str:
    """A share in [0, 1] as a percentage number (no sign), "n/a" for None or NaN."""
    return fmt(None if share is None else 100 * share, digits)


def cell(value: Any) -> str:
    """A table cell: str(value) with pipes escaped and line breaks flattened (user text must not break the table)."""
    return str(value).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def row(cells: Sequence[Any]) -> str:
    """One table row: `| a | b |`."""
    return "| " + " | ".join(cell(c) for c in cells) + " |"


def table(header: Sequence[Any], rows: Iterable[Sequence[Any]]) -> list[str]:
    """A pipe table as lines: the header, the `|---|` rule, the rows (no blank line around it)."""
    return [row(header), "|---" * len(header) + "|", *(row(r) for r in rows)]


def code_block(text: str) -> list[str]:
    """`text` in a fenced block, the fence longer than any backtick run inside it."""
    longest, run = 0, 0
    for ch in text:
        run = run + 1 if ch == "`" else 0
        longest = max(longest, run)
    fence = "`" * max(3, longest + 1)
    return [fence, text, fence]
