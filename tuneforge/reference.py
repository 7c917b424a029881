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
from torch import Tensor, nn

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
    disabled; otherwise a frozen deep copy taken now (call it before the first optimizer step), run with its
    own injected modules disabled: base weights train (full, layer-wise, or a new classification head next to
    a prompt or adapters), and the copy still holds what was injected, which is not the original.
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
            with disabled_adapters(self.copy):
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


def reference_bytes(model: nn.Module, trainable: set[str]) -> int:
    """What a `FrozenReference` taken of `model` would hold: nothing when only switchable injected modules
    train (`trainable`), else a copy of every parameter and buffer."""
    switchable = {name for name, m in model.named_modules() if hasattr(m, "injected_disabled")}
    if trainable and all(is_injected(n) and _under_any(n, switchable) for n in trainable):
        return 0
    return tensor_bytes(model)


def tensor_bytes(model: nn.Module) -> int:
    """Bytes of a module's parameters and buffers."""
    tensors = [*model.parameters(), *model.buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


def _under_any(name: str, modules: set[str]) -> bool:
    parts = name.split(".")
    return any(".".join(parts[:i]) in modules for i in range(len(parts), 0, -1))


class KeptReference:
    """A `FrozenReference` taken once, at the first task's start, that a resumed task sequence gets back.

    Resuming after a finished task restores that task's end weights before training starts again, so a
    reference taken then would be the wrong model. Once a task has ended, checkpoints therefore carry the
    frozen copy's tensors (nothing when the reference is the model with its adapters disabled).
    """

    def __init__(self) -> None:
        self.reference: FrozenReference | None = None
        self.task_ended = False
        self._pending: dict[str, Tensor] = {}

    def take(self, model: nn.Module) -> FrozenReference:
        """The reference, taken from `model` now if this is the first start (call before any update)."""
        if self.reference is None:
            self.reference = FrozenReference(model)
        if self._pending and self.reference.copy is not None:
            self.reference.copy.load_state_dict(self._pending)
        self._pending = {}
        return self.reference

    def state_dict(self, prefix: str) -> dict[str, Tensor]:
        if not self.task_ended or self.reference is None or self.reference.copy is None:
            return {}
        return {prefix + name: tensor for name, tensor in self.reference.copy.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any], prefix: str) -> None:
        self._pending = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
        self.task_ended = self.task_ended or bool(self._pending)
        if self.reference is not None:
            self.take(self.reference.model)
