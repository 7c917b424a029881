"""Run reports: a before/after table in Markdown, a loss-curve PNG, and a console summary."""

from __future__ import annotations

from pathlib import Path

from tuneforge.metrics import read_metrics


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def metric_rows(results: dict) -> list[tuple[str, str, str, str]]:
    """(metric, before, after, change) rows for the task eval set(s) and the retain set."""
    rows = []
    splits = [(results["before"].get("eval", {}), results["after"].get("eval", {}), "task")]
    for name, after in results["after"].get("tasks", {}).items():
        splits.append((results["before"].get("tasks", {}).get(name, {}), after, f"task {name}"))
    splits.append((results["before"].get("retain", {}), results["after"].get("retain", {}), "retain"))
    for before, after, label in splits:
        for key in ("loss", "perplexity", "accuracy"):
            if key in before and key in after:
                change = after[key] - before[key]
                rows.append((f"{label} {key}", _fmt(before[key]), _fmt(after[key]), f"{change:+.4g}"))
    return rows


def cost_rows(results: dict) -> list[tuple[str, str]]:
    total, trainable = results["total_params"], results["trainable_params"]
    rows = [
        ("trainable parameters", f"{trainable:,} of {total:,} ({100 * trainable / max(total, 1):.3f}%)"),
        ("trainable by strategy",
         ", ".join(f"{k}: {v:,}" for k, v in results["trainable_by_strategy"].items())),
        ("optimizer steps", _fmt(results["steps"])),
        ("training time",
         f"{results['train_seconds']:.1f} s (wall {results['wall_seconds']:.1f} s with evaluation)"),
        ("throughput", f"{results['tokens_per_s']:.0f} tokens/s (non-padding)"),
        ("peak memory", f"{results['peak_memory_mb']:.0f} MiB"),
    ]
    if "adapter_bytes" in results:
        rows.append(("adapter size", f"{results['adapter_bytes'] / 2**20:.2f} MiB"))
    return rows


def write_loss_plot(run_dir: Path) -> Path | None:
    records = read_metrics(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
    evals = [r for r in records if r.get("split") == "eval" and "loss" in r]
    if not train:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3.5))
    axis.plot([r["step"] for r in train], [r["loss"] for r in train], label="train loss")
    if evals:
        axis.plot([r["step"] for r in evals], [r["loss"] for r in evals], "o-", label="eval loss")
    retain = [r for r in evals if "retain_loss" in r]
    if retain:  # the forgetting curve: retain-set loss at every periodic eval
        axis.plot([r["step"] for r in retain], [r["retain_loss"] for r in retain], "s--", label="retain loss")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.legend()
    axis.grid(alpha=0.3)
    figure.tight_layout()
    path = run_dir / "loss.png"
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def continual_section(continual: dict | None, title: str = "Continual learning") -> list[str]:
    """The task x task result matrix R[i][j] (row: after training task i) with ACC, BWT and FWT."""
    if not continual:
        return []
    names = continual["tasks"]
    metric = continual["metric"]
    lines = ["", f"## {title}", "",
             f"R[i][j] = {metric} on task j after training task i (b = before any training):", "",
             "| after \\ on | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines.append("| b (base) | " + " | ".join(f"{v:.4g}" for v in continual["baseline"]) + " |")
    for name, row in zip(names, continual["matrix"]):
        lines.append(f"| {name} | " + " | ".join(f"{v:.4g}" for v in row) + " |")
    summary = ", ".join(f"{key.upper()} {continual[key]:+.4g}"
                        for key in ("acc", "bwt", "fwt") if key in continual)
    return lines + ["", summary + " (Lopez-Paz & Ranzato 2017; BWT < 0 means forgetting)."]


def write_report(run_dir: Path, results: dict) -> Path:
    from tuneforge.strategies import default_parametrization

    plot = write_loss_plot(run_dir)
    listed = ", ".join(next(iter(s)) for s in results["strategies"])
    strategies = listed or f"{default_parametrization().name} (default)"
    lines = [f"# tuneforge run: {run_dir.name}", "",
             f"Model `{results['model']}`; strategies: {strategies}.", ""]
    lines += ["## What it learned and what it forgot", "",
              "| metric | before | after | change |", "|---|---|---|---|"]
    lines += [f"| {m} | {b} | {a} | {c} |" for m, b, a, c in metric_rows(results)]
    if results.get("forgetting"):
        relative = ""
        before_ppl = results["before"].get("retain", {}).get("perplexity")
        if before_ppl and "perplexity" in results["forgetting"]:
            relative = f" (perplexity {100 * results['forgetting']['perplexity'] / before_ppl:+.1f}%)"
        lines += ["", "Forgetting = retain metric after minus before (positive loss change = forgot): "
                  + ", ".join(f"{k} {v:+.4g}" for k, v in results["forgetting"].items()) + relative + "."]
    lines += continual_section(results.get("continual"))
    lines += ["", "## What it cost", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in cost_rows(results)]
    if results.get("skipped"):  # data.skip_invalid
        lines += ["", "## Skipped records", "",
                  f"{results['skipped']['count']} invalid record(s) left out; the first:", ""]
        lines += [f"- `{message}`" for message in results["skipped"]["examples"]]
    if plot is not None:
        lines += ["", "## Loss", "", f"![loss curve]({plot.name})"]
    samples_before = results["before"].get("samples", [])
    samples_after = results["after"].get("samples", [])
    if samples_after:
        lines += ["", "## Samples (greedy)", ""]
        for i, after in enumerate(samples_after):
            before = samples_before[i]["output"] if i < len(samples_before) else "-"
            lines += [f"**Prompt:** {after['prompt']}", "", f"- reference: {after['reference']}",
                      f"- before: {before}", f"- after: {after['output']}", ""]
    path = run_dir / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def console_summary(results: dict) -> str:
    """The before/after table and costs as plain text for the terminal."""
    rows = [("metric", "before", "after", "change"), *metric_rows(results)]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = ["  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)) for row in rows]
    lines.append("")
    lines += [f"{k}: {v}" for k, v in cost_rows(results)]
    for sample in results["after"].get("samples", [])[:3]:
        lines += ["", f"Q: {sample['prompt']}", f"A: {sample['output']}"]
    return "\n".join(lines)
