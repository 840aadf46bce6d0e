"""Sweep results: one row per (prompt, grid point), with metrics, exports and a summary.

Metrics of a row (``row.metrics``):

* the response's ``diagnostics``, flattened (nested keys joined with ``.``; lists such as
  per-step arrays are left out), plus ``finish_reason`` and ``completion_tokens``;
* ``overlap`` — token overlap with the *reference* row of the same prompt: the fraction
  of positions ``i < max(len(a), len(b))`` where both outputs have a token and the token
  ids agree (so a length difference counts as disagreement; two empty outputs overlap
  1.0). The reference is the first grid point whose swept values are all 0 (the
  unsteered point, e.g. λ = 0), else the first grid point. Meaningful with greedy
  decoding or a fixed ``seed``;
* ``distinct_2`` — distinct bigrams / bigrams of the row's token ids (0.0 for outputs
  shorter than two tokens).
"""

from __future__ import annotations

import csv
import json
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from clients._format import aligned
from clients._grid import expand_grid, reference_index
from clients.types import GenerateResponse

_FIXED = ("prompt_index", "prompt")
#: What ``str(result)`` shows (those present); ``summary()`` has every numeric metric.
SHOWN_METRICS = (
    "overlap", "distinct_2", "completion_tokens", "base_ppl", "style_ppl", "js_mean",
    "kl_base_steered_mean", "argmax_flip_rate",
)
_TAIL = ("text", "token_ids")


def token_overlap(a: Sequence[int], b: Sequence[int]) -> float:
    """Fraction of positions (over the longer sequence) where the token ids agree."""
    n = max(len(a), len(b))
    if n == 0:
        return 1.0
    return sum(1 for x, y in zip(a, b, strict=False) if x == y) / n


