"""Synthetic finished run directories (results.json, config.yaml, metrics.jsonl) for report tests: no model,
no training, known numbers."""

from __future__ import annotations

import json
import math
from pathlib import Path

import yaml


def fake_run(root: Path, name: str, strategies: list[dict], task: tuple[float, float],
             retain_ppl: tuple[float, float], params: int, seed: int = 0, steps: int = 10,
             train_seconds: float = 20.0, memory_mb: float = 1500.0, samples: bool = True) -> Path:
    """A run directory as `tuneforge train` leaves it: task loss before -> after, retain perplexity
    before -> after, `params` trainable parameters."""
    run_dir = root / name
    run_dir.mkdir(parents=True)
    (task_before, task_after), (ppl_before, ppl_after) = task, retain_ppl

    def split(loss: float, ppl: float, output: str) -> dict:
        evaluation = {"eval": {"loss": loss, "perplexity": math.exp(loss)},
                      "retain": {"loss": math.log(ppl), "perplexity": ppl}}
        if samples:
            evaluation["samples"] = [{"prompt": "What is a fox?", "reference": "An animal | quick.",
                                      "output": output}]
        return evaluation

    results = {
        "model": "tiny", "strategies": strategies, "task_type": "causal_lm", "tasks": ["task"],
        "total_params": 1_000_000, "trainable_params": params, "trainable_by_strategy": {"x": params},
        "before": split(task_before, ppl_before, "I do not know."),
        "after": split(task_after, ppl_after, "A small animal."),
        "forgetting": {"loss": math.log(ppl_after / ppl_before), "perplexity": ppl_after - ppl_before},
        "steps": steps, "train_seconds": train_seconds, "wall_seconds": train_seconds + 5,
        "tokens_per_s": 100.0 if steps else 0.0, "peak_memory_mb": memory_mb,
        "adapter_bytes": params * 4 if steps else 0,
    }
    (run_dir / "results.json").write_text(json.dumps(results))
    config = {"model": "tiny", "data": {"train": "d.jsonl"}, "retain": "r.txt", "strategies": strategies,
              "train": {"max_steps": steps, "batch_size": 4, "max_seq_len": 32, "seed": seed}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    records = [{"step": s, "epoch": 0, "loss": task_before + (task_after - task_before) * s / max(steps, 1),
                "lr": 1e-3, "tokens_per_s": 100.0, "ewc": 0.01 * s} for s in range(2, steps + 1, 2)]
    records.append({"step": steps, "split": "eval", "loss": task_after, "retain_loss": math.log(ppl_after)})
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run_dir
