"""Pictures of a run, for when a person would rather look than read."""

from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Line:
    """One series of a line chart; ``style`` is a matplotlib format string ("-", "o--", ...)."""

    label: str
    xs: list[float]
    ys: list[float | None]
    style: str = "-"


def plot_loss_curves(rows: list[dict[str, Any]], path: Path) -> Path | None:
    """Training loss per step (and eval loss where measured) as a PNG; None if there is nothing to plot."""
    train = [(r["step"], r["loss"]) for r in rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r]
    if not train:
        return None
    fig, ax = pyplot().subplots(figsize=(7, 4), dpi=110)
    ax.plot(*zip(*train), label="train loss", linewidth=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", linewidth=1.5)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per loss token)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_png(fig, path)


def pyplot() -> Any:
    """matplotlib's pyplot on the file-only Agg backend, imported only when a plot is drawn (heavy)."""
    import matplotlib  # noqa: PLC0415

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # noqa: PLC0415

    return plt


def save_png(fig: Any, path: Path) -> Path:
    """Lay out, write and close a figure."""
    fig.tight_layout()
    fig.savefig(path)
    pyplot().close(fig)
    return path


def _png_bytes(fig: Any) -> bytes:
    """Render and close a figure; a report embeds the bytes, so nothing touches the disk."""
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png")
    pyplot().close(fig)
    return buffer.getvalue()


def lines_png(lines: list[Line], *, xlabel: str, ylabel: str, log_y: bool = False) -> bytes:
    """Several (x, y) series on one axis, as PNG bytes; points with a missing y are skipped."""
    fig, ax = pyplot().subplots(figsize=(7, 3.6), dpi=100)
    for line in lines:
        points = [(x, y) for x, y in zip(line.xs, line.ys) if y is not None]
        if points:
            ax.plot(*zip(*points), line.style, label=line.label, linewidth=1.4, markersize=4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.xaxis.set_major_locator(pyplot().MaxNLocator(integer=True))  # steps are whole numbers
    if log_y:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    if len(lines) > 1:
        ax.legend()
    return _png_bytes(fig)


def grouped_bars_png(metrics: list[str], models: list[str], values: dict[str, dict[str, float]]) -> bytes:
    """One small panel per metric with one bar per model (before/after at a glance; panels because
    metrics live on different scales)."""
    plt = pyplot()
    columns = min(len(metrics), 3)
    rows = -(-len(metrics) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3.4 * columns, 2.8 * rows), dpi=100, squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, metric in zip(axes.flat, metrics):
        heights = [values[model][metric] for model in models]
        ax.bar(range(len(models)), heights, color=[colours[i % len(colours)] for i in range(len(models))])
        ax.set_xticks(range(len(models)), models, rotation=15, fontsize=8)
        ax.set_title(metric, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    for ax in list(axes.flat)[len(metrics) :]:
        ax.set_visible(False)
    return _png_bytes(fig)


def interval_png(label: str, delta: float, low: float, high: float) -> bytes:
    """A difference with its confidence interval against the zero line: does the CI exclude zero?"""
    fig, ax = pyplot().subplots(figsize=(7, 1.6), dpi=100)
    ax.errorbar([delta], [0], xerr=[[delta - low], [high - delta]], fmt="o", capsize=6, linewidth=2)
    ax.axvline(0.0, color="grey", linestyle="--", linewidth=1)
    ax.set_yticks([])
    ax.set_xlabel(label)
    ax.grid(axis="x", alpha=0.3)
    return _png_bytes(fig)


def compare_loss_curves(runs: list[tuple[str, list[dict[str, Any]]]], path: Path) -> Path | None:
    """Training loss (solid) and eval loss (dots) of several runs on one axis, written as a PNG."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=110)
    drawn = False
    for index, (name, rows) in enumerate(runs):
        colour = f"C{index % 10}"
        train = [(r["step"], r["loss"]) for r in rows if "loss" in r and "step" in r]
        evals = [(r["step"], r["eval_loss"]) for r in rows if "eval_loss" in r and "step" in r]
        if train:
            ax.plot(*zip(*train), color=colour, linewidth=1.2, label=f"{name} train")
            drawn = True
        if evals:
            ax.plot(*zip(*evals), "o--", color=colour, linewidth=1, label=f"{name} eval")
            drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)
