"""Sweep grids: expanding ``{path: [values]}`` into points and applying a point to a
request body by dotted path (``"steering.0.lambda"``, ``"temperature"``,
``"steering.0.bias.70"``: list items by index, dict entries by key)."""

from __future__ import annotations

import copy
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

from clients.steering import Ngram, SteeringLike


def expand_grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the last path varying fastest."""
    if not grid:
        raise ValueError("the sweep grid is empty")
    for path, values in grid.items():
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence) or not values:
            raise ValueError(f"grid['{path}'] must be a non-empty list of values")
    keys = list(grid)
    combos = itertools.product(*(grid[k] for k in keys))
    return [dict(zip(keys, combo, strict=True)) for combo in combos]


def set_path(body: dict[str, Any], path: str, value: Any) -> None:
    """Set ``body[a][b]...`` for ``path = "a.b..."`` in place; missing dict keys are
    created, list items must exist (indices ``0 .. len-1``, as the server accepts)."""
    parts = path.split(".")
    node: Any = body
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        where = ".".join(parts[: i + 1])
        if isinstance(node, list):
            # Decimal digits only, like the server: no negative (from-the-end) indices.
            if not part.isdigit() or int(part) >= len(node):
                raise ValueError(
                    f"grid path '{path}': '{where}' is not an index of a list of {len(node)}"
                )
            index = int(part)
            if last:
                node[index] = value
            else:
                node = node[index]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                node = node.setdefault(part, {})
        else:
            raise ValueError(f"grid path '{path}': '{where}' is inside a {type(node).__name__}")


def apply_params(body: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of ``body`` with each ``path → value`` of ``params`` set."""
    out = copy.deepcopy(dict(body))
    for path, value in params.items():
        set_path(out, path, value)
    return out


def ngram_index(steering: Sequence[SteeringLike]) -> int:
    """The index of the first n-gram entry (for the ``lambdas=`` shortcut)."""
    for i, entry in enumerate(steering):
        is_dict_ngram = isinstance(entry, Mapping) and entry.get("type") == "ngram"
        if isinstance(entry, Ngram) or is_dict_ngram:
            return i
    raise ValueError("lambdas= needs an Ngram entry in steering")


def resolve_grid(
    steering: Sequence[SteeringLike] | None,
    grid: Mapping[str, Sequence[Any]] | None,
    lambdas: Sequence[float] | None,
) -> dict[str, list[Any]]:
    """The grid of a sweep call: ``grid`` plus ``lambdas`` as ``steering.<i>.lambda``."""
    out = {k: list(v) for k, v in (grid or {}).items()}
    if lambdas is not None:
        out[f"steering.{ngram_index(steering or [])}.lambda"] = list(lambdas)
    if not out:
        raise ValueError("give grid= or lambdas=")
    return out


def reference_index(points: Sequence[Mapping[str, Any]]) -> int:
    """The "unsteered" point that token overlap is measured against: the first point
    whose swept values are all 0, else the first point."""
    for i, point in enumerate(points):
        if all(_is_zero(v) for v in point.values()):
            return i
    return 0


def _is_zero(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value == 0
