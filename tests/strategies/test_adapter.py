"""Tests of the adapter strategy."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_bert, tiny_llama

import tuneforge
from tuneforge.strategies.adapter import BottleneckAdapter
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


def test_bottleneck_adapter_closed_form():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 2, "relu", {})
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(3, 6)
    expected = h + torch.relu(h @ adapter.down.weight.T + adapter.down.bias) @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(h), expected)


@pytest.mark.parametrize("placement, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_placement_and_parameter_count(placement, per_layer):
    model = tuneforge.prepare(tiny_llama(), [{"adapter": {"placement": placement, "reduction_factor": 4}}])
    bottleneck = 32 // 4
    assert trainable_count(model) == 4 * per_layer * (2 * 32 * bottleneck + bottleneck + 32)
    sites = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad}
    assert sites == ({"adapter_attn", "adapter_ffn"} if placement == "houlsby" else {"adapter_ffn"})


def test_adapter_runs_inside_each_sublayer_and_disables():
    model = tuneforge.prepare(tiny_llama(), [{"adapter": {"placement": "houlsby", "bottleneck_size": 4}}]).eval()
    randomize(model, "adapter_")
    layer = model.model.layers[0]
    hidden = torch.randn(1, 5, 32)
    attention_out, _ = layer.self_attn.forward(layer.input_layernorm(hidden), position_embeddings=model.model.rotary_emb(
        hidden, torch.arange(5)[None]), attention_mask=None)
    adapted, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=model.model.rotary_emb(
        hidden, torch.arange(5)[None]), attention_mask=None)
    torch.testing.assert_close(adapted, layer.adapter_attn(attention_out))  # the hook applies exactly the adapter
    with disabled_adapters(model):
        plain = model(TOKENS).logits
    assert not torch.allclose(model(TOKENS).logits, plain)
    torch.testing.assert_close(plain, tiny_llama().eval()(TOKENS).logits)


def test_adapter_on_bert_sits_before_the_residual_layer_norm():
    model = tuneforge.prepare(tiny_bert(), [{"adapter": {"placement": "pfeiffer", "bottleneck_size": 4}}]).eval()
    randomize(model, "adapter_")
    output = model.bert.encoder.layer[0].output  # dense -> dropout -> LayerNorm(h + input)
    hidden, residual = torch.randn(1, 3, 64), torch.randn(1, 3, 32)
    expected = output.LayerNorm(model.bert.encoder.layer[0].adapter_ffn(output.dense(hidden)) + residual)
    torch.testing.assert_close(output(hidden, residual), expected)


def test_adapter_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2))
    reference = model.eval()(TOKENS).logits
    tuneforge.prepare(model, [{"adapter": {"placement": "houlsby", "bottleneck_size": 4}}])
    torch.testing.assert_close(model(TOKENS).logits, reference)
    assert trainable_count(model) == 2 * 2 * (2 * 32 * 4 + 4 + 32)


def test_adapter_options_are_checked():
    with pytest.raises(Exception, match="reduction_factor or bottleneck_size"):
        tuneforge.prepare(tiny_llama(), [{"adapter": {"reduction_factor": 4, "bottleneck_size": 8}}])
    with pytest.raises(Exception, match="unknown activation"):
        tuneforge.prepare(tiny_llama(), [{"adapter": {"activation": "swishy"}}])
