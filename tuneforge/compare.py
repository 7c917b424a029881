"""`tuneforge compare`: strategies side by side on the user's own data, in one report.

Each config is trained in its own process (so peak memory is that run's alone) with the same data,
steps and seed; finished run directories are collected as they are. With `--seeds 0,1,2` every config is
trained once per seed, in turn, and each row holds the mean and spread over its seeds. The report says
whether the runs were comparable and, if not, what differed. Rendering lives in `compare_report`,
plots in `compare_plots`, the summary in `compare_summary`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from datetime import date
from pathlib import Path

import yaml

from tuneforge.errors import ConfigError, TrainingError
from tuneforge.formatting import relative_change
from tuneforge.tradeoff import aggregate, pareto_front, seed_group

# Settings that must agree for a comparison to be fair.
FAIR_KEYS = ("model", "data", "tasks", "retain", "train.max_steps", "train.epochs", "train.batch_size",
             "train.grad_accum", "train.max_seq_len", "train.seed")

# `--cost` choices: the row field each one reads, and how it is named in the report.
COSTS = {"params": ("trainable_params", "trainable parameters"),
         "time": ("train_seconds", "training time"),
         "memory": ("peak_memory_mb", "peak memory")}

# Row fields that are averaged over seeds.
NUMERIC = ("task", "task_before", "task_change", "task_change_pct", "task_gain", "retain_ppl_before",
           "retain_ppl_after", "retain_ppl_change", "benchmark_change", "forgetting", "forgetting_pct",
           "trainable_params", "artifact_bytes", "peak_memory_mb", "train_seconds", "tokens_per_s", "steps")


def parse_seeds(text: str) -> list[int]:
    """`0,1,2` -> [0, 1, 2]; a one-line error for anything else."""
    parts = [part.strip() for part in text.split(",")]
    if not all(part.isdigit() for part in parts):
        raise ConfigError(f"--seeds {text!r}: expected comma-separated non-negative integers, e.g. 0,1,2")
    seeds = [int(part) for part in parts]
    if len(set(seeds)) != len(seeds):
        raise ConfigError(f"--seeds {text!r}: a seed is listed twice")
    return seeds


def check_cost(cost: str) -> str:
    if cost not in COSTS:
        raise ConfigError(f"--cost {cost!r}: unknown (choose one of: {', '.join(COSTS)})")
    return cost


def run_or_collect(source: str, runs_dir: Path, overrides: list[str], seed: int | None = None) -> Path:
    """A finished run directory for `source`: itself if it is one, else train the config into runs_dir
    (as `NAME-seedN` with `train.seed=N` when a seed is given)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "results.json").is_file():
            raise ConfigError(f"{path}: not a finished run (no results.json)")
        return path
    if not path.is_file():
        raise ConfigError(f"{source}: neither a config file nor a run directory")
    run_dir = runs_dir / (path.stem if seed is None else f"{path.stem}-seed{seed}")
    seeded = [] if seed is None else [f"train.seed={seed}"]
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(path), "--overwrite",
               "--output", str(run_dir), *overrides, *seeded]
    print(f"compare: training {path.name} -> {run_dir}", flush=True)
    if subprocess.run(command, check=False).returncode != 0:
        raise TrainingError(f"compare: training {path} failed (see the output above)")
    return run_dir


def _get(config: dict, dotted: str):
    node = config
    for part in dotted.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return node


def fairness(configs: dict[str, dict], groups: dict[str, list[str]] | None = None) -> list[str]:
    """Settings that differ between rows (prompt-only runs, with 0 steps, are exempt from step counts).

    `groups` maps each row to its runs (one per seed); seeds are then compared as each row's set of seeds.
    """
    groups = groups or {name: [name] for name in configs}
    differences = []
    for key in FAIR_KEYS:
        if key == "train.seed":
            values = {row: sorted(_get(configs[r], key) or 0 for r in runs) for row, runs in groups.items()}
            values = {row: seeds[0] if len(seeds) == 1 else seeds for row, seeds in values.items()}
        else:
            values = {name: _get(c, key) for name, c in configs.items()
                      if not (key.startswith("train.") and _get(c, "train.max_steps") == 0)}
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
    """One run's row: what it learned (task), what it forgot (retain), what it cost."""
    after, before = results["after"], results["before"]
    task_metric = "accuracy" if "accuracy" in after.get("eval", {}) else "loss"
    retain_before, retain_after = before.get("retain", {}), after.get("retain", {})
    task, task_before = after["eval"].get(task_metric), before["eval"].get(task_metric)
    change = None if task is None or task_before is None else task - task_before
    return {
        "run": name,
        "strategies": strategies_label(results),
        "task_metric": task_metric,
        "task": task,
        "task_before": task_before,
        "task_change": change,
        "task_change_pct": relative_change(task_before, task),
        # gain: positive when the task got better (loss down, accuracy up)
        "task_gain": None if change is None else (-change if task_metric == "loss" else change),
        "retain_ppl_before": retain_before.get("perplexity"),
        "retain_ppl_after": retain_after.get("perplexity"),
        "forgetting": results.get("forgetting", {}).get("loss"),  # retain loss after - before
        "retain_ppl_change": results.get("forgetting", {}).get("perplexity"),
        # lm-eval benchmarks: mean change of their primary metrics, in points (negative = forgot)
        "benchmark_change": _mean(list(results.get("benchmark_change", {}).values())),
        "forgetting_pct": relative_change(retain_before.get("perplexity"), retain_after.get("perplexity")),
        "trainable_params": results["trainable_params"] if results["steps"] else 0,
        "artifact_bytes": results.get("adapter_bytes", 0),
        "peak_memory_mb": results["peak_memory_mb"],
        "train_seconds": results["train_seconds"],
        "tokens_per_s": results["tokens_per_s"] if results["steps"] else None,
        "steps": results["steps"],
        "seed": None,
    }


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def group_rows(runs: list[dict]) -> list[dict]:
    """One row per configuration: runs named `NAME-seedN` are averaged into row `NAME`."""
    grouped: dict[str, list[dict]] = {}
    for run in runs:
        grouped.setdefault(seed_group(run["run"])[0], []).append(run)
    rows = []
    for name, members in grouped.items():
        row = aggregate(members, NUMERIC)
        row.pop("seed", None)
        rows.append({**row, "run": name, "runs": [m["run"] for m in members],
                     "seeds": [m["seed"] for m in members if m["seed"] is not None]})
    return rows


