"""Figures for run reports, written as PNG (matplotlib, Agg backend: no display needed).

- :func:`learning_curves`: one line per method, the mean over seeds with a 95% confidence
  band (Student-t interval of the mean over seeds; no band for a single seed).
- :func:`bar_chart`: one bar per label with optional error bars.
- :func:`markdown_table`: a table for ``report.md``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

def mean_and_ci(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean over axis 0 (seeds) and the half-width of its 95% Student-t interval
    (:func:`trainkit.stats.mean_ci`; NaN entries left out per column). A 1-D input is one
    seed's curve (no interval): pass ``[seeds, 1]`` for a scalar per seed."""
    from trainkit.stats import mean_ci

    values = np.asarray(values, dtype=np.float64)
    mean, half, _ = mean_ci(values[None] if values.ndim == 1 else values)
    return mean, half


def _pyplot():
    os.environ.setdefault("MPLCONFIGDIR", os.path.join(os.environ.get("TMPDIR", "/tmp"), "mpl-trainkit"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def learning_curves(path: str | Path, curves: Mapping[str, tuple[Sequence[float], np.ndarray]], *,
                    xlabel: str = "step", ylabel: str = "", title: str = "",
                    logy: bool = False, references: Mapping[str, float] | None = None) -> Path:
    """``curves[label] = (steps [N], values [seeds, N] or [N])``: mean line, 95% CI band.
    ``references[label] = y`` draws dashed horizontal lines (a loss floor, a paper's number)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for label, (steps, values) in curves.items():
        mean, ci = mean_and_ci(values)
        seeds = 1 if np.ndim(values) == 1 else np.shape(values)[0]
        line, = ax.plot(steps, mean, label=f"{label} (n={seeds})" if seeds > 1 else label)
        if seeds > 1:
            low = mean - ci
            if logy:  # a band reaching below zero cannot be drawn on a log axis: clip it
                low = np.maximum(low, 0.1 * mean)
            ax.fill_between(steps, low, mean + ci, color=line.get_color(), alpha=0.2,
                            linewidth=0)
    for label, y in (references or {}).items():
        ax.axhline(y, linestyle="--", color="gray", linewidth=1, label=label)
    if logy:
        ax.set_yscale("log")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3)
    if curves or references:
        ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def bar_chart(path: str | Path, labels: Sequence[str], values: Sequence[float], *,
              errors: Sequence[float] | None = None, ylabel: str = "", title: str = "") -> Path:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(4, 0.8 * len(labels) + 2), 4), dpi=110)
    ax.bar(range(len(labels)), values, yerr=errors, capsize=4 if errors is not None else 0)
    ax.set_xticks(range(len(labels)), labels, rotation=30 if len(labels) > 4 else 0, ha="right"
                  if len(labels) > 4 else "center")
    ax.set_ylabel(ylabel)
    if title:
        ax.set_title(title)
    ax.grid(alpha=0.3, axis="y")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[Sequence[Any]], headers: Sequence[str]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)
