"""Multi-task learning: sampling proportions, single-task batches, task heads and their gradients."""

from __future__ import annotations

import json
from collections import Counter

import pytest
import torch
from conftest import classification_records, task_records

import tuneforge
from tuneforge.config import ScheduleConfig, validate_config
from tuneforge.run import train_run
from tuneforge.tasks import mixture_plan, task_probabilities


def micro_batches(steps: list[list[list[int]]]) -> list[list[int]]:
    """A plan's steps as one list of micro-batches."""
    return [micro for step in steps for micro in step]


def task_of(index: int, sizes: list[int]) -> int:
    bound = 0
    for task, size in enumerate(sizes):
        bound += size
        if index < bound:
            return task
    raise AssertionError(index)


def test_proportional_sampling_sees_every_example_once_in_single_task_batches():
    sizes = [30, 90]
    batches = micro_batches(mixture_plan(sizes, 4, ScheduleConfig(sampling="proportional"), seed=0)(0, 0, 1))
    assert sorted(i for b in batches for i in b) == list(range(120))
    assert all(len({task_of(i, sizes) for i in b}) == 1 for b in batches)
    shares = Counter(task_of(b[0], sizes) for b in batches)
    assert shares == {0: 8, 1: 23}  # ceil(30 / 4), ceil(90 / 4)


def test_temperature_sampling_matches_the_configured_proportions():
    sizes, schedule = [100, 900], ScheduleConfig(sampling="temperature", temperature=2.0)
    expected = task_probabilities(sizes, schedule)
    assert expected == pytest.approx([10 / 40, 30 / 40])  # sqrt(100) : sqrt(900)
    plan = mixture_plan(sizes, 2, schedule, seed=0)
    drawn = Counter(task_of(b[0], sizes) for epoch in range(8) for b in micro_batches(plan(epoch, 0, 1)))
    total = sum(drawn.values())
    assert drawn[0] / total == pytest.approx(expected[0], abs=0.03)


def test_round_robin_alternates_tasks():
    sizes = [8, 8, 8]
    batches = micro_batches(mixture_plan(sizes, 2, ScheduleConfig(sampling="round_robin"), seed=0)(0, 0, 1))
    assert [task_of(b[0], sizes) for b in batches[:6]] == [0, 1, 2, 0, 1, 2]


def test_heads_get_only_their_own_tasks_gradients(tiny_bert_dir):
    from transformers import AutoModel

    model = AutoModel.from_pretrained(tiny_bert_dir)
    model = tuneforge.prepare(model, [{"full": {}},
                                      {"heads": {"tasks": {"a": {"num_labels": 3}, "b": {"num_labels": 2}}}}])
    batch = {"input_ids": torch.randint(3, 50, (4, 6)), "attention_mask": torch.ones(4, 6, dtype=torch.long)}
    out = model(**batch, task_id=torch.zeros(4, dtype=torch.long))
    assert out.logits.shape == (4, 3)
    torch.nn.functional.cross_entropy(out.logits, torch.tensor([0, 1, 2, 0])).backward()
    assert model.head_a.weight.grad.abs().sum() > 0
    assert model.head_b.weight.grad is None
    assert model.encoder.layer[0].attention.self.query.weight.grad.abs().sum() > 0  # the shared body learns
    assert model(**batch, task_id=torch.ones(4, dtype=torch.long)).logits.shape == (4, 2)


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_two_classification_tasks_on_a_shared_encoder(tmp_path, tiny_bert_dir):
    config = validate_config({
        "model": str(tiny_bert_dir),
        "tasks": [
            {"name": "animal",
             "data": {"train": write_jsonl(tmp_path / "a.jsonl", classification_records("animal"))}},
            {"name": "colour",
             "data": {"train": write_jsonl(tmp_path / "c.jsonl", classification_records("colour"))}},
        ],
        "schedule": {"mode": "mixture", "sampling": "round_robin"},
        "strategies": [{"full": {}}, {"heads": {}}],
        "train": {"max_steps": 40, "batch_size": 8, "lr": 3e-3, "max_seq_len": 32},
        "output": str(tmp_path / "run"),
    })
    results = train_run(config)
    assert set(results["after"]["tasks"]) == {"animal", "colour"}
    for task in ("animal", "colour"):
        assert results["after"]["tasks"][task]["loss"] < results["before"]["tasks"][task]["loss"]
    assert "| task animal accuracy |" in (tmp_path / "run" / "report.md").read_text()
    from transformers import AutoModel

    loaded = tuneforge.load_adapter(AutoModel.from_pretrained(tiny_bert_dir), tmp_path / "run" / "adapter")
    assert loaded.head_colour.weight.shape == (2, 32)


def test_language_modelling_and_classification_tasks_on_one_decoder(tmp_path, tiny_model_dir):
    config = validate_config({
        "model": str(tiny_model_dir),
        "retain": None,
        "tasks": [
            {"name": "qa", "data": {"train": write_jsonl(tmp_path / "qa.jsonl", task_records(32))}},
            {"name": "colour",
             "data": {"train": write_jsonl(tmp_path / "c.jsonl", classification_records("colour"))}},
        ],
        "strategies": [{"lora": {"rank": 4, "targets": "all-linear"}}, {"heads": {}}],
        "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "max_seq_len": 48, "eval_every": 3},
        "evaluation": {"samples": 1, "max_new_tokens": 4},
        "output": str(tmp_path / "run"),
    })
    results = train_run(config)
    assert "perplexity" in results["after"]["tasks"]["qa"]
    assert "accuracy" in results["after"]["tasks"]["colour"]
    assert results["trainable_by_strategy"]["heads"] == 32 * 2 + 2
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    # per-task metrics in every eval
    assert any("colour/accuracy" in r for r in records if r.get("split") == "eval")


def test_several_classification_tasks_without_heads_is_a_clear_error(tmp_path, tiny_bert_dir):
    from tuneforge.errors import ConfigError

    config = validate_config({
        "model": str(tiny_bert_dir),
        "tasks": [
            {"name": "a",
             "data": {"train": write_jsonl(tmp_path / "a.jsonl", classification_records("animal"))}},
            {"name": "b",
             "data": {"train": write_jsonl(tmp_path / "b.jsonl", classification_records("colour"))}},
        ],
        "output": str(tmp_path / "run"),
    })
    with pytest.raises(ConfigError, match="add `- heads: {}`"):
        train_run(config)
