"""The frozen original model, shared by the strategies that compare against it (distillation, retention).

Sits below the strategies so that none of them imports another: `FrozenReference` runs the model as it was
before training, `frozen_copy` takes a detached deep copy, and `eval_mode` switches dropout off for a block.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from tuneforge.surgery import disabled_adapters, is_injected


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run a block in eval mode (no dropout), then restore the model's previous training flag."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


class FrozenReference:
    """The model as it was before training, run without gradients (a teacher or a retention target).

    Uses `disabled_adapters(model)` when every trainable parameter belongs to a module that can be
    disabled; otherwise a frozen deep copy taken now (call it before the first optimizer step).
    """

    def __init__(self, model: nn.Module):
        self.copy: nn.Module | None = None
        if not self.adapters_only(model):
            self.copy = frozen_copy(model)
        self.model = model

    @staticmethod
    def adapters_only(model: nn.Module) -> bool:
        """True when only injected parameters train, each in a module `disabled_adapters` turns off."""
        trainable = [name for name, p in model.named_parameters() if p.requires_grad]
        switchable = {name for name, m in model.named_modules() if hasattr(m, "injected_disabled")}
        return bool(trainable) and all(is_injected(n) and _under_any(n, switchable) for n in trainable)

    @torch.no_grad()
    def __call__(self, **inputs: Any) -> Any:
        if self.copy is not None:
            return self.copy(**inputs)
        with eval_mode(self.model), disabled_adapters(self.model):  # the reference has no dropout
            return self.model(**inputs)


def frozen_copy(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with no parameter requiring grad; strategy objects riding on the model
    (they may hold teachers or Fisher tensors) are not copied."""
    from tuneforge.compose import STRATEGIES_ATTR  # compose imports the registry, which imports strategies

    riding = model.__dict__.pop(STRATEGIES_ATTR, None)
    try:
        duplicate = copy.deepcopy(model)
    finally:
        if riding is not None:
            object.__setattr__(model, STRATEGIES_ATTR, riding)
    duplicate.eval()
    duplicate.requires_grad_(False)
    return duplicate


def _under_any(name: str, modules: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(len(parts), 0, -1))
