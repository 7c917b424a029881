"""L2-SP: an L2 penalty toward the starting point instead of toward zero (Li, Grandvalet & Davoine 2018,
arXiv:1802.01483).

    loss = task + alpha / 2 * ||w_S - w0_S||^2 + beta / 2 * ||w_new||^2     over the trainable parameters

w_S are the parameters the pretrained model has (under full or layer-wise fine-tuning), pulled toward
their pretrained values w0_S with alpha = `weight`. w_new are the parameters it does not have, whose
starting values are a random draw with nothing to keep: the injected ones (LoRA, adapters, prefix, prompt,
task heads) and the classification head a sequence-classification model gets on top of a body or language
model. As in the paper they are pulled toward zero, with beta = `new_weight` (default: `weight`; so a
zero-initialised LoRA B is pulled toward 0 as before, and LoRA A toward 0 rather than its random draw).
The optimizer's `weight_decay` (toward zero) is separate and unchanged.

The anchors are the weights before training, which a resumed run rebuilds identically (the base model and a
seeded init), so they are not stored in checkpoints; in a task sequence they stay those of the first task's
start, and once a task has ended (the model has moved) checkpoints carry them.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from torch import Tensor, nn

from tuneforge.losses import l2sp_penalty
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import is_injected


class L2SPOptions(Options):
    # alpha; the penalty's gradient is weight * (w - w0) on pretrained weights
    weight: float = Field(0.01, ge=0)
    new_weight: float | None = Field(None, ge=0)  # beta, on new parameters (pulled toward 0); None: `weight`


@register("l2sp", L2SPOptions)
class L2SP(Strategy):
    """L2 penalty pulling pretrained weights toward their starting values and new ones toward zero (L2-SP,
    Li et al. 2018)."""

    identity_start = True  # an objective: the model is untouched

    family = "objective"
    step_penalty = True  # a weight penalty: counted once per optimizer step
    options: L2SPOptions

    def refuses_engine(self, engine: str) -> str | None:
        return ("it keeps the pretrained weights as anchors; under sharding "
                "that copy would be whole on every process, and its weight reads would see one "
                "process's shards (use distributed.engine: ddp)")

    def __init__(self, options: L2SPOptions):
        super().__init__(options)
        self.anchors: dict[str, Tensor] = {}  # w0_S
        self.new_names: list[str] = []  # w_new
        self.started = False
        self.task_ended = False  # the model has moved from the anchors: checkpoints must carry them

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        # Called before a checkpoint is loaded, so these are the starting values even on resume. In a task
        # sequence (called once per task) the anchors stay those of the first task's start.
        if self.started:
            return
        from tuneforge.compose import trainable_in_any_epoch  # compose imports the registry

        names = trainable_in_any_epoch(model, ctx)
        new = new_parameter_names(model, names)
        self.new_names = sorted(new)
        self.anchors = {name: p.detach().clone() for name, p in model.named_parameters()
                        if name in names and name not in new}
        self.started = True

    def held_bytes(self, model: nn.Module, trainable: set[str], ctx: StrategyContext) -> int:
        """An anchor copy of every trained pretrained parameter."""
        sizes = dict(model.named_parameters())
        anchored = trainable - new_parameter_names(model, trainable)
        return sum(sizes[name].numel() * sizes[name].element_size() for name in anchored if name in sizes)

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        self.task_ended = True

    def needs_logits(self) -> bool:
        return False  # the penalty reads the weights only

    def loss(self, model: nn.Module, batch: dict, outputs, ctx: StrategyContext) -> dict[str, Tensor]:
        params = dict(model.named_parameters())
        for name, anchor in self.anchors.items():  # restored from a checkpoint: on the CPU
            if anchor.device != params[name].device:
                self.anchors[name] = anchor.to(params[name].device)
        trainable = {name: anchor for name, anchor in self.anchors.items() if params[name].requires_grad}
        new = [name for name in self.new_names if params[name].requires_grad]
        return {"l2sp": l2sp_penalty(params, trainable, self.options.weight, new, self.options.new_weight)}

    def state_dict(self) -> dict[str, Any]:
        if not self.task_ended:
            return {}
        return {"new": self.new_names, **{f"anchor.{name}": tensor for name, tensor in self.anchors.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "new" not in state:
            return
        self.new_names = list(state["new"])
        self.anchors = {key[len("anchor."):]: value for key, value in state.items()
                        if key.startswith("anchor.")}
        self.started = self.task_ended = True


def new_parameter_names(model: nn.Module, names: set[str]) -> set[str]:
    """Which of `names` the pretrained model did not have (L2-SP's w_new): injected parameters, and a
    classification head the loader initialised at random (`compose.new_head_parameters`); a classifier
    loaded with its trained head keeps that head anchored like any pretrained weight."""
    from tuneforge.compose import new_head_parameters  # compose imports the registry

    head = new_head_parameters(model)
    return {name for name in names if is_injected(name) or name in head}
