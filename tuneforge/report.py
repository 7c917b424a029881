"""Run reports: a before/after table with relative changes, one loss figure, samples side by side, and a
console summary. Numbers follow `tuneforge.formatting`."""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.checkpoint import write_atomic
from tuneforge.formatting import MISSING, change_cell, decimals_for, fixed, relative_change, significant
from tuneforge.metrics import read_metrics

# Significant figures per metric; each row's before, after and change share the row's decimals.
METRIC_SIG = {"loss": 4, "perplexity": 4, "accuracy": 3}
# Train-record fields that are not loss terms.
NOT_TERMS = {"step", "epoch", "loss", "lr", "tokens_per_s", "grad_norm", "task", "split"}


def metric_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows for the task eval set(s) and the retain set; the change is
    absolute, then relative in %: `-1.903 (-57.5%)`."""
    rows = []
    splits = [(results["before"].get("eval", {}), results["after"].get("eval", {}), "task")]
    for name, after in results["after"].get("tasks", {}).items():
        splits.append((results["before"].get("tasks", {}).get(name, {}), after, f"task {name}"))
    splits.append((results["before"].get("retain", {}), results["after"].get("retain", {}), "retain"))
    for before, after, label in splits:
        for key in ("loss", "perplexity", "accuracy"):
            if key in before and key in after:
                decimals = decimals_for([before[key], after[key]], METRIC_SIG[key])
                change = change_cell(after[key] - before[key], relative_change(before[key], after[key]),
                                     decimals)
                rows.append((f"{label} {key}", fixed(before[key], decimals), fixed(after[key], decimals),
                             change))
    return rows + benchmark_rows(results)


def benchmark_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows for the lm-eval benchmarks, in points (% of documents)."""
    rows = []
    before_all = results["before"].get("benchmarks", {})
    for task, after in results["after"].get("benchmarks", {}).items():
        before = before_all.get(task, {})
        if after.get("value") is None or before.get("value") is None:
            continue
        b, a = 100 * before["value"], 100 * after["value"]
        change = change_cell(a - b, None, 1)
        rows.append((f"benchmark {task} {after['metric']} (%)", fixed(b, 1), fixed(a, 1), f"{change} points"))
    return rows


def benchmark_note(results: dict) -> list[str]:
    """How each benchmark was run, with its chance level (multiple choice)."""
    notes = []
    for task, after in results["after"].get("benchmarks", {}).items():
        chance = f", chance {fixed(100 * after['chance'], 1)}%" if after.get("chance") is not None else ""
        notes.append(f"{task}: {after['n']} documents, {after['num_fewshot']}-shot{chance}")
    if not notes:
        return []
    return ["", ("Benchmarks (lm-evaluation-harness, before with injected modules disabled): "
                 + "; ".join(notes) + ". A fall in points is forgetting.")]


def cost_rows(results: dict) -> list[tuple[str, str]]:
    total, trainable = results["total_params"], results["trainable_params"]
    rows = [
        ("trainable parameters",
         f"{trainable:,} of {total:,} ({significant(100 * trainable / max(total, 1))}%)"),
        ("trainable by strategy",
         ", ".join(f"{k}: {v:,}" for k, v in results["trainable_by_strategy"].items())),
        ("optimizer steps", f"{results['steps']:,}"),
        ("training time", (f"{significant(results['train_seconds'])} s "
                          f"(wall {significant(results['wall_seconds'])} s with evaluation)")),
        ("throughput", f"{significant(results['tokens_per_s'])} tokens/s (non-padding)"),
        ("peak memory", f"{significant(results['peak_memory_mb'])} MiB"),
    ]
    if "adapter_bytes" in results:
        rows.append(("adapter size", f"{significant(results['adapter_bytes'] / 2**20)} MiB"))
    return rows


def _endpoints(results: dict | None, split: str, steps: int) -> list[tuple[int, float]]:
    """(step, loss) before training and after it, from results.json, for a curve with no periodic eval."""
    if not results:
        return []
    points = [(0, results["before"].get(split, {}).get("loss")),
              (steps, results["after"].get(split, {}).get("loss"))]
    return [(step, loss) for step, loss in points if loss is not None]


