"""Prefix tuning: learned key/value prefixes in every attention layer (Li & Liang 2021, arXiv:2101.00190).

Each layer l attends to `length` extra key/value pairs P_k^l, P_v^l before the real tokens:

    attn(q, [P_k^l ; K], [P_v^l ; V])             P^l: (kv_heads, length, head_dim)

All prefixes live in one matrix P: (length, layers * 2 * kv_heads * head_dim), PEFT's layout (per virtual
token: layer 0 keys, layer 0 values, layer 1 keys, ...). With `reparam: true` P is produced by an MLP,
P = W_2 tanh(W_1 E) + b_2 with E: (length, hidden), which the paper found to train more stably; the MLP is
folded into the plain P when the adapter is saved. Without it, P starts as the keys and values the model
itself computes for random vocabulary tokens ("real word activations", Sec. 7.2), captured inside the
attention function, so fused projections (phi3 `qkv_proj`, gpt_neox `query_key_value`, gpt2 `c_attn`)
need nothing special.

Mechanism: the prefix is joined to the keys and values inside a registered attention function
(transformers' AttentionInterface), after the KV cache update. So the cache only ever holds real tokens and
the prefix survives it in `generate`; nothing is written to a cache during training, so gradient
checkpointing (which drops caches) keeps working; and `disabled_adapters` turns it off. As with PEFT's
prefilled `past_key_values`, real tokens sit at positions length, length + 1, ... (the prefix occupies
0 .. length - 1): a pre-hook adds `length` to the positions given to the rotary embedding (Llama, Phi-3,
GPT-NeoX, Gemma2) or to the learned position table (GPT-2 `wpe`, OPT `embed_positions`, whose own offset
of 2 is added after ours, BERT `position_embeddings`). Encoders (BERT) attend bidirectionally: every
token sees the prefix.

Attention variants: logit softcapping (Gemma2, `softcap`) is computed eagerly, tanh-capped as the model
does; sliding windows (Gemma2, Mistral) limit the real tokens only (the model's own mask), while the prefix
stays visible to every query: it is context for every token, as in Li & Liang (PEFT's cache puts the
prefix inside the window instead, so the two agree while length + sequence <= window). ALiBi models (Falcon
`alibi: true`, Bloom, MPT) are refused: they add their distance biases to the attention mask for the real
tokens only, so prefix keys would get none. Falcon without ALiBi is refused too: in transformers 5.24 it
computes attention in its own code, not through AttentionInterface (as do Bloom and MPT).
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import repeat_kv, sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

from tuneforge.errors import ModelError
from tuneforge.peft_layout import PROMPT_KEY
from tuneforge.reference import eval_mode
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext

ATTENTION_NAME = "tuneforge_prefix"
ENCODER_ATTR = "prefix_encoder"
LINK_ATTR = "tuneforge_prefix_link"  # plain (unregistered) attribute on an attention module: (encoder, layer)
WEIGHT_NAME = f"{ENCODER_ATTR}.embedding"  # the one tensor an adapter holds (P, folded)
ROTARY_NAME = "rotary_emb"  # Llama, Phi-3, GPT-NeoX, Gemma2, ...: called with position ids
POSITION_TABLES = ("wpe", "embed_positions", "position_embeddings")  # learned positions: GPT-2, OPT, BERT
ALIBI_TYPES = ("bloom", "mpt")  # model types whose positions are ALiBi biases, whatever their config says
USE_INSTEAD = "use lora or prompt"
_CAPTURED: ContextVar[list | None] = ContextVar("tuneforge_prefix_captured", default=None)


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

    def shift_positions(self, module: nn.Module, args: tuple, kwargs: dict):
        """Position pre-hook: real tokens sit after the prefix (positions + length), as with a filled cache.

        Rotary embeddings take (x, position_ids); OPT's table takes position_ids= (and adds its offset after);
        GPT-2's and BERT's plain nn.Embedding take the position ids first. A bound method, not a closure, so a
        deep copy of the model (a frozen reference) consults its own encoder.
        """
        if self.injected_disabled:
            return None
        if kwargs.get("position_ids") is not None:
            return args, {**kwargs, "position_ids": self._shifted(kwargs["position_ids"])}
        if isinstance(module, nn.Embedding):
            return (self._shifted(args[0]), *args[1:]), kwargs
        return (args[0], self._shifted(args[1]), *args[2:]), kwargs

    def _shifted(self, positions: Tensor) -> Tensor:  # OPT marks padding -1 (its padding row): left as it is
        return torch.where(positions >= 0, positions + self.length, positions)

    def folded(self) -> Tensor:
        """P as (length, layers * 2 * kv_heads * head_dim): the MLP evaluated once."""
        if self.reparam_in is None:
            return self.embedding
        return self.reparam_out(torch.tanh(self.reparam_in(self.embedding)))


def prefix_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                     attention_mask: Tensor | None, **kwargs) -> tuple[Tensor, Tensor | None]:
    """Attention over [prefix ; keys] for modules linked to a PrefixEncoder; SDPA, or eager with `softcap`."""
    captured = _CAPTURED.get()
    if captured is not None:  # setup's forward over random tokens: record what this layer computed
        captured.append((module, key[0], value[0]))  # (kv_heads, T, head_dim)
    softcap = kwargs.get("softcap") is not None  # SDPA has no softcapping (Gemma2): computed eagerly
    if softcap and attention_mask is None and getattr(module, "is_causal", True) and query.shape[2] > 1:
        attention_mask = _causal_mask(query, key)  # sdpa_mask leaves causality to SDPA's is_causal
    encoder, layer = getattr(module, LINK_ATTR, (None, 0))
    if encoder is not None and not encoder.injected_disabled:
        prefix_k, prefix_v = encoder.layer_kv(layer)  # (kv_heads, P, head_dim)
        batch = key.shape[0]
        attention_mask = _with_prefix_columns(attention_mask, query, key, encoder.length, module)
        key = torch.cat([prefix_k.to(key.dtype).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([prefix_v.to(value.dtype).expand(batch, -1, -1, -1), value], dim=2)
    if softcap:
        return softcapped_attention(module, query, key, value, attention_mask, **kwargs)
    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def softcapped_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor, mask: Tensor | None,
                         softcap: float, scaling: float | None = None, dropout: float = 0.0,
                         **kwargs) -> tuple[Tensor, Tensor]:
    """Eager attention with capped logits, softcap * tanh(q k^T * scaling / softcap).

    Logit softcapping as in Gemma 2 (arXiv:2408.00118): the same operations in the same order as Gemma2's own
    eager attention, so a disabled prefix is exact.
    """
    groups = query.shape[1] // key.shape[1]
    key, value = repeat_kv(key, groups), repeat_kv(value, groups)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        if mask.dtype == torch.bool:  # sdpa_mask's True = attend, as the additive mask eager attention uses
            mask = torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype)
        scores = scores + mask
    weights = nn.functional.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _with_prefix_columns(mask: Tensor | None, query: Tensor, key: Tensor, length: int, module: nn.Module):
    """The (B, 1, Q, K) mask widened to (B, 1, Q, length + K): every query sees the whole prefix."""
    if mask is None:
        if not getattr(module, "is_causal", True):
            return None  # bidirectional without padding: everything is visible anyway
        mask = _causal_mask(query, key)
    visible = torch.ones if mask.dtype == torch.bool else torch.zeros  # bool: True = attend; float: additive
    prefix = visible((*mask.shape[:-1], length), dtype=mask.dtype, device=mask.device)
    return torch.cat([prefix, mask], dim=-1)


def _causal_mask(query: Tensor, key: Tensor) -> Tensor:
    """(1, 1, Q, K) bool, True = attend: the last Q of K positions each see themselves and what precedes."""
    q_len, k_len = query.shape[2], key.shape[2]
    rows = torch.arange(q_len, device=query.device)[:, None] + (k_len - q_len)  # absolute query positions
    return (torch.arange(k_len, device=query.device)[None, :] <= rows)[None, None]


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

    def refuses_compile(self) -> str | None:
        # measured: the layer number picking each block's slice of P is a Python int, so torch.compile
        # specialises one graph per block, past the recompile limit on a real model
        return ("each block's prefix is picked by its layer number, one compiled graph per block "
                "(set train.compile: false)")

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        if hasattr(model, ENCODER_ATTR):
            raise ModelError("prefix: the model already has a prefix (prefix listed twice?)")
        _refuse_unsupported(model)
        position_modules = _position_modules(model)
        register_attention()
        config = model.config.get_text_config()
        previous = config._attn_implementation
        model.set_attn_implementation(ATTENTION_NAME)
        try:
            attentions, keys, values = _real_token_keys_values(model, self.options.length)
        except ModelError:
            model.set_attn_implementation(previous)  # refused: the model is left as it came
            raise
        parameter = next(model.parameters())
        factory = {"device": parameter.device, "dtype": parameter.dtype}
        reparam = None
        if self.options.reparam:
            reparam = (config.hidden_size, self.options.reparam_hidden or config.hidden_size)
        kv_heads, _, head_dim = keys[0].shape
        encoder = PrefixEncoder(self.options.length, len(attentions), kv_heads, head_dim, reparam, factory)
        if reparam is None:  # start from real word activations (Sec. 7.2): each layer's own keys and values
            with torch.no_grad():
                rows = torch.stack([torch.stack(keys), torch.stack(values)], 1)  # (layers, 2, kv_heads, P, d)
                encoder.embedding.copy_(rows.permute(3, 0, 1, 2, 4).reshape(self.options.length, -1))
        model.add_module(ENCODER_ATTR, encoder)
        for layer, attention in enumerate(attentions):
            object.__setattr__(attention, LINK_ATTR, (encoder, layer))
        for module in position_modules:
            module.register_forward_pre_hook(encoder.shift_positions, with_kwargs=True)
        return model

    def adapter_state(self, model: nn.Module) -> dict[str, Tensor]:
        return {WEIGHT_NAME: getattr(model, ENCODER_ATTR).folded()}

    def adapter_options(self) -> dict:
        return {"length": self.options.length, "reparam": False, "reparam_hidden": None}

    def to_peft(self, model: nn.Module) -> PeftTranslation | None:
        """PEFT's layout, unless PEFT would compute something else: with a sliding window shorter than the
        model's context, PEFT's cached prefix leaves the window while ours stays visible to every query, so
        such an adapter gets no `adapter_config.json` rather than one that claims equality."""
        text = model.config.get_text_config()
        window = getattr(text, "sliding_window", None)
        if isinstance(window, int) and window < getattr(text, "max_position_embeddings", window + 1):
            return None
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


def _refuse_unsupported(model: nn.Module) -> None:
    """A ModelError naming the actual cause, for models whose attention the prefix cannot join."""
    name = type(model).__name__
    config = getattr(model, "config", None)
    if config is None or not hasattr(model, "set_attn_implementation"):
        raise ModelError(f"prefix: {name} is not a transformers model with an attention interface; "
                         f"{USE_INSTEAD}")
    text = config.get_text_config()
    if getattr(config, "is_encoder_decoder", False):
        raise ModelError(f"prefix: {name} is an encoder-decoder (prefixes for its encoder, decoder and "
                         f"cross-attention are not implemented); {USE_INSTEAD}")
    if getattr(text, "alibi", False) or text.model_type in ALIBI_TYPES:
        raise ModelError(f"prefix: {name} uses ALiBi position biases, which its code builds for the real "
                         f"tokens only (the prefix keys would get no bias); {USE_INSTEAD}")
    if not model._can_set_attn_implementation():
        raise ModelError(f"prefix: {name} computes attention without transformers' AttentionInterface; "
                         f"{USE_INSTEAD}")
    implementation = text._attn_implementation
    if implementation not in ("sdpa", "eager", ATTENTION_NAME, None):
        raise ModelError(f"prefix: attention implementation {implementation!r} is not supported; "
                         f"load the model with attn_implementation='sdpa'")


def _position_modules(model: nn.Module) -> list[nn.Module]:
    """The rotary embeddings or learned position tables whose positions move behind the prefix."""
    found = [m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] == ROTARY_NAME
             or (n.rsplit(".", 1)[-1] in POSITION_TABLES and isinstance(m, nn.Embedding))]
    if not found:
        raise ModelError(f"prefix: {type(model).__name__} has neither a rotary embedding ({ROTARY_NAME}) nor "
                         f"a learned position table ({', '.join(POSITION_TABLES)}), so real tokens cannot be "
                         f"placed after the prefix; {USE_INSTEAD}")
    return found


@contextmanager
def _capturing() -> Iterator[list]:
    """Collect (attention module, keys, values) from every `prefix_attention` call inside the block."""
    captured: list = []
    token = _CAPTURED.set(captured)
    try:
        yield captured
    finally:
        _CAPTURED.reset(token)


@torch.no_grad()
def _real_token_keys_values(model: nn.Module,
                            length: int) -> tuple[list[nn.Module], list[Tensor], list[Tensor]]:
    """One forward over `length` random vocabulary tokens: the attention modules in call order, with the keys
    and values (kv_heads, length, head_dim) each computed at positions 0 .. length - 1, as a cache holds
    them. A model none of whose attention reaches `prefix_attention` is refused here."""
    vocab = model.get_input_embeddings().weight.shape[0]
    tokens = torch.randint(0, vocab, (1, length), device=next(model.parameters()).device)
    with _capturing() as captured, eval_mode(model):
        model(input_ids=tokens)
    name = type(model).__name__
    attentions = [module for module, _, _ in captured]
    if not captured:
        raise ModelError(f"prefix: {name} computes attention without transformers' AttentionInterface; "
                         f"{USE_INSTEAD}")
    if len({id(m) for m in attentions}) != len(attentions):
        raise ModelError(f"prefix: {name} calls one attention module more than once per forward (shared "
                         f"layers); {USE_INSTEAD}")
    shapes = {tuple(k.shape) for _, k, _ in captured} | {tuple(v.shape) for _, _, v in captured}
    if len(shapes) != 1:
        raise ModelError(f"prefix: {name}'s layers have different key/value shapes {sorted(shapes)}, which "
                         f"PEFT's one prefix matrix cannot hold; {USE_INSTEAD}")
    return attentions, [k for _, k, _ in captured], [v for _, _, v in captured]
