"""Adapters, prefix, prompt and IA3 against closed forms; composition conflicts; merged export; inspect counts."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama
from test_strategy_contract import tiny_bert

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.adapter import BottleneckAdapter
from tuneforge.strategies.ia3 import IA3Linear, ia3_modules
from tuneforge.surgery import disabled_adapters

# tiny_llama: 4 layers, hidden 32, 4 heads of 8, 2 key/value heads (kv width 16), FFN 64


def randomize(model, prefix: str, scale: float = 0.3, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part.startswith(prefix) for part in name.split(".")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


# --- bottleneck adapters -------------------------------------------------------------------------------


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


# --- prefix tuning ------------------------------------------------------------------------------------


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


# --- prompt tuning ------------------------------------------------------------------------------------


def test_prompt_equals_prepending_the_embeddings_by_hand():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    base = tiny_llama().eval()
    embeds = torch.cat([model.prompt_encoder.embedding[None].expand(2, -1, -1), base.model.embed_tokens(TOKENS)], 1)
    expected = base(inputs_embeds=embeds).logits[:, 3:]
    torch.testing.assert_close(model(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_prompt_extends_token_labels_for_the_models_own_loss():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    labels = TOKENS.clone()
    labels[:, :4] = -100
    output = model(input_ids=TOKENS, labels=labels)
    from tuneforge.evaluate import token_losses

    total, count = token_losses(output.logits, labels)
    torch.testing.assert_close(output.loss, total / count)


def test_prompt_right_padding_leaves_real_positions_unchanged():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    padded = model(input_ids=TOKENS, attention_mask=mask).logits
    torch.testing.assert_close(padded[1, :6], model(input_ids=TOKENS[1:, :6]).logits[0], atol=1e-5, rtol=1e-5)


def test_prompt_initialisations(tokenizer):
    from conftest import tiny_llama as build

    model = tuneforge.prepare(build(vocab_size=len(tokenizer)),
                              [{"prompt": {"length": 5, "init": "text", "init_text": "the cat"}}], tokenizer=tokenizer)
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    expected = model.model.embed_tokens.weight[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(model.prompt_encoder.embedding, expected)
    vocab = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 4, "init": "vocab"}}])
    table = vocab.model.embed_tokens.weight
    assert all((table == row).all(-1).any() for row in vocab.prompt_encoder.embedding)
    with pytest.raises(ModelError, match="needs the tokenizer"):
        tuneforge.prepare(tiny_llama(), [{"prompt": {"init": "text", "init_text": "hi"}}])
    with pytest.raises(Exception, match="init: text needs init_text"):
        tuneforge.prepare(tiny_llama(), [{"prompt": {"init": "text"}}])


# --- IA3 ----------------------------------------------------------------------------------------------


def test_ia3_closed_forms_and_exact_merge():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for feedforward in (False, True):
        base = torch.nn.Linear(6, 5)
        layer = IA3Linear(base, feedforward=feedforward)
        assert layer.ia3_l.shape == ((1, 6) if feedforward else (5, 1))
        torch.testing.assert_close(layer(x), base(x))  # ones: unchanged at step 0
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 1.5)
        scale = layer.ia3_l.flatten()
        expected = base(x * scale) if feedforward else base(x) * scale
        torch.testing.assert_close(layer(x), expected)
        weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
        layer.merge()
        torch.testing.assert_close(torch.nn.functional.linear(x, layer.weight, layer.bias), expected)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, weight)
        torch.testing.assert_close(layer.bias, bias)


def test_ia3_defaults_and_parameter_count():
    model = tuneforge.prepare(tiny_llama(), [{"ia3": {}}])
    wrapped = {name.split(".")[-1]: module.feedforward for name, module in ia3_modules(model)}
    assert wrapped == {"k_proj": False, "v_proj": False, "down_proj": True}
    assert trainable_count(model) == 4 * (16 + 16 + 64)  # d_out of k and v, d_in of down_proj, per layer


def test_ia3_feedforward_must_be_a_target():
    with pytest.raises(ModelError, match="feedforward_targets match .*down_proj.*list it in targets"):
        tuneforge.prepare(tiny_llama(), [{"ia3": {"targets": ["k_proj"], "feedforward_targets": ["down_proj"]}}])


# --- LoRA options ---------------------------------------------------------------------------------------


def test_lora_gaussian_init_keeps_outputs_and_draws_a_with_std_one_over_rank():
    model = tiny_llama().eval()
    reference = model(TOKENS).logits
    tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": "all-linear", "init": "gaussian"}}])
    torch.testing.assert_close(model(TOKENS).logits, reference, atol=0, rtol=0)
    a_values = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("lora_A.weight")])
    assert abs(a_values.std().item() - 1 / 4) < 0.02  # ~6k draws; Kaiming-uniform would give ~0.10 here


# --- composition --------------------------------------------------------------------------------------


def test_layerwise_and_prefix_train_the_union():
    model = tuneforge.prepare(tiny_llama(), [{"layerwise": {"train_layers": [3], "train_head": False}},
                                             {"prefix": {"length": 2}}])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prefix_encoder.embedding" in trainable
    assert {n for n in trainable if n != "prefix_encoder.embedding"} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")}


@pytest.mark.parametrize("strategies, message", [
    ([{"lora": {"targets": ["k_proj"]}}, {"ia3": {}}], r"ia3: model\.layers\.0\.self_attn\.k_proj is already wrapped \(LoRALinear\)"),
    ([{"ia3": {}}, {"lora": {"targets": "all-linear"}}], r"lora: .* is already wrapped \(IA3Linear\)"),
    ([{"prefix": {}}, {"prefix": {}}], "prefix is listed twice"),
    ([{"prompt": {}}, {"prompt": {}}], "prompt is listed twice"),
    ([{"adapter": {}}, {"adapter": {}}], "adapter is listed twice"),
])
def test_conflicting_combinations_fail_at_setup(strategies, message):
    with pytest.raises(ModelError, match=message):
        tuneforge.prepare(tiny_llama(), strategies)


# --- merged export ------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategies", [[{"ia3": {}}], [{"lora": {"rank": 4, "dora": True, "targets": "all-linear"}}],
                                        [{"ia3": {"targets": ["k_proj", "down_proj"]}}, {"lora": {"targets": ["q_proj"]}}]])
def test_merged_export_loads_with_transformers_alone(strategies, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.export import export_merged

    model = tuneforge.prepare(tiny_llama(), strategies).eval()
    randomize(model, "ia3_", scale=0.2)
    randomize(model, "lora_", scale=0.2)
    expected = model(TOKENS).logits.detach()
    report = export_merged(model, tokenizer, tmp_path / "merged", {"input_ids": TOKENS})
    assert report["max_weight_change"] > 0 and report["max_logit_difference"] <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("ia3" in n or "lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(TOKENS).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", [{"adapter": {}}, {"prefix": {}}, {"prompt": {}}])
def test_methods_that_cannot_merge_say_so(strategy, tmp_path):
    from tuneforge.export import export_merged

    model = tuneforge.prepare(tiny_llama(), [strategy])
    with pytest.raises(ModelError, match=f"cannot merge {next(iter(strategy))} .*adapter/ directory"):
        export_merged(model, None, tmp_path / "merged")


def test_untrained_ia3_merge_is_refused(tmp_path):
    from tuneforge.export import export_merged

    with pytest.raises(ModelError, match="left every weight unchanged"):
        export_merged(tuneforge.prepare(tiny_llama(), [{"ia3": {}}]), None, tmp_path / "merged")


def test_cli_export_of_an_ia3_run(run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.cli import main
    from tuneforge.models import load_model
    from tuneforge.run import train_run

    config = run_config(strategies=[{"ia3": {}}], train={"max_steps": 2})
    train_run(config)
    assert main(["export", config.output, "--merged", str(tmp_path / "merged")]) == 0
    base, tokenizer, _ = load_model(config.model)
    unmerged = tuneforge.load_adapter(base, f"{config.output}/adapter").eval()
    inputs = tokenizer(["What colour is the cat?"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**inputs).logits, unmerged(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert (tmp_path / "merged" / "generation_config.json").is_file()


# --- inspect ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("strategy, expected", [
    ({"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}, 4 * (4 * (32 + 32) + 4 * (32 + 16))),
    ({"prefix": {"length": 6}}, 2 * 4 * 16 * 6),
    ({"prompt": {"length": 6}}, 6 * 32),
    ({"ia3": {}}, 4 * (16 + 16 + 64)),
    ({"adapter": {"placement": "houlsby", "bottleneck_size": 8}}, 4 * 2 * (2 * 32 * 8 + 8 + 32)),
])
def test_inspect_counts_match_closed_forms(run_config, strategy, expected):
    from tuneforge.run import inspect_config

    report = inspect_config(run_config(strategies=[strategy]))
    assert report["trainable_by_strategy"] == {next(iter(strategy)): expected}
    assert report["trainable_params"] == expected
