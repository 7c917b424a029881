"""Tests of the prefix strategy."""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from conftest import randomize, tiny_bert, tiny_llama, trainable_count
from transformers import DynamicCache

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.surgery import disabled_adapters

TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def test_prefix_parameter_count_closed_form():
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 5}}])
    assert trainable_count(model) == 2 * 4 * 16 * 5  # 2 x layers x kv width x length
    options = {"length": 5, "reparam": True, "reparam_hidden": 12}
    reparam = tuneforge.prepare(tiny_llama(), [{"prefix": options}])
    width = 4 * 2 * 16
    assert trainable_count(reparam) == 5 * 32 + (32 * 12 + 12) + (12 * width + width)


def test_prefix_attention_equals_explicit_keys_and_values():
    """Layer 0 with the prefix equals softmax(q [P_k; K]^T / sqrt(d)) [P_v; V] computed by hand."""
    model = tuneforge.prepare(tiny_llama(layers=1), [{"prefix": {"length": 3}}]).eval()
    encoder, attention = model.prefix_encoder, model.model.layers[0].self_attn
    captured = {}
    attention.register_forward_hook(
        lambda m, a, k, out: captured.update(out=out[0], hidden=k["hidden_states"]), with_kwargs=True)
    model(TOKENS[:1])
    hidden = captured["hidden"]  # (1, T, 32), the attention input
    positions = torch.arange(3, 3 + hidden.shape[1])[None]  # real tokens come after the prefix
    cos, sin = model.model.rotary_emb.forward(hidden, positions)  # .forward: no hook, positions as given
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q = attention.q_proj(hidden).view(1, -1, 4, 8).transpose(1, 2)
    k = attention.k_proj(hidden).view(1, -1, 2, 8).transpose(1, 2)
    v = attention.v_proj(hidden).view(1, -1, 2, 8).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    prefix_k, prefix_v = encoder.layer_kv(0)
    k = torch.cat([prefix_k[None], k], 2).repeat_interleave(2, dim=1)  # grouped-query: 2 heads per kv head
    v = torch.cat([prefix_v[None], v], 2).repeat_interleave(2, dim=1)
    scores = q @ k.transpose(2, 3) / 8 ** 0.5
    length = hidden.shape[1]
    causal = torch.ones(length, length).tril().bool()
    scores = scores.masked_fill(~torch.cat([torch.ones(length, 3).bool(), causal], 1), float("-inf"))
    expected = attention.o_proj((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, length, 32))
    torch.testing.assert_close(captured["out"], expected, atol=1e-5, rtol=1e-5)


def assert_left_padding_scores_alone(model) -> None:
    """A row left-padded by two tokens gives the logits the same row gives unpadded."""
    single = model(input_ids=TOKENS[:1, 2:]).logits
    padded = TOKENS[:1].clone()
    padded[0, :2] = 0
    mask = torch.ones_like(padded)
    mask[0, :2] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    logits = model(input_ids=padded, attention_mask=mask, position_ids=positions).logits
    torch.testing.assert_close(logits[:, 2:], single, atol=1e-5, rtol=1e-5)


def test_prefix_left_padding_matches_the_unpadded_sequence():
    assert_left_padding_scores_alone(tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3}}]).eval())


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
    saved_options = json.loads((tmp_path / "adapter" / "tuneforge.json").read_text())["strategies"][0]
    assert saved_options["prefix"]["reparam"] is False
    loaded = tuneforge.load_adapter(tiny_llama(), tmp_path / "adapter").eval()
    assert trainable_count(loaded) == 3 * 4 * 2 * 16
    torch.testing.assert_close(loaded(TOKENS).logits, model(TOKENS).logits, atol=1e-5, rtol=1e-5)


def test_prefix_disables_to_the_exact_base_model():
    base = tiny_llama().eval()(TOKENS).logits
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 3}}]).eval()
    with disabled_adapters(model):
        torch.testing.assert_close(model(TOKENS).logits, base, atol=0, rtol=0)


def test_layerwise_and_prefix_train_the_union():
    model = tuneforge.prepare(tiny_llama(), [{"layerwise": {"train_layers": [3], "train_head": False}},
                                             {"prefix": {"length": 2}}])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "prefix_encoder.embedding" in trainable
    assert {n for n in trainable if n != "prefix_encoder.embedding"} == {
        n for n, _ in model.named_parameters() if n.startswith("model.layers.3.")}


# The architecture matrix: tiny random models (hidden 32, 2 layers) of each attention layout prefix meets.
COMMON = {"vocab_size": 300, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 64, "pad_token_id": 0,
          "initializer_range": 0.2}


