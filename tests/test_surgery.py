"""Module surgery: which layers are targets, which are already wrapped, and how names are summarised."""

from __future__ import annotations

import pytest
import torch
from tiny_models import ARCHITECTURES, LLAMA_LIKE, tiny_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.lora import lora_modules
from tuneforge.surgery import (
    describe_modules,
    ensure_unwrapped,
    find_linear_targets,
    linear_modules,
    plain_layer,
    replace_module,
)

# Linear layers per transformer block: what `all-linear` wraps (two blocks in every tiny model)
BLOCK_LINEARS = {**dict.fromkeys(LLAMA_LIKE, 7), "phi3": 4, "gpt2": 4, "gpt_neox": 4, "opt": 6, "falcon": 4,
                 "bert": 6}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_all_linear_is_the_blocks_linear_layers_only(kind):
    """Issue 18, cause 4: output heads, poolers, classifiers and other non-block linears are never targets."""
    model = tuneforge.prepare(tiny_model(kind), [{"lora": {"rank": 2, "targets": "all-linear"}}])
    wrapped = {name for name, _ in lora_modules(model)}
    assert len(wrapped) == 2 * BLOCK_LINEARS[kind]
    left = {name for name, m in model.named_modules()
            if type(m) in (nn.Linear, Conv1D) and "lora_" not in name}
    assert all(".0." not in name and ".1." not in name for name in left)  # nothing inside a block stays plain
    outside = {"bert": {"bert.pooler.dense", "classifier"}}.get(kind, {"lm_head"})
    assert outside <= left


def test_all_linear_leaves_out_opts_input_and_output_projections():
    from transformers import OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    config = OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                       word_embed_proj_dim=16, max_position_embeddings=64)
    model = OPTForCausalLM(config)
    names = {name for name, _ in find_linear_targets(model, "all-linear")}
    assert len(names) == 12 and not any("project_" in name or "lm_head" in name for name in names)


def test_falcon_linear_is_a_plain_linear_target_not_a_wrapper():
    """Issue 18, cause 3: FalconLinear subclasses nn.Linear; it was taken for another strategy's wrapper."""
    model = tiny_model("falcon")
    name, module = find_linear_targets(model, ["query_key_value"])[0]
    assert type(module).__name__ == "FalconLinear"
    ensure_unwrapped(name, module, "lora")  # no error
    tuneforge.prepare(model, [{"lora": {"targets": ["query_key_value"]}}])
    with pytest.raises(ModelError, match=r"ia3: .*query_key_value is already wrapped \(LoRALinear\)"):
        tuneforge.prepare(model, [{"ia3": {"targets": ["query_key_value"], "feedforward_targets": []}}])


def test_a_linear_subclass_computing_something_else_is_refused():
    class Doubled(nn.Linear):
        def forward(self, x):
            return 2 * super().forward(x)

    with pytest.raises(ModelError, match="Doubled whose forward is not W x \\+ b"):
        ensure_unwrapped("layers.0.proj", Doubled(4, 3), "lora")


def test_plain_layer_rebuilds_the_wrapped_type_with_the_same_parameters():
    model = tiny_model("falcon")
    original = model.transformer.h[0].mlp.dense_h_to_4h
    rebuilt = plain_layer(original.weight, original.bias, False, type(original))
    assert type(rebuilt) is type(original) and rebuilt.weight is original.weight and rebuilt.bias is None
    x = torch.randn(3, 32)
    torch.testing.assert_close(rebuilt(x), original(x))
    conv = Conv1D(5, 4)
    torch.testing.assert_close(plain_layer(conv.weight, conv.bias, True)(x[:, :4]), conv(x[:, :4]))


def test_replace_module_keeps_forward_hooks():
    parent = nn.Sequential(nn.Linear(3, 3))
    parent[0].register_forward_hook(lambda module, inputs, output: output * 0)
    replace_module(parent, "0", nn.Linear(3, 3))
    assert parent(torch.ones(1, 3)).abs().sum() == 0


def test_describe_modules_folds_layer_indices():
    names = [f"model.layers.{i}.self_attn.{p}" for i in range(4) for p in ("q_proj", "v_proj")]
    assert describe_modules(names) == "8 modules: model.layers.*.self_attn.{q_proj,v_proj}"
    assert describe_modules(["transformer.h.0.mlp.c_proj"]) == "1 module: transformer.h.*.mlp.c_proj"
    assert describe_modules([]) == "0 modules"


def test_a_target_matching_nothing_is_named_with_its_option():
    model = tiny_model("opt")
    with pytest.raises(ModelError, match=r"feedforward_targets \['down_proj'\] matched no linear layer.*fc2"):
        find_linear_targets(model, ["fc2", "down_proj"], option="feedforward_targets")
    assert len(linear_modules(model)) == 12