def write_loss_plot(run_dir: Path) -> Path | None:
    """`loss.png`: task loss (train), eval loss and each strategy's loss term on the left axis; retain loss
    (forgetting) on the right axis. Before/after evaluations from results.json anchor both ends."""
    from tuneforge.plotting import colour, pyplot, save

    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
    if not train:
        return None
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else None
    last = max(r["step"] for r in train)
    evals = [r for r in records if r.get("split") == "eval"]
    plt = pyplot()
    figure, axis = plt.subplots(figsize=(8, 4.5))
    lines = []
    for index, task in enumerate(dict.fromkeys(r.get("task") for r in train)):
        mine = [r for r in train if r.get("task") == task]
        label = "task loss (train)" + (f", {task}" if task else "")
        lines += axis.plot([r["step"] for r in mine], [r["loss"] for r in mine], color=colour(index),
                           label=label)
    eval_points = sorted({**dict(_endpoints(results, "eval", last)),
                          **{r["step"]: r["loss"] for r in evals if "loss" in r}}.items())
    if eval_points:
        lines += axis.plot(*zip(*eval_points), "o-", color=colour(2), label="eval loss")
    terms = sorted({key for r in train for key in r if key not in NOT_TERMS
                    and isinstance(r[key], (int, float))})
    for index, term in enumerate(terms):
        steps = [r for r in train if term in r]
        lines += axis.plot([r["step"] for r in steps], [r[term] for r in steps], ":", color=colour(4 + index),
                           label=f"{term} term (train)")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("task loss and loss terms (nats)")
    retain_points = sorted({**dict(_endpoints(results, "retain", last)),
                            **{r["step"]: r["retain_loss"] for r in evals if "retain_loss" in r}}.items())
    if retain_points:
        right = axis.twinx()
        right.spines["right"].set_visible(True)
        right.grid(False)
        lines += right.plot(*zip(*retain_points), "s--", color=colour(3), label="retain loss (forgetting)")
        # at least ±5% of the retain loss around its values, so that a tiny change looks tiny
        values = [loss for _, loss in retain_points]
        middle, half = (max(values) + min(values)) / 2, (max(values) - min(values)) / 2
        half = max(half * 1.15, 0.05 * abs(values[0]))
        right.set_ylim(middle - half, middle + half)
        right.set_ylabel("retain loss (nats; up = forgetting)", color=colour(3))
        right.tick_params(axis="y", colors=colour(3))
    axis.set_title(f"{run_dir.name}: what it learned and what it forgot")
    axis.legend(lines, [line.get_label() for line in lines], loc="upper center",
                bbox_to_anchor=(0.5, -0.15), ncol=min(3, len(lines)), frameon=False)
    return save(figure, run_dir / "loss.png")


def continual_section(continual: dict | None, title: str = "Continual learning") -> list[str]:
    """The task x task result matrix R[i][j] (row: after training task i) with ACC, BWT and FWT."""
    if not continual:
        return []
    names = continual["tasks"]
    metric = continual["metric"]
    decimals = decimals_for([v for row in [continual["baseline"], *continual["matrix"]] for v in row],
                            METRIC_SIG.get(metric, 4))
    lines = ["", f"## {title}", "",
             f"R[i][j] = {metric} on task j after training task i (b = before any training):", "",
             "| after \\ on | " + " | ".join(names) + " |", "|---" + "|---:" * len(names) + "|"]
    lines.append("| b (base) | " + " | ".join(fixed(v, decimals) for v in continual["baseline"]) + " |")
    for name, row in zip(names, continual["matrix"]):
        lines.append(f"| {name} | " + " | ".join(fixed(v, decimals) for v in row) + " |")
    summary = ", ".join(f"{key.upper()} {fixed(continual[key], decimals, signed=True)}"
                        for key in ("acc", "bwt", "fwt") if key in continual)
    return lines + ["", summary + " (Lopez-Paz & Ranzato 2017; BWT < 0 means forgetting)."]


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or MISSING


def sample_rows(results: dict) -> list[str]:
    """Greedy generations before and after training, side by side, as Markdown table lines."""
    before = results["before"].get("samples", [])
    after = results["after"].get("samples", [])
    if not after:
        return []
    lines = ["| prompt | reference | before | after |", "|---|---|---|---|"]
    for i, sample in enumerate(after):
        earlier = before[i]["output"] if i < len(before) else MISSING
        lines.append(f"| {_cell(sample['prompt'])} | {_cell(sample['reference'])} | {_cell(earlier)} "
                     f"| {_cell(sample['output'])} |")
    return lines


def write_report(run_dir: Path, results: dict) -> Path:
    from tuneforge.strategies import default_parametrization

    plot = write_loss_plot(run_dir)
    listed = ", ".join(next(iter(s)) for s in results["strategies"])
    strategies = listed or f"{default_parametrization().name} (default)"
    lines = [f"# tuneforge run: {run_dir.name}", "",
             f"Model `{results['model']}`; strategies: {strategies}.", ""]
    lines += ["## What it learned and what it forgot", "",
              "| metric | before | after | change (relative) |", "|---|---:|---:|---:|"]
    lines += [f"| {m} | {b} | {a} | {c} |" for m, b, a, c in metric_rows(results)]
    lines += ["", ("Loss: mean token cross-entropy in nats (lower is better). Forgetting shows as the retain "
              "rows going up: original-domain text the run did not train on.")]
    lines += benchmark_note(results)
    lines += continual_section(results.get("continual"))
    lines += ["", "## What it cost", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cost_rows(results)]
    if results.get("skipped"):  # data.skip_invalid
        lines += ["", "## Skipped records", "",
                  f"{results['skipped']['count']} invalid record(s) left out; the first:", ""]
        lines += [f"- `{message}`" for message in results["skipped"]["examples"]]
    if plot is not None:
        lines += ["", "## Loss", "", f"![Task, eval and retain loss over training]({plot.name})", "",
                  ("Left axis: the task loss on training batches, the eval loss and each strategy's own loss "
                  "term. Right axis: the retain loss; a rise means the run forgot. Step 0 is the model "
                  "before training.")]
    samples = sample_rows(results)
    if samples:
        lines += ["", "## Samples (greedy), before and after", "", *samples]
    path = run_dir / "report.md"
    write_atomic(path, "\n".join(lines) + "\n")
    return path


def console_summary(results: dict) -> str:
    """The before/after table and costs as plain text for the terminal."""
    rows = [("metric", "before", "after", "change (relative)"), *metric_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i])
                       for i, cell in enumerate(row)) for row in rows]
    lines.append("")
    lines += [f"{k}: {v}" for k, v in cost_rows(results)]
    for sample in results["after"].get("samples", [])[:3]:
        lines += ["", f"Q: {sample['prompt']}", f"A: {sample['output']}"]
    return "\n".join(lines)
