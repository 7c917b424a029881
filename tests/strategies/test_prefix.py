"""Tests of the prefix strategy."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_bert, tiny_llama

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.surgery import disabled_adapters


def randomize(model, prefix: str, scale: float = 0.3, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part.startswith(prefix) for part in name.split(".")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def test_prefix_parameter_count_closed_form():
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 5}}])
    assert trainable_count(model) == 2 * 4 * 16 * 5  # 2 x layers x kv width x length
    reparam = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 5, "reparam": True, "reparam_hidden": 12}}])
    width = 4 * 2 * 16
    assert trainable_count(reparam) == 5 * 32 + (32 * 12 + 12) + (12 * width + width)


def test_prefix_attention_equals_explicit_keys_and_values():
    """Layer 0 with the prefix equals softmax(q [P_k; K]^T / sqrt(d)) [P_v; V] computed by hand."""
    model = tuneforge.prepare(tiny_llama(layers=1), [{"prefix": {"length": 3}}]).eval()
    encoder, attention = model.prefix_encoder, model.model.layers[0].self_attn
    captured = {}
    attention.register_forward_hook(lambda m, a, k, out: captured.update(out=out[0], hidden=k["hidden_states"]),
                                    with_kwargs=True)
    model(TOKENS[:1])
    hidden = captured["hidden"]  # (1, T, 32), the attention input
    positions = torch.arange(3, 3 + hidden.shape[1])[None]  # real tokens come after the prefix
    cos, sin = model.model.rotary_emb.forward(hidden, positions)  # .forward: no hook, positions given as they are
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = attention.q_proj(hidden).view(1, -1, 4, 8).transpose(1, 2)
    k = attention.k_proj(hidden).view(1, -1, 2, 8).transpose(1, 2)
    v = attention.v_proj(hidden).view(1, -1, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    prefix_k, prefix_v = encoder.layer_kv(0)
    k = torch.cat([prefix_k[None], k], 2).repeat_interleave(2, dim=1)  # grouped-query: 2 query heads per kv head
    v = torch.cat([prefix_v[None], v], 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(2, 3) / 8 ** 0.5
    length = hidden.shape[1]
    causal = torch.ones(length, length).tril().bool()
    scores = scores.masked_fill(~torch.cat([torch.ones(length, 3).bool(), causal], 1), float("-inf"))
    expected = attention.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, length, 32))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


def test_prefix_left_padding_matches_the_unpadded_sequence():
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3}}]).eval()
    single = model(input_ids=TOKENS[:1, 2:]).logits
    padded = TOKENS[:1].clone()
    padded[0, :2] = 0
    mask = torch.ones_like(padded)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits[:, 2:], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_prefix_gradients_with_gradient_checkpointing(reentrant):
    def gradients(checkpointing: bool) -> dict:
        model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3, "reparam": True}}])
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        model.train()
        model(input_ids=TOKENS).logits.logsumexp(-1).mean().backward()
        return {n: p.grad for n, p in model.named_parameters() if p.requires_grad}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain and all(g.abs().sum() > 0 for g in plain.values())
    for name, gradient in plain.items():
        torch.testing.assert_close(checkpointed[name], gradient)


def test_prefix_run_with_gradient_checkpointing_learns(run_config):
    from tuneforge.run import train_run

    config = run_config(strategies=[{"prefix": {"length": 4}}],
                        train={"max_steps": 4, "gradient_checkpointing": True, "lr": 3e-2})
    results = train_run(config)
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]
    assert results["trainable_params"] == 2 * 4 * 16 * 4


def test_prefix_reparam_is_folded_at_save(tmp_path):
    from safetensors.torch import load_file

    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3, "reparam": True}}]).eval()
    randomize(model, "prefix_")
    tuneforge.save_adapter(model, tmp_path / "adapter")
    saved = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in saved.items()} == {"prompt_embeddings": (3, 4 * 2 * 16)}
    assert json.loads((tmp_path / "adapter" / "tuneforge.json").read_text())["strategies"][0]["prefix"]["reparam"] is False
    loaded = tuneforge.load_adapter(tiny_llama(), tmp_path / "adapter").eval()
    assert trainable_count(loaded) == 3 * 4 * 2 * 16
    torch.testing.assert_close(loaded(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_prefix_disables_to_the_exact_base_model():
    base = tiny_llama().eval()(TOKENS).logits
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3}}]).eval()
    with disabled_adapters(model):
        torch.testing.assert_close(model(TOKENS).logits, base, atol=0, rtol=0)


def test_prefix_starts_from_the_models_own_keys_and_values():
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3}}])
    keys, values = model.prefix_encoder.layer_kv(0)
    assert keys.shape == values.shape == (2, 3, 8)
    # k_proj of some real hidden states: the prefix key norms are in the model's own range, not zero or N(0, 1)
    assert 0 < keys.norm(dim=-1).mean() < 10 and not torch.equal(keys, values)


def test_prefix_refuses_unsupported_models():
    with pytest.raises(ModelError, match="prefix: BertForSequenceClassification is not supported.*prompt or lora"):
        tuneforge.prepare(tiny_bert(), [{"prefix": {}}])


def test_layerwise_and_prefix_train_the_union():
    model = tuneforge.prepare(tiny_llama(), [{"layerwise": {"train_layers": [3], "train_head": False}},
                                             {"prefix": {"length": 2}}])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prefix_encoder.embedding" in trainable
    assert {n for n in trainable if n != "prefix_encoder.embedding"} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")}
