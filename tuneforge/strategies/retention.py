"""Knowledge retention: keep the model's predictions on retain text close to the frozen original's.

    loss = task + weight * KL(p_original || p_current)        on a retain batch, every `every` steps

In the spirit of Learning without Forgetting (Li & Hoiem 2016, arXiv:1606.09282): the original model's
outputs are the targets, so the retained behaviour is the model's own (not the retain text's tokens).
Retain batches come from `ctx.retain_batches`, the documents set aside for regularisers: disjoint from
the ones forgetting is measured on, so the measurement is not trained on.

The frozen original is the same model with its injected modules disabled when the parametrization only
adds modules (LoRA, adapters, IA3, prefix, prompt): no second copy in memory. When base weights train
(full, layer-wise), a frozen copy is kept instead.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from typing import Any

from pydantic import Field
from torch import Tensor, nn

from tuneforge.errors import ConfigError
from tuneforge.losses import retention_kl
from tuneforge.reference import FrozenReference
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext


class RetentionOptions(Options):
    weight: float = Field(1.0, ge=0)
    every: int = Field(1, ge=1)  # add the term on every k-th optimizer step (k=1: every step)


@register("retention", RetentionOptions)
class Retention(Strategy):
    """KL to the frozen original model on retain batches interleaved with training (LwF-style)."""

    identity_start = True  # an objective: the model is untouched

    family = "objective"
    options: RetentionOptions

    def __init__(self, options: RetentionOptions):
        super().__init__(options)
        self.reference: FrozenReference | None = None
        self.consumed = 0  # retain batches drawn so far: a resumed run continues the same stream
        self._stream: Iterator[dict] | None = None
        self._stream_source: Any = None

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        if ctx.task_type != "causal_lm" or ctx.retain_batches is None:
            raise ConfigError("retention needs retain text for a causal LM: set `retain:` to a text file "
                              "or builtin:shakespeare")
        if self.reference is None:  # in a task sequence: the model before the first task
            self.reference = FrozenReference(model)
        self._stream_source = lambda: ctx.retain_batches(device=ctx.device)
        self._stream = None

    def _next_batch(self) -> dict:
        if self._stream is None:  # skip what a resumed run already consumed
            self._stream = itertools.islice(self._stream_source(), self.consumed, None)
        self.consumed += 1
        return next(self._stream)

    def needs_logits(self) -> bool:
        return False  # it runs its own forward on retain batches

    def loss(self, model: nn.Module, batch: dict, outputs, ctx: StrategyContext) -> dict[str, Tensor]:
        if self.reference is None or ctx.step % self.options.every != 0:
            return {}
        retain = self._next_batch()
        inputs = {"input_ids": retain["input_ids"], "attention_mask": retain["attention_mask"]}
        current = model(**inputs).logits  # (B, T, V)
        reference = self.reference(**inputs).logits
        kl = retention_kl(current, reference, mask=retain["attention_mask"].bool())
        return {"retention": self.options.weight * kl}

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state.get("consumed", 0))
        self._stream = None
