"""The probes' end-of-fit figure: values against depth (one line per probe step) and values against step.

matplotlib is imported inside the functions (it is only needed at the end of fit, on rank 0), and only its Agg
canvas is used: no pyplot, no global backend change.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

__all__ = ["Panels", "Series", "depth_figure", "plottable", "scalar_mappable"]

#: ``(ylabel, key, names)`` per depth panel: the value of ``names[i]`` at depth ``i`` is ``entry[f"{key}/{name}"]``.
Panels = Sequence[tuple[str, str, Sequence[str]]]
#: ``(ylabel, [(key, label), ...])`` for the last panel, values against step.
Series = tuple[str, Sequence[tuple[str, str]]]


def _positive(value: float) -> float:
    return value if math.isfinite(value) and value > 0 else math.nan


def _depth_lines(history: list[dict[str, float]], key: str, names: Sequence[str]) -> list[tuple[float, list[float]]]:
    """``(step, values)`` per history entry with a positive value on this panel; non-positive values are NaN (the
    panel is log-scaled)."""
    lines = []
    for h in history:
        ys = [_positive(h.get(f"{key}/{n}", math.nan)) for n in names]
        if not all(math.isnan(y) for y in ys):
            lines.append((h["step"], ys))
    return lines


def _series_points(history: list[dict[str, float]], key: str) -> list[tuple[float, float]]:
    return [(h["step"], h[key]) for h in history if math.isfinite(h.get(key, math.nan))]


def plottable(history: list[dict[str, float]], panels: Panels, series: Series) -> bool:
    """Whether the figure would show at least one curve: a depth line with two or more positive values, or a
    series with two or more finite values."""
    for _, key, names in panels:
        if any(sum(not math.isnan(y) for y in ys) >= 2 for _, ys in _depth_lines(history, key, names)):
            return True
    return any(len(_series_points(history, key)) >= 2 for key, _ in series[1])


def depth_figure(history: list[dict[str, float]], panels: Panels, series: Series, title: str, path: str) -> None:
    """Save a figure: panels "value vs depth, one line per probed step (colour = step)" and one "value vs step".

    Depth panels are log-scaled when they hold a positive value (non-positive values are left out, so matplotlib has
    nothing to complain about); a panel without any says so in its middle.
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * (len(panels) + 1), 4.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    steps = [h["step"] for h in history]
    lo, hi = (min(steps), max(steps)) if steps else (0.0, 1.0)
    cmap = colormaps["viridis"]
    for ax, (ylabel, key, names) in zip(axes, panels, strict=False):
        lines = _depth_lines(history, key, names)
        for step, ys in lines:
            ax.plot(range(len(names)), ys, color=cmap((step - lo) / (hi - lo) if hi > lo else 0.0), lw=1, marker=".")
        ax.set_xlabel("depth (layer index, registration order)")
        ax.set_ylabel(ylabel)
        if lines:
            ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "no positive value recorded", ha="center", va="center", transform=ax.transAxes)
    if steps and len(panels):
        fig.colorbar(scalar_mappable(cmap, lo, hi), ax=axes[len(panels) - 1], label="step")
    ax = axes[-1]
    ylabel, keys = series
    for key, label in keys:
        points = _series_points(history, key)
        if points:
            ax.plot([s for s, _ in points], [v for _, v in points], marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def scalar_mappable(cmap: Any, lo: float, hi: float) -> Any:
    """A colorbar source for ``cmap`` over ``[lo, hi]`` (a unit range when ``hi <= lo``)."""
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1), cmap=cmap)
