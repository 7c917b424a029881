"""The comparison table: its columns, cells formatted by `tuneforge.formatting`, and the best per column.

One definition serves the terminal, Markdown and HTML. Each cell carries its text and the number it sorts
by; `best` marks the best value of a column among trained runs (the untrained baseline trivially costs
nothing, so it is not ranked).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.formatting import MISSING, change_cell, decimals_for, fixed, si_count, significant, with_spread

FRONT_MARK = "★"  # rows on the Pareto front


@dataclass(frozen=True)
class Column:
    key: str                   # the row field the column shows and sorts by
    header: str                # with its unit
    kind: str = "text"         # text | linear (shared decimals) | change | count | log (per value)
    sig: int = 3               # significant figures (linear: of the column's largest value)
    better: str | None = None  # "lower" or "higher": ranked, best highlighted
    relative: str | None = None  # change: the field with the relative change in %
    spread: bool = False       # show ± the spread over seeds
    terminal: bool = True      # also in the terminal's narrower table
    if_varies: bool = False    # shown only when rows differ (before training, every row is the same model)
    if_present: bool = False   # shown only when some row has a value (benchmarks are configured)


@dataclass(frozen=True)
class Cell:
    text: str
    value: float | str | None
    best: bool = False


def columns(task_metric: str) -> list[Column]:
    loss = task_metric == "loss"
    unit = " (nats)" if loss else ""
    task_better = "lower" if loss else "higher"
    arrow = "↓" if loss else "↑"
    return [
        Column("run", "run"),
        Column("strategies", "strategies", terminal=False),
        Column("task_before", f"task {task_metric} before{unit}", "linear", 4, terminal=False,
               if_varies=True),
        Column("task", f"task {task_metric} after {arrow}{unit}", "linear", 4, task_better, spread=True),
        Column("task_change", f"task {task_metric} change {arrow}", "change", 4, task_better,
               "task_change_pct", spread=True),
        Column("retain_ppl_before", "retain ppl before", "linear", 4, terminal=False, if_varies=True),
        Column("retain_ppl_after", "retain ppl after ↓", "linear", 4, "lower", spread=True, terminal=False),
        Column("retain_ppl_change", "forgetting ↓ (retain ppl change)", "change", 3, "lower",
               "forgetting_pct", spread=True),
        Column("benchmark_change", "benchmark change ↑ (points)", "linear", 3, "higher", spread=True,
               if_present=True),
        Column("trainable_params", "trainable params ↓", "count", 3, "lower"),
        Column("artifact_mib", "artifact ↓ (MiB)", "log", 3, "lower", terminal=False),
        Column("peak_memory_mb", "peak memory ↓ (MiB)", "linear", 4, "lower"),
        Column("train_seconds", "train time ↓ (s)", "linear", 3, "lower"),
        Column("tokens_per_s", "throughput ↑ (tokens/s)", "linear", 3, "higher", terminal=False),
    ]


def with_derived(row: dict) -> dict:
    """Fields the table shows that are computed from others."""
    size = row.get("artifact_bytes")
    return {**row, "artifact_mib": None if size is None else size / 2**20, "spread": row.get("spread", {})}


def sort_value(row: dict, column: Column):
    """What a column ranks and sorts by: a change by its relative value (forgetting is a % of perplexity)."""
    return row.get(column.relative if column.relative else column.key)


def best_values(rows: list[dict], column: Column):
    values = [v for row in rows if row["steps"] and (v := sort_value(row, column)) is not None]
    if column.better is None or len(set(values)) < 2:  # nothing to rank, or every run the same
        return None
    return min(values) if column.better == "lower" else max(values)


def table(rows: list[dict], terminal: bool = False) -> tuple[list[Column], list[list[Cell]]]:
    """The columns and, per row, one Cell per column."""
    rows = [with_derived(row) for row in rows]
    shown = [c for c in columns(rows[0]["task_metric"]) if (c.terminal or not terminal)
             and (not c.if_varies or len({row.get(c.key) for row in rows}) > 1)
             and (not c.if_present or any(row.get(c.key) is not None for row in rows))]
    out = [[] for _ in rows]
    for column in shown:
        values = [row.get(column.key) for row in rows]
        decimals = decimals_for(values, column.sig)
        best = best_values(rows, column)
        for cells, row, value in zip(out, rows, values):
            spread = row["spread"].get(column.key) if column.spread else None
            if column.kind == "text":
                text = str(value) if value is not None else MISSING
                if column.key == "run" and row.get("pareto"):
                    text = f"{FRONT_MARK} {text}"
            elif column.kind == "linear":
                text = with_spread(fixed(value, decimals), spread, decimals)
            elif column.kind == "change":
                text = change_cell(value, row.get(column.relative), decimals, spread)
            elif column.kind == "count":
                text = si_count(value)
            else:
                text = significant(value, column.sig)
            ranked = sort_value(row, column)
            cells.append(Cell(text, ranked, best is not None and row["steps"] > 0 and ranked == best))
    return shown, out
