"""Markdown pieces the benchmark reports share."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def fmt(x: float | None, digits: int = 4) -> str:
    """A figure with ``digits`` decimals, or n/a."""
    return "n/a" if x is None else f"{x:.{digits}f}"


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table of ``rows`` under ``header``."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
