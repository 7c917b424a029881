"""Layer-wise fine-tuning: train chosen layers, decay the LR with depth, unfreeze gradually.

- Freezing lower layers keeps general features and saves compute (Yosinski et al. 2014).
- Layer-wise LR decay: layer i of L gets `lr * lr_decay ** (L - 1 - i)`, embeddings `lr * lr_decay ** L`
  (discriminative fine-tuning, Howard & Ruder 2018, ULMFiT; as used by ELECTRA and BEiT).
- Gradual unfreezing: start with the top chosen layer, unfreeze one more every `unfreeze_every_epochs`
  epochs, from the top down (Howard & Ruder 2018).
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import is_injected, layer_index, num_layers, parse_layer_spec


class LayerwiseOptions(Options):
    train_layers: list[int | str] | str | int = "all"  # indices, ranges "8-11", "top:4", "bottom:2"
    lr_decay: float | None = Field(None, gt=0, le=1)
    unfreeze_every_epochs: int | None = Field(None, ge=1)
    train_embeddings: bool = False
    train_head: bool = True  # final norm and any untied output/classification head


@register("layerwise", LayerwiseOptions)
class Layerwise(Strategy):
    """Train chosen layers only, with optional layer-wise LR decay and gradual unfreezing."""

    identity_start = True  # nothing is injected

    options: LayerwiseOptions
    trains_base_weights = True

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        self.total_layers = num_layers(model)
        self.layers = sorted(parse_layer_spec(self.options.train_layers, self.total_layers))
        return model

    def active_layers(self, epoch: int) -> list[int]:
        """The chosen layers trainable at `epoch` (all of them unless unfreezing gradually)."""
        every = self.options.unfreeze_every_epochs
        if every is None:
            return self.layers
        count = min(len(self.layers), epoch // every + 1)
        return self.layers[-count:]

    def trainable(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        active = set(self.active_layers(ctx.epoch))
        names = set()
        for name, _ in model.named_parameters():
            if is_injected(name):
                continue
            index = layer_index(name)
            if index is not None:
                if index in active:
                    names.add(name)
            elif _is_embedding(name):
                if self.options.train_embeddings:
                    names.add(name)
            elif self.options.train_head:
                names.add(name)
        return names

    def param_groups(self, model: nn.Module, base_lr: float) -> dict[str, float]:
        decay = self.options.lr_decay
        if decay is None:
            return {}
        top = self.total_layers - 1
        rates = {}
        for name, _ in model.named_parameters():
            index = layer_index(name)
            if index is not None:
                rates[name] = base_lr * decay ** (top - index)
            elif _is_embedding(name):
                rates[name] = base_lr * decay ** self.total_layers
        return rates


def _is_embedding(name: str) -> bool:
    return "embed" in name or name.endswith(("wte.weight", "wpe.weight"))