def objectives(row: dict, cost: str, with_forgetting: bool) -> list[float] | None:
    """What the Pareto front minimizes: -task gain, forgetting (retain perplexity change, %), cost."""
    gain, forgetting, spend = row["task_gain"], row["forgetting_pct"], row[COSTS[cost][0]]
    if gain is None or spend is None or (with_forgetting and forgetting is None):
        return None
    return [-gain, forgetting, spend] if with_forgetting else [-gain, spend]


def mark_front(rows: list[dict], cost: str) -> None:
    """Set `pareto` on every row: on the front of task gain vs forgetting vs cost (means over seeds);
    without a retain set, of task gain vs cost."""
    with_forgetting = all(row["forgetting_pct"] is not None for row in rows)
    points = {i: p for i, row in enumerate(rows) if (p := objectives(row, cost, with_forgetting)) is not None}
    keys = list(points)
    front = {keys[i] for i in pareto_front([points[k] for k in keys])}
    for i, row in enumerate(rows):
        row["pareto"] = i in front


def collect(sources: list[str], runs_dir: Path, overrides: list[str],
            seeds: list[int] | None) -> dict[str, Path]:
    """Every source's run directory by run name; configs are trained once per seed, seed by seed."""
    run_dirs: dict[str, Path] = {}
    for seed in seeds or [None]:
        for source in sources:
            if seed is not None and seed != seeds[0] and Path(source).is_dir():
                continue  # a finished run is collected once
            run_dir = run_or_collect(source, runs_dir, overrides, seed)
            name = run_dir.name if run_dir.name not in run_dirs else f"{run_dir.name}-{len(run_dirs)}"
            run_dirs[name] = run_dir
    return run_dirs


def compare(
    sources: list[str], output: Path, overrides: list[str] | None = None, command: str = "",
    runs_dir: Path | None = None, seeds: list[int] | None = None, cost: str = "params"
) -> Path:
    """Run or collect every source, then write report.md, report.html, comparison.json and plots to `output`.

    Trained runs go to `runs_dir` (default `output/runs`).
    """
    check_cost(cost)
    output.mkdir(parents=True, exist_ok=True)
    run_dirs = collect(sources, runs_dir or output / "runs", overrides or [], seeds)
    # imported once the runs are done: training needs none of the rendering (nor matplotlib)
    from tuneforge.compare_plots import write_plots
    from tuneforge.compare_report import render_html, render_markdown
    from tuneforge.compare_summary import summarize

    results = {name: json.loads((d / "results.json").read_text()) for name, d in run_dirs.items()}
    configs = {name: yaml.safe_load((d / "config.yaml").read_text()) for name, d in run_dirs.items()}
    runs = [{**row_of(name, results[name]), "seed": _get(configs[name], "train.seed")} for name in run_dirs]
    rows = group_rows(runs)
    mark_front(rows, cost)
    differences = fairness(configs, {row["run"]: row["runs"] for row in rows})
    summary = summarize(rows, cost)
    plots = write_plots(rows, run_dirs, output, cost)
    continual = {name: r["continual"] for name, r in results.items() if r.get("continual")}
    report = {"rows": rows, "runs": runs, "differences": differences, "cost": cost,
              "summary": summary, "continual": continual, "command": command,
              "date": date.today().isoformat()}
    (output / "comparison.json").write_text(json.dumps(report, indent=1))
    (output / "report.md").write_text(render_markdown(report, plots, configs, continual))
    (output / "report.html").write_text(render_html(report, plots, configs, continual))
    return output / "report.md"
