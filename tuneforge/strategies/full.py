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

    identity_start = True  # nothing is injected

    trains_base_weights = True
    is_default = True

    @classmethod
    def refuses(cls, other: type[Strategy]) -> str | None:
        if other.trains_base_weights:
            return f"{other.name} chooses which base weights train, full trains all of them; list one of them"
        if other.parameter_efficient:
            return (f"{other.name} exists to train a few parameters while the base stays frozen, and full "
                    f"trains every base weight anyway; list one of them")
        return None

    def trainable(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        return {name for name, _ in model.named_parameters() if not is_injected(name)}