def distinct_n(token_ids: Sequence[int], n: int = 2) -> float:
    """Distinct n-grams / n-grams (0.0 when there is no n-gram)."""
    grams = [tuple(token_ids[i : i + n]) for i in range(len(token_ids) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dict → ``{"a.b": scalar}``; lists and other containers are dropped."""
    out: dict[str, Any] = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, name + "."))
        elif value is None or isinstance(value, (str, int, float, bool)):
            out[name] = value
    return out


@dataclass
class SweepRow:
    """One generation of a sweep."""

    prompt_index: int
    prompt: str
    params: dict[str, Any]
    text: str
    token_ids: list[int]
    metrics: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        """A flat dict: prompt, params by path, text, token ids, then metrics."""
        return {
            "prompt_index": self.prompt_index, "prompt": self.prompt, **self.params,
            "text": self.text, "token_ids": self.token_ids, **self.metrics,
        }


class SweepResult:
    """The rows of a sweep, in (prompt, grid point) order."""

    def __init__(self, grid: Mapping[str, Sequence[Any]], rows: list[SweepRow]) -> None:
        self.grid = {k: list(v) for k, v in grid.items()}
        self.rows = rows

    @classmethod
    def from_responses(
        cls,
        prompts: Sequence[str | list[int]],
        grid: Mapping[str, Sequence[Any]],
        responses: Sequence[Sequence[GenerateResponse]],
    ) -> SweepResult:
        """``responses[p][g]`` answers prompt ``p`` at point ``g`` of ``expand_grid(grid)``."""
        points = expand_grid(grid)
        ref = reference_index(points)
        rows: list[SweepRow] = []
        for p, (prompt, per_point) in enumerate(zip(prompts, responses, strict=True)):
            if len(per_point) != len(points):
                raise ValueError(f"prompt {p}: {len(per_point)} results for {len(points)} points")
            reference = per_point[ref].token_ids
            for params, r in zip(points, per_point, strict=True):
                metrics = flatten(r.diagnostics or {})
                metrics.update(
                    finish_reason=r.finish_reason,
                    completion_tokens=r.usage.completion_tokens,
                    overlap=token_overlap(r.token_ids, reference),
                    distinct_2=distinct_n(r.token_ids, 2),
                )
                text = prompt if isinstance(prompt, str) else json.dumps(prompt)
                rows.append(SweepRow(p, text, dict(params), r.text, list(r.token_ids), metrics))
        return cls(grid, rows)

    # ------------------------------------------------------------------ summary

    def metric_names(self) -> list[str]:
        """Metric names in first-seen order."""
        names: dict[str, None] = {}
        for row in self.rows:
            names.update(dict.fromkeys(row.metrics))
        return list(names)

    def numeric_metrics(self) -> list[str]:
        """Metrics that are numbers in every row that has them (bools count as 0/1)."""
        out = []
        for name in self.metric_names():
            values = [r.metrics.get(name) for r in self.rows]
            present = [v for v in values if v is not None]
            if present and all(isinstance(v, (int, float)) for v in present):
                out.append(name)
        return out

    def summary(self, metrics: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Per grid point: the params, ``n`` prompts, and ``<metric>_mean`` /
        ``<metric>_std`` (sample std; 0.0 with one prompt) of each numeric metric."""
        names = list(metrics) if metrics is not None else self.numeric_metrics()
        groups: dict[str, list[SweepRow]] = {}
        for row in self.rows:
            groups.setdefault(json.dumps(row.params, sort_keys=True), []).append(row)
        out = []
        for point in expand_grid(self.grid):
            rows = groups.get(json.dumps(point, sort_keys=True), [])
            entry: dict[str, Any] = {**point, "n": len(rows)}
            for name in names:
                xs = [float(v) for r in rows if (v := r.metrics.get(name)) is not None]
                xs = [x for x in xs if not math.isnan(x)]
                entry[f"{name}_mean"] = statistics.fmean(xs) if xs else math.nan
                entry[f"{name}_std"] = statistics.stdev(xs) if len(xs) > 1 else 0.0
            out.append(entry)
        return out

    def __len__(self) -> int:
        return len(self.rows)

    def __str__(self) -> str:
        present = set(self.numeric_metrics())
        shown = [m for m in SHOWN_METRICS if m in present]
        return format_summary(self.summary(shown), list(self.grid))

    def __repr__(self) -> str:
        return f"SweepResult(grid={self.grid!r}, rows={len(self.rows)})"

    # ------------------------------------------------------------------ exports

    def records(self) -> list[dict[str, Any]]:
        """One flat dict per row (see :meth:`SweepRow.record`)."""
        return [r.record() for r in self.rows]

    def columns(self) -> list[str]:
        """CSV column order: prompt_index, prompt, the grid paths, text, token_ids,
        then metrics (``from_csv`` relies on params sitting between prompt and text)."""
        return [*_FIXED, *self.grid, *_TAIL, *self.metric_names()]

    def to_csv(self, path: str | Path) -> Path:
        """Write one line per row; token ids and non-string params as JSON."""
        path = Path(path)
        with path.open("w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=self.columns())
            writer.writeheader()
            for rec in self.records():
                writer.writerow({k: _cell(k, v) for k, v in rec.items()})
        return path

    @classmethod
    def from_csv(cls, path: str | Path) -> SweepResult:
        """Read back what :meth:`to_csv` wrote."""
        with Path(path).open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            cols = list(reader.fieldnames or [])
            lines = list(reader)
        keys = cols[len(_FIXED) : cols.index("text")]
        metric_cols = cols[cols.index("token_ids") + 1 :]
        rows = []
        for line in lines:
            params = {k: _parse(line[k]) for k in keys}
            metrics = {k: _parse(line[k]) for k in metric_cols if line[k] != ""}
            rows.append(SweepRow(
                int(line["prompt_index"]), line["prompt"], params, line["text"],
                json.loads(line["token_ids"]), metrics,
            ))
        grid: dict[str, list[Any]] = {k: [] for k in keys}
        for row in rows:
            for k in keys:
                if row.params[k] not in grid[k]:
                    grid[k].append(row.params[k])
        return cls(grid, rows)

    def to_json(self, path: str | Path) -> Path:
        """Write ``{"grid": ..., "rows": [...], "summary": [...]}``."""
        path = Path(path)
        doc = {"grid": self.grid, "rows": [asdict(r) for r in self.rows],
               "summary": self.summary()}
        path.write_text(json.dumps(doc, indent=1, ensure_ascii=False, default=str) + "\n",
                        encoding="utf-8")
        return path

    @classmethod
    def from_json(cls, path: str | Path) -> SweepResult:
        """Read back what :meth:`to_json` wrote."""
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(doc["grid"], [SweepRow(**r) for r in doc["rows"]])

    def to_pandas(self) -> Any:
        """The rows as a ``pandas.DataFrame`` (needs ``pip install pandas``)."""
        try:
            import pandas as pd
        except ImportError as e:
            raise ImportError("to_pandas() needs pandas: pip install pandas") from e
        return pd.DataFrame(self.records(), columns=self.columns())

    def plot(self, path: str | Path, metrics: Sequence[str] | None = None) -> Path:
        """Save one line chart per metric (mean ± std over prompts) against the first
        swept parameter; one line per combination of the other swept parameters.
        Needs matplotlib; draws off-screen (Agg), never opens a window."""
        from clients._plot import plot_summary

        names = list(metrics) if metrics is not None else ["overlap", "distinct_2"]
        return plot_summary(self.summary(names), list(self.grid), names, Path(path))


def _cell(key: str, value: Any) -> Any:
    """A CSV cell: strings as they are, numbers by repr, the rest as JSON."""
    if isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return value
    return json.dumps(value)


def _parse(cell: str) -> Any:
    """A CSV cell back: JSON if it parses (numbers, lists, true/null), nan/inf, else text."""
    try:
        return json.loads(cell)
    except ValueError:
        pass
    try:
        return float(cell)
    except ValueError:
        return cell


def format_summary(summary: list[dict[str, Any]], keys: Sequence[str]) -> str:
    """The summary as an aligned text table: params, n, then ``mean ± std`` per metric."""
    if not summary:
        return "(empty sweep)"
    metrics = [k[: -len("_mean")] for k in summary[0] if k.endswith("_mean")]
    header = [*keys, "n", *metrics]
    lines = []
    for entry in summary:
        cells = [_fmt(entry[k]) for k in keys] + [str(entry["n"])]
        cells += [f"{_fmt(entry[m + '_mean'])} ± {_fmt(entry[m + '_std'])}" for m in metrics]
        lines.append(cells)
    return aligned(header, lines)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
