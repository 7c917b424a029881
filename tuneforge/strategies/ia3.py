"""IA3: learned rescaling of keys, values and feed-forward activations (Liu et al. 2022, arXiv:2205.05638).

"Infused Adapter by Inhibiting and Amplifying Inner Activations" learns one vector per adapted layer:

    k = l_k * (W_k x + b_k)        v = l_v * (W_v x + b_v)        (output rescaling, l: (d_out, 1))
    y = W_down (l_ff * a) + b      a: the feed-forward activation  (input rescaling,  l_ff: (1, d_in))

Every l starts at ones, so the model is unchanged at step 0. Both forms fold exactly into the weight
(`W' = l * W` row-wise, or `W' = W * l_ff` column-wise) and unfold again by dividing. The vectors are
stored as `ia3_l` with PEFT's shapes, so adapters load in PEFT unchanged.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tuneforge.errors import ModelError
from tuneforge.peft_layout import peft_targets, short_targets
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext
from tuneforge.surgery import ensure_unwrapped, find_linear_targets, plain_layer, replace_module


class IA3Linear(nn.Module):
    """A linear layer (nn.Linear or GPT-2's Conv1D) whose output (or, for feed-forward layers, input) is rescaled."""

    def __init__(self, base: nn.Linear | Conv1D, feedforward: bool):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores weight as (d_in, d_out)
        self.weight = base.weight
        self.bias = base.bias
        d_in, d_out = (base.weight.shape if self.fan_in_fan_out else base.weight.shape[::-1])
        self.in_features, self.out_features = d_in, d_out
        self.feedforward = feedforward
        shape = (1, d_in) if feedforward else (d_out, 1)
        self.ia3_l = nn.Parameter(torch.ones(shape, device=base.weight.device, dtype=base.weight.dtype))
        self.merged = False
        self.injected_disabled = False

    def _base_weight(self) -> Tensor:
        """The base weight as (d_out, d_in)."""
        return self.weight.T if self.fan_in_fan_out else self.weight

    def forward(self, x: Tensor) -> Tensor:
        if self.merged or self.injected_disabled:
            return F.linear(x, self._base_weight(), self.bias)
        scale = self.ia3_l.flatten()
        if self.feedforward:
            return F.linear(x * scale, self._base_weight(), self.bias)
        return F.linear(x, self._base_weight(), self.bias) * scale

    @torch.no_grad()
    def _rescale(self, inverse: bool) -> None:
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
        return plain_layer(self.weight, self.bias, self.fan_in_fan_out)

    def extra_repr(self) -> str:
        where = "input" if self.feedforward else "output"
        return f"{self.in_features} -> {self.out_features}, rescales the {where}"


class IA3Options(Options):
    targets: list[str] | str = Field(default_factory=lambda: ["k_proj", "v_proj", "down_proj"])
    feedforward_targets: list[str] = Field(default_factory=lambda: ["down_proj"])  # rescale the input instead


@register("ia3", IA3Options)
class IA3(Strategy):
    """IA3 rescaling vectors on keys, values and feed-forward inputs; merges exactly; PEFT layout."""

    identity_start = True  # every scale starts at one

    param_prefix = "ia3_"
    parameter_efficient = True
    peft_type = "IA3"
    options: IA3Options

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        targets = find_linear_targets(model, self.options.targets)
        feedforward = set()
        if self.options.feedforward_targets:
            feedforward = {name for name, _ in find_linear_targets(model, self.options.feedforward_targets)}
        outside = sorted(feedforward - {name for name, _ in targets})
        if outside:
            raise ModelError(f"ia3: feedforward_targets match {outside[0]}, which targets does not; "
                             f"list it in targets too")
        for name, module in targets:
            ensure_unwrapped(name, module, "ia3")
            replace_module(model, name, IA3Linear(module, feedforward=name in feedforward))
        return model

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


def ia3_modules(model: nn.Module) -> list[tuple[str, IA3Linear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, IA3Linear)]


def unload_ia3(model: nn.Module) -> nn.Module:
    """Fold every IA3 vector into its weight and put the plain layer back: a model transformers can save."""
    for name, module in ia3_modules(model):
        module.merge()
        replace_module(model, name, module.unwrap())
    return model
