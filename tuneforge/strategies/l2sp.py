"""L2-SP: an L2 penalty toward the starting point instead of toward zero (Li, Grandvalet & Davoine 2018,
arXiv:1802.01483).

    loss = task + weight / 2 * sum_i ||theta_i - theta0_i||^2       over the trainable parameters

theta0 is what each trainable parameter holds before the first step: the pretrained weights under full
or layer-wise fine-tuning; for injected parameters (LoRA, adapters) their initial values, so a zero-init
LoRA B is pulled back toward 0 and the update B A toward none. The optimizer's `weight_decay` (toward
zero) is separate and unchanged. The anchors are the weights before training, which a resumed run
rebuilds identically (the base model and a seeded init), so they are not stored in checkpoints.
"""

from __future__ import annotations

from pydantic import Field
from torch import Tensor, nn

from tuneforge.losses import l2sp_penalty
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext


class L2SPOptions(Options):
    weight: float = Field(0.01, ge=0)  # lambda; the penalty's gradient is weight * (theta - theta0)


@register("l2sp", L2SPOptions)
class L2SP(Strategy):
    """L2 penalty pulling trainable weights toward their starting values (L2-SP, Li et al. 2018)."""

    family = "objective"
    step_penalty = True  # a weight penalty: counted once per optimizer step
    options: L2SPOptions

    def __init__(self, options: L2SPOptions):
        super().__init__(options)
        self.anchors: dict[str, Tensor] = {}

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        # Called before a checkpoint is loaded, so these are the starting values even on resume. In a task
        # sequence (called once per task) the anchors stay those of the first task's start.
        if self.anchors:
            return
        names = trainable_in_any_epoch(model, ctx)
        self.anchors = {name: p.detach().clone() for name, p in model.named_parameters() if name in names}

    def needs_logits(self) -> bool:
        return False  # the penalty reads the weights only

    def loss(self, model: nn.Module, batch: dict, outputs, ctx: StrategyContext) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        trainable = {name: anchor for name, anchor in self.anchors.items() if params[name].requires_grad}
        return {"l2sp": l2sp_penalty(params, trainable, self.options.weight)}


def trainable_in_any_epoch(model: nn.Module, ctx: StrategyContext) -> set[str]:
    from tuneforge.compose import trainable_in_any_epoch as in_any_epoch

    return in_any_epoch(model, ctx)
