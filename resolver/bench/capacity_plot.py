"""The capacity plot: answered vs offered rate, loss and p99 on a second axis, the knee marked.

Importing this module needs matplotlib (the ``plot`` extra); ``capacity.write_outputs`` catches
the ImportError and says so in one line. The Agg backend is forced: no display is needed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # after use(): the backend must be chosen first

FIGURE_INCHES = (8.0, 5.0)
DPI = 100  # 800 x 500 pixels: readable, and the PNG stays well under 100 kB


def axis_range(offered: list[float]) -> tuple[float, float]:
    """From 0 for a ramp that starts low; zoomed in for a fine ramp around a knee, where the
    whole range would squeeze every step into one corner."""
    if not offered:
        return 0.0, 1.0
    smallest, largest = min(offered), max(offered)
    margin = max((largest - smallest) * 0.1, largest * 0.01)
    low = 0.0 if smallest <= 2 * (largest - smallest) else smallest - margin
    return low, largest + margin


def plot(path: Path, report: dict[str, Any]) -> None:
    steps = report["steps"]
    offered = [step["offered_pps"] for step in steps]
    answered = [step["answered_pps"] for step in steps]
    loss_pct = [step["loss"] * 100 for step in steps]
    p99 = [step["p99_ms"] if step["p99_ms"] is not None else float("nan") for step in steps]
    figure, rate_axis = plt.subplots(figsize=FIGURE_INCHES, dpi=DPI)
    try:
        low, top = axis_range(offered)
        rate_axis.plot([low, top], [low, top], color="0.8", linestyle=":",
                       label="answered = offered")
        rate_axis.plot(offered, answered, "o-", color="tab:blue", label="answered pps")
        rate_axis.set_xlabel("offered queries/s")
        rate_axis.set_ylabel("answered queries/s", color="tab:blue")
        rate_axis.set_xlim(low, top)
        rate_axis.set_ylim(low, top)
        second_axis = rate_axis.twinx()
        second_axis.plot(offered, loss_pct, "s--", color="tab:red", label="loss %")
        second_axis.plot(offered, p99, "^--", color="tab:orange", label="p99 ms")
        second_axis.set_ylabel("loss % / p99 ms")
        second_axis.set_ylim(bottom=0)
        knee = report.get("knee_pps")
        title = f"capacity of {report.get('target', '?')}"
        if knee is not None:
            knee_offered = next(s["offered_pps"] for s in steps if s["target_pps"] == knee)
            rate_axis.axvline(knee_offered, color="black", linewidth=1)
            rate_axis.annotate(f"knee {knee:g} pps", (knee_offered, low + (top - low) * 0.05),
                               xytext=(5, 0), textcoords="offset points")
            title += f": knee at {knee:g} pps"
        else:
            title += ": no knee within the plan"
        rate_axis.set_title(title)
        handles, labels = rate_axis.get_legend_handles_labels()
        more_handles, more_labels = second_axis.get_legend_handles_labels()
        rate_axis.legend(handles + more_handles, labels + more_labels, loc="upper left")
        rate_axis.grid(True, alpha=0.3)
        figure.tight_layout()
        figure.savefig(path, format="png")
    finally:
        plt.close(figure)
