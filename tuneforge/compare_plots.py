"""The comparison's figures, each titled, with a caption for the report: the trade-off (task gain vs
forgetting, marker size = cost, Pareto front drawn), task metric vs trainable parameters, forgetting per
run, and the training-loss curves. With several seeds: means, error bars (± one standard deviation) and
bands."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from tuneforge.compare_summary import COST_FIELDS, COST_WORDS, cost_text
from tuneforge.metrics import read_metrics
from tuneforge.plotting import MARKERS, colour, pyplot, save
from tuneforge.tradeoff import mean_spread, pareto_front


@dataclass(frozen=True)
class Plot:
    path: Path
    title: str
    caption: str


def _colours(rows: list[dict]) -> dict[str, str]:
    """One colour per row, the same in every figure."""
    return {row["run"]: colour(index) for index, row in enumerate(rows)}


def _err(row: dict, key: str) -> float:
    return row.get("spread", {}).get(key) or 0.0


def _seed_note(rows: list[dict]) -> str:
    seeds = max(len(row["seeds"]) for row in rows)
    return f" Error bars: ± one standard deviation over {seeds} seeds." if seeds > 1 else ""


def _marker_sizes(values: list[float]) -> list[float]:
    """Marker areas from 60 to 900 pt², by the square root of the cost (its range spans decades)."""
    roots = [math.sqrt(max(v, 0.0)) for v in values]
    top = max(roots) or 1.0
    return [60 + 840 * r / top for r in roots]


def tradeoff_plot(rows: list[dict], output: Path, cost: str) -> Plot | None:
    field = COST_FIELDS[cost]
    shown = [r for r in rows if r["task_gain"] is not None and r["forgetting_pct"] is not None
             and r[field] is not None]
    if not shown:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 5.5))
    sizes, colours = _marker_sizes([r[field] for r in shown]), _colours(rows)
    for index, (row, size) in enumerate(zip(shown, sizes)):
        point = (row["task_gain"], row["forgetting_pct"])
        axis.scatter(*point, s=size, color=colours[row["run"]], marker=MARKERS[index % len(MARKERS)],
                     alpha=0.8, zorder=3, edgecolors="black" if row.get("pareto") else "none", linewidths=1.5)
        if _err(row, "task_gain") or _err(row, "forgetting_pct"):
            axis.errorbar(*point, xerr=_err(row, "task_gain"), yerr=_err(row, "forgetting_pct"), fmt="none",
                          ecolor="#222", elinewidth=1.2, capsize=4, zorder=4)
        offset = math.sqrt(size) / 2 + 3  # clear of the marker, whatever its size
        axis.annotate(f"{row['run']}\n{cost_text(row[field], cost)}", point, textcoords="offset points",
                      xytext=(offset, offset), fontsize=10, zorder=5)
    # The front of the two plotted axes (more gain, less forgetting), as a staircase through its points.
    front = sorted((shown[i] for i in pareto_front([(-r["task_gain"], r["forgetting_pct"]) for r in shown])),
                   key=lambda r: r["task_gain"])
    if len(front) > 1:
        axis.step([r["task_gain"] for r in front], [r["forgetting_pct"] for r in front], where="pre",
                  color="#333", linestyle="--", linewidth=1.2, zorder=1,
                  label="Pareto front (task gain vs forgetting)")
        axis.legend(loc="upper left", frameon=False)
    axis.axhline(0, color="black", linewidth=0.8)
    metric = rows[0]["task_metric"]
    unit = "loss decrease, nats" if metric == "loss" else "accuracy increase"
    axis.set_xlabel(f"task gain ({unit}) → better")
    axis.set_ylabel("forgetting: retain perplexity change (%) ↓ better")
    axis.set_title(f"Task gain vs forgetting (marker size: {COST_WORDS[cost]})")
    axis.margins(x=0.15, y=0.2)
    caption = (f"What each run learned (right is better) against what it forgot (down is better); the "
               f"marker's area grows with {COST_WORDS[cost]}. The dashed staircase joins the runs no other "
               "run beats on both axes; a black edge marks the runs on the front of all three (gain, "
               f"forgetting, {COST_WORDS[cost]})." + _seed_note(rows))
    return Plot(save(figure, output / "tradeoff.png"), "Task gain vs forgetting", caption)


def metric_plot(rows: list[dict], output: Path) -> Plot:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 5))
    metric = rows[0]["task_metric"]
    for index, row in enumerate(rows):
        if not row["steps"]:  # untrained: no parameters to put on a log axis, so a reference line
            axis.axhline(row["task"], color=colour(index), linestyle="--",
                         label=f"{row['run']} (no training): {row['task']:.3f}")
            continue
        axis.errorbar(row["trainable_params"], row["task"], yerr=_err(row, "task"), color=colour(index),
                      marker=MARKERS[index % len(MARKERS)], markersize=9, capsize=3, linestyle="none")
        axis.annotate(row["run"], (row["trainable_params"], row["task"]), textcoords="offset points",
                      xytext=(8, 6), fontsize=10)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log scale)")
    better = "lower" if metric == "loss" else "higher"
    axis.set_ylabel(f"task {metric} after training ({better} is better)")
    axis.set_title(f"Task {metric} vs trainable parameters")
    if axis.get_legend_handles_labels()[0]:
        axis.legend(loc="best", frameon=False)
    axis.margins(x=0.2)
    caption = (f"Eval {metric} after training against the number of trained parameters (log scale); the "
               "dashed line is the untrained model." + _seed_note(rows))
    return Plot(save(figure, output / "metric_vs_params.png"), f"Task {metric} vs trainable parameters",
                caption)


def forgetting_plot(rows: list[dict], output: Path) -> Plot | None:
    shown = [r for r in rows if r["forgetting_pct"] is not None]
    if not shown:
        return None
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 0.6 * len(shown) + 1.6))
    shown = sorted(shown, key=lambda r: r["forgetting_pct"])
    errors = [_err(r, "forgetting_pct") for r in shown]
    axis.barh([r["run"] for r in shown], [r["forgetting_pct"] for r in shown],
              xerr=errors if any(errors) else None, capsize=3,
              color=[colour(3) if r["forgetting_pct"] > 0 else colour(0) for r in shown])
    axis.axvline(0, color="black", linewidth=0.8)
    axis.set_xlabel("retain perplexity change after training (%): > 0 = forgot")
    axis.set_title("Forgetting: retain perplexity change per run")
    axis.grid(axis="y", alpha=0)
    caption = ("How much worse (orange, > 0) or better (blue) each run models the retain set, "
               "original-domain text none of them trained on, relative to the model before training."
               + _seed_note(rows))
    return Plot(save(figure, output / "forgetting.png"), "Forgetting per run", caption)


SMOOTHING = 5  # logged points in the moving average of the training-loss curves


def moving_average(values: list[float], window: int = SMOOTHING) -> list[float]:
    """Each value averaged with its neighbours (a centred window, shorter at the ends)."""
    half = window // 2
    return [sum(values[max(0, i - half):i + half + 1]) / len(values[max(0, i - half):i + half + 1])
            for i in range(len(values))]


def curves_plot(rows: list[dict], run_dirs: dict[str, Path], output: Path) -> Plot:
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8.5, 5))
    colours = _colours(rows)
    for row in (r for r in rows if r["steps"]):
        curves = []
        for name in row["runs"]:
            records = read_metrics(run_dirs[name] / "metrics.jsonl")
            curves.append({r["step"]: r["loss"] for r in records if "split" not in r and "loss" in r})
        steps = sorted(set.intersection(*(set(c) for c in curves))) if curves else []
        if not steps:
            continue
        smoothed = [moving_average([c[s] for s in steps]) for c in curves]  # one curve per seed
        stats = [mean_spread([curve[i] for curve in smoothed]) for i in range(len(steps))]
        means = [m for m, _ in stats]
        axis.plot(steps, means, color=colours[row["run"]], label=row["run"], linewidth=1.8)
        if len(curves) > 1:
            axis.fill_between(steps, [m - (s or 0) for m, s in stats], [m + (s or 0) for m, s in stats],
                              color=colours[row["run"]], alpha=0.2, linewidth=0)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss (task, nats)")
    axis.set_title("Training loss per run")
    axis.legend(loc="upper left", bbox_to_anchor=(1.01, 1), frameon=False)  # beside the curves, not on them
    seeds = max(len(row["seeds"]) for row in rows)
    band = f" Lines: mean over {seeds} seeds; bands: ± one standard deviation." if seeds > 1 else ""
    caption = (f"The task loss on training batches as each run trained, a moving average over {SMOOTHING} "
               "logged points (single batches are noisy)." + band)
    return Plot(save(figure, output / "loss_curves.png"), "Training loss per run", caption)


def write_plots(rows: list[dict], run_dirs: dict[str, Path], output: Path, cost: str) -> list[Plot]:
    """Every figure of the report, in the order it shows them (rows hold means; their `runs` name the run
    directories the curves are read from)."""
    plots = [tradeoff_plot(rows, output, cost), metric_plot(rows, output), forgetting_plot(rows, output),
             curves_plot(rows, run_dirs, output)]
    return [plot for plot in plots if plot is not None]
