"""EWC's Fisher is the per-sequence empirical Fisher, also when the loop feeds packed rows."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama

import tuneforge
from tuneforge.data import collate
from tuneforge.packing import packed_collate
from tuneforge.strategies import StrategyContext
from tuneforge.strategies.ewc import single_examples

PAD = 0
CAPACITY = 13


def documents() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for length, prompt in ((7, 2), (5, 1), (10, 3)):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})  # prompt tokens masked
    return items


def task_fisher(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The Fisher EWC keeps for a finished task whose training batches were `batches`."""
    ewc = next(s for s in model.tuneforge_strategies if s.name == "ewc")
    ewc.penalties, ewc.task_examples = [], []
    ctx = StrategyContext(current_task="t")
    ewc.on_train_start(model, ctx)
    for batch in batches:
        ewc.loss(model, batch, None, ctx)
    ewc.on_task_end(model, "t", ctx)
    (_, fisher), = ewc.penalties
    return fisher


def test_packed_rows_split_into_their_documents():
    items = documents()
    packed = packed_collate(items, PAD, capacity=CAPACITY)
    # row 0: documents 0 and 1 (12 tokens); row 1: document 2 (10 tokens) and 2 padding tokens
    assert packed["input_ids"].shape == (2, 12) and packed["attention_mask"][1].sum() == 10
    examples = single_examples(packed)
    assert len(examples) == 3
    for example, item in zip(examples, items, strict=True):
        assert example["input_ids"].tolist() == [item["input_ids"]]
        assert example["attention_mask"].tolist() == [[1] * len(item["input_ids"])]
        assert example["labels"][0, 1:].tolist() == item["labels"][1:]  # the first token is no target either way
        assert "position_ids" not in example


def test_fisher_of_packed_rows_equals_the_fisher_of_its_documents_alone():
    model = tuneforge.prepare(tiny_llama(), [{"full": {}}, {"ewc": {"fisher_samples": 8}}])
    items = documents()
    packed = task_fisher(model, [packed_collate(items, PAD, capacity=CAPACITY)])
    alone = task_fisher(model, [collate([item], PAD) for item in items])
    assert packed.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-6, rtol=1e-4, msg=name)
    assert max(value.abs().max().item() for value in alone.values()) > 1e-4  # a Fisher worth comparing


@pytest.mark.parametrize("rows", [1, 2])
def test_padded_batches_still_split_into_rows(rows):
    items = documents()[:rows]
    examples = single_examples(collate(items, PAD))
    assert [e["input_ids"].tolist() for e in examples] == [[item["input_ids"]] for item in items]
