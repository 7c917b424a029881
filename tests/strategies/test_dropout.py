"""Tests of the dropout strategy."""

from __future__ import annotations

import pytest
import torch

from tuneforge.errors import ModelError

LORA = {"lora": {"rank": 4, "targets": "all-linear"}}


def test_dropout_sets_attention_and_lora_rates_and_refuses_what_the_model_lacks(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

    from tuneforge import prepare
    from tuneforge.strategies.lora import lora_modules

    model = prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    [LORA, {"dropout": {"attention": 0.2, "lora": 0.3}}])
    assert {layer.self_attn.attention_dropout for layer in model.model.layers} == {0.2}
    assert model.config.attention_dropout == 0.2
    assert {module.lora_dropout.p for _, module in lora_modules(model)} == {0.3}
    with pytest.raises(ModelError, match="no hidden-state dropout"):
        prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [{"dropout": {"hidden": 0.1}}])
    with pytest.raises(ModelError, match="list `dropout` after `lora`"):
        prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [{"dropout": {"lora": 0.1}}, LORA])

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))
    bert = prepare(bert, [{"dropout": {"attention": 0.05, "hidden": 0.25}}])
    rates = {name: module.p for name, module in bert.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert rates["bert.encoder.layer.0.attention.self.dropout"] == 0.05
    assert rates["bert.encoder.layer.1.output.dropout"] == 0.25
    assert rates["bert.embeddings.dropout"] == 0.25 and rates["dropout"] == 0.25  # classifier too
    assert (bert.config.attention_probs_dropout_prob, bert.config.hidden_dropout_prob) == (0.05, 0.25)
