"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

A small residual MLP is inserted after a sub-layer's output projection, before the sub-layer's own skip
connection:

    h <- h + W_up f(W_down h)        W_down: (b, d), W_up: (d, b) zeros, b = d / reduction_factor

W_up (weight and bias) starts at zero, so the model is unchanged at step 0. Placements:
- `houlsby`: after the attention block and after the feed-forward block of every layer;
- `pfeiffer`: after the feed-forward block only (half the parameters, similar quality in the paper).

Where exactly: on the sub-layer's output, just before the layer's residual add, per architecture
(`ADAPTER_SITES`, keyed by `config.model_type`; each is a path inside a transformer layer, hooked on its
output):
- pre-norm decoders (Llama, Mistral, Qwen, Gemma, Phi-3, StableLM, Granite; GPT-2's `attn`/`mlp`; OPT's
  `self_attn` and `fc2`): `h + adapter(mlp(norm(h)))`. OPT's feed-forward has no module of its own: its
  output leaves `fc2`, then dropout and the residual add.
- sandwich-norm decoders (Gemma 2/3, OLMo 2) normalise a sub-layer's output before the add: the adapter
  follows that norm (`post_attention_layernorm`, `post_feedforward_layernorm`).
- parallel blocks (GPT-NeoX with `use_parallel_residual`, Falcon, StableLM's option): `h + attn(.) + mlp(.)`
  with both branches read from h. `houlsby` adapts each branch before the sum, `pfeiffer` the
  feed-forward branch only; each adapter sees only its branch, not the sum. GPT-NeoX's sites are the
  dropouts after each branch (`post_attention_dropout`, `post_mlp_dropout`), sequential or parallel.
- BERT (hooks on `attention.output.dropout` and `output.dropout`):
  `LayerNorm(x + adapter(dropout(dense(.))))`, i.e. before the block's add & LayerNorm. Deviation:
  `pfeiffer` uses that same feed-forward site, while AdapterHub's `seq_bn` (its Pfeiffer config;
  `original_ln_before: true`) feeds the adapter the output of the feed-forward block's add & LayerNorm
  and applies that LayerNorm again after it (`original_ln_after: true`). Same parameter count, different
  function: AdapterHub `seq_bn` weights are not equivalent here.
An architecture the table does not name gets the first entry whose two sites exist in its layers.

The adapters are child modules of each transformer layer (`...layers.3.adapter_ffn.down.weight`) and run
as forward hooks on the sub-layer, so no base module is replaced and base parameter names never change
(when another strategy wraps a hooked layer, such as LoRA on OPT's `fc2`, the hook moves to the wrapper).
Adapters cannot be merged into the base weights (the non-linearity sits in between): ship them as adapters.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

from pydantic import Field, model_validator
from torch import Tensor, nn
from transformers.activations import ACT2FN

from tuneforge.errors import ModelError
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import (
    architecture_default,
    compute_dtype,
    describe_modules,
    model_type,
    transformer_layers,
)


class AdapterSites(NamedTuple):
    """Paths inside a transformer layer whose outputs are the attention and feed-forward sub-layer outputs."""

    attention: str
    feedforward: str


_PRE_NORM = AdapterSites("self_attn", "mlp")
_SANDWICH = AdapterSites("post_attention_layernorm", "post_feedforward_layernorm")  # norm before the add
# BERT adds the residual inside `attention.output` / `output`, after their dropout
_BERT = AdapterSites("attention.output.dropout", "output.dropout")
# Keyed by config.model_type; for other architectures the first entry whose sites exist (in this order).
# A string is why the architecture has no site.
ADAPTER_SITES: dict[str, AdapterSites | str] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "phi3", "stablelm", "granite", "smollm3",
                     "olmo", "mixtral", "phi"), _PRE_NORM),
    **dict.fromkeys(("gemma2", "gemma3_text", "olmo2"), _SANDWICH),
    **dict.fromkeys(("gpt2", "gptj"), AdapterSites("attn", "mlp")),
    "gpt_neox": AdapterSites("post_attention_dropout", "post_mlp_dropout"),
    "falcon": AdapterSites("self_attention", "mlp"),
    "opt": AdapterSites("self_attn", "fc2"),
    **dict.fromkeys(("bert", "roberta", "deberta-v2"), _BERT),
    "bloom": "BLOOM adds the residual inside its attention and MLP modules: no sub-layer output precedes it",
}


