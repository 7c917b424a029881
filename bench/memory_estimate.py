"""Check `tuneforge inspect`'s memory estimate against the peak a real `tuneforge train` reaches.

For each config below (the bundled SmolLM2-135M and MiniLM, and synthetic Llama models with random
weights), in fresh processes: `tuneforge inspect CONFIG --json` (the estimate), then `tuneforge train`
for a few steps (its `results.json` records the measured peak: resident set size on a CPU). Writes
`docs/results/memory_estimate.json`.

    python bench/memory_estimate.py [--only NAME ...] [--output docs/results/memory_estimate.json]
    python bench/memory_estimate.py --render docs/results/memory_estimate.json   # the table in the docs

Each run is measured twice: with the C library's default allocator settings, and with freed blocks
returned to the system (`MALLOC_MMAP_THRESHOLD_`), where the resident set follows live memory.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
TOLERANCE = 0.25  # the estimate must be within 25% of the measured peak


def synthetic_llama(directory: Path, hidden: int, layers: int, inner: int, heads: int) -> str:
    """A Llama of the given shape with random weights and SmolLM2's tokenizer, saved as a model folder."""
    if (directory / "config.json").is_file():
        return str(directory)
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=inner,
                         num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads // 4,
                         max_position_embeddings=4096, tie_word_embeddings=True,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return str(directory)


def cases(work: Path) -> dict[str, dict]:
    """name -> config (without output). Short runs: the peak is reached in the first steps."""
    chat = {"train": "builtin:chatterbot", "max_eval_examples": 16}
    evaluation = {"retain_examples": 4, "samples": 0}
    lm = {"retain": "builtin:shakespeare", "evaluation": evaluation}
    train = {"max_steps": 2, "lr": 1e-4, "log_every": 1}
    llama_360 = synthetic_llama(work / "llama-360m", hidden=960, layers=16, inner=2560, heads=16)
    llama_60 = synthetic_llama(work / "llama-60m", hidden=512, layers=8, inner=1536, heads=8)
    return {
        "smollm2 lora all-linear b8 s128": {"model": "smollm2-135m", "data": chat, **lm,
            "strategies": [{"lora": {"rank": 16, "targets": "all-linear"}}],
            "train": {**train, "batch_size": 8, "max_seq_len": 128}},
        "smollm2 full b8 s128": {"model": "smollm2-135m", "data": chat, **lm, "strategies": [],
            "train": {**train, "batch_size": 8, "max_seq_len": 128}},
        "smollm2 lora packed b8 s512": {"model": "smollm2-135m", "data": chat, **lm,
            "strategies": [{"lora": {"rank": 8}}],
            "train": {**train, "batch_size": 8, "max_seq_len": 512, "packing": True}},
        "smollm2 lora packed b8 s512 checkpointing": {"model": "smollm2-135m", "data": chat, **lm,
            "strategies": [{"lora": {"rank": 8}}],
            "train": {**train, "batch_size": 8, "max_seq_len": 512, "packing": True,
                      "gradient_checkpointing": True}},
        "smollm2 full + retention b4 s128": {"model": "smollm2-135m", "data": chat, **lm,
            "strategies": [{"retention": {}}], "train": {**train, "batch_size": 4, "max_seq_len": 128}},
        "smollm2 prompt b8 s128 bf16": {"model": "smollm2-135m", "data": chat, **lm,
            "strategies": [{"prompt": {"length": 16}}],
            "train": {**train, "batch_size": 8, "max_seq_len": 128, "precision": "bf16"}},
        "synthetic llama 360M lora packed b2 s512": {"model": llama_360, "data": chat, **lm,
            "strategies": [{"lora": {"rank": 8}}],
            "train": {**train, "batch_size": 2, "max_seq_len": 512, "packing": True}},
        "synthetic llama 60M full packed b4 s1024": {"model": llama_60, "data": chat, **lm,
            "strategies": [], "train": {**train, "batch_size": 4, "max_seq_len": 1024, "packing": True}},
        "minilm classification full b16": {"model": "minilm-l6", "retain": None, "evaluation": evaluation,
            "data": {"train": "builtin:bbc-news", "max_train_examples": 256, "max_eval_examples": 16},
            "strategies": [], "train": {**train, "batch_size": 16, "max_seq_len": 256}},
    }


# glibc keeps freed blocks for reuse, so a CPU run's resident set can stay above its live memory; with a
# fixed mmap threshold large blocks go back to the system when freed and the resident set follows live
# memory (slower: every large allocation becomes a fresh mapping, so tuneforge does not set it)
RETURNING = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def tuneforge(*args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO), **(env_extra or {})}
    return subprocess.run([sys.executable, "-m", "tuneforge.cli", *args], env=env, capture_output=True,
                          text=True, check=False, timeout=1800)


