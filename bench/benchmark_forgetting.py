"""Forgetting in benchmark points: `examples/benchmarks.yaml` (full fine-tuning of the bundled SmolLM2-135M
on chatterbot chit-chat, trivia left out) with the bundled trivia-mc benchmark before and after.

    python bench/benchmark_forgetting.py [--run DIR]   # trains into DIR (or reads a finished DIR)
    python bench/benchmark_forgetting.py --render docs/results/benchmark_forgetting.json

Writes `docs/results/benchmark_forgetting.json` and renders its table into docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = "examples/benchmarks.yaml"
OUTPUT = REPO / "docs" / "results" / "benchmark_forgetting.json"
DOC = REPO / "docs" / "evaluation.md"
BEGIN, END = "<!-- begin benchmark_forgetting.json -->", "<!-- end benchmark_forgetting.json -->"


def collect(run_dir: Path, command: str) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    before, after = results["before"], results["after"]
    rows = []
    for task, scores in after["benchmarks"].items():
        earlier = before["benchmarks"][task]
        for metric in scores["metrics"]:
            rows.append({"task": task, "metric": metric, "before": earlier["metrics"][metric],
                         "after": scores["metrics"][metric], "documents": scores["n"],
                         "num_fewshot": scores["num_fewshot"], "chance": scores["chance"]})
    return {
        "date": datetime.date.today().isoformat(), "command": command, "runs": 1, "config": CONFIG,
        "model": results["model"], "strategies": results["strategies"], "steps": results["steps"],
        "train_seconds": results["train_seconds"], "wall_seconds": results["wall_seconds"],
        "benchmarks": rows,
        "task_loss": {"before": before["eval"]["loss"], "after": after["eval"]["loss"]},
        "retain_perplexity": {"before": before["retain"]["perplexity"],
                              "after": after["retain"]["perplexity"]},
    }


def render(report: dict) -> str:
    lines = [f"Measured {report['date']}, 1 run (`{report['command']}`), {report['steps']} steps:", "",
             "| measure | before | after | change |", "|---|---:|---:|---:|"]
    for row in report["benchmarks"]:
        before, after = 100 * row["before"], 100 * row["after"]
        lines.append(f"| {row['task']} {row['metric']} (%, {row['documents']} questions, "
                     f"{row['num_fewshot']}-shot, chance {100 * row['chance']:.1f}%) | {before:.1f} | "
                     f"{after:.1f} | {after - before:+.1f} points |")
    for name, key, digits in (("task eval loss (nats)", "task_loss", 3),
                              ("retain perplexity (Shakespeare)", "retain_perplexity", 2)):
        before, after = report[key]["before"], report[key]["after"]
        lines.append(f"| {name} | {before:.{digits}f} | {after:.{digits}f} | {after - before:+.{digits}f} |")
    return "\n".join(lines)


def render_into_doc(report: dict, doc: Path = DOC) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + f"{BEGIN}\n{render(report)}\n{END}" + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", default="runs/benchmarks", help="the run directory (trained if missing)")
    parser.add_argument("--render", help="only render this JSON into docs/evaluation.md")
    args = parser.parse_args()
    if args.render:
        render_into_doc(json.loads(Path(args.render).read_text()))
        return
    command = f"tuneforge train {CONFIG} --output {args.run}"
    run_dir = Path(args.run)
    if not (run_dir / "results.json").is_file():
        subprocess.run([sys.executable, "-m", "tuneforge.cli", "train", CONFIG, "--output", str(run_dir)],
                       cwd=REPO, check=True)
    report = collect(run_dir, command)
    OUTPUT.write_text(json.dumps(report, indent=1) + "\n")
    render_into_doc(report)
    print(render(report))


if __name__ == "__main__":
    main()