def tiny(arch: str, seed: int = 0, **overrides):
    """A tiny random model of `arch`; the same seed gives the same weights."""
    torch.manual_seed(seed)
    if arch == "llama":
        return tiny_llama(layers=2, seed=seed)
    if arch == "bert":
        return tiny_bert(seed=seed)
    if arch == "gpt2":
        config = transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=4, n_positions=64,
                                         initializer_range=0.2, **overrides)
        return transformers.GPT2LMHeadModel(config)
    if arch == "opt":
        config = transformers.OPTConfig(vocab_size=300, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                                        num_attention_heads=4, max_position_embeddings=64, pad_token_id=1,
                                        word_embed_proj_dim=32, init_std=0.2, **overrides)
        return transformers.OPTForCausalLM(config)
    if arch == "falcon":
        config = transformers.FalconConfig(vocab_size=300, hidden_size=32, num_hidden_layers=2,
                                           num_attention_heads=4, **overrides)
        return transformers.FalconForCausalLM(config)
    if arch == "t5":
        config = transformers.T5Config(vocab_size=300, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4)
        return transformers.T5ForConditionalGeneration(config)
    if arch == "bloom":
        config = transformers.BloomConfig(vocab_size=300, hidden_size=32, n_layer=2, n_head=4, **overrides)
        return transformers.BloomForCausalLM(config)
    if arch == "phi3":  # fused qkv_proj, rotary
        config = transformers.Phi3Config(num_key_value_heads=2, **COMMON, **overrides)
        return transformers.Phi3ForCausalLM(config)
    if arch == "gpt_neox":  # fused query_key_value, partial rotary
        return transformers.GPTNeoXForCausalLM(transformers.GPTNeoXConfig(**COMMON, **overrides))
    if arch == "gemma2":  # logit softcapping; sliding-window layers (by default wider than the sequences)
        config = {"num_key_value_heads": 2, "head_dim": 8, "sliding_window": 32, **COMMON, **overrides}
        return transformers.Gemma2ForCausalLM(transformers.Gemma2Config(**config))
    raise ValueError(arch)


DECODERS = ["llama", "phi3", "gpt2", "gpt_neox", "opt", "gemma2"]
SUPPORTED = [*DECODERS, "bert"]


def prepared(arch: str, length: int = 3, **overrides):
    """The prefix on `arch`, moved off its start so that it matters (as training would)."""
    model = tuneforge.prepare(tiny(arch, **overrides), [{"prefix": {"length": length}}]).eval()
    randomize(model, "prefix_")
    return model


def prefix_cache(model, batch: int) -> DynamicCache:
    """The prefix as the model's own KV cache holds past tokens: PEFT's `past_key_values` mechanism."""
    cache = DynamicCache(config=model.config)
    encoder = model.prefix_encoder
    for layer in range(encoder.layers):
        keys, values = encoder.layer_kv(layer)
        cache.update(keys[None].expand(batch, -1, -1, -1), values[None].expand(batch, -1, -1, -1), layer)
    return cache


@pytest.mark.parametrize("arch", SUPPORTED)
def test_disabled_prefix_is_the_base_model_exactly(arch):
    base = tiny(arch).eval()(TOKENS).logits
    model = prepared(arch)
    with disabled_adapters(model):
        torch.testing.assert_close(model(TOKENS).logits, base, atol=0, rtol=0)
    assert not torch.allclose(model(TOKENS).logits, base)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_prefix_equals_its_keys_and_values_in_the_models_own_cache(arch):
    """Our attention hook equals the unmodified model attending to the prefix as cached past tokens, real
    tokens placed after it (rotary or learned positions; BERT bidirectionally), with a padded mask row."""
    model = prepared(arch)
    mask = torch.ones_like(TOKENS)
    mask[1, -3:] = 0  # right padding: every architecture's own mask handles it after cached tokens
    expected = model(input_ids=TOKENS, attention_mask=mask).logits
    base = tiny(arch).eval()
    with torch.no_grad():
        with_prefix = torch.cat([torch.ones(2, 3, dtype=mask.dtype), mask], 1)
        logits = base(input_ids=TOKENS, attention_mask=with_prefix, cache=prefix_cache(model, 2)).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_prefix_starts_as_the_keys_and_values_the_model_caches_for_real_tokens(arch):
    """Init from real word activations (Li & Liang Sec. 7.2), through fused projections too: what the base
    model caches for the same random tokens (drawn from the same seed), at positions 0 .. length - 1."""
    base = tiny(arch).eval()
    torch.manual_seed(5)
    tokens = torch.randint(0, 300, (1, 3))
    cache = DynamicCache(config=base.config)
    with torch.no_grad():
        base(input_ids=tokens, cache=cache, use_cache=True)
    model = tiny(arch)
    torch.manual_seed(5)
    encoder = tuneforge.prepare(model, [{"prefix": {"length": 3}}]).prefix_encoder
    for layer in range(2):
        keys, values = encoder.layer_kv(layer)
        torch.testing.assert_close(keys, cache.layers[layer].keys[0])
        torch.testing.assert_close(values, cache.layers[layer].values[0])


@pytest.mark.parametrize("arch", DECODERS)
def test_left_padded_row_scores_as_it_does_alone(arch):
    assert_left_padding_scores_alone(prepared(arch))


