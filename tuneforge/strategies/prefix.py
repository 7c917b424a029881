"""Prefix tuning: learned key/value prefixes in every attention layer (Li & Liang 2021, arXiv:2101.00190).

Each layer l attends to `length` extra key/value pairs P_k^l, P_v^l before the real tokens:

    attn(q, [P_k^l ; K], [P_v^l ; V])             P^l: (kv_heads, length, head_dim)

All prefixes live in one matrix P: (length, layers * 2 * kv_heads * head_dim), PEFT's layout (per virtual
token: layer 0 keys, layer 0 values, layer 1 keys, ...). With `reparam: true` P is produced by an MLP,
P = W_2 tanh(W_1 E) + b_2 with E: (length, hidden), which the paper found to train more stably; the MLP is
folded into the plain P when the adapter is saved. Without it, P starts as the keys and values the model
itself computes for random vocabulary tokens ("real word activations", Sec. 7.2).

Mechanism: the prefix is joined to the keys and values inside a registered attention function
(transformers' AttentionInterface), after the KV cache update. So the cache only ever holds real tokens and
the prefix survives it in `generate`; nothing is written to a cache during training, so gradient
checkpointing (which drops caches) keeps working; and `disabled_adapters` turns it off. As in PEFT, real
tokens sit at positions length, length + 1, ... (the prefix occupies 0 .. length - 1), which a pre-hook on
the rotary embedding applies.
"""

from __future__ import annotations

import functools
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from tuneforge.errors import ModelError
from tuneforge.peft_layout import PROMPT_KEY
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext

ATTENTION_NAME = "tuneforge_prefix"
ENCODER_ATTR = "prefix_encoder"
LINK_ATTR = "tuneforge_prefix_encoder"  # plain (unregistered) attribute on each attention module
WEIGHT_NAME = f"{ENCODER_ATTR}.embedding"  # the one tensor an adapter holds (P, folded)


class PrefixEncoder(nn.Module):
    """The prefix matrix P, directly or through the MLP reparametrisation; `layer_kv` slices one layer."""

    def __init__(self, length: int, layers: int, kv_heads: int, head_dim: int,
                 reparam: tuple[int, int] | None, factory: dict):
        super().__init__()
        self.layers, self.kv_heads, self.head_dim = layers, kv_heads, head_dim
        width = layers * 2 * kv_heads * head_dim
        if reparam is None:
            self.embedding = nn.Parameter(torch.zeros(length, width, **factory))
            self.reparam_in = self.reparam_out = None
        else:
            hidden, reparam_hidden = reparam
            self.embedding = nn.Parameter(torch.randn(length, hidden, **factory))
            self.reparam_in = nn.Linear(hidden, reparam_hidden, **factory)
            self.reparam_out = nn.Linear(reparam_hidden, width, **factory)
        self.injected_disabled = False

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def layer_kv(self, layer: int) -> tuple[Tensor, Tensor]:
        """Keys and values of one layer, each (kv_heads, length, head_dim)."""
        block = 2 * self.kv_heads * self.head_dim
        start = layer * block
        if self.reparam_in is None:
            rows = self.embedding[:, start:start + block]
        else:  # only this layer's rows of the output projection
            hidden = torch.tanh(self.reparam_in(self.embedding))
            rows = nn.functional.linear(hidden, self.reparam_out.weight[start:start + block],
                                        self.reparam_out.bias[start:start + block])
        keys_values = rows.view(self.length, 2, self.kv_heads, self.head_dim).permute(1, 2, 0, 3)
        return keys_values[0], keys_values[1]

    def folded(self) -> Tensor:
        """P as (length, layers * 2 * kv_heads * head_dim): the MLP evaluated once."""
        if self.reparam_in is None:
            return self.embedding
        return self.reparam_out(torch.tanh(self.reparam_in(self.embedding)))


def prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, **kwargs):
    """SDPA attention over [prefix ; keys] for attention modules linked to a PrefixEncoder, plain SDPA otherwise."""
    encoder = getattr(module, LINK_ATTR, None)
    if encoder is not None and not encoder.injected_disabled:
        prefix_k, prefix_v = encoder.layer_kv(module.layer_idx)  # (kv_heads, P, head_dim)
        batch = key.shape[0]
        attention_mask = _with_prefix_columns(attention_mask, query, key, encoder.length, module)
        key = torch.cat([prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def _with_prefix_columns(mask: Tensor | None, query: Tensor, key: Tensor, length: int, module: nn.Module):
    """The (B, 1, Q, K) mask widened to (B, 1, Q, length + K): every query sees the whole prefix."""
    if mask is None:
        if not getattr(module, "is_causal", True):
            return None  # bidirectional without padding: everything is visible anyway
        q_len, k_len = query.shape[2], key.shape[2]
        rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)  # absolute query positions
        mask = (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]  # (1, 1, Q, K)
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # bool: True = attend; float: additive
    prefix = visible((*mask.shape[:-1], length), dtype=mask.dtype, device=mask.device)
    return torch.cat([prefix, mask], dim=-1)


@functools.cache
def register_attention() -> None:
    """Make `prefix_attention` known to transformers under ATTENTION_NAME, once, at the first setup (not at
    import: importing tuneforge changes no global registry)."""
    AttentionInterface.register(ATTENTION_NAME, prefix_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


class PrefixOptions(Options):
    length: int = Field(20, ge=1)  # virtual tokens per layer
    reparam: bool = False  # MLP reparametrisation during training (folded away at save)
    reparam_hidden: int | None = Field(None, ge=1)  # the MLP's hidden width; default: the model's hidden size

    @model_validator(mode="after")
    def _hidden_needs_reparam(self) -> PrefixOptions:
        if self.reparam_hidden is not None and not self.reparam:
            raise ValueError("reparam_hidden needs reparam: true")
        return self


@register("prefix", PrefixOptions)
class PrefixTuning(Strategy):
    """Learned key/value prefixes in every attention layer (Li & Liang); generate, grad-ckpt; PEFT layout."""

    identity_start = False  # the prefix is attended to from step 0

    param_prefix = "prefix_"
    parameter_efficient = True
    peft_type = "PREFIX_TUNING"
    options: PrefixOptions

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        if hasattr(model, ENCODER_ATTR):
            raise ModelError("prefix: the model already has a prefix (prefix listed twice?)")
        register_attention()
        attentions, rotaries = _check_supported(model)
        config = model.config.get_text_config()
        kv_heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = attentions[0].head_dim
        parameter = next(model.parameters())
        factory = {"device": parameter.device, "dtype": parameter.dtype}
        reparam = None
        if self.options.reparam:
            reparam = (config.hidden_size, self.options.reparam_hidden or config.hidden_size)
        encoder = PrefixEncoder(self.options.length, len(attentions), kv_heads, head_dim, reparam, factory)
        if reparam is None:
            _init_from_real_tokens(model, attentions, encoder)
        model.add_module(ENCODER_ATTR, encoder)
        for attention in attentions:
            object.__setattr__(attention, LINK_ATTR, encoder)
        for rotary in rotaries:
            rotary.register_forward_pre_hook(_shift_positions(encoder), with_kwargs=True)
        model.set_attn_implementation(ATTENTION_NAME)
        return model

    def adapter_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {WEIGHT_NAME: getattr(model, ENCODER_ATTR).folded()}

    def adapter_options(self) -> dict:
        return {"length": self.options.length, "reparam": False, "reparam_hidden": None}

    def to_peft(self, model: nn.Module) -> PeftTranslation:
        encoder = getattr(model, ENCODER_ATTR)
        return PeftTranslation({
            "peft_type": self.peft_type, "num_virtual_tokens": encoder.length, "num_layers": encoder.layers,
            "token_dim": encoder.kv_heads * encoder.head_dim, "num_attention_heads": encoder.kv_heads,
            "num_transformer_submodules": 1, "prefix_projection": False,
            "encoder_hidden_size": model.config.get_text_config().hidden_size,
        }, {WEIGHT_NAME: PROMPT_KEY})

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        # PEFT saves the reparametrised prefix already folded, like tuneforge.
        return {"length": config["num_virtual_tokens"]}, {PROMPT_KEY: WEIGHT_NAME}


def _check_supported(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """The attention modules (ordered by layer) and rotary embeddings, or a ModelError saying what is missing."""
    name = type(model).__name__
    hint = "prefix tuning supports decoders with rotary embeddings (Llama, Mistral, Qwen2); try prompt or lora"
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation") or not model._can_set_attn_implementation():
        raise ModelError(f"prefix: {name} does not route attention through transformers' "
                         f"AttentionInterface; {hint}")
    implementation = config.get_text_config()._attn_implementation
    if implementation not in ("sdpa", "eager", ATTENTION_NAME, None):
        raise ModelError(f"prefix: attention implementation {implementation!r} is not supported; "
                         f"load the model with attn_implementation='sdpa'")
    needed = ("layer_idx", "head_dim", "k_proj", "v_proj")
    attentions = [m for m in model.modules()
                  if type(m).__name__.endswith("Attention") and all(hasattr(m, a) for a in needed)]
    rotaries = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == "rotary_emb"]
    if not attentions or not rotaries or getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"prefix: {name} is not supported; {hint}")
    return sorted(attentions, key=lambda m: m.layer_idx), rotaries


def _shift_positions(encoder: PrefixEncoder):
    """Rotary pre-hook: real tokens sit after the prefix (positions + length), as with a prefilled cache."""

    def hook(module: nn.Module, args: tuple, kwargs: dict):
        if encoder.injected_disabled:
            return None
        if "position_ids" in kwargs:
            return args, {**kwargs, "position_ids": kwargs["position_ids"] + encoder.length}
        return (args[0], args[1] + encoder.length, *args[2:]), kwargs

    return hook


@torch.no_grad()
def _init_from_real_tokens(model: nn.Module, attentions: list[nn.Module], encoder: PrefixEncoder) -> None:
    """Start P from the keys and values each layer computes for `length` random vocabulary tokens."""
    inputs: dict[int, Tensor] = {}

    def capture(module, args, kwargs):
        inputs[module.layer_idx] = kwargs.get("hidden_states", args[0] if args else None)

    handles = [a.register_forward_pre_hook(capture, with_kwargs=True) for a in attentions]
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        tokens = torch.randint(0, vocab, (1, encoder.length), device=encoder.embedding.device)
        model(input_ids=tokens, use_cache=False)
    finally:
        for handle in handles:
            handle.remove()
    block = encoder.kv_heads * encoder.head_dim
    for attention in attentions:
        hidden = inputs[attention.layer_idx][0]  # (length, hidden)
        start = attention.layer_idx * 2 * block
        encoder.embedding[:, start:start + block] = attention.k_proj(hidden)
        encoder.embedding[:, start + block:start + 2 * block] = attention.v_proj(hidden)
