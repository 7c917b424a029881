"""Fast paths compute the same thing: label-only chunked loss, fused LoRA, frozen layers without a graph,
gradient checkpointing with LoRA, merged LoRA as a plain linear layer."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import tiny_llama

import tuneforge
from tuneforge import evaluate
from tuneforge.evaluate import evaluate_lm, label_head, linear_cross_entropy, token_losses
from tuneforge.strategies import Strategy
from tuneforge.strategies.base import Options
from tuneforge.strategies.lora import LoRALinear
from tuneforge.train import task_loss


def lm_batch(seed: int = 0, batch: int = 3, length: int = 12, vocab: int = 300) -> dict:
    """Right-padded batch whose first third of every row is an unlabelled prompt."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(3, vocab, (batch, length), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, -4:] = 0
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    labels[:, : length // 3] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@pytest.mark.parametrize("setup", ["untied", "tied", "prompt"])
def test_label_only_head_gives_the_full_logits_loss_and_gradients(setup, monkeypatch):
    monkeypatch.setattr(evaluate, "CE_CHUNK_ROWS", 4)  # 4 rows per chunk: several chunks
    monkeypatch.setattr(evaluate, "CE_CHUNK_ELEMENTS", 0)
    model = tiny_llama()
    if setup == "tied":  # as in SmolLM2: the head's weight is the embedding matrix
        model.lm_head.weight = model.model.embed_tokens.weight
    if setup == "prompt":  # hidden states come back with 5 virtual positions in front
        model = tuneforge.prepare(model, [{"prompt": {"length": 5}}])
    batch = lm_batch()
    results = []
    for head in (None, label_head(model)):
        model.zero_grad(set_to_none=True)
        loss_sum, count, outputs = task_loss(model, batch, head=head)
        (loss_sum / count).backward()
        grads = {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}
        results.append((float(loss_sum.detach()), count, grads, outputs))
    (full, full_count, full_grads, full_out), (fast, fast_count, fast_grads, fast_out) = results
    assert full_out.logits.shape[1] == 12 and fast_out.logits.shape[1] == 0  # the head really was skipped
    assert fast_count == full_count == int((batch["labels"][:, 1:] != -100).sum())
    assert fast == pytest.approx(full, rel=1e-6)
    for name, grad in full_grads.items():
        if grad is not None or fast_grads[name] is not None:
            torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)


