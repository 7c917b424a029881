"""Resident memory right after loading the bundled SmolLM2-135M, by `quantize:`, each in a fresh process.

Splits the resident set into anonymous memory (the heap: what a process really holds) and file-backed
pages (a memory-mapped weights file: counted in the resident set, but clean pages the kernel can drop
under memory pressure), from /proc/self/status. Writes JSON and renders the table into docs/memory.md.

    python bench/load_memory.py [--output docs/results/2026-11-29-load-memory.json]
    python bench/load_memory.py --render docs/results/2026-11-29-load-memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "memory.md"
BEGIN, END = "<!-- begin load-memory.json -->", "<!-- end load-memory.json -->"
MODES = ("none", "int8", "nf4", "gguf")

PROBE = """
import json, resource, sys
def status():
    fields = {}
    for line in open("/proc/self/status"):
        key, _, value = line.partition(":")
        if key in ("VmRSS", "RssAnon", "RssFile"):
            fields[key] = int(value.split()[0]) / 1024
    return fields
from tuneforge.models import load_model
before = status()
model, _, _ = load_model("smollm2-135m", quantize=sys.argv[1])
after = status()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({"before": before, "after": after, "peak_rss_mib": peak}))
"""


def measure(mode: str) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-c", PROBE, mode], env=env, capture_output=True, text=True,
                          check=True, timeout=600)
    return {"quantize": mode, **json.loads(done.stdout.strip().splitlines()[-1])}


def render(report: dict) -> str:
    lines = [BEGIN, "", (f"Measured {report['date']}, one process each: `{report['command']}` "
             f"(`{report['file']}`). MiB after `load_model`; the interpreter and libraries alone hold the "
             f"\"before\" column."), "",
             ("| quantize | resident before | resident after | heap (anonymous) after | file-backed after | "
             "peak resident |"), "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        before, after = row["before"], row["after"]
        lines.append(f"| {row['quantize']} | {before['VmRSS']:.0f} | {after['VmRSS']:.0f} | "
                     f"{after['RssAnon']:.0f} | {after['RssFile']:.0f} | {row['peak_rss_mib']:.0f} |")
    return "\n".join([*lines, "", END])


def render_into_doc(report: dict) -> None:
    text = DOC.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    DOC.write_text(text[:start] + render(report) + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="docs/results/2026-11-29-load-memory.json")
    parser.add_argument("--render")
    args = parser.parse_args()
    if args.render:
        render_into_doc(json.loads(Path(args.render).read_text()))
        return
    report = {"date": datetime.date.today().isoformat(), "command": "python bench/load_memory.py",
              "file": args.output, "rows": [measure(mode) for mode in MODES]}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    render_into_doc(report)
    print(render(report))


if __name__ == "__main__":
    main()
