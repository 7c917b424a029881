"""Tests of the adapter strategy."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_bert, tiny_llama, trainable_count
from tiny_models import ARCHITECTURES, tiny_model

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.adapter import BottleneckAdapter
from tuneforge.surgery import disabled_adapters

TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def test_bottleneck_adapter_closed_form():
    torch.manual_seed(0)
    adapter = BottleneckAdapter(6, 2, "relu", {})
    torch.nn.init.normal_(adapter.up.weight)
    h = torch.randn(3, 6)
    down = torch.relu(h @ adapter.down.weight.T + adapter.down.bias)
    expected = h + down @ adapter.up.weight.T + adapter.up.bias
    torch.testing.assert_close(adapter(h), expected)


@pytest.mark.parametrize("placement, per_layer", [("houlsby", 2), ("pfeiffer", 1)])
def test_adapter_placement_and_parameter_count(placement, per_layer):
    model = tuneforge.prepare(tiny_llama(), [{"adapter": {"placement": placement, "reduction_factor": 4}}])
    bottleneck = 32 // 4
    assert trainable_count(model) == 4 * per_layer * (2 * 32 * bottleneck + bottleneck + 32)
    sites = {n.split(".")[3] for n, p in model.named_parameters() if p.requires_grad}
    assert sites == ({"adapter_attn", "adapter_ffn"} if placement == "houlsby" else {"adapter_ffn"})


def test_adapter_runs_inside_each_sublayer_and_disables():
    model = tuneforge.prepare(tiny_llama(),
                              [{"adapter": {"placement": "houlsby", "bottleneck_size": 4}}]).eval()
    randomize(model, "adapter_")
    layer = model.model.layers[0]
    hidden = torch.randn(1, 5, 32)
    positions = model.model.rotary_emb(hidden, torch.arange(5)[None])
    attention_out, _ = layer.self_attn.forward(layer.input_layernorm(hidden), position_embeddings=positions,
                                               attention_mask=None)
    adapted, _ = layer.self_attn(layer.input_layernorm(hidden), position_embeddings=positions,
                                 attention_mask=None)
    # the hook applies exactly the adapter
    torch.testing.assert_close(adapted, layer.adapter_attn(attention_out))
    with disabled_adapters(model):
        plain = model(TOKENS).logits
    assert not torch.allclose(model(TOKENS).logits, plain)
    torch.testing.assert_close(plain, tiny_llama().eval()(TOKENS).logits)


def test_adapter_on_bert_sits_before_the_residual_layer_norm():
    model = tuneforge.prepare(tiny_bert(),
                              [{"adapter": {"placement": "pfeiffer", "bottleneck_size": 4}}]).eval()
    randomize(model, "adapter_")
    output = model.bert.encoder.layer[0].output  # dense -> dropout -> LayerNorm(h + input)
    hidden, residual = torch.randn(1, 3, 64), torch.randn(1, 3, 32)
    expected = output.LayerNorm(model.bert.encoder.layer[0].adapter_ffn(output.dense(hidden)) + residual)
    torch.testing.assert_close(output(hidden, residual), expected)


def test_adapter_on_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, bos_token_id=1,
                                       eos_token_id=2))
    reference = model.eval()(TOKENS).logits
    tuneforge.prepare(model, [{"adapter": {"placement": "houlsby", "bottleneck_size": 4}}])
    torch.testing.assert_close(model(TOKENS).logits, reference)
    assert trainable_count(model) == 2 * 2 * (2 * 32 * 4 + 4 + 32)


def test_adapter_options_are_checked():
    with pytest.raises(Exception, match="reduction_factor or bottleneck_size"):
        tuneforge.prepare(tiny_llama(), [{"adapter": {"reduction_factor": 4, "bottleneck_size": 8}}])
    with pytest.raises(Exception, match="unknown activation"):
        tuneforge.prepare(tiny_llama(), [{"adapter": {"activation": "swishy"}}])


@pytest.mark.parametrize("placement", ["houlsby", "pfeiffer"])
@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_adapters_are_placed_on_every_architecture_and_start_as_identity(kind, placement):
    """Issue 18, cause 4 (adapters found no insertion point on gpt_neox and opt)."""
    reference = tiny_model(kind).eval()(TOKENS).logits
    options = {"placement": placement, "bottleneck_size": 4}
    model = tuneforge.prepare(tiny_model(kind), [{"adapter": options}]).eval()
    adapters = [name for name, module in model.named_modules() if isinstance(module, BottleneckAdapter)]
    assert len(adapters) == 2 * (2 if placement == "houlsby" else 1)
    torch.testing.assert_close(model(TOKENS).logits, reference, atol=0, rtol=0)  # zero-initialised up-proj
    randomize(model, "adapter_")
    assert not torch.allclose(model(TOKENS).logits, reference)
    with disabled_adapters(model):
        torch.testing.assert_close(model(TOKENS).logits, reference)


SITES = {
    "gpt_neox": ("post_attention_dropout", "post_mlp_dropout"), "opt": ("self_attn", "fc2"),
    "falcon": ("self_attention", "mlp"), "gemma2": ("post_attention_layernorm", "post_feedforward_layernorm"),
    "phi3": ("self_attn", "mlp"), "gpt2": ("attn", "mlp"),
    "bert": ("attention.output.dropout", "output.dropout"),
}


@pytest.mark.parametrize("kind", list(SITES))
def test_adapter_sites_are_where_the_sub_layer_output_meets_the_residual(kind):
    model = tuneforge.prepare(tiny_model(kind), [{"adapter": {"placement": "houlsby", "bottleneck_size": 4}}])
    layer = next(m for name, m in model.named_modules() if name.endswith(".0") and hasattr(m, "adapter_ffn"))
    hooked = {name for name, module in layer.named_modules() if module._forward_hooks}
    assert hooked == set(SITES[kind])


def test_adapter_on_opt_follows_fc2_and_survives_lora_on_fc2():
    """OPT has no feed-forward module: the adapter adapts fc2's output, even when LoRA wraps fc2."""
    adapter = {"adapter": {"placement": "pfeiffer", "bottleneck_size": 4}}
    alone = tuneforge.prepare(tiny_model("opt"), [adapter]).eval()
    randomize(alone, "adapter_")
    layer = alone.model.decoder.layers[0]
    x = torch.randn(1, 3, 64)
    plain = torch.nn.functional.linear(x, layer.fc2.weight, layer.fc2.bias)
    torch.testing.assert_close(layer.fc2(x), layer.adapter_ffn(plain))
    expected = alone(TOKENS).logits
    lora = {"lora": {"rank": 2, "targets": ["fc2"]}}  # zero-initialised: only the adapter changes the outputs
    trained = {name: p for name, p in alone.named_parameters() if "adapter_" in name}
    for strategies in ([adapter, lora], [lora, adapter]):
        model = tuneforge.prepare(tiny_model("opt"), strategies).eval()
        model.load_state_dict(trained, strict=False)
        torch.testing.assert_close(model(TOKENS).logits, expected)