def test_chunked_cross_entropy_under_bf16_autocast_and_with_a_bias(monkeypatch):
    monkeypatch.setattr(evaluate, "CE_CHUNK_ROWS", 8)
    monkeypatch.setattr(evaluate, "CE_CHUNK_ELEMENTS", 0)
    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(37, 16, generator=generator, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, requires_grad=True)
    bias = torch.randn(50, generator=generator, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    for autocast in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            fused = linear_cross_entropy(hidden, weight, bias, targets)
            reference = F.cross_entropy(F.linear(hidden, weight, bias).float(), targets, reduction="sum")
        got = torch.autograd.grad(3 * fused, (hidden, weight, bias))
        want = torch.autograd.grad(3 * reference, (hidden, weight, bias))
        tolerance = 2e-2 if autocast else 1e-5
        assert float(fused) == pytest.approx(float(reference), rel=tolerance)
        for have, expected in zip(got, want, strict=True):
            assert have.dtype == expected.dtype
            torch.testing.assert_close(have, expected, rtol=tolerance, atol=tolerance)


def test_evaluation_loss_is_unchanged_by_the_label_only_head():
    model = tiny_llama()
    batch = lm_batch(seed=1)
    items = [{"input_ids": ids[mask == 1].tolist(), "labels": labels[mask == 1].tolist()}
             for ids, mask, labels in zip(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                          strict=True)]
    with torch.no_grad():
        total, count = token_losses(model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits,
                                    batch["labels"])
    result = evaluate_lm(model, items, batch_size=2, pad_token_id=0, device="cpu")
    assert result["tokens"] == count and result["loss"] == pytest.approx(float(total) / count, rel=1e-5)


def test_full_logits_are_kept_for_strategies_that_override_loss():
    from tuneforge.compose import build_strategies

    class ReadsLogits(Strategy):
        def loss(self, model, batch, outputs, ctx):
            return {"mean_logit": outputs.logits.mean()}

    assert ReadsLogits(Options()).needs_logits()
    assert build_strategies([{"distill": {}}])[0].needs_logits()  # compares logits with its teacher's
    assert not any(s.needs_logits() for names in (["lora"], ["full"], [{"layerwise": {}}])
                   for s in build_strategies(names))
    # fit gives task_loss the head only when no strategy needs logits;
    # distill in the real loop: test_objectives


def test_layers_below_the_lowest_trainable_one_build_no_graph(run_config):
    """Layer-wise top half, also with gradient checkpointing (whose transformers hook would make the
    embeddings' output require grad): nothing below layer 2 is recorded for backward."""
    from tuneforge.run import build_model, load_run_data

    for checkpointing in (False, True):
        config = run_config(strategies=[{"layerwise": {"train_layers": "top:2"}}],
                            train={"gradient_checkpointing": checkpointing})
        model = build_model(config, load_run_data(config))[0]
        model.train()
        records: dict = {}

        def record(key, records=records):
            return lambda module, args, out: records.__setitem__(
                key, (out[0] if isinstance(out, tuple) else out).requires_grad)

        hooks = [model.get_input_embeddings().register_forward_hook(record("embeddings"))]
        hooks += [layer.register_forward_hook(record(index))
                  for index, layer in enumerate(model.model.layers)]
        loss_sum, _, _ = task_loss(model, lm_batch(vocab=model.config.vocab_size), head=label_head(model))
        loss_sum.backward()
        for hook in hooks:
            hook.remove()
        assert records == {"embeddings": False, 0: False, 1: False, 2: True, 3: True}, checkpointing
        assert all(p.grad is None for n, p in model.named_parameters()
                   if ".layers.0." in n or ".layers.1." in n)


def test_fused_lora_forward_equals_base_plus_scaled_update_and_its_gradients():
    torch.manual_seed(0)
    base = torch.nn.Linear(16, 24)
    layer = LoRALinear(base, rank=4, alpha=8.0)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(2, 5, 16, requires_grad=True)
    out = layer(x)
    reference = base(x) + 2.0 * (x @ layer.lora_A.weight.T) @ layer.lora_B.weight.T
    torch.testing.assert_close(out, reference)
    got = torch.autograd.grad(out.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    want = torch.autograd.grad(reference.square().sum(), (x, layer.lora_A.weight, layer.lora_B.weight))
    for have, expected in zip(got, want, strict=True):
        torch.testing.assert_close(have, expected, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed dtypes inside the in-place GEMM
        assert layer(x).dtype == torch.bfloat16


def test_merged_lora_runs_only_the_base_linear():
    model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 4, "targets": "all-linear"}}])
    for name, parameter in model.named_parameters():
        if "lora_B" in name:
            torch.nn.init.normal_(parameter, std=0.1)
    ids = lm_batch()["input_ids"]
    with torch.no_grad():
        unmerged = model(input_ids=ids).logits
        from tuneforge.strategies.lora import merge_lora

        merge_lora(model)

        def refuse(module, args):
            raise AssertionError("a merged model must not run its LoRA factors")

        for module in model.modules():
            if isinstance(module, LoRALinear):
                module.lora_A.register_forward_pre_hook(refuse)
                module.lora_B.register_forward_pre_hook(refuse)
        merged = model(input_ids=ids).logits
    torch.testing.assert_close(merged, unmerged, rtol=1e-4, atol=1e-4)


def test_gradient_checkpointing_with_lora_gives_the_same_gradients():
    grads = []
    for checkpointing in (False, True):
        model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 4, "targets": "all-linear"}}])
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                torch.nn.init.normal_(parameter, std=0.1, generator=torch.Generator().manual_seed(1))
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.disable_input_require_grads()
        model.train()
        loss_sum, count, _ = task_loss(model, lm_batch(), head=label_head(model))
        (loss_sum / count).backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 4 * 7 * 2
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=1e-5, atol=1e-7, msg=name)
