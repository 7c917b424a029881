"""IA3: learned rescaling of keys, values and feed-forward activations (Liu et al. 2022, arXiv:2205.05638).

"Infused Adapter by Inhibiting and Amplifying Inner Activations" learns one vector per adapted layer:

    k = l_k * (W_k x + b_k)        v = l_v * (W_v x + b_v)        (output rescaling, l: (d_out, 1))
    y = W_down (l_ff * a) + b      a: the feed-forward activation  (input rescaling,  l_ff: (1, d_in))

Every l starts at ones, so the model is unchanged at step 0. Both forms fold exactly into the weight
(`W' = l * W` row-wise, or `W' = W * l_ff` column-wise) and unfold again by dividing. The vectors are
stored as `ia3_l` with PEFT's shapes, so adapters load in PEFT unchanged.

Default targets per architecture (`IA3_DEFAULTS`, keyed by `config.model_type`): the attention keys and
values, and the input of the feed-forward output projection. Where keys and values come out of one fused
projection (GPT-2's `c_attn`, GPT-NeoX's and Falcon's `query_key_value`, Phi-3's `qkv_proj`) its whole
output is rescaled, queries included, as PEFT does: the query part of l is one more vector, not a
different method. An architecture the table does not name gets the first entry whose layers it has.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tuneforge.errors import ModelError
from tuneforge.peft_layout import peft_targets, short_targets
from tuneforge.quantize import frozen_linear, is_quantized
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext
from tuneforge.surgery import (
    architecture_default,
    compute_dtype,
    describe_modules,
    ensure_unwrapped,
    find_linear_targets,
    linear_features,
    linear_modules,
    linear_names,
    model_type,
    plain_layer,
    replace_module,
    targets_exist,
)


class IA3Layout(NamedTuple):
    """An architecture's default IA3 targets: attention layers (output rescaled), feed-forward (input)."""

    attention: tuple[str, ...]
    feedforward: tuple[str, ...]


_LLAMA = IA3Layout(("k_proj", "v_proj"), ("down_proj",))
# BERT-style encoders: the block's feed-forward output is `layer.N.output.dense`; a bare `output.dense`
# suffix would also match the attention output `layer.N.attention.output.dense`.
_BERT_FFN = (r".*\.layer\.\d+\.output\.dense",)
# Keyed by config.model_type; for other architectures the first entry whose layers exist (in this order)
IA3_DEFAULTS: dict[str, IA3Layout] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm",
                     "olmo", "olmo2", "granite", "smollm3"), _LLAMA),
    # Mixtral's experts are fused parameters in transformers 5, not linear layers: attention only
    "mixtral": IA3Layout(("k_proj", "v_proj"), ()),
    "phi3": IA3Layout(("qkv_proj",), ("down_proj",)),
    "phi": IA3Layout(("k_proj", "v_proj"), ("fc2",)),
    "gpt2": IA3Layout(("c_attn",), ("mlp.c_proj",)),
    "gpt_neox": IA3Layout(("query_key_value",), ("dense_4h_to_h",)),
    "falcon": IA3Layout(("query_key_value",), ("dense_4h_to_h",)),
    "bloom": IA3Layout(("query_key_value",), ("dense_4h_to_h",)),
    "opt": IA3Layout(("k_proj", "v_proj"), ("fc2",)),
    "gptj": IA3Layout(("k_proj", "v_proj"), ("fc_out",)),
    "bert": IA3Layout(("key", "value"), _BERT_FFN),
    "roberta": IA3Layout(("key", "value"), _BERT_FFN),
    "deberta-v2": IA3Layout(("key_proj", "value_proj"), _BERT_FFN),
}


