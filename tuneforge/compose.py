"""Apply a strategy list to a model and decide, in one place, what is trainable."""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from tuneforge.config import StrategySpec, parse_strategies
from tuneforge.errors import ModelError
from tuneforge.models import new_head_modules
from tuneforge.strategies import (
    REGISTRY,
    Strategy,
    StrategyContext,
    build_strategy,
    default_parametrization,
    refusal,
)
from tuneforge.surgery import is_injected

STRATEGIES_ATTR = "tuneforge_strategies"  # the applied strategies ride on the model for save_adapter
NEW_HEAD = "new head"  # trainable_by_strategy's entry for a head the loader initialised at random


def build_strategies(specs: list[StrategySpec] | list[dict] | list[str]) -> list[Strategy]:
    """Strategy objects from validated specs or from the same single-key dicts as in YAML."""
    specs = parse_strategies(list(specs))
    check_combination([spec.name for spec in specs])
    return [build_strategy(spec.name, spec.options) for spec in specs]


def check_combination(names: list[str]) -> None:
    """Refuse strategy lists that cannot mean anything, saying why (before any model loads)."""
    reason = refusal(names)
    if reason:
        raise ModelError(f"strategies: {reason}")


def apply_strategies(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext) -> nn.Module:
    """Run every strategy's surgery in list order, then set `requires_grad` once for the union."""
    for strategy in strategies:
        model = strategy.setup(model, ctx)
    setattr_plain(model, STRATEGIES_ATTR, strategies)
    set_trainable(model, strategies, ctx)
    return model


def has_parametrization(strategies: list[Strategy]) -> bool:
    return any(REGISTRY[s.name].family == "parametrization" for s in strategies)


def trainable_by_strategy(model: nn.Module, strategies: list[Strategy],
                          ctx: StrategyContext) -> dict[str, set[str]]:
    """Parameter names each strategy trains. With no parametrization listed, full fine-tuning is implied."""
    wanted = {strategy.name: strategy.trainable(model, ctx) for strategy in strategies}
    if not has_parametrization(strategies):
        default = default_parametrization()
        implied = build_strategy(default.name, REGISTRY[default.name].options())
        wanted[default.name] = implied.trainable(model, ctx)
    head = new_head_parameters(model)
    if head:  # trained with every parametrization: a random head never trained predicts at chance
        wanted[NEW_HEAD] = head
    unused = set().union(*(strategy.unused_parameters(model, ctx) for strategy in strategies))
    return {name: names - unused for name, names in wanted.items()}


def new_head_parameters(model: nn.Module) -> set[str]:
    """Parameters of the head the loader initialised at random (`models.new_head_modules`): a classification
    head put on a body or language-model checkpoint. Every run trains and saves them, whatever the
    parametrization; in PEFT's layout they are `modules_to_save`. Strategies' injected modules are not part
    of it."""
    modules = new_head_modules(model)
    return {name for name, _ in model.named_parameters()
            if name.split(".", 1)[0] in modules and not is_injected(name)}


def trainable_in_any_epoch(model: nn.Module, ctx: StrategyContext,
                           strategies: list[Strategy] | None = None) -> set[str]:
    """Names of parameters some strategy trains in some epoch the loop will start (`ctx.num_epochs`).

    Gradual unfreezing adds layers by epoch; the optimizer, L2-SP and EWC all need the whole set. Without
    `strategies`, those applied to the model; a model not prepared by tuneforge: what is trainable now.
    """
    strategies = applied_strategies(model) if strategies is None else strategies
    if not strategies:
        return {name for name, p in model.named_parameters() if p.requires_grad}
    names: set[str] = set()
    for epoch in range(max(ctx.num_epochs, 1)):
        names |= set().union(*trainable_by_strategy(model, strategies, replace(ctx, epoch=epoch)).values())
    return names


def set_trainable(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext) -> set[str]:
    """The ONE place `requires_grad` is set: true exactly for the union of what strategies ask for."""
    wanted = set().union(*trainable_by_strategy(model, strategies, ctx).values())
    if not wanted:
        listed = ", ".join(s.name for s in strategies) or "none"
        raise ModelError(f"nothing to train: the strategies ({listed}) select no parameter")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in wanted)
    return wanted


def applied_strategies(model: nn.Module) -> list[Strategy]:
    return getattr(model, STRATEGIES_ATTR, [])


def setattr_plain(model: nn.Module, name: str, value: object) -> None:
    """Attach a non-module attribute without nn.Module registering anything."""
    object.__setattr__(model, name, value)
