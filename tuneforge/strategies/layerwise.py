"""Layer-wise fine-tuning: train chosen layers, decay the LR with depth, unfreeze gradually.

- Freezing lower layers keeps general features and saves compute (Yosinski et al. 2014).
- Layer-wise LR decay: layer i of L gets `lr * lr_decay ** (L - 1 - i)`, embeddings `lr * lr_decay ** L`
  (discriminative fine-tuning, Howard & Ruder 2018, ULMFiT; as used by ELECTRA and BEiT). The rates
  cover the base model's parameters only: injected ones (LoRA, adapters, prefix, prompt, heads) keep
  the run's `lr`. "Embeddings" are the base model's `nn.Embedding` tables (token, position, token type)
  and the rest of an embedding block that holds no transformer layer (BERT's `embeddings.LayerNorm`).
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

    def refuses_engine(self, engine: str) -> str | None:
        if engine == "deepspeed" and self.options.unfreeze_every_epochs is not None:
            return ("gradual unfreezing changes the trained set by epoch, and ZeRO partitions the trained "
                    "set "
                    "once (use distributed.engine: fsdp or ddp)")
        return None

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
        embeddings = embedding_parameter_names(model)
        names = set()
        for name, _ in model.named_parameters():
            if is_injected(name):
                continue
            index = layer_index(name)
            if index is not None:
                if index in active:
                    names.add(name)
            elif name in embeddings:
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
        embeddings = embedding_parameter_names(model)
        rates = {}
        for name, _ in model.named_parameters():
            index = layer_index(name)
            if index is not None:  # a layer's base weights and what was injected into it (LoRA, adapters)
                rates[name] = base_lr * decay ** (top - index)
            elif name in embeddings and not is_injected(name):  # `prompt_encoder.embedding` is no input
                # embedding: a soft prompt or prefix sits outside every layer and keeps the base lr
                rates[name] = base_lr * decay ** self.total_layers
        return rates


def embedding_parameter_names(model: nn.Module) -> set[str]:
    """Base parameters below the first transformer layer: every non-injected `nn.Embedding` (token,
    position, token-type tables), the input embeddings (matched by identity), and an embedding block
    holding the input embeddings but no transformer layer (BERT's `embeddings`, with its LayerNorm)."""
    try:
        input_embeddings = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):  # not a transformers model, or one without the method
        input_embeddings = None
    blocks = [input_embeddings] if isinstance(input_embeddings, nn.Module) else []
    for name, module in model.named_modules():
        if not name or is_injected(name):
            continue
        holds_input = any(child is input_embeddings for child in module.children())
        if isinstance(module, nn.Embedding) or (holds_input and not _holds_layers(module)):
            blocks.append(module)
    ids = {id(parameter) for block in blocks for parameter in block.parameters()}
    return {name for name, parameter in model.named_parameters()
            if id(parameter) in ids and not is_injected(name)}


def _holds_layers(module: nn.Module) -> bool:
    return any(layer_index(name) is not None for name, _ in module.named_modules())
