"""Strategy registry: short names -> strategy classes and their options models."""

from __future__ import annotations

from dataclasses import dataclass

from pydantic import BaseModel

from tuneforge.strategies.base import Options, Strategy, StrategyContext


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


def _import_all() -> None:
    """Importing a strategy module registers it: every module in this package is imported once."""
    import importlib
    import pkgutil

    for module in pkgutil.iter_modules(__path__):
        if module.name not in ("base",):
            importlib.import_module(f"{__name__}.{module.name}")


_import_all()

__all__ = ["REGISTRY", "Options", "Strategy", "StrategyContext", "StrategyEntry", "build_strategy", "register"]
