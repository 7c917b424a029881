"""Runs under a runs root, read from their run directories alone (the command line's runs and the page's
alike): state, progress, strategies, cost and what each learned and forgot. Nothing here writes."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import yaml

from tuneforge.run_status import run_state

# files only a run directory has (with config.yaml)
RUN_MARKERS = ("status.json", "metrics.jsonl", "results.json", "evaluation_before.json", "checkpoints")
NOT_SEARCHED = {"checkpoints", "tensorboard", "configs", "exports", "__pycache__"}  # and the adapter folder
MAX_DEPTH = 4  # compare puts its runs at OUTPUT/runs/NAME


def find_runs(root: Path) -> list[str]:
    """Run ids (paths relative to `root`, `/`-separated) of every run directory under it; symlinks and
    hidden folders are not followed."""
    from tuneforge.export import ADAPTER_DIR

    found, skipped = [], NOT_SEARCHED | {ADAPTER_DIR}
    for directory, subdirs, files in os.walk(root, followlinks=False):
        here = Path(directory)
        depth = len(here.relative_to(root).parts)
        if "config.yaml" in files and depth and any((here / m).exists() for m in RUN_MARKERS):
            found.append(here.relative_to(root).as_posix())
            subdirs[:] = []  # runs do not nest
            continue
        subdirs[:] = sorted(d for d in subdirs if not d.startswith(".") and d not in skipped
                            and depth < MAX_DEPTH)
    return sorted(found)


def read_json(path: Path) -> dict | None:
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return value if isinstance(value, dict) else None


def read_config(run_dir: Path) -> dict:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return {}
    return config if isinstance(config, dict) else {}


def read_records(path: Path, offset: int = 0) -> tuple[list[dict], int]:
    """Complete metrics records from byte `offset` on, and the offset after the last complete line (a line
    being written is left for next time). A file shorter than `offset` was rewritten (a resume drops what a
    killed run logged after its checkpoint): the caller starts again from 0."""
    try:
        with open(path, "rb") as handle:
            handle.seek(offset)
            data = handle.read()
    except OSError:
        return [], offset
    end = data.rfind(b"\n") + 1
    records = []
    for line in data[:end].splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


_parsed: dict[Path, tuple[tuple[int, int], list[dict]]] = {}


def all_records(path: Path) -> list[dict]:
    """Every complete record of a metrics file, parsed again only when the file changed (the runs table is
    rebuilt every second while a page watches it)."""
    try:
        stat = path.stat()
    except OSError:
        return []
    key = (stat.st_size, stat.st_mtime_ns)
    cached = _parsed.get(path)
    if cached is None or cached[0] != key:
        cached = _parsed[path] = (key, read_records(path)[0])
    return cached[1]


def strategies_text(config: dict) -> str:
    from tuneforge.strategies import REGISTRY, default_parametrization

    names = []
    for spec in config.get("strategies") or []:
        if isinstance(spec, dict) and len(spec) == 1:
            (name, options), = spec.items()
            entry = REGISTRY.get(name)
            names.append(entry.cls.label(options or {}) if entry else str(name))
    return " + ".join(names) or f"{default_parametrization().name} (default)"


def summary(root: Path, run_id: str) -> dict:
    """One row of the runs table."""
    run_dir = root / run_id
    state, record = run_state(run_dir)
    config = read_config(run_dir)
    results = read_json(run_dir / "results.json") if state != "running" else None
    before = read_json(run_dir / "evaluation_before.json") or {}
    records = all_records(run_dir / "metrics.jsonl")
    train = [r for r in records if r.get("split", "train") == "train" and "step" in r]
    evals = [r for r in records if r.get("split") == "eval"]
    step = results["steps"] if results else max((r["step"] for r in train), default=0)
    total = (config.get("train") or {}).get("max_steps")
    untrained = bool(results) and results.get("steps") == 0  # max_steps: 0, the prompt-only baseline
    task_metric, task, forgetting_pct = None, None, None
    after = results["after"] if results else (evals[-1] if evals else {})
    after_eval = after.get("eval", after) if results else after
    for metric in ("accuracy", "loss"):
        if metric in after_eval:
            task_metric, task = metric, after_eval[metric]
            break
    retain_before = (before.get("retain") or {}).get("loss")
    retain_after = (after.get("retain") or {}).get("loss") if results else after.get("retain_loss")
    if retain_before is not None and retain_after is not None:
        from math import exp

        forgetting_pct = 100 * (exp(retain_after - retain_before) - 1)  # retain perplexity change
    if results:
        seconds = results.get("train_seconds")
    elif record.get("started"):
        ended = time.time() if state == "running" else record.get("ended", time.time())
        seconds = ended - record["started"]
    else:
        seconds = None
    return {
        "id": run_id, "state": state, "step": step, "total_steps": total,
        "progress": (min(1.0, step / total) if total else (1.0 if results else None)),
        "strategies": "none (prompt only)" if untrained else strategies_text(config),
        "model": config.get("model"),
        "trainable_params": (0 if untrained else results.get("trainable_params")) if results else None,
        "total_params": results.get("total_params") if results else None,
        "task_metric": task_metric, "task": task, "forgetting_pct": forgetting_pct,
        "seconds": seconds, "peak_memory_mb": results.get("peak_memory_mb") if results else None,
        "error": record.get("error"), "reason": record.get("reason"),
        "modified": _modified(run_dir),
    }


def _modified(run_dir: Path) -> float:
    times = [p.stat().st_mtime for p in (run_dir / "config.yaml", run_dir / "metrics.jsonl",
                                         run_dir / "status.json") if p.exists()]
    return max(times, default=0.0)


def plot_series(records: list[dict], before: dict, results: dict | None) -> dict:
    """Curves on one step axis: train loss (per task), each strategy's loss term, eval loss and retain loss
    (the base model's at step 0, the final evaluation at the last step)."""
    from tuneforge.report import NOT_TERMS

    series: dict[str, list[list[float]]] = {}
    for r in records:
        step = r.get("step")
        if step is None:
            continue
        if r.get("split", "train") == "train":
            suffix = f" ({r['task']})" if r.get("task") else ""
            if isinstance(r.get("loss"), (int, float)):
                series.setdefault("train loss" + suffix, []).append([step, r["loss"]])
            for key, value in r.items():
                if key not in NOT_TERMS and isinstance(value, (int, float)):
                    series.setdefault(f"{key} term", []).append([step, value])
        elif r.get("split") == "eval":
            if isinstance(r.get("loss"), (int, float)):
                series.setdefault("eval loss", []).append([step, r["loss"]])
            if isinstance(r.get("retain_loss"), (int, float)):
                series.setdefault("retain loss", []).append([step, r["retain_loss"]])
    for split, name in (("eval", "eval loss"), ("retain", "retain loss")):
        start = (before.get(split) or {}).get("loss")
        if start is not None:
            series.setdefault(name, []).insert(0, [0, start])
        end = ((results or {}).get("after", {}).get(split) or {}).get("loss")
        if end is not None:
            series.setdefault(name, []).append([results["steps"], end])
    return series


def log_tail(path: Path, lines: int = 40) -> str:
    """The last lines of a log, progress-bar redraws (carriage returns) collapsed to their last state."""
    try:
        with open(path, "rb") as handle:
            handle.seek(max(0, handle.seek(0, os.SEEK_END) - 64 * 1024))
            text = handle.read().decode("utf-8", "replace")
    except OSError:
        return ""
    shown = [line.rsplit("\r", 1)[-1] if "\r" in line.rstrip("\r") else line.rstrip("\r")
             for line in text.split("\n")]
    return "\n".join(shown[-lines:])
