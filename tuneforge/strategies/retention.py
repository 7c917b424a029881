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
from torch.nn.utils.rnn import pad_sequence

from tuneforge.errors import ConfigError
from tuneforge.losses import retention_kl
from tuneforge.reference import FrozenReference, KeptReference, reference_bytes
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

    def refuses_engine(self, engine: str) -> str | None:
        return ("it keeps a frozen copy of the base model to take the KL against; under sharding "
                "that copy would be whole on every process, and its weight reads would see one "
                "process's shards (use distributed.engine: ddp)")

    def __init__(self, options: RetentionOptions):
        super().__init__(options)
        self.kept = KeptReference()  # the model before the first task, also after a resumed sequence
        self.reference: FrozenReference | None = None
        self.consumed = 0  # retain batches drawn so far: a resumed run continues the same stream
        self._stream: Iterator[dict] | None = None
        self._stream_source: Any = None

    @classmethod
    def refuses_run(cls, task_type: str, sequence: bool) -> str | None:
        if task_type == "classification":
            return ("retention keeps a language model's predictions on `retain:` text; this run's model is "
                    "a classifier (no language-model head): remove retention, or use ewc across a task "
                    "sequence")
        return None

    def extra_forward_tokens(self, batch_size: int, max_seq_len: int) -> int:
        return batch_size * max_seq_len  # one retain sequence per row of the batch, with its logits

    def held_bytes(self, model: nn.Module, trainable: set[str], ctx: StrategyContext) -> int:
        return reference_bytes(model, trainable)  # the model before training, when base weights train

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        reason = self.refuses_run(ctx.task_type, ctx.current_task is not None)
        if reason:
            raise ConfigError(reason)
        if ctx.retain_batches is None:
            raise ConfigError("retention needs retain text for a causal LM: set `retain:` to a text file "
                              "or builtin:shakespeare")
        self.reference = self.kept.take(model)  # in a task sequence: the model before the first task
        # single sequences: each optimizer step takes `ctx.step_rows` of them, however the step is split
        self._stream_source = lambda: ctx.retain_batches(batch_size=1, device=ctx.device)
        self._stream = None
        self._step_batch: dict[str, Tensor] | None = None
        self._step_offset = 0

    def _next_batch(self) -> dict:
        """The next single retain sequence; `consumed` counts sequences."""
        if self._stream is None:  # skip what a resumed run already consumed
            self._stream = itertools.islice(self._stream_source(), self.consumed, None)
        self.consumed += 1
        return next(self._stream)

    def needs_logits(self) -> bool:
        return False  # it runs its own forward on retain batches

    def loss(self, model: nn.Module, batch: dict, outputs, ctx: StrategyContext) -> dict[str, Tensor]:
        if self.reference is None or ctx.step % self.options.every != 0:
            return {}
        rows = len(batch["input_ids"])
        if ctx.micro_index == 0 or self._step_batch is None:  # one retain batch per step, split like the step
            singles = [self._next_batch() for _ in range(max(ctx.step_rows, rows))]
            self._step_batch = {key: pad_sequence([single[key][0] for single in singles], batch_first=True)
                                for key in ("input_ids", "attention_mask")}  # right-padded, as collate does
            self._step_offset = 0
        step_batch, start = self._step_batch, self._step_offset
        self._step_offset += rows
        inputs = {key: value[start:start + rows] for key, value in step_batch.items()}
        current = model(**inputs).logits  # (rows, T, V)
        reference = self.reference(**inputs).logits
        real = inputs["attention_mask"].bool()
        # summed over this slice's tokens / the whole step retain batch's tokens: any split gives the same sum
        kl = retention_kl(current, reference, mask=real) * real.sum() / step_batch["attention_mask"].sum()
        return {"retention": self.options.weight * kl}

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        self.kept.task_ended = True

    def state_dict(self) -> dict[str, Any]:
        return {"consumed": self.consumed, **self.kept.state_dict("reference.")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.consumed = int(state.get("consumed", 0))
        self.kept.load_state_dict(state, "reference.")
        self._stream = None
