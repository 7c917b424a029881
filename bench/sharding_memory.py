"""Per-process peak memory and step time of full fine-tuning on 2 processes: DDP, ZeRO-2, ZeRO-3, FSDP2.

A synthetic Llama (random weights, SmolLM2's tokenizer and vocabulary, ~90M parameters with tied
embeddings) is fully fine-tuned for a few steps by `torchrun --nproc_per_node 2` with each
`distributed.engine`, in alternating order over the repeats. From results.json (`distributed.memory_mb`),
for each process: what it holds once training ends (resident memory after freed memory is handed back,
before the final checkpoint gathers anything), and its peak resident memory during training (from the
start of training: loading puts the whole model in every process first). The arithmetic beside them:
with AdamW in fp32, model states take 16 bytes a parameter (4 weights, 4 gradients, 8 moments); ZeRO-2
divides gradients and moments by the processes, ZeRO-3 and FSDP2 all 16 (Rajbhandari et al. 2020,
table 1).

    python bench/sharding_memory.py [--repeats 2] [--steps 6] \
        [--output docs/results/2026-11-29-sharding.json]
    python bench/render_docs.py       # the table in docs/distributed.md again, from the JSON
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ENGINES = {
    "ddp": {"engine": "ddp"},
    "zero2": {"engine": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
    "zero3": {"engine": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}}},
    "fsdp": {"engine": "fsdp"},
}
STATE_BYTES = {"ddp": lambda n: 16, "zero2": lambda n: 4 + 12 / n, "zero3": lambda n: 16 / n,
               "fsdp": lambda n: 16 / n}  # model-state bytes per parameter held by each process
PROCESSES = 2
# glibc keeps freed blocks below its (growing) mmap threshold for reuse, and the resident set counts them:
# with blocks of 1 MiB and more mapped and unmapped, the resident peak follows live memory
# (bench/memory_estimate.py measures the difference)
RETURNING = {"MALLOC_MMAP_THRESHOLD_": str(2**20)}


def synthetic_model(directory: Path) -> int:
    """A ~90M-parameter Llama with random weights, saved with SmolLM2's tokenizer; returns its size."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from tuneforge.models import load_tokenizer, resolve_model_path

    tokenizer = load_tokenizer(resolve_model_path("smollm2-135m"))
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=640, intermediate_size=1728,
                         num_hidden_layers=12, num_attention_heads=10, num_key_value_heads=5,
                         tie_word_embeddings=True, max_position_embeddings=2048)
    model = LlamaForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return sum(p.numel() for p in model.parameters())


