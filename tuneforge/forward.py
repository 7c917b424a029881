"""The one place a batch becomes model inputs, so task routing is the same in training and evaluation."""

from __future__ import annotations

from typing import ClassVar, Protocol

from torch import nn


class RoutesTasks(Protocol):
    """A model class whose forward takes a `task_id` (B,) and routes the batch by it (task-specific heads).

    Declared on the class by the wrapper module a strategy returns, never tagged on a model instance.
    """

    routes_tasks: ClassVar[bool]


def routes_tasks(model: nn.Module) -> bool:
    """Whether batches are given to `model` with their `task_id` (see `RoutesTasks`)."""
    return bool(getattr(type(model), "routes_tasks", False))


def model_inputs(batch: dict, with_task: bool = False) -> dict:
    """input_ids and attention_mask, plus task_id for models with task-specific heads."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if with_task and "task_id" in batch:
        inputs["task_id"] = batch["task_id"]
    return inputs


def is_classification_batch(batch: dict) -> bool:
    """Classification batches carry one label per sequence, (B,); language-model batches one per token."""
    return batch["labels"].dim() == 1