def test_adapter_on_parallel_gpt_neox_adapts_each_branch_before_the_sum():
    houlsby = {"adapter": {"placement": "houlsby", "bottleneck_size": 4}}
    model = tuneforge.prepare(tiny_model("gpt_neox"), [houlsby])
    model.eval()
    randomize(model, "adapter_")
    layer = model.gpt_neox.layers[0]
    assert layer.use_parallel_residual
    h = torch.randn(1, 4, 32)
    position = model.gpt_neox.rotary_emb(h, torch.arange(4)[None])
    with disabled_adapters(model):
        attention, _ = layer.attention(layer.input_layernorm(h), attention_mask=None,
                                       position_embeddings=position)
        mlp = layer.mlp(layer.post_attention_layernorm(h))
    expected = h + layer.adapter_attn(attention) + layer.adapter_ffn(mlp)
    torch.testing.assert_close(layer(h, position_embeddings=position), expected)


def test_adapter_refuses_an_architecture_without_known_sites():
    from types import SimpleNamespace

    class Mystery(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.config = SimpleNamespace(model_type="mystery", hidden_size=8)
            block = {"mix": torch.nn.Linear(8, 8)}
            self.blocks = torch.nn.ModuleList(torch.nn.ModuleDict(block) for _ in range(2))

    with pytest.raises(ModelError, match="adapter: no insertion points known for mystery .*use lora or ia3"):
        tuneforge.prepare(Mystery(), [{"adapter": {}}])


def test_adapter_refusal_on_bloom_says_why():
    from transformers import BloomConfig, BloomForCausalLM

    model = BloomForCausalLM(BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4))
    with pytest.raises(ModelError, match="adapter: BLOOM adds the residual inside .*use lora or ia3"):
        tuneforge.prepare(model, [{"adapter": {}}])
