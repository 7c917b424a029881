"""Dropout control: set the model's attention, hidden-state and LoRA dropout rates from the config.

Dropout (Srivastava et al. 2014, JMLR 15) regularises fine-tuning on small data; pretrained checkpoints
ship with their own rates (SmolLM2: 0 everywhere; BERT: 0.1), and this sets them per run:
- `attention`: dropout on attention probabilities (Llama's `attention_dropout`, BERT's self-attention
  dropout, GPT-2's `attn_dropout`);
- `hidden`: every other dropout layer of the base model (embeddings, residual/output projections,
  classifier), as BERT's `hidden_dropout_prob` and GPT-2's `resid_pdrop`/`embd_pdrop` do;
- `lora`: the dropout on LoRA's input path (list `dropout` after `lora`).
The model config is updated too, so a saved model carries the rates. Unset options leave rates alone.
"""

from __future__ import annotations

from pydantic import Field
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import is_injected

_ATTENTION_CONFIG_KEYS = ("attention_dropout", "attention_probs_dropout_prob", "attn_pdrop")
_HIDDEN_CONFIG_KEYS = ("hidden_dropout_prob", "hidden_dropout", "resid_pdrop", "embd_pdrop")
# A dropout layer inside a module that projects queries/keys/values acts on attention probabilities.
_ATTENTION_PROJECTIONS = ("query", "key", "value", "q_proj", "k_proj", "c_attn", "qkv_proj", "Wqkv")


class DropoutOptions(Options):
    attention: float | None = Field(None, ge=0, lt=1)
    hidden: float | None = Field(None, ge=0, lt=1)
    lora: float | None = Field(None, ge=0, lt=1)


@register("dropout", DropoutOptions)
class Dropout(Strategy):
    """Override attention, hidden-state and LoRA dropout rates."""

    identity_start = True  # rates only: eval-mode outputs are untouched

    family = "objective"
    options: DropoutOptions

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        opts = self.options
        kind = type(model).__name__
        if opts.attention is not None:
            found = set_attention_dropout(model, opts.attention)
            if not found:
                raise ModelError(f"dropout: {kind} has no attention dropout to set; remove `attention`")
        if opts.hidden is not None:
            found = set_hidden_dropout(model, opts.hidden)
            if not found:
                raise ModelError(f"dropout: {kind} has no hidden-state dropout layers (Llama-style models "
                                 f"only have attention dropout); remove `hidden`")
        if opts.lora is not None:
            found = set_lora_dropout(model, opts.lora)
            if not found:
                raise ModelError("dropout: lora: no LoRA layers yet; "
                                 "list `dropout` after `lora` in strategies")
        return model


def set_attention_dropout(model: nn.Module, rate: float) -> int:
    """Set attention-probability dropout everywhere; returns how many modules or layers changed."""
    _set_config(model, _ATTENTION_CONFIG_KEYS, rate)  # so a saved model carries the rate
    count = 0
    for name, module in model.named_modules():
        if isinstance(getattr(module, "attention_dropout", None), float):  # Llama-style: a rate, no layer
            module.attention_dropout = rate
            count += 1
        elif isinstance(module, nn.Dropout) and _is_attention_dropout(model, name):
            module.p = rate
            count += 1
    return count


def set_hidden_dropout(model: nn.Module, rate: float) -> int:
    """Set every base-model dropout layer that does not act on attention probabilities."""
    layers = [
        module for name, module in model.named_modules()
        if isinstance(module, nn.Dropout) and not is_injected(name) and not _is_attention_dropout(model, name)
    ]
    for module in layers:
        module.p = rate
    if layers:
        _set_config(model, _HIDDEN_CONFIG_KEYS, rate)
    return len(layers)


def set_lora_dropout(model: nn.Module, rate: float) -> int:
    """Give every LoRA layer an input dropout of `rate` (identity at 0, as LoRA builds it).

    LoRA layers are found by what they have, a `lora_dropout` submodule: no other strategy is imported.
    """
    modules = [m for m in model.modules() if isinstance(getattr(m, "lora_dropout", None), nn.Module)]
    for module in modules:
        module.lora_dropout = nn.Dropout(rate) if rate > 0 else nn.Identity()
    return len(modules)


def _is_attention_dropout(model: nn.Module, name: str) -> bool:
    parent_name, _, child = name.rpartition(".")
    if is_injected(name):
        return False
    if "attn" in child or "attention" in child:
        return True
    parent = model.get_submodule(parent_name) if parent_name else model
    return any(hasattr(parent, projection) for projection in _ATTENTION_PROJECTIONS)


def _set_config(model: nn.Module, keys: tuple[str, ...], rate: float) -> None:
    """Config keys alone do not change a built model; they make a saved model carry the rate."""
    config = getattr(model, "config", None)
    for key in keys:
        if config is not None and isinstance(getattr(config, key, None), (int, float)):
            setattr(config, key, rate)
