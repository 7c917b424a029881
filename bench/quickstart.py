"""The README's quickstart figures, from a timed `bash scripts/quickstart.sh` (or a finished run directory).

    python bench/quickstart.py                  # runs scripts/quickstart.sh, times it, writes the JSON
    python bench/quickstart.py --run runs/quickstart --wall 213   # a finished run, its wall time given
    python bench/render_docs.py                 # the README's paragraph again, from the JSON

Writes docs/results/<date>-quickstart.json (date, command, the run's results); `bench/render_docs.py`
renders the paragraph between the `quickstart.json` markers of README.md from it.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def record(run: Path, wall: float, command: str, machine: str) -> dict:
    results = json.loads((run / "results.json").read_text())
    return {"date": datetime.date.today().isoformat(), "command": command, "machine": machine,
            "load_average": os.getloadavg()[0], "wall_seconds": wall,
            "steps": results["steps"], "train_seconds": results["train_seconds"],
            "task_loss": [results["before"]["eval"]["loss"], results["after"]["eval"]["loss"]],
            "retain_perplexity": [results["before"]["retain"]["perplexity"],
                                  results["after"]["retain"]["perplexity"]],
            "trainable_params": results["trainable_params"], "total_params": results["total_params"],
            "peak_memory_mb": results["peak_memory_mb"], "adapter_bytes": results["adapter_bytes"]}


def render(report: dict) -> str:
    minutes, seconds = divmod(round(report["wall_seconds"]), 60)
    before, after = report["retain_perplexity"]
    return (f"Measured on {report['machine']} ({report['date']}, 1 run, `{report['command']}`): the run "
            f"takes {minutes} min {seconds:02d} s after the install ({report['steps']} steps in "
            f"{report['train_seconds']:.0f} s), task loss {report['task_loss'][0]:.3f} -> "
            f"{report['task_loss'][1]:.3f}, retain perplexity {before:.2f} -> {after:.2f} "
            f"({100 * (after / before - 1):+.1f}%), {report['trainable_params'] / 1e6:.1f} M of "
            f"{report['total_params'] / 1e6:.1f} M parameters trained, peak memory "
            f"{report['peak_memory_mb'] / 1024:.1f} GiB, a {report['adapter_bytes'] / 2**20:.1f} MiB "
            f"adapter.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, help="a finished quickstart run (else run it now)")
    parser.add_argument("--wall", type=float, help="its wall time in seconds (with --run)")
    parser.add_argument("--machine", default="2 CPU cores")
    args = parser.parse_args()
    command = "bash scripts/quickstart.sh"
    if args.run is None:
        subprocess.run(["bash", "scripts/setup.sh"], cwd=REPO, check=True)
        started = time.perf_counter()
        subprocess.run(["bash", "scripts/quickstart.sh"], cwd=REPO, check=True)
        wall, run = time.perf_counter() - started, REPO / "runs" / "quickstart"
    else:
        if args.wall is None:
            parser.error("--run needs --wall (the run's wall time in seconds)")
        wall, run = args.wall, args.run
    report = record(run, wall, command, args.machine)
    output = REPO / "docs" / "results" / f"{report['date']}-quickstart.json"
    output.write_text(json.dumps(report, indent=1) + "\n")
    import render_docs  # this folder: the registry renders the doc from the JSON just written

    render_docs.render_all()
    print(render(report))


if __name__ == "__main__":
    main()
