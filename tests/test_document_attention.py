"""Per-document attention for packed rows computes what the block-diagonal mask computes, or is not used."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from test_packing import PAD, random_items

import tuneforge
from tuneforge import document_attention
from tuneforge.errors import ConfigError
from tuneforge.evaluate import label_head
from tuneforge.packing import check_packing, packed_collate, packed_model_inputs
from tuneforge.train import task_loss

ROW = document_attention.MIN_ROW_LENGTH


def lora_llama(**overrides):
    model = tuneforge.prepare(tiny_llama(**overrides), [{"lora": {"rank": 4, "targets": "all-linear"}}])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # B = 0 at init would make every LoRA-A gradient zero
                parameter.normal_(std=0.1)
    return model


def loss_and_grads(model, batch, fast_head: bool) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    loss_sum, count, _ = task_loss(model, batch, head=label_head(model) if fast_head else None)
    (loss_sum / count).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return float(loss_sum.detach()) / count, grads


@pytest.mark.parametrize("checkpointing", [False, True])
def test_per_document_loss_and_gradients_equal_the_masked_ones(checkpointing):
    model = lora_llama()
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = packed_collate(random_items([7, 11, 4, 20, 9, 3, 14]), PAD, capacity=32)
    rows = batch["input_ids"].shape[0]
    assert rows > 1 and (batch["position_ids"] == 0).sum() > rows  # several rows, several examples in one
    masked_loss, masked = loss_and_grads(model, batch, fast_head=True)
    assert document_attention.enable(model, ROW)
    calls = []
    original = document_attention.sdpa_attention_forward

    def counting(*args, **kwargs):
        calls.append(args[1].shape[2])
        return original(*args, **kwargs)

    document_attention.sdpa_attention_forward = counting
    try:
        documents_loss, per_document = loss_and_grads(model, batch, fast_head=True)
    finally:
        document_attention.sdpa_attention_forward = original
    assert documents_loss == pytest.approx(masked_loss, rel=1e-5)
    for name, grad in masked.items():
        torch.testing.assert_close(per_document[name], grad, rtol=1e-4, atol=1e-6, msg=name)
    # one call per example and layer (the padding at a row's end belongs to its last example)
    examples = int((batch["position_ids"] == 0).sum())
    passes = model.config.num_hidden_layers * (2 if checkpointing else 1)  # checkpointing runs forward twice
    assert len(calls) == examples * passes and sum(calls) == batch["input_ids"].numel() * passes


def test_boundaries_split_the_flattened_rows_at_every_example():
    batch = packed_collate(random_items([5, 9, 17, 3]), PAD, capacity=20)
    cu = document_attention.boundaries(batch["position_ids"])["cu_seq_lens_q"].tolist()
    width = batch["input_ids"].shape[1]
    assert cu[0] == 0 and cu[-1] == batch["input_ids"].numel()
    assert all(r * width in cu for r in range(batch["input_ids"].shape[0]))  # no example spans two rows
    assert sorted(cu) == cu and len(set(cu)) == len(cu)


def test_calls_without_boundaries_are_plain_sdpa():
    model = lora_llama().eval()
    ids = torch.tensor([[5, 6, 7, 8, 9], [0, 0, 10, 11, 12]])  # left padding: position ids do not restart
    mask = (ids != 0).long()
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        document_attention.enable(model, ROW)
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)


def test_check_packing_picks_documents_where_they_compute_the_same():
    assert check_packing(lora_llama(), PAD, "cpu", ROW) == "documents"
    assert check_packing(lora_llama(), PAD, "cpu") == "mask"  # no row length given: left as it was
    assert check_packing(lora_llama(), PAD, "cpu", ROW - 1) == "mask"  # short rows: the mask costs no more
    assert check_packing(tiny_llama(attn_implementation="eager"), PAD, "cpu", ROW) == "mask"
    prefix = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 4}}])  # its own attention function
    assert check_packing(prefix, PAD, "cpu", ROW) == "mask"
    windowed = tiny_llama(sliding_window=16, use_sliding_window=True)
    assert "sliding window (16)" in document_attention.why_not(windowed, ROW)


def test_a_per_document_function_that_mixes_examples_is_turned_off(monkeypatch):
    model = lora_llama()

    def wrong(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        kwargs.pop("cu_seq_lens_k", None)
        kwargs.pop("cu_seq_lens_q", None)
        return document_attention.sdpa_attention_forward(module, query, key, value, None, dropout, scaling,
                                                         **kwargs)  # causal over the whole row

    from transformers.modeling_utils import AttentionInterface

    document_attention.enable(model, ROW)
    monkeypatch.setitem(AttentionInterface._global_mapping, document_attention.ATTENTION_NAME, wrong)
    assert check_packing(model, PAD, "cpu", ROW) == "mask"
    assert not document_attention.uses_document_attention(model)


def test_a_soft_prompt_is_still_refused_and_the_model_left_as_it_came():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 4}}])  # rows grow inside the model
    with pytest.raises(ConfigError, match="train.packing: examples packed into one row"):
        check_packing(model, PAD, "cpu", ROW)
    assert not document_attention.uses_document_attention(model)


def test_only_plain_full_attention_models_on_cpu_are_switched():
    assert document_attention.why_not(tiny_llama(), ROW) is None
    assert "CPU only" in document_attention.why_not(tiny_llama(), ROW, "meta")
    assert "attention chunk size (64)" in document_attention.why_not(tiny_llama(attention_chunk_size=64), ROW)
    hybrid = tiny_llama()
    hybrid.config.layer_types = ["full_attention", "linear_attention", "full_attention", "full_attention"]
    assert "linear_attention" in document_attention.why_not(hybrid, ROW)


def test_a_packed_run_trains_the_same_per_document_as_masked(run_config, monkeypatch, tmp_path):
    from tuneforge.run import train_run

    monkeypatch.setattr(document_attention, "MIN_ROW_LENGTH", 0)  # tiny rows, to keep the run short
    def losses(name: str) -> list[float]:
        config = run_config(train={"packing": True, "batch_size": 2, "max_steps": 4, "max_seq_len": 48},
                            output=str(tmp_path / name))
        train_run(config)
        lines = (Path(config.output) / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r and r.get("split") != "eval"]

    split = []
    original = document_attention.boundaries
    monkeypatch.setattr(document_attention, "boundaries", lambda p: split.append(1) or original(p))
    documents = losses("documents")
    assert len(split) >= 4  # the check and every training step carried the boundaries
    monkeypatch.setattr(document_attention, "why_not", lambda *args: "off for the comparison")
    masked = losses("masked")
    assert documents == pytest.approx(masked, rel=1e-4) and len(documents) == 4


def test_packed_inputs_carry_boundaries_only_when_asked():
    batch = packed_collate(random_items([5, 9]), PAD, capacity=20)
    assert "cu_seq_lens_q" not in packed_model_inputs({}, batch)
    assert packed_model_inputs({}, batch, documents=True)["cu_seq_lens_q"].tolist() == [0, 5, 14]


def test_compiled_blocks_train_the_same_per_document(run_config, monkeypatch, tmp_path):
    """Under train.compile the per-document call runs eagerly between two compiled parts of each block."""
    from tuneforge import compiling
    from tuneforge.run import train_run

    monkeypatch.setattr(document_attention, "MIN_ROW_LENGTH", 0)
    monkeypatch.setattr(compiling, "BACKEND", "eager")  # dynamo's tracing and guards, no code generation
    train = {"packing": True, "batch_size": 2, "max_steps": 2, "max_seq_len": 48}
    split = []
    original = document_attention.boundaries
    monkeypatch.setattr(document_attention, "boundaries", lambda p: split.append(1) or original(p))

    def losses(name: str, **extra) -> list[float]:
        config = run_config(train={**train, **extra}, output=str(tmp_path / name))
        train_run(config)
        lines = (Path(config.output) / "metrics.jsonl").read_text().splitlines()
        return [r["loss"] for r in map(json.loads, lines) if "loss" in r and r.get("split") != "eval"]

    torch._dynamo.reset()
    compiled = losses("compiled", compile=True)
    assert len(split) >= 3  # the check and both steps went per document
    assert compiled == pytest.approx(losses("eager"), abs=1e-6)
