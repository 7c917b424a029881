"""Bottleneck adapters (Houlsby et al. 2019, arXiv:1902.00751; Pfeiffer et al. 2020, arXiv:2005.00247).

A small residual MLP is inserted after a sub-layer's output projection, before the sub-layer's own skip
connection:

    h <- h + W_up f(W_down h)        W_down: (b, d), W_up: (d, b) zeros, b = d / reduction_factor

W_up (weight and bias) starts at zero, so the model is unchanged at step 0. Placements:
- `houlsby`: after the attention block and after the feed-forward block of every layer;
- `pfeiffer`: after the feed-forward block only (half the parameters, similar quality in the paper).

Where exactly: on the sub-layer's output, before the layer's residual add. Pre-norm decoders (Llama,
Mistral, Qwen, GPT-2; hooks on `self_attn`/`attn` and `mlp`): `h + adapter(mlp(norm(h)))`. BERT (hooks on
`attention.output.dropout` and `output.dropout`): `LayerNorm(x + adapter(dropout(dense(.))))`, i.e.
before the block's add & LayerNorm. Deviation: `pfeiffer` uses that same feed-forward site, while
AdapterHub's `seq_bn` (its Pfeiffer config; `original_ln_before: true`) feeds the adapter the output of
the feed-forward block's add & LayerNorm and applies that LayerNorm again after it (`original_ln_after:
true`). Same parameter count, different function: AdapterHub `seq_bn` weights are not equivalent here.

The adapters are child modules of each transformer layer (`...layers.3.adapter_ffn.down.weight`) and run
as forward hooks on the sub-layer, so no base module is replaced and base parameter names never change.
Adapters cannot be merged into the base weights (the non-linearity sits in between): ship them as adapters.
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field, model_validator
from torch import Tensor, nn
from transformers.activations import ACT2FN

from tuneforge.errors import ModelError
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import layer_index

# Where a sub-layer's output leaves it, before its residual add, per model family (first match wins).
# BERT adds the residual inside `attention.output` / `output` after their dropout, so the adapter goes on
# the dropout's output; Llama/Mistral/Qwen (`self_attn`, `mlp`) and GPT-2 (`attn`, `mlp`) add it in the layer.
ATTENTION_SITES = ("attention.output.dropout", "self_attn", "attn", "self_attention")
FFN_SITES = ("output.dropout", "mlp", "feed_forward")


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
        kinds = {"adapter_attn": ATTENTION_SITES, "adapter_ffn": FFN_SITES}
        if opts.placement == "pfeiffer":
            del kinds["adapter_attn"]
        layers = transformer_layers(model)
        for layer_name, layer in layers:
            parameter = next(layer.parameters())
            factory = {"device": parameter.device, "dtype": parameter.dtype}
            for attribute, sites in kinds.items():
                if hasattr(layer, attribute):
                    raise ModelError(f"adapter: {layer_name} already has {attribute} (adapter listed twice?)")
                site = _find_site(layer, sites)
                if site is None:
                    raise ModelError(f"adapter: {type(layer).__name__} has none of {', '.join(sites)}; "
                                     f"bottleneck adapters support Llama-, GPT-2- and BERT-style layers")
                adapter = BottleneckAdapter(width, bottleneck, opts.activation, factory)
                layer.add_module(attribute, adapter)
                site.register_forward_hook(adapter.adapt_output)
        return model


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks: modules named `...layers.N` (`h.N`, `layer.N`, ...), one per index."""
    found = {}
    for name, module in model.named_modules():
        index = layer_index(name)
        if index is not None and name.rsplit(".", 1)[-1] == str(index) and index not in found:
            found[index] = (name, module)
    if not found:
        raise ModelError(f"{type(model).__name__}: no transformer layers found (expected names like model.layers.0)")
    return [found[i] for i in sorted(found)]


def _find_site(layer: nn.Module, sites: tuple[str, ...]) -> nn.Module | None:
    for path in sites:
        try:
            return layer.get_submodule(path)
        except AttributeError:
            continue
    return None


def _hidden_size(model: nn.Module) -> int:
    config = getattr(model, "config", None)
    config = config.get_text_config() if hasattr(config, "get_text_config") else config
    size = getattr(config, "hidden_size", None) or getattr(config, "n_embd", None)
    if size is None:
        raise ModelError(f"adapter: cannot tell the hidden size of {type(model).__name__} (no config.hidden_size)")
    return size
