"""Full fine-tuning: every parameter of the base model is trained."""

from __future__ import annotations

from torch import nn

from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import is_injected


class FullOptions(Options):
    pass


@register("full", FullOptions)
class FullFineTuning(Strategy):
    """Train every base-model parameter (the default when no parametrization is listed)."""

    def trainable(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        return {name for name, _ in model.named_parameters() if not is_injected(name)}
