"""Strategy registry: short names -> strategy classes and their options models."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext, TaskInfo


@dataclass(frozen=True)
class StrategyEntry:
    cls: type[Strategy]
    options: type[BaseModel]
    family: str
    summary: str


REGISTRY: dict[str, StrategyEntry] = {}


def register(name: str, options: type[Options]):
    """Class decorator: make a strategy available under `name` in configs and `tuneforge.prepare`."""

    def decorate(cls: type[Strategy]) -> type[Strategy]:
        cls.name = name
        summary = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
        REGISTRY[name] = StrategyEntry(cls=cls, options=options, family=cls.family, summary=summary)
        return cls

    return decorate


def build_strategy(name: str, options: BaseModel) -> Strategy:
    return REGISTRY[name].cls(options)


def injected_prefixes() -> tuple[str, ...]:
    """Every registered strategy's parameter prefix: the names that are not base-model parameters."""
    return tuple(sorted({entry.cls.param_prefix for entry in REGISTRY.values() if entry.cls.param_prefix}))


def default_parametrization() -> type[Strategy]:
    """The parametrization a strategy list implies when it names none (the one declaring `is_default`)."""
    defaults = [entry.cls for entry in REGISTRY.values() if entry.cls.is_default]
    if len(defaults) != 1:
        raise RuntimeError(f"exactly one strategy must declare is_default (found {len(defaults)})")
    return defaults[0]


def refusal(names: list[str]) -> str | None:
    """Why a strategy list cannot mean anything (None when it can): a strategy twice, or a pair that one of
    its two members refuses (each strategy declares its own refusals)."""
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        return f"{repeated[0]} is listed twice; give it once with all its options"
    classes = [REGISTRY[name].cls for name in names]
    for i, first in enumerate(classes):
        for second in classes[i + 1:]:
            reason = first.refuses(second) or second.refuses(first)
            if reason:
                return f"{first.name} and {second.name} together: {reason}"
    return None


def _import_all() -> None:
    """Importing a strategy module registers it: every module in this package is imported once."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name not in ("base",):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["REGISTRY", "Options", "PeftTranslation", "Strategy", "StrategyContext", "StrategyEntry",
           "TaskInfo", "build_strategy", "default_parametrization", "injected_prefixes", "refusal",
           "register"]
