"""A longer bad-input fuzz campaign than the test suite's, with its counts written down.

    python bench/fuzz_campaign.py                 # 3,000 examples per generated property (the CLI one 2/5)
    python bench/fuzz_campaign.py --examples 500  # a shorter one
    python bench/render_docs.py                   # docs/reliability.md's paragraph again, from the JSON

Runs `tests/test_bad_input.py` under pytest with `TUNEFORGE_FUZZ_EXAMPLES` raised and hypothesis' statistics
on, and writes docs/results/fuzz-campaign.json: date, command, the setting, and for every generated
property the passing, failing and invalid inputs hypothesis reports (summed over its phases) with the
reason it stopped, plus pytest's outcome. A property stops early when it runs out of distinct inputs.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
OUTPUT = REPO / "docs" / "results" / "fuzz-campaign.json"
TEST_FILE = "tests/test_bad_input.py"

_HEADER = re.compile(r"^(?P<test>\S+::\S+):$")
_COUNTS = re.compile(r"- (?P<passing>\d+) passing, (?P<failing>\d+) failing, and (?P<invalid>\d+) invalid")
_STOPPED = re.compile(r"- Stopped because (?P<reason>.+)$")
_SUMMARY = re.compile(r"(?P<count>\d+) (?P<outcome>passed|failed|error|errors|skipped)\b")


def parse_statistics(text: str) -> dict[str, dict]:
    """Per test, the inputs hypothesis ran (`--hypothesis-show-statistics`), summed over its phases."""
    tests: dict[str, dict] = {}
    current = None
    for line in text.splitlines():
        stripped = line.strip()
        if header := _HEADER.match(stripped):
            current = tests.setdefault(header["test"].split("::")[-1],
                                       {"passing": 0, "failing": 0, "invalid": 0, "stopped": None})
        elif current is not None and (counts := _COUNTS.search(stripped)):
            for key in ("passing", "failing", "invalid"):
                current[key] += int(counts[key])
        elif current is not None and (stopped := _STOPPED.search(stripped)):
            current["stopped"] = stopped["reason"]
    return tests


def parse_outcome(text: str) -> dict[str, int]:
    """pytest's last summary line as counts, e.g. {"passed": 17}."""
    last = [line for line in text.splitlines() if _SUMMARY.search(line)]
    return {m["outcome"]: int(m["count"]) for m in _SUMMARY.finditer(last[-1])} if last else {}


def render(report: dict) -> str:
    """docs/reliability.md's campaign paragraph and table."""
    tests = report["tests"]
    total = sum(t["passing"] + t["failing"] for t in tests.values())
    failing = sum(t["failing"] for t in tests.values())
    outcome = ", ".join(f"{count} {name}" for name, count in report["outcome"].items())
    rows = ["| property | inputs run | failing | invalid (filtered out) | stopped because |",
            "| --- | ---: | ---: | ---: | --- |"]
    for name, t in tests.items():
        rows.append(f"| `{name}` | {t['passing'] + t['failing']:,} | {t['failing']} | {t['invalid']:,} "
                    f"| {t['stopped'] or '-'} |")
    return (f"Campaign of {report['date']} (1 run, `{report['command']}`, {report['examples']:,} examples "
            f"per generated property, {report['seconds'] / 60:.0f} min on {report['machine']}): "
            f"**{total:,} generated inputs, {failing} failing**; pytest: {outcome}.\n\n" + "\n".join(rows))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=3000, help="hypothesis examples per property")
    parser.add_argument("--machine", default="2 CPU cores")
    args = parser.parse_args()
    command = f"python bench/fuzz_campaign.py --examples {args.examples}"
    env = {**os.environ, "TUNEFORGE_FUZZ_EXAMPLES": str(args.examples), "HF_HUB_OFFLINE": "1"}
    started = time.perf_counter()
    finished = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", TEST_FILE,
                               "--hypothesis-show-statistics", "-o", "addopts="],
                              cwd=REPO, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    text = finished.stdout + finished.stderr
    tests = parse_statistics(text)
    if not tests:
        sys.exit(f"fuzz_campaign: no hypothesis statistics in pytest's output:\n{text[-2000:]}")
    report = {"date": datetime.date.today().isoformat(), "command": command, "machine": args.machine,
              "examples": args.examples, "seconds": seconds, "outcome": parse_outcome(text), "tests": tests}
    OUTPUT.write_text(json.dumps(report, indent=1) + "\n")
    import render_docs  # this folder: the registry renders the doc from the JSON just written

    render_docs.render_all()
    print(render(report))
    if finished.returncode:
        sys.exit(f"fuzz_campaign: pytest failed (exit {finished.returncode}); see {OUTPUT}")


if __name__ == "__main__":
    main()