def test_right_padded_bert_row_classifies_as_it_does_alone():
    model = prepared("bert")
    single = model(input_ids=TOKENS[:1, :6]).logits
    mask = torch.ones_like(TOKENS[:1])
    mask[0, 6:] = 0
    torch.testing.assert_close(model(input_ids=TOKENS[:1], attention_mask=mask).logits, single,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", DECODERS)
def test_peft_loads_our_prefix_with_equal_logits_and_generation(arch, tmp_path):
    """PEFT feeds the prefix as `past_key_values` (its own mechanism) and gets our logits. (BERT: PEFT 0.21.2
    passes `past_key_values`, which BertModel no longer takes in transformers 5.24; the cache test above
    checks the same mechanism through `cache=`.)"""
    peft = pytest.importorskip("peft")
    ours = prepared(arch)
    mask = torch.ones_like(TOKENS)
    expected = ours(input_ids=TOKENS, attention_mask=mask).logits
    tuneforge.save_adapter(ours, tmp_path / "adapter")
    text = ours.config.get_text_config()
    window = getattr(text, "sliding_window", None)
    if isinstance(window, int) and window < text.max_position_embeddings:
        # PEFT's cached prefix leaves a sliding window, ours stays visible: no adapter_config.json is written
        assert not (tmp_path / "adapter" / "adapter_config.json").exists()
        return
    theirs = peft.PeftModel.from_pretrained(tiny(arch), str(tmp_path / "adapter")).eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids=TOKENS, attention_mask=mask).logits, expected,
                                   atol=1e-5, rtol=1e-5)
        prompt, sequence = TOKENS[:1, :5], TOKENS[:1, :5]
        for _ in range(4):  # greedy by full forwards (no cache on PEFT's side)
            next_token = theirs(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], 1)
    generated = ours.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generated.tolist() == sequence.tolist()


@pytest.mark.parametrize("arch", SUPPORTED)
def test_saved_prefix_reloads_with_equal_logits(arch, tmp_path):
    ours = prepared(arch)
    tuneforge.save_adapter(ours, tmp_path / "adapter")
    loaded = tuneforge.load_adapter(tiny(arch), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(TOKENS).logits, ours(TOKENS).logits, atol=0, rtol=0)


@pytest.mark.parametrize("arch", SUPPORTED)
def test_one_training_step_gives_finite_loss_and_prefix_gradient(arch):
    model = tuneforge.prepare(tiny(arch), [{"prefix": {"length": 3}}]).train()
    labels = torch.tensor([0, 2]) if arch == "bert" else TOKENS
    loss = model(input_ids=TOKENS, labels=labels).loss
    loss.backward()
    gradient = model.prefix_encoder.embedding.grad
    assert torch.isfinite(loss) and gradient is not None and gradient.abs().sum() > 0
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"prefix_encoder.embedding"}


def test_gemma2_softcaps_prefix_logits_and_keeps_the_prefix_in_every_window():
    """Sliding-window layers limit the real tokens (the model's own mask) but every query sees the whole
    prefix; attention logits stay within +-softcap (Gemma 2's tanh capping) with the prefix included."""
    model = prepared("gemma2", sliding_window=2)
    assert model.config.layer_types[0] == "sliding_attention"
    weights = model(input_ids=TOKENS[:1], output_attentions=True).attentions[0][0]  # (heads, Q, 3 + T)
    last = weights[:, -1]
    assert (last[:, :3] > 0).all()  # the prefix, visible to the last query
    assert (last[:, 3:-2] == 0).all() and (last[:, -2:] > 0).all()  # the window: the last 2 real tokens only
    from tuneforge.strategies.prefix import softcapped_attention

    query = torch.full((1, 1, 1, 4), 100.0)
    keys = torch.stack([torch.full((4,), 100.0), torch.ones(4)])[None, None]  # logits 40000 and 400
    _, probabilities = softcapped_attention(torch.nn.Module().eval(), query, keys, torch.randn(1, 1, 2, 4),
                                            None, softcap=50.0, scaling=1.0)
    torch.testing.assert_close(probabilities, torch.full_like(probabilities, 0.5))  # both capped to ~50


ALIBI = "uses ALiBi position biases, which its code builds for the real tokens only .*; use lora or prompt"


@pytest.mark.parametrize(("arch", "overrides", "message"), [
    ("falcon", {}, ("prefix: FalconForCausalLM computes attention without transformers' AttentionInterface; "
                    "use lora or prompt")),
    ("falcon", {"alibi": True}, f"prefix: FalconForCausalLM {ALIBI}"),
    ("bloom", {}, f"prefix: BloomForCausalLM {ALIBI}"),
    ("t5", {}, "prefix: T5ForConditionalGeneration is an encoder-decoder .*; use lora or prompt"),
])
def test_refusals_name_the_cause_and_what_to_use(arch, overrides, message):
    model = tiny(arch, **overrides)
    implementation = model.config._attn_implementation
    with pytest.raises(ModelError, match=message):
        tuneforge.prepare(model, [{"prefix": {}}])
    assert model.config._attn_implementation == implementation and not hasattr(model, "prefix_encoder")
