"""GGUF export of a LoRA-tuned bundled SmolLM2-135M at every `--quant`: time, size, and logit differences.

Trains LoRA for a few steps on the bundled chat data, then runs `tuneforge export RUN --gguf ... --quant Q`
for each type (the CLI path: load, merge, check, write), reloads each file with transformers
(`from_pretrained(..., gguf_file=...)`) and compares its logits with the unmerged tuned model's on chat
prompts and Shakespeare lines. Writes docs/results/DATE-gguf-export.json; `--render FILE.json` prints the
table of docs/export.md from it.

    HF_HUB_OFFLINE=1 python bench/gguf_export.py
    python bench/gguf_export.py --render docs/results/DATE-gguf-export.json
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import tempfile
import time
from pathlib import Path

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_1")
PROMPTS = ["What is AI?", "Tell me a joke about computers.", "Who wrote Hamlet?"]
LINES = ["To be, or not to be, that is the question:", "Now is the winter of our discontent"]


def measure(steps: int, work: Path) -> dict:
    import torch

    import tuneforge
    from tuneforge.cli import main
    from tuneforge.config import validate_config
    from tuneforge.models import load_model
    from tuneforge.run import train_run

    config = validate_config({
        "model": "smollm2-135m",
        "data": {"train": "builtin:chatterbot", "max_train_examples": 64, "max_eval_examples": 16},
        "retain": "builtin:shakespeare",
        "strategies": [{"lora": {"rank": 8, "alpha": 16, "targets": "all-linear"}}],
        "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64},
        "evaluation": {"retain_examples": 4, "samples": 0},
        "output": str(work / "run"),
    })
    train_run(config)
    base, tokenizer, _ = load_model("smollm2-135m")
    tuned = tuneforge.load_adapter(base, work / "run" / "adapter").eval()
    texts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], tokenize=False,
                                           add_generation_prompt=True) for p in PROMPTS] + LINES
    inputs = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
    mask = inputs["attention_mask"].bool()
    with torch.no_grad():
        expected = tuned(**inputs).logits[mask]
    rows = []
    for quant in QUANTS:
        out = work / f"smollm2-tuned-{quant}.gguf"
        printed = io.StringIO()
        started = time.perf_counter()
        with contextlib.redirect_stdout(printed):
            assert main(["export", str(work / "run"), "--gguf", str(out), "--quant", quant]) == 0
        command_seconds = time.perf_counter() - started
        text = printed.getvalue()
        report = json.loads(text[text.index("{"):])
        from transformers import AutoModelForCausalLM

        started = time.perf_counter()
        reloaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=out.name, dtype=torch.float32).eval()
        reload_seconds = time.perf_counter() - started
        with torch.no_grad():
            got = reloaded(**inputs).logits[mask]
        difference = (got - expected).abs()
        rows.append({
            "quant": quant, "bytes": report["bytes"], "tensor_types": report["tensor_types"],
            "write_seconds": report["seconds"], "export_command_seconds": round(command_seconds, 2),
            "reload_seconds": round(reload_seconds, 2),
            "max_abs_logit_difference": difference.max().item(),
            "mean_abs_logit_difference": difference.mean().item(),
            "max_abs_logit": expected.abs().max().item(),
            "argmax_agreement": (got.argmax(-1) == expected.argmax(-1)).float().mean().item(),
        })
        print(json.dumps(rows[-1]), file=sys.stderr)
        out.unlink()
        del reloaded
    return {"model": "smollm2-135m (SmolLM2-135M-Instruct) + LoRA r8 all-linear, "
                     f"{steps} steps on builtin:chatterbot", "positions_compared": int(mask.sum()),
            "texts": len(texts), "rows": rows}


def render(path: Path, shown: str | None = None) -> str:
    """The table of docs/export.md from the JSON at `path` (named `shown` in the text, else as given)."""
    from tuneforge.formatting import significant

    data = json.loads(path.read_text())
    load = data["load_average_1min"]
    intro = (f"Measured {data['date']} on {data['cpus']} CPU cores (1-minute load average "
             f"{load['before']:.1f} before, {load['after']:.1f} after: a shared machine, so times are "
             f"upper bounds), "
             f"1 run each: `{data['command']}` "
             f"(`{shown or path.as_posix()}`). {data['model']}; logits compared at "
             f"{data['positions_compared']} positions of {data['texts']} texts against the unmerged tuned "
             f"model.")
    header = ("| --quant | file | export command | of which writing | reload (transformers) "
              "| max \\|Δlogit\\| | mean \\|Δlogit\\| | argmax agreement |")
    lines = [intro, "", header, "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for row in data["rows"]:
        cells = [row["quant"], f"{row['bytes'] / 2**20:.1f} MiB", f"{row['export_command_seconds']:.1f} s",
                 f"{row['write_seconds']:.1f} s", f"{row['reload_seconds']:.1f} s",
                 significant(row["max_abs_logit_difference"], 2),
                 significant(row["mean_abs_logit_difference"], 2),
                 f"{100 * row['argmax_agreement']:.1f}%"]
        lines.append(f"| {' | '.join(cells)} |")
    scale = max(row["max_abs_logit"] for row in data["rows"])
    lines += ["", f"The largest |logit| is {scale:.1f}."]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--render", type=Path, help="print the docs table from this JSON instead")
    args = parser.parse_args()
    if args.render:
        print(render(args.render))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    load_before = os.getloadavg()[0]  # the machine may be shared: times are upper bounds when it is busy
    with tempfile.TemporaryDirectory() as work:
        result = measure(args.steps, Path(work))
    result["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    date = datetime.date.today().isoformat()
    command = "HF_HUB_OFFLINE=1 python bench/gguf_export.py"
    command += f" --steps {args.steps}" if args.steps != 2 else ""
    result = {"date": date, "command": command, "cpus": os.cpu_count(), **result}
    path = Path(__file__).resolve().parent.parent / "docs" / "results" / f"{date}-gguf-export.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(path)


if __name__ == "__main__":
    main()