def run(engine: str, model: Path, work: Path, steps: int, repeat: int) -> dict:
    output = work / f"{engine}-{repeat}"
    config = {"model": str(model), "data": {"train": "builtin:chatterbot", "max_eval_examples": 8},
              "retain": None, "strategies": [{"full": {}}],
              "train": {"max_steps": steps, "batch_size": 4, "lr": 1e-5, "max_seq_len": 128,
                        "log_every": 1},
              "evaluation": {"samples": 0}, "distributed": ENGINES[engine], "output": str(output)}
    path = work / f"{engine}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO),
           "TOKENIZERS_PARALLELISM": "false", **RETURNING}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
               str(PROCESSES), "-m", "tuneforge.cli", "train", str(path)]
    subprocess.run(command, env=env, check=True, capture_output=True, text=True, timeout=1800)
    result = json.loads((output / "results.json").read_text())
    records = [json.loads(line) for line in (output / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r.get("split", "train") == "train"]
    tokens_per_s = [r["tokens_per_s"] for r in train][1:]  # after the first step's warm-up
    return {"engine": engine, "repeat": repeat, "load_average": os.getloadavg()[0],
            "peak_memory_mb": result["distributed"]["memory_mb"]["peak"],
            "resident_memory_mb": result["distributed"]["memory_mb"]["resident"],
            "held": result["distributed"]["held"], "seconds_per_step": result["train_seconds"] / steps,
            "tokens_per_s": statistics.median(tokens_per_s), "final_loss": records[-1]["loss"]}


def summarise(runs: list[dict], parameters: int) -> list[dict]:
    def mean_of(engine: str, key: str) -> float:
        return statistics.mean(statistics.mean(r[key]) for r in runs if r["engine"] == engine)

    ddp_time = statistics.mean(r["seconds_per_step"] for r in runs if r["engine"] == "ddp")
    rows = []
    for engine in ENGINES:
        mine = [r for r in runs if r["engine"] == engine]
        resident = [statistics.mean(r["resident_memory_mb"]) for r in mine]
        peaks = [statistics.mean(r["peak_memory_mb"]) for r in mine]
        times = [r["seconds_per_step"] for r in mine]
        expected = (STATE_BYTES["ddp"](PROCESSES) - STATE_BYTES[engine](PROCESSES)) * parameters / 2**20
        rows.append({"engine": engine, "resident_mb": statistics.mean(resident),
                     "resident_spread_mb": max(resident) - min(resident),
                     "saved_mb": mean_of("ddp", "resident_memory_mb") - statistics.mean(resident),
                     "arithmetic_saved_mb": expected, "peak_mb": statistics.mean(peaks),
                     "peak_spread_mb": max(peaks) - min(peaks),
                     "peak_saved_mb": mean_of("ddp", "peak_memory_mb") - statistics.mean(peaks),
                     "state_bytes_per_parameter": STATE_BYTES[engine](PROCESSES),
                     "step_time_ratio": statistics.mean(times) / ddp_time,
                     "step_time_spread": (max(times) - min(times)) / ddp_time, "held": mine[0]["held"]})
    return rows


def render(report: dict) -> str:
    loads = [r["load_average"] for r in report["runs"]]
    lines = [(f"Measured {report['date']} on {report['machine']}: `{report['command']}` "
             f"(`{report['file']}`). Full fine-tuning of a {report['parameters'] / 1e6:.0f}M-parameter "
             f"synthetic Llama, fp32, {PROCESSES} CPU processes (gloo, 1 thread each), batch 4 x 128 "
             f"tokens per process, {report['steps']} steps, {report['repeats']} runs per engine in "
             f"alternating order; MiB per process, the mean of the processes and runs (± half the spread "
             f"over runs), with `MALLOC_MMAP_THRESHOLD_={RETURNING['MALLOC_MMAP_THRESHOLD_']}` so that the "
             f"resident set follows live memory. The machine's 1-minute load average during the runs: "
             f"{min(loads):.1f} to {max(loads):.1f} on 2 cores, so step times are rough."), "",
             ("| engine | model-state bytes / parameter | process 0 holds (params, AdamW) | held after "
              "training | saved vs DDP | arithmetic saving | peak in training | peak saved vs DDP | step "
              "time vs DDP |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in report["rows"]:
        held = row["held"]
        lines.append(
            f"| {row['engine']} | {row['state_bytes_per_parameter']:g} | {held['parameters']:.2f}, "
            f"{held['optimizer_state']:.2f} | {row['resident_mb']:,.0f} "
            f"(± {row['resident_spread_mb'] / 2:,.0f}) | {row['saved_mb']:,.0f} | "
            f"{row['arithmetic_saved_mb']:,.0f} | {row['peak_mb']:,.0f} "
            f"(± {row['peak_spread_mb'] / 2:,.0f}) | {row['peak_saved_mb']:,.0f} | "
            f"{row['step_time_ratio']:.2f}x (± {row['step_time_spread'] / 2:.2f}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--output", default="docs/results/2026-11-29-sharding.json")
    parser.add_argument("--machine", default="2 CPU cores, 24 GiB")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        parameters = synthetic_model(work / "model")
        runs = []
        for repeat in range(args.repeats):  # alternating order: a slow spell of the machine hits each engine
            order = list(ENGINES) if repeat % 2 == 0 else list(reversed(ENGINES))
            for engine in order:
                runs.append(run(engine, work / "model", work, args.steps, repeat))
                print(json.dumps(runs[-1]), flush=True)
    command = f"python bench/sharding_memory.py --repeats {args.repeats} --steps {args.steps}"
    report = {"date": datetime.date.today().isoformat(), "command": command, "file": args.output,
              "machine": args.machine, "parameters": parameters, "steps": args.steps,
              "repeats": args.repeats, "runs": runs, "rows": summarise(runs, parameters)}
    Path(args.output).write_text(json.dumps(report, indent=1) + "\n")
    import render_docs  # this folder: the registry renders the doc from the JSON just written

    render_docs.render_all()
    print(render(report))


if __name__ == "__main__":
    main()
