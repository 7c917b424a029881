"""Shared plot style: a colour-blind-safe palette and figures legible at 100% zoom."""

from __future__ import annotations

from pathlib import Path

# Okabe & Ito (2008), "Color Universal Design": distinguishable with every common colour-vision deficiency.
PALETTE = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]
# Line styles and markers on top of colour, so lines stay apart in greyscale too.
LINESTYLES = ["-", "--", "-.", ":"]
MARKERS = ["o", "s", "^", "D", "v", "P", "X", "*"]
DPI = 100  # with the font sizes below, text is 14-16 px tall in the PNG: readable without zooming


def pyplot():
    """matplotlib's pyplot on the Agg backend (no display needed) with tuneforge's style."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from cycler import cycler

    plt.rcParams.update({
        "font.size": 11, "axes.titlesize": 13, "axes.titleweight": "bold", "axes.labelsize": 11,
        "legend.fontsize": 10, "xtick.labelsize": 10, "ytick.labelsize": 10,
        "axes.prop_cycle": cycler(color=PALETTE), "axes.grid": True, "grid.alpha": 0.3,
        "axes.spines.top": False, "axes.spines.right": False,
    })
    return plt


def colour(index: int) -> str:
    return PALETTE[index % len(PALETTE)]


def save(figure, path: Path) -> Path:
    """Write `figure` as a PNG; a failed write (a full disk) names `path`."""
    import matplotlib.pyplot as plt

    from tuneforge.faults import writing

    try:
        with writing(path):
            figure.savefig(path, dpi=DPI, bbox_inches="tight")
    finally:
        plt.close(figure)
    return path
