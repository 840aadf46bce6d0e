"""Line charts of a sweep summary (matplotlib, imported only when plotting)."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any


def plot_summary(
    summary: list[dict[str, Any]], keys: Sequence[str], metrics: Sequence[str], path: Path,
    *, tradeoff: bool = False,
) -> Path:
    """One panel per metric: mean ± std against ``keys[0]``, a line per combination of
    the other keys; with ``tradeoff`` a first panel plots mean ``style_ppl`` (x) against
    mean ``base_ppl`` (y), one point per grid point labelled with its ``keys[0]`` value.
    Uses the Agg canvas directly, so pyplot's global state (and any interactive backend
    the caller chose) is left alone."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise ImportError("plot() needs matplotlib: pip install matplotlib") from e

    x_key, others = keys[0], list(keys[1:])
    x_values = list(dict.fromkeys(entry[x_key] for entry in summary))
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in x_values)

    panels = len(metrics) + int(tradeoff)
    fig = Figure(figsize=(5.0 * panels, 3.6), layout="constrained")
    FigureCanvasAgg(fig)
    axes = list(fig.subplots(1, panels, squeeze=False)[0])
    series: dict[str, list[dict[str, Any]]] = {}
    for entry in summary:
        label = ", ".join(f"{k}={entry[k]}" for k in others)
        series.setdefault(label, []).append(entry)
    if tradeoff:
        ax = axes.pop(0)
        for label, entries in series.items():
            xs = [e["style_ppl_mean"] for e in entries]
            ys = [e["base_ppl_mean"] for e in entries]
            ax.plot(xs, ys, marker="o", label=label or None)
            for point, x, y in zip(entries, xs, ys, strict=True):
                ax.annotate(f"{x_key.rsplit('.', 1)[-1]}={point[x_key]}", (x, y),
                            fontsize="small",
                            textcoords="offset points", xytext=(4, 4))
        # Both perplexities span orders of magnitude; lower-left is better on both.
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("style PPL (lower = more in style)")
        ax.set_ylabel("base PPL (lower = more fluent)")
        ax.set_title("trade-off")
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize="small")
    for ax, metric in zip(axes, metrics, strict=True):
        for label, entries in series.items():
            xs = [e[x_key] if numeric else x_values.index(e[x_key]) for e in entries]
            ys = [e.get(f"{metric}_mean", math.nan) for e in entries]
            err = [e.get(f"{metric}_std", 0.0) for e in entries]
            if metric.endswith("_ppl"):
                # Perplexities span orders of magnitude: log axis, no error bars below 0.
                ax.plot(xs, ys, marker="o", label=label or None)
            else:
                ax.errorbar(xs, ys, yerr=err, marker="o", capsize=3, label=label or None)
        if metric.endswith("_ppl"):
            ax.set_yscale("log")
        if not numeric:
            ax.set_xticks(range(len(x_values)), [json.dumps(v) for v in x_values])
        ax.set_xlabel(x_key)
        ax.set_ylabel(metric)
        ax.set_title(metric)
        ax.grid(alpha=0.3)
        if others:
            ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)
    return path
