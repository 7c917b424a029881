"""Packing: whole examples share rows, attention stays in each, the loss is the separate examples' loss."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama

import tuneforge
from tuneforge.errors import ConfigError
from tuneforge.evaluate import label_head, token_losses
from tuneforge.packing import check_packing, first_fit_rows, packed_collate, packing_plan
from tuneforge.train import task_loss

PAD = 0


def random_items(lengths: list[int], seed: int = 1, vocab: int = 300) -> list[dict]:
    """Examples whose first third is an unlabelled prompt, the rest labelled (like completion data)."""
    generator = torch.Generator().manual_seed(seed)
    items = []
    for length in lengths:
        ids = torch.randint(3, vocab, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] * (length // 3) + ids[length // 3:]})
    return items


def separate_losses(model, items: list[dict]) -> tuple[float, int]:
    total, count = 0.0, 0
    for item in items:
        ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
        loss_sum, n = token_losses(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits, labels)
        total, count = total + float(loss_sum.detach()), count + n
    return total, count


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
@pytest.mark.parametrize("fast_head", [False, True])
def test_packed_loss_is_the_token_weighted_mean_of_the_separate_losses(attention, fast_head):
    model = tiny_llama(attn_implementation=attention)
    items = random_items([5, 9, 17, 3, 30, 12, 2])
    with torch.no_grad():
        total, count = separate_losses(model, items)
        batch = packed_collate(items, PAD, capacity=40)
        assert batch["input_ids"].shape[0] < len(items)  # several examples really share rows
        packed_sum, packed_count, _ = task_loss(model, batch, head=label_head(model) if fast_head else None)
    assert packed_count == count
    assert float(packed_sum) / packed_count == pytest.approx(total / count, rel=1e-5)


def test_packed_gradients_equal_the_separate_examples_gradients():
    model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 4, "targets": "all-linear"}}])
    for name, parameter in model.named_parameters():
        if "lora_B" in name:  # B = 0 at init would make every LoRA-A gradient zero
            torch.nn.init.normal_(parameter, std=0.1)
    items = random_items([7, 11, 4, 20])
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}

    _, count = separate_losses(model, items)
    loss_separate = sum(task_loss(model, packed_collate([item], PAD, 64))[0] for item in items) / count
    expected = torch.autograd.grad(loss_separate, list(trainable.values()))
    packed_sum, packed_count, _ = task_loss(model, packed_collate(items, PAD, 24), head=label_head(model))
    got = torch.autograd.grad(packed_sum / packed_count, list(trainable.values()))
    for name, want, have in zip(trainable, expected, got, strict=True):
        torch.testing.assert_close(have, want, rtol=1e-4, atol=1e-6, msg=name)


def test_collate_restarts_positions_and_never_targets_an_examples_first_token():
    items = random_items([3, 4, 5], seed=2)
    batch = packed_collate(items, PAD, capacity=8)
    rows, _ = first_fit_rows([3, 4, 5], 8)
    assert rows == [[0, 1], [2]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6]]  # pad continues
    assert batch["input_ids"][0].tolist() == items[0]["input_ids"] + items[1]["input_ids"]
    assert batch["input_ids"][1, 5:].tolist() == [PAD, PAD]
    assert batch["labels"][0, 3] == -100 and batch["labels"][1, 0] == -100  # starts of examples
    assert batch["labels"][0, 4:].tolist() == items[1]["labels"][1:]
    assert batch["attention_mask"].sum() == 12 and batch["attention_mask"][1].tolist() == [1] * 5 + [0] * 2


def test_plan_uses_every_example_once_per_epoch_in_at_most_batch_size_rows():
    lengths = [int(n) for n in torch.randint(1, 60, (300,), generator=torch.Generator().manual_seed(0))]
    plan = packing_plan(lengths, [200, 100], rows=2, capacity=64, seed=3)
    for epoch in (0, 1):
        batches = [batch for step in plan(epoch, 0, 1) for batch in step]
        assert sorted(i for batch in batches for i in batch) == list(range(300))
        assert all(all(i < 200 for i in b) or all(i >= 200 for i in b) for b in batches)  # one task each
        items = [{"input_ids": [1] * lengths[i], "labels": [1] * lengths[i]} for i in range(300)]
        for batch in batches:
            assert packed_collate([items[i] for i in batch], PAD, 64)["input_ids"].shape[0] <= 2
        filled = sum(lengths) / (len(batches) * 2 * 64)
        assert filled > 0.85  # rows are nearly full
    assert plan(0, 0, 1) == plan(0, 0, 1) and plan(0, 0, 1) != plan(1, 0, 1)
    first, second = ([b for step in plan(0, rank, 2) for b in step] for rank in (0, 1))
    assert len(first) == len(second) and not {i for b in first for i in b} & {i for b in second for i in b}


def test_packing_refuses_a_soft_prompt_that_would_open_only_the_row():
    # each example sees it
    check_packing(tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 4}}]), PAD, "cpu")
    with pytest.raises(ConfigError, match="train.packing: examples packed into one row"):
        check_packing(tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 4}}]), PAD, "cpu")


def test_a_packed_run_trains_on_fewer_rows_and_learns(run_config):
    from tuneforge.run import train_run

    config = run_config(train={"packing": True, "batch_size": 2, "max_steps": 8, "max_seq_len": 48})
    results = train_run(config)
    records = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if "loss" in r and r.get("split") != "eval"]
    assert len(train) == 8 and train[-1]["loss"] < train[0]["loss"]
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]


def test_packing_refuses_a_strategy_that_runs_its_own_forward_on_the_batch(run_config):
    from tuneforge.run import train_run

    config = run_config(strategies=[{"lora": {"rank": 4}}, {"distill": {"teacher": "base"}}],
                        train={"packing": True})
    with pytest.raises(ConfigError, match="train.packing: distill reads every position's logits"):
        train_run(config)
