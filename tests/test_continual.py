"""Continual learning: the R matrix and transfer metrics, reservoir replay, sequence runs and their resume."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import ANIMALS, COLORS, classification_records

from tuneforge.config import validate_config
from tuneforge.continual import continual_metrics
from tuneforge.run import train_run
from tuneforge.strategies.replay import Replay, ReplayOptions


def test_metrics_match_a_hand_computed_example():
    # 3 tasks; row i = accuracies on tasks 0..2 after training task i; b = before any training
    matrix = [[0.9, 0.3, 0.2],
              [0.7, 0.8, 0.4],
              [0.6, 0.7, 0.9]]
    baseline = [0.1, 0.2, 0.3]
    result = continual_metrics(matrix, baseline)
    assert result["acc"] == pytest.approx((0.6 + 0.7 + 0.9) / 3)
    assert result["bwt"] == pytest.approx(((0.6 - 0.9) + (0.7 - 0.8)) / 2)  # -0.2: forgetting
    assert result["fwt"] == pytest.approx(((0.3 - 0.2) + (0.4 - 0.3)) / 2)  # +0.1


def test_reservoir_buffer_is_uniform_over_the_stream():
    stream, size, trials = 200, 20, 1500
    counts = Counter()
    for trial in range(trials):
        replay = Replay(ReplayOptions(buffer_size=size))
        replay.rng.seed(trial)
        for item in range(stream):
            replay.add({"id": item})
        assert len(replay.buffer) == size
        counts.update(entry["id"] for entry in replay.buffer)
    expected = trials * size / stream  # 150 per item
    first, last = sum(counts[i] for i in range(50)) / 50, sum(counts[i] for i in range(150, 200)) / 50
    assert first == pytest.approx(expected, rel=0.08) and last == pytest.approx(expected, rel=0.08)
    chi2 = sum((counts[i] - expected) ** 2 / expected for i in range(stream))
    assert chi2 < 280  # 199 degrees of freedom: p ~ 0.0002 at 280


def test_replay_mixes_stored_examples_into_later_tasks():
    replay = Replay(ReplayOptions(buffer_size=10, ratio=0.5))
    first = [{"task_id": 0, "n": i} for i in range(8)]
    assert replay.task_items(first, None) == first
    replay.on_task_end(None, "a", None)
    second = [{"task_id": 1, "n": i} for i in range(6)]
    mixed = replay.task_items(second, None)
    assert mixed[:6] == second and len(mixed) == 9 and all(item["task_id"] == 0 for item in mixed[6:])
    state = json.loads(json.dumps(replay.state_dict()))  # JSON-able: goes into checkpoints
    restored = Replay(ReplayOptions(buffer_size=10, ratio=0.5))
    restored.load_state_dict(state)
    assert restored.buffer == replay.buffer and restored.seen == 8


def remap_records(shift: int, count: int = 32) -> list[dict]:
    """The colour task with a task-specific mapping, so later tasks overwrite earlier ones."""
    return [{"prompt": f"What colour is the {ANIMALS[i % 8]}?", "completion": f" {COLORS[(i + shift) % 8]}"}
            for i in range(count)]


def sequence_config(tmp_path, model_dir, strategies, name="run", **train):
    tasks = []
    for index, shift in enumerate((0, 3, 5)):
        path = tmp_path / f"task{index}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in remap_records(shift)))
        tasks.append({"name": f"t{index}", "data": {"train": str(path), "eval_fraction": 0.25}})
    return validate_config({
        "model": str(model_dir), "retain": None, "tasks": tasks, "schedule": {"mode": "sequence"},
        "strategies": strategies,
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "max_seq_len": 32, "save_every": 4, **train},
        "evaluation": {"samples": 0},
        "output": str(tmp_path / name),
    })


def test_sequence_run_reports_the_matrix_and_transfer(tmp_path, tiny_model_dir):
    results = train_run(sequence_config(tmp_path, tiny_model_dir,
                                        [{"full": {}}, {"replay": {"buffer_size": 16}}]))
    continual = results["continual"]
    assert continual["tasks"] == ["t0", "t1", "t2"] and len(continual["matrix"]) == 3
    assert all(len(row) == 3 for row in continual["matrix"])
    assert continual["matrix"][0][0] > continual["baseline"][0]  # learning task 0 helped task 0
    assert set(continual) >= {"acc", "bwt", "fwt"}
    report = (tmp_path / "run" / "report.md").read_text()
    assert "## Continual learning" in report and "BWT" in report
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert {r["task"] for r in steps} == {"t0", "t1", "t2"}


def register_task_crash():
    from tuneforge.strategies import REGISTRY, Options, Strategy, register

    if "crash_in_task" in REGISTRY:
        return

    class CrashOptions(Options):
        task: str
        step: int

    @register("crash_in_task", CrashOptions)
    class CrashInTask(Strategy):
        """Test helper: raise inside a chosen task at a chosen step."""

        family = "objective"

        def needs_logits(self):
            return False  # as the uninterrupted run: the same (chunked) loss path, bit for bit

        def loss(self, model, batch, outputs, ctx):
            if ctx.current_task == self.options.task and ctx.step == self.options.step:
                raise KeyboardInterrupt
            return {}


def test_sequence_resume_is_exact(tmp_path, tiny_model_dir):
    register_task_crash()
    strategies = [{"full": {}}, {"replay": {"buffer_size": 8}}]
    train_run(sequence_config(tmp_path, tiny_model_dir, strategies, name="a"))
    with pytest.raises(KeyboardInterrupt):
        crash = {"crash_in_task": {"task": "t1", "step": 6}}
        train_run(sequence_config(tmp_path, tiny_model_dir, strategies + [crash], name="b"))
    no_crash = {"crash_in_task": {"task": "none", "step": 0}}
    train_run(sequence_config(tmp_path, tiny_model_dir, strategies + [no_crash], name="b"), resume=True)
    a = json.loads((tmp_path / "a" / "results.json").read_text())["continual"]["matrix"]
    b = json.loads((tmp_path / "b" / "results.json").read_text())["continual"]["matrix"]
    assert a == b
    from safetensors.torch import load_file

    from tuneforge.checkpoint import latest_checkpoint

    wa = load_file(str(latest_checkpoint(tmp_path / "a" / "checkpoints" / "t2") / "weights.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "b" / "checkpoints" / "t2") / "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_classification_sequence_uses_accuracy(tmp_path, tiny_bert_dir):
    def write(name, kind):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in classification_records(kind)))
        return str(path)

    config = validate_config({
        "model": str(tiny_bert_dir),
        "tasks": [{"name": "animal", "data": {"train": write("a", "animal")}},
                  {"name": "colour", "data": {"train": write("c", "colour")}}],
        "schedule": {"mode": "sequence"},
        "strategies": [{"full": {}}, {"heads": {}}],
        "train": {"max_steps": 4, "batch_size": 8, "lr": 1e-3, "max_seq_len": 32},
        "output": str(tmp_path / "run"),
    })
    continual = train_run(config)["continual"]
    assert continual["metric"] == "accuracy" and all(0 <= v <= 1 for row in continual["matrix"] for v in row)
