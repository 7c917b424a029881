"""The one place a batch becomes model inputs, so task routing is the same in training and evaluation."""

from __future__ import annotations

from torch import nn

TASK_ROUTING_ATTR = "tuneforge_routes_tasks"  # set by the `heads` strategy on models that take task_id


def routes_tasks(model: nn.Module) -> bool:
    return bool(getattr(model, TASK_ROUTING_ATTR, False))


def model_inputs(batch: dict, with_task: bool = False) -> dict:
    """input_ids and attention_mask, plus task_id for models with task-specific heads."""
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if with_task and "task_id" in batch:
        inputs["task_id"] = batch["task_id"]
    return inputs


def is_classification_batch(batch: dict) -> bool:
    """Classification batches carry one label per sequence, (B,); language-model batches one per token."""
    return batch["labels"].dim() == 1
