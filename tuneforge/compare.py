"""`tuneforge compare`: strategies side by side on the user's own data, in one report.

Each config is trained in its own process (so peak memory is that run's alone) with the same data,
steps and seed; finished run directories are collected as they are. The report says whether the runs
were comparable and, if not, what differed.
"""

from __future__ import annotations

import base64
import html
import json
import subprocess
import sys
from pathlib import Path

import yaml

from tuneforge.errors import ConfigError, TrainingError
from tuneforge.report import continual_section

# Settings that must agree for a comparison to be fair.
FAIR_KEYS = ("model", "data", "tasks", "retain", "train.max_steps", "train.epochs", "train.batch_size",
             "train.grad_accum", "train.max_seq_len", "train.seed")


def run_or_collect(source: str, runs_dir: Path, overrides: list[str]) -> Path:
    """A finished run directory for `source`: itself if it is one, else train the config into runs_dir."""
    path = Path(source)
    if path.is_dir():
        if not (path / "results.json").is_file():
            raise ConfigError(f"{path}: not a finished run (no results.json)")
        return path
    if not path.is_file():
        raise ConfigError(f"{source}: neither a config file nor a run directory")
    run_dir = runs_dir / path.stem
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(path), "--overwrite",
               "--output", str(run_dir), *overrides]
    print(f"compare: training {path.name} -> {run_dir}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise TrainingError(f"compare: training {path} failed (see the output above)")
    return run_dir


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fairness(configs: dict[str, dict]) -> list[str]:
    """Settings that differ between runs (prompt-only runs, with 0 steps, are exempt from step counts)."""
    differences = []
    for key in FAIR_KEYS:
        values = {name: _get(c, key) for name, c in configs.items()
                  if not (key.startswith("train.") and key != "train.seed"
                          and _get(c, "train.max_steps") == 0)}
        if len({json.dumps(v, sort_keys=True) for v in values.values()}) > 1:
            shown = ", ".join(f"{name}: {json.dumps(v)}" for name, v in values.items())
            differences.append(f"`{key}` differs ({shown})")
    return differences


def strategies_label(results: dict) -> str:
    """`lora + ewc`; each strategy names itself with its options (`label`, e.g. `lora (dora)`); `none
    (prompt only)` untrained; the implied default parametrization when the list is empty."""
    from tuneforge.strategies import REGISTRY, default_parametrization

    if results.get("steps", 0) == 0:
        return "none (prompt only)"
    names = []
    for spec in results["strategies"]:
        (name, options), = spec.items()
        entry = REGISTRY.get(name)  # a run made by another version may name a strategy this one lacks
        names.append(entry.cls.label(options or {}) if entry else name)
    return " + ".join(names) or default_parametrization().name


def row_of(name: str, results: dict) -> dict:
    after, before = results["after"], results["before"]
    task_metric = "accuracy" if "accuracy" in after.get("eval", {}) else "loss"
    retain_before, retain_after = before.get("retain", {}), after.get("retain", {})
    return {
        "run": name,
        "strategies": strategies_label(results),
        "task_metric": task_metric,
        "task": after["eval"].get(task_metric),
        "task_before": before["eval"].get(task_metric),
        "retain_ppl_before": retain_before.get("perplexity"),
        "retain_ppl_after": retain_after.get("perplexity"),
        "forgetting": results.get("forgetting", {}).get("loss"),
        "trainable_params": results["trainable_params"] if results["steps"] else 0,
        "artifact_bytes": results.get("adapter_bytes", 0),
        "peak_memory_mb": results["peak_memory_mb"],
        "train_seconds": results["train_seconds"],
        "tokens_per_s": results["tokens_per_s"] if results["steps"] else None,
        "steps": results["steps"],
    }


def _fmt(value, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return f"{value:,}" if isinstance(value, int) else str(value)


TABLE_COLUMNS = [
    ("run", "run"), ("strategies", "strategies"), ("steps", "steps"), ("task", "task metric (after)"),
    ("task_before", "task (before)"), ("retain_ppl_before", "retain ppl before"),
    ("retain_ppl_after", "retain ppl after"),
    ("forgetting", "forgetting (retain loss +)"), ("trainable_params", "trainable params"),
    ("artifact_mb", "artifact MiB"), ("peak_memory_mb", "peak MiB"), ("train_seconds", "train s"),
    ("tokens_per_s", "tokens/s"),
]


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for row in rows:
        values = {**row, "artifact_mb": row["artifact_bytes"] / 2**20}
        out.append([_fmt(values[key]) for key, _ in TABLE_COLUMNS])
    return out


def write_plots(rows: list[dict], run_dirs: dict[str, Path], output: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from tuneforge.metrics import read_metrics

    paths = []
    metric = rows[0]["task_metric"]
    figure, axis = plt.subplots(figsize=(6.5, 4))
    for row in rows:
        x = max(row["trainable_params"], 1)
        axis.scatter(x, row["task"])
        axis.annotate(row["run"], (x, row["task"]), textcoords="offset points", xytext=(4, 4), fontsize=8)
    axis.set_xscale("log")
    axis.set_xlabel("trainable parameters (log; prompt-only plotted at 1)")
    axis.set_ylabel(f"task {metric} after training")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(output / "metric_vs_params.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)

    if any(row["forgetting"] is not None for row in rows):
        figure, axis = plt.subplots(figsize=(6.5, 3.5))
        names = [row["run"] for row in rows]
        axis.bar(names, [row["forgetting"] or 0.0 for row in rows], color="tab:red")
        axis.axhline(0, color="black", linewidth=0.8)
        axis.set_ylabel("retain loss after - before")
        axis.tick_params(axis="x", rotation=30)
        figure.tight_layout()
        paths.append(output / "forgetting.png")
        figure.savefig(paths[-1], dpi=110)
        plt.close(figure)

    figure, axis = plt.subplots(figsize=(6.5, 4))
    for name, run_dir in run_dirs.items():
        train = [r for r in read_metrics(run_dir / "metrics.jsonl") if "split" not in r and "loss" in r]
        if train:
            axis.plot([r["step"] for r in train], [r["loss"] for r in train], label=name)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("training loss")
    axis.legend(fontsize=8)
    axis.grid(alpha=0.3)
    figure.tight_layout()
    paths.append(output / "loss_curves.png")
    figure.savefig(paths[-1], dpi=110)
    plt.close(figure)
    return paths


def compare(
    sources: list[str], output: Path, overrides: list[str] | None = None, command: str = "",
    runs_dir: Path | None = None
) -> Path:
    """Run or collect every source, then write report.md, report.html, comparison.json and plots to `output`.

    Trained runs go to `runs_dir` (default `output/runs`).
    """
    output.mkdir(parents=True, exist_ok=True)
    run_dirs: dict[str, Path] = {}
    for source in sources:
        run_dir = run_or_collect(source, runs_dir or output / "runs", overrides or [])
        name = run_dir.name if run_dir.name not in run_dirs else f"{run_dir.name}-{len(run_dirs)}"
        run_dirs[name] = run_dir
    results = {name: json.loads((d / "results.json").read_text()) for name, d in run_dirs.items()}
    configs = {name: yaml.safe_load((d / "config.yaml").read_text()) for name, d in run_dirs.items()}
    rows = [row_of(name, results[name]) for name in run_dirs]
    differences = fairness(configs)
    plots = write_plots(rows, run_dirs, output)
    (output / "comparison.json").write_text(json.dumps({"rows": rows, "differences": differences}, indent=1))
    continual = {name: r["continual"] for name, r in results.items() if r.get("continual")}
    markdown = render_markdown(rows, differences, plots, configs, command, continual)
    (output / "report.md").write_text(markdown)
    (output / "report.html").write_text(render_html(rows, differences, plots, command, continual))
    return output / "report.md"


def fairness_line(differences: list[str], configs: dict[str, dict]) -> str:
    if differences:
        return "**Not a like-for-like comparison:** " + "; ".join(differences) + "."
    first = next(iter(configs.values()))
    steps = _get(first, "train.max_steps") or f"{_get(first, 'train.epochs')} epoch(s)"
    return (f"Fair comparison: same model, data, retain set, seed ({_get(first, 'train.seed')}), batch size "
            f"({_get(first, 'train.batch_size')}), "
            f"max_seq_len ({_get(first, 'train.max_seq_len')}) and budget "
            f"({steps} steps) for every trained run; prompt-only rows train nothing.")


def render_markdown(rows, differences, plots, configs, command, continual: dict | None = None) -> str:
    header = [label for _, label in TABLE_COLUMNS]
    lines = ["# tuneforge comparison", ""]
    if command:
        lines += [f"Made with `{command}`.", ""]
    lines += [fairness_line(differences, configs), "",
              "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cells) + " |" for cells in table_rows(rows)]
    metric = rows[0]["task_metric"]
    lines += ["", f"Task metric: eval {metric}" + (" (lower is better)" if metric == "loss" else "") +
              ". Forgetting: retain-set loss after minus before (positive = forgot). "
              "Artifact: the saved adapter "
              "(or trained weights). Time and tokens/s: training steps only.", ""]
    lines += [f"![{p.stem}]({p.name})" for p in plots]
    for name, result in (continual or {}).items():  # sequence runs: each one's task x task matrix
        lines += continual_section(result, f"Continual learning: {name}")
    return "\n".join(lines) + "\n"


def continual_html(name: str, continual: dict) -> str:
    """One sequence run's R matrix as an HTML table, with ACC/BWT/FWT."""
    cells = "".join(f"<th>{html.escape(t)}</th>" for t in continual["tasks"])
    rows = [("b (base)", continual["baseline"]), *zip(continual["tasks"], continual["matrix"])]
    body = "".join(f"<tr><th>{html.escape(label)}</th>"
                   + "".join(f"<td>{v:.4g}</td>" for v in values) + "</tr>"
                   for label, values in rows)
    summary = ", ".join(f"{k.upper()} {continual[k]:+.4g}" for k in ("acc", "bwt", "fwt") if k in continual)
    return (f"<h2>Continual learning: {html.escape(name)}</h2>"
            f"<p>R[i][j] = {html.escape(continual['metric'])} on "
            f"task j after training task i</p><table><tr><th>after \\ on</th>{cells}</tr>{body}</table>"
            f"<p>{html.escape(summary)} (BWT &lt; 0 means forgetting)</p>")


def render_html(rows, differences, plots, command, continual: dict | None = None) -> str:
    header = "".join(f"<th>{html.escape(label)}</th>" for _, label in TABLE_COLUMNS)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>"
                   for cells in table_rows(rows))
    images = "".join(
        f'<img alt="{p.stem}" src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    note = ("<p><b>Not a like-for-like comparison:</b> " + html.escape("; ".join(differences)) + "</p>"
            if differences else "")
    made = f"<p>Made with <code>{html.escape(command)}</code></p>" if command else ""
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}"
             "img{max-width:48%;margin:1em 1% 0 0}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>tuneforge comparison</title>"
            f"<style>{style}</style></head><body><h1>tuneforge comparison</h1>{made}{note}"
            f"<table><tr>{header}</tr>{body}</table>{images}"
            + "".join(continual_html(name, result) for name, result in (continual or {}).items())
            + "</body></html>\n")
