"""The one strategy interface. Every method is a no-op by default; strategies override what they need.

Three families compose freely in one `strategies:` list:
- parametrizations decide what is trained or injected (full, layerwise, lora, ...);
- objectives add named loss terms (distillation, EWC, L2-SP, ...);
- data schedules decide what data the loop sees (multi-task mixtures, continual sequences, replay).
The training loop calls these hooks and never knows which strategies exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn


class Options(BaseModel):
    """Base of every strategy's options: unknown options are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass
class StrategyContext:
    """What a strategy may read about the run. The loop updates `epoch` and `step` as it goes."""

    tokenizer: Any = None
    task_type: str = "causal_lm"  # or "classification"
    epoch: int = 0
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    num_epochs: int = 1
    base_lr: float = 0.0
    device: Any = None
    retain_batches: Any = None  # callable () -> iterator of retain-set batches, when a retain set exists
    extras: dict[str, Any] = field(default_factory=dict)


class Strategy:
    """No-op base class. Subclass it directly; never subclass a concrete strategy."""

    name: ClassVar[str] = ""
    family: ClassVar[str] = "parametrization"  # or "objective" / "schedule"
    param_prefix: ClassVar[str | None] = None  # injected parameters carry this prefix, e.g. "lora_"

    def __init__(self, options: Options):
        self.options = options

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        """Surgery: inject modules or wrap the model. Returns the (possibly new) model."""
        return model

    def trainable(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        """Names of parameters this strategy wants trained now (may change by epoch)."""
        if self.param_prefix is None:
            return set()
        return {name for name, _ in model.named_parameters() if _has_prefix(name, self.param_prefix)}

    def param_groups(self, model: nn.Module, base_lr: float) -> dict[str, float]:
        """Optional per-parameter learning rates, `{name: lr}`; parameters not listed use `base_lr`."""
        return {}

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        """Called once before the first step (anchors for regularisers, teacher set-up)."""

    def on_epoch_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        """Called at the start of every epoch (gradual unfreezing)."""

    def loss(self, model: nn.Module, batch: dict, outputs: Any, ctx: StrategyContext) -> dict[str, Tensor]:
        """Extra loss terms, already weighted, by name. The loop sums them with the task loss."""
        return {}

    def needs_logits(self) -> bool:
        """Whether `loss` reads `outputs.logits` (or hidden states) at every position.

        When no strategy does, the loop takes a language model's task loss from the labelled positions only,
        with a chunked cross-entropy that never holds full-vocabulary logits, and `outputs.logits` is empty.
        Default: True exactly when the strategy overrides `loss`, so an objective that compares logits keeps
        them without saying so; one whose terms ignore `outputs` (EWC, L2-SP) may return False to run faster.
        """
        return type(self).loss is not Strategy.loss

    def task_weight(self, ctx: StrategyContext) -> float:
        """Factor on the loop's task loss (1.0 by default). Distillation returns alpha here and its KD term
        from `loss`, so `alpha * task + (1 - alpha) * KD` needs no extra term undoing part of the task loss."""
        return 1.0

    def task_items(self, items: list[dict], ctx: StrategyContext) -> list[dict]:
        """Data schedules: the training items of the task about to start (replay mixes in stored ones)."""
        return items

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        """Called after each task of a sequence (EWC Fisher, replay buffer)."""

    def adapter_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors `save_adapter` writes for this strategy (its injected parameters by default)."""
        if self.param_prefix is None:
            return {}
        return {
            name: tensor for name, tensor in model.state_dict().items() if _has_prefix(name, self.param_prefix)
        }

    def adapter_options(self) -> dict[str, Any]:
        """The options `save_adapter` records to rebuild the modules `adapter_state` fits (e.g. a prefix whose
        MLP reparametrisation was folded away is saved as a plain prefix)."""
        return self.options.model_dump(mode="json")

    def state_dict(self) -> dict[str, Any]:
        """Strategy state a checkpoint needs for exact resume (tensors and JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def _has_prefix(name: str, prefix: str) -> bool:
    return any(part.startswith(prefix) for part in name.split("."))
