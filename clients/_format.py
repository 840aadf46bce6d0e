"""Plain-text tables and key/value listings (the CLI's and ``SweepResult``'s)."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any


def cell(value: Any) -> str:
    """One value as table text: floats to 4 significant digits, containers as JSON."""
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, (list, dict)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """Left-aligned columns with a header; ``(none)`` for no rows."""
    if not rows:
        return "(none)"
    return aligned(columns, [[cell(r.get(c)) for c in columns] for r in rows])


def aligned(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """Cells already as text, in left-aligned columns two spaces apart, under ``header``."""
    widths = [max([len(h), *(len(line[i]) for line in lines)]) for i, h in enumerate(header)]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)).rstrip()
        for line in [list(header), *lines]
    )


def keyvalues(data: Mapping[str, Any]) -> str:
    """``key: value`` lines, keys aligned."""
    if not data:
        return "(empty)"
    width = max(len(k) for k in data)
    return "\n".join(f"{k.ljust(width)}  {cell(v)}" for k, v in data.items())
