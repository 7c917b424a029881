"""Task-specific classification heads on a shared body (multi-task learning; Caruana 1997).

Each classification task `name` gets `head_<name>`: dropout + a linear layer on a pooled sequence
representation (mean over tokens for encoders, the last real token for decoders). Batches carry their
`task_id`; a batch of a classification task is routed through the body and that task's head only, so a
head never receives another task's gradient. Batches of language-modelling tasks use the model as usual.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tuneforge.errors import ModelError
from tuneforge.forward import TASK_ROUTING_ATTR
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext


class HeadSpec(BaseModel):
    labels: list[str] | None = None
    num_labels: int | None = Field(None, ge=2)


class HeadsOptions(Options):
    tasks: dict[str, HeadSpec] | None = None  # default: every classification task of the run, labels from data
    pooling: Literal["auto", "mean", "first", "last"] = "auto"
    dropout: float = Field(0.1, ge=0, lt=1)


@register("heads", HeadsOptions)
class TaskHeads(Strategy):
    """One classification head per task on a shared body; batches routed by their task id."""

    identity_start = False  # a classification task gets new, randomly initialised outputs

    param_prefix = "head_"
    provides_heads = True  # the run loads a headless body; this strategy adds one head per task
    options: HeadsOptions

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        tasks = self._task_heads(ctx)
        if not tasks:
            raise ModelError("heads: no classification task to put a head on (tasks need text/label data)")
        body = getattr(model, "base_model", model)
        hidden = model.config.hidden_size
        is_decoder = hasattr(model, "lm_head") or getattr(model.config, "is_decoder", False)
        pooling = self.options.pooling if self.options.pooling != "auto" else ("last" if is_decoder else "mean")
        device = next(model.parameters()).device
        heads: dict[int, nn.Linear] = {}
        self.resolved = {name: {"num_labels": num_labels} for _, name, num_labels in tasks}
        for task_id, name, num_labels in tasks:
            head = nn.Linear(hidden, num_labels, device=device)
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            model.add_module(f"head_{name}", head)
            heads[task_id] = head
        original_forward = model.forward
        dropout = self.options.dropout

        def forward(input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                    task_id: Tensor | None = None, **kwargs):
            if task_id is not None and bool((task_id != task_id[0]).any()):
                raise ModelError("heads: a batch mixes tasks; every micro-batch must hold one task's items")
            head = heads.get(int(task_id[0])) if task_id is not None else None
            if head is None:  # no task or a language-modelling task: the model as it was
                return original_forward(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
            states = body(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state  # (B, T, H)
            pooled = pool(states, attention_mask, pooling)  # (B, H)
            pooled = F.dropout(pooled, dropout, training=model.training)
            return SequenceClassifierOutput(logits=head(pooled))

        object.__setattr__(model, "forward", forward)  # an instance attribute: nn.Module.__call__ uses it
        object.__setattr__(model, TASK_ROUTING_ATTR, True)
        return model

    def adapter_options(self) -> dict:
        """Saved with the head sizes, so `load_adapter` rebuilds the heads without the run's data."""
        return {**self.options.model_dump(mode="json"), "tasks": self.resolved}

    def _task_heads(self, ctx: StrategyContext) -> list[tuple[int, str, int]]:
        run_tasks = [(t.name, t.task_type, t.labels) for t in ctx.tasks]  # in task-id order
        if self.options.tasks is not None:
            ids = {name: i for i, (name, _, _) in enumerate(run_tasks)}
            chosen = []
            for index, (name, spec) in enumerate(self.options.tasks.items()):
                count = len(spec.labels) if spec.labels else spec.num_labels
                if count is None:
                    raise ModelError(f"heads: task {name!r} needs `labels` or `num_labels`")
                chosen.append((ids.get(name, index), name, count))
            return chosen
        return [(i, name, len(labels)) for i, (name, kind, labels) in enumerate(run_tasks) if kind == "classification"]


def pool(states: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """(B, T, H) -> (B, H): mean over real tokens, the first token, or the last real token."""
    if attention_mask is None:
        attention_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
    if how == "first":
        return states[:, 0]
    if how == "last":
        last = attention_mask.sum(dim=1) - 1  # right padding: the last real token
        return states[torch.arange(states.size(0), device=states.device), last]
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