class IA3Linear(nn.Module):
    """A linear layer (nn.Linear, GPT-2's Conv1D or a frozen quantized layer) whose output (feed-forward
    layers: input) is rescaled. A quantized base is decoded on the fly and cannot be merged into."""

    def __init__(self, base: nn.Linear | Conv1D, feedforward: bool):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores weight as (d_in, d_out)
        self.base_type = type(base)  # a subclass (FalconLinear) comes back as itself on unwrap
        self.weight = base.weight
        self.bias = base.bias
        d_in, d_out = linear_features(base)
        self.in_features, self.out_features = d_in, d_out
        self.feedforward = feedforward
        shape = (1, d_in) if feedforward else (d_out, 1)
        factory = {"device": base.weight.device, "dtype": compute_dtype(base.weight)}
        self.ia3_l = nn.Parameter(torch.ones(shape, **factory))
        self.merged = False
        self.injected_disabled = False

    def _base_weight(self) -> Tensor:
        """The base weight as (d_out, d_in)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def _base_forward(self, x: Tensor) -> Tensor:
        """W x + b of the frozen base layer (decoded on the fly when it is quantized)."""
        if self.fan_in_fan_out:
            return F.linear(x, self.weight.T, self.bias)
        return frozen_linear(x, self.weight, self.bias)

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.injected_disabled:
            return self._base_forward(x)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return self._base_forward(x * scale)
        return self._base_forward(x) * scale

    @torch.no_grad()
    def _rescale(self, inverse: bool) -> None:
        if is_quantized(self.weight):
            raise ModelError("ia3: cannot merge into a quantized base weight; load the base unquantized "
                             "(export --merged decodes it first)")
        factor = self.ia3_l.reciprocal() if inverse else self.ia3_l  # (d_out, 1) or (1, d_in)
        weight = self._base_weight() * factor
        self.weight.data.copy_(weight.T if self.fan_in_fan_out else weight)
        if self.bias is not None and not self.feedforward:
            self.bias.data.mul_(factor.flatten())

    def merge(self) -> None:
        if not self.merged:
            self._rescale(inverse=False)
            self.merged = True

    def unmerge(self) -> None:
        if self.merged:
            self._rescale(inverse=True)
            self.merged = False

    def unwrap(self) -> nn.Linear | Conv1D:
        """The plain layer type it wrapped, holding the current (merged or base) weight."""
        return plain_layer(self.weight, self.bias, self.fan_in_fan_out, self.base_type)

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else "output"
        return f"{self.in_features} -> {self.out_features}, rescales the {where}"


class IA3Options(Options):
    # None: the architecture's default (IA3_DEFAULTS): attention keys and values plus feedforward_targets
    targets: list[str] | str | None = None
    # rescale the input instead; None: the architecture's feed-forward defaults among the targets
    feedforward_targets: list[str] | None = None


@register("ia3", IA3Options)
class IA3(Strategy):
    """IA3 rescaling vectors on keys, values and feed-forward inputs; merges exactly; PEFT layout."""

    identity_start = True  # every scale starts at one

    param_prefix = "ia3_"
    parameter_efficient = True
    peft_type = "IA3"
    options: IA3Options

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        opts = self.options
        both_set = opts.targets is not None and opts.feedforward_targets is not None
        layout = None if both_set else default_layout(model)
        default = f"ia3's default for {model_type(model)}"  # errors name the defaults: the user set nothing
        if opts.feedforward_targets is None:  # the architecture's feed-forward layers (among targets, if set)
            feedforward = _names(model, layout.feedforward, default) if layout else set()
        else:  # [] is no feed-forward layer
            feedforward = _names(model, opts.feedforward_targets, "feedforward_targets")
        if opts.targets is None:
            names = _names(model, layout.attention, default) | feedforward
            targets = [(n, m) for n, m in linear_modules(model) if n in names]
        else:
            targets = find_linear_targets(model, opts.targets)
            if opts.feedforward_targets is None:
                feedforward &= {n for n, _ in targets}
        outside = sorted(feedforward - {name for name, _ in targets})
        if outside:
            raise ModelError(f"ia3: feedforward_targets match {outside[0]}, which targets does not; "
                             f"list it in targets too")
        for name, module in targets:
            ensure_unwrapped(name, module, "ia3")
            replace_module(model, name, IA3Linear(module, feedforward=name in feedforward))
        return model

    def describe(self, model: nn.Module) -> str | None:
        modules = ia3_modules(model)
        feedforward = [n for n, m in modules if m.feedforward]
        text = describe_modules([n for n, _ in modules])
        return f"{text} (input rescaled: {describe_modules(feedforward)})" if feedforward else text

    def merged_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return ia3_modules(model)

    def unload(self, model: nn.Module) -> None:
        unload_ia3(model)

    def to_peft(self, model: nn.Module) -> PeftTranslation:
        modules = ia3_modules(model)
        targets, _ = short_targets(model, [n for n, _ in modules], restricted=False)
        feedforward = [n for n, m in modules if m.feedforward]
        short = len(targets) == 0 or "." not in targets[0]
        feedforward = sorted({n.rsplit(".", 1)[-1] for n in feedforward}) if short else sorted(feedforward)
        return PeftTranslation({
            "peft_type": self.peft_type, "target_modules": targets, "feedforward_modules": feedforward,
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in modules), "init_ia3_weights": True,
        })

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        feedforward = config.get("feedforward_modules") or []
        feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
        return {"targets": peft_targets(config), "feedforward_targets": feedforward}, {}


def default_layout(model: nn.Module) -> IA3Layout:
    """The model's default IA3 targets (IA3_DEFAULTS); a refusal saying what to set when there is none."""
    layout = architecture_default(
        model, IA3_DEFAULTS, lambda entry: targets_exist(model, entry.attention + entry.feedforward))
    if layout is None:
        raise ModelError(
            f"ia3: no default targets for {model_type(model) or type(model).__name__}; set `targets` (its "
            f"attention key and value layers, and the feed-forward output layers) and `feedforward_targets` "
            f"(those feed-forward layers) from its linear layers: {linear_names(model)}")
    return layout


def _names(model: nn.Module, targets: list[str] | tuple[str, ...], option: str) -> set[str]:
    if not targets:
        return set()
    return {name for name, _ in find_linear_targets(model, list(targets), option=option)}


def ia3_modules(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, IA3Linear)]


def unload_ia3(model: nn.Module) -> nn.Module:
    """Fold every IA3 vector into its weight and put the plain layer back: a model transformers can save."""
    for name, module in ia3_modules(model):
        module.merge()
        replace_module(model, name, module.unwrap())
    return model
