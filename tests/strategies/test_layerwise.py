"""Layer-wise LR decay next to injected parameters: only the base model's layers and embeddings decay."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

import tuneforge
from tuneforge.config import TrainConfig
from tuneforge.strategies import StrategyContext
from tuneforge.train import build_optimizer

DECAY = 0.5
LAYERS = 4


def learning_rates(model) -> dict[str, float]:
    optimizer = build_optimizer(model, model.tuneforge_strategies, StrategyContext(), TrainConfig(lr=1.0))
    rate_of = {id(p): group["lr"] for group in optimizer.param_groups for p in group["params"]}
    return {name: rate_of[id(p)] for name, p in model.named_parameters() if id(p) in rate_of}


@pytest.mark.parametrize("injected", [{"prompt": {"length": 4}}, {"prefix": {"length": 4}},
                                      {"prefix": {"length": 4, "reparam": True}}])
def test_prompt_and_prefix_embeddings_get_the_base_rate(injected):
    model = tuneforge.prepare(tiny_llama(layers=LAYERS),
                              [{"layerwise": {"lr_decay": DECAY, "train_embeddings": True}}, injected])
    rates = learning_rates(model)
    encoder = [name for name in rates if name.startswith(("prompt_", "prefix_"))]
    assert encoder and all(rates[name] == 1.0 for name in encoder), {n: rates[n] for n in encoder}
    # the real embeddings still decay
    assert rates["model.embed_tokens.weight"] == pytest.approx(DECAY**LAYERS)
    assert rates["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(DECAY ** (LAYERS - 1))
    assert rates["lm_head.weight"] == 1.0


def test_injected_encoders_are_not_embeddings_to_train():
    from tuneforge.strategies.layerwise import embedding_parameter_names

    model = tuneforge.prepare(tiny_llama(), [{"layerwise": {"train_layers": [3], "train_embeddings": False}},
                                             {"prompt": {"length": 4}}])
    assert embedding_parameter_names(model) == {"model.embed_tokens.weight"}
    assert not model.get_input_embeddings().weight.requires_grad
    assert model.prompt_encoder.embedding.requires_grad  # prompt trains its own parameter


def test_lora_inside_a_layer_decays_with_its_layer():
    """Discriminative rates are per layer: what was injected into layer i learns at layer i's rate."""
    model = tuneforge.prepare(tiny_llama(layers=LAYERS),
                              [{"layerwise": {"lr_decay": DECAY}}, {"lora": {"rank": 2}}])
    rates = learning_rates(model)
    lora = [name for name in rates if ".lora_" in name]
    assert lora
    for name in lora:
        layer = int(name.split(".layers.")[1].split(".")[0])
        assert rates[name] == pytest.approx(DECAY ** (LAYERS - 1 - layer)), name
    assert rates["model.layers.0.self_attn.q_proj.weight"] == pytest.approx(DECAY ** (LAYERS - 1))


def test_encoder_embedding_block_decays_as_one():
    from transformers import BertConfig, BertModel

    from tuneforge.strategies.layerwise import embedding_parameter_names

    config = BertConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64)
    model = tuneforge.prepare(BertModel(config),
                              [{"layerwise": {"lr_decay": DECAY, "train_embeddings": True}}])
    embeddings = {f"embeddings.{part}" for part in ("word_embeddings.weight", "position_embeddings.weight",
                                                    "token_type_embeddings.weight", "LayerNorm.weight",
                                                    "LayerNorm.bias")}
    assert embedding_parameter_names(model) == embeddings
    rates = learning_rates(model)
    assert all(rates[name] == pytest.approx(DECAY**2) for name in embeddings)
    assert rates["encoder.layer.1.output.dense.weight"] == 1.0