def measure(name: str, config: dict, work: Path) -> dict:
    path = work / (name.replace(" ", "-").replace("+", "plus") + ".yaml")
    output = work / "runs" / path.stem
    path.write_text(yaml.safe_dump({**config, "output": str(output)}, sort_keys=False))
    inspected = tuneforge("inspect", str(path), "--json")
    if inspected.returncode != 0:
        raise SystemExit(f"{name}: inspect failed: {inspected.stderr[-2000:]}")
    estimate = json.loads(inspected.stdout.strip().splitlines()[-1])["memory"]
    measured = {}
    for allocator, extra in (("default", None), ("returning", RETURNING)):
        trained = tuneforge("train", str(path), "--overwrite", env_extra=extra)
        if trained.returncode != 0:
            raise SystemExit(f"{name}: train failed: {trained.stderr[-2000:]}")
        results = json.loads((output / "results.json").read_text())
        measured[allocator] = int(results["peak_memory_mb"] * 2**20)
    total = estimate["total"]
    return {"name": name, "config": config, "estimate": estimate, "measured_peak": measured["default"],
            "measured_peak_returning": measured["returning"], "ratio": total / measured["default"],
            "ratio_returning": total / measured["returning"]}


DOC = REPO / "docs" / "reliability.md"
BEGIN, END = "<!-- begin memory_estimate.json -->", "<!-- end memory_estimate.json -->"


def render(report: dict) -> str:
    """The Markdown table of a report, between its markers."""
    lines = [BEGIN, "", (f"Measured {report['date']}, {report['machine']}, one run each: "
             f"`{report['command']}` (`docs/results/memory_estimate.json`)."), "",
             ("| run | estimate | measured peak | estimate / measured | peak, freed memory returned | "
             "estimate / that |"), "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        lines.append(f"| {row['name']} | {row['estimate']['total'] / 2**20:,.0f} MiB | "
                     f"{row['measured_peak'] / 2**20:,.0f} MiB | {row['ratio']:.2f} | "
                     f"{row['measured_peak_returning'] / 2**20:,.0f} MiB | {row['ratio_returning']:.2f} |")
    return "\n".join([*lines, "", END])


def render_into_doc(report: dict, doc: Path = DOC) -> None:
    text = doc.read_text()
    start, end = text.index(BEGIN), text.index(END) + len(END)
    doc.write_text(text[:start] + render(report) + text[end:])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", nargs="*", help="names (substrings) of the cases to run")
    parser.add_argument("--output", default=str(REPO / "docs/results/memory_estimate.json"))
    parser.add_argument("--work", help="folder for synthetic models and runs (default: a temporary one)")
    parser.add_argument("--render", help="only render this JSON report into docs/reliability.md")
    parser.add_argument("--keep", action="store_true",
                        help="keep rows already in --output and measure the rest (with --only: those again)")
    args = parser.parse_args()
    if args.render:
        render_into_doc(json.loads(Path(args.render).read_text()))
        return
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="tuneforge-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    output = Path(args.output)
    done = {row["name"]: row for row in json.loads(output.read_text())["rows"]} if args.keep and \
        output.is_file() else {}
    rows = []
    for name, config in cases(work).items():
        chosen = not args.only or any(part in name for part in args.only)
        if name in done and not (args.only and chosen):  # kept; --only with --keep measures it again
            row = done[name]
        elif chosen:
            row = measure(name, config, work)
        else:
            continue
        rows.append(row)
        write(output, rows, args)  # after every row: a long campaign keeps what it measured
        print(f"{name:<45} estimate {row['estimate']['total'] / 2**20:6.0f} MiB, measured "
              f"{row['measured_peak'] / 2**20:6.0f} MiB (ratio {row['ratio']:.2f}), freed blocks returned "
              f"{row['measured_peak_returning'] / 2**20:6.0f} MiB ({row['ratio_returning']:.2f})", flush=True)
    render_into_doc(json.loads(output.read_text()))
    print(f"written to {output} and {DOC}")


def write(output: Path, rows: list[dict], args) -> None:
    command = "python bench/memory_estimate.py"  # rows redone with --keep --only come from the same command
    report = {"date": datetime.date.today().isoformat(), "command": command,
              "machine": f"{os.cpu_count()} CPU cores", "tolerance": TOLERANCE, "rows": rows}
    output.write_text(json.dumps(report, indent=1) + "\n")


if __name__ == "__main__":
    main()