class BottleneckAdapter(nn.Module):
    """h + W_up f(W_down h): down-projection, non-linearity, zero-initialised up-projection, residual."""

    def __init__(self, width: int, bottleneck: int, activation: str, factory: dict):
        super().__init__()
        self.down = nn.Linear(width, bottleneck, **factory)  # default (Kaiming-uniform) init
        self.activation = ACT2FN[activation]
        self.up = nn.Linear(bottleneck, width, **factory)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.injected_disabled = False

    def forward(self, hidden: Tensor) -> Tensor:  # (B, T, d) -> (B, T, d)
        if self.injected_disabled:
            return hidden
        return hidden + self.up(self.activation(self.down(hidden)))

    def adapt_output(self, module: nn.Module, inputs: tuple, output):
        """The forward hook on the sub-layer: its output (or a tuple output's first item) through the
        adapter. A bound method, so a deep copy of the model (a frozen reference) runs its own adapter."""
        if isinstance(output, tuple):
            return (self(output[0]), *output[1:])
        return self(output)

    def extra_repr(self) -> str:
        return f"{self.down.in_features} -> {self.down.out_features} -> {self.up.out_features}"


class AdapterOptions(Options):
    placement: Literal["houlsby", "pfeiffer"] = "pfeiffer"
    reduction_factor: int | None = Field(None, ge=1)  # bottleneck = hidden_size / reduction_factor
    bottleneck_size: int | None = Field(None, ge=1)
    activation: str = "relu"

    @model_validator(mode="after")
    def _one_size(self) -> AdapterOptions:
        if self.reduction_factor is not None and self.bottleneck_size is not None:
            raise ValueError("give reduction_factor or bottleneck_size, not both")
        if self.activation not in ACT2FN:
            raise ValueError(f"unknown activation {self.activation!r} (e.g. relu, gelu, silu, tanh)")
        return self


@register("adapter", AdapterOptions)
class Adapter(Strategy):
    """Bottleneck adapters after attention and/or feed-forward blocks (Houlsby, Pfeiffer); cannot merge."""

    identity_start = True  # the up-projection starts at zero

    param_prefix = "adapter_"
    parameter_efficient = True
    options: AdapterOptions

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        opts = self.options
        width = _hidden_size(model)
        bottleneck = opts.bottleneck_size or max(1, width // (opts.reduction_factor or 16))
        layers = transformer_layers(model)
        def fits(entry: AdapterSites | str) -> bool:
            if isinstance(entry, str):
                return False
            return all(_has(layer, path) for _, layer in layers for path in entry)

        sites = architecture_default(model, ADAPTER_SITES, fits)
        if isinstance(sites, str):
            raise ModelError(f"adapter: {sites}; use lora or ia3 on this model")
        if sites is None or not fits(sites):
            pairs = {f"{e.attention}/{e.feedforward}" for e in ADAPTER_SITES.values()
                     if not isinstance(e, str)}
            known = ", ".join(sorted(pairs))
            kind = model_type(model) or type(model).__name__
            layer_type = type(layers[0][1]).__name__
            raise ModelError(f"adapter: no insertion points known for {kind} ({layer_type} has none of the "
                             f"known sub-layer pairs: {known}); use lora or ia3 on this model")
        kinds = {"adapter_attn": sites.attention, "adapter_ffn": sites.feedforward}
        if opts.placement == "pfeiffer":
            del kinds["adapter_attn"]
        for layer_name, layer in layers:
            parameter = next(layer.parameters())
            # injected weights are float32 next to a quantized (integer) base weight
            factory = {"device": parameter.device, "dtype": compute_dtype(parameter)}
            for attribute, path in kinds.items():
                if hasattr(layer, attribute):
                    raise ModelError(f"adapter: {layer_name} already has {attribute} (adapter listed twice?)")
                adapter = BottleneckAdapter(width, bottleneck, opts.activation, factory)
                layer.add_module(attribute, adapter)
                layer.get_submodule(path).register_forward_hook(adapter.adapt_output)
        self.sites = [f"{name}.{path}" for name, _ in layers for path in kinds.values()]
        return model

    def describe(self, model: nn.Module) -> str | None:
        """The sub-layers whose outputs pass through an adapter."""
        return describe_modules(getattr(self, "sites", []))


def _has(layer: nn.Module, path: str) -> bool:
    try:
        layer.get_submodule(path)
    except AttributeError:
        return False
    return True


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ModelError(f"adapter: cannot tell the hidden size of {type(model).__name__} "
                         f"(no config.hidden_size)")
    return size
