"""Task-specific classification heads on a shared body (multi-task learning; Caruana 1997).

Each classification task `name` gets `head_<name>`: dropout + a linear layer on a pooled sequence
representation (mean over tokens for encoders, the last real token for decoders). Batches carry their
`task_id`; a batch of a classification task is routed through the body and that task's head only, so a
head never receives another task's gradient. Batches of language-modelling tasks use the model as usual.

Wiring: `setup` returns a `TaskHeadsModel`, a real wrapper module (no patched `forward`), so a deep copy
(the frozen reference of `retention` or `distill: {teacher: base}`) is a fully independent model. The wrapper
shares the base model's registries of children, parameters and buffers: parameter names stay the base's
(`model.layers.0...`) plus `head_<task>.*`, a module that later surgery replaces is replaced for both, and
`deepcopy` keeps the sharing (one memo). Central code finds the routing on the class (`routes_tasks`).
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from pydantic import BaseModel, Field
from torch import Tensor, nn
from transformers.modeling_outputs import SequenceClassifierOutput

from tuneforge.errors import ModelError
from tuneforge.forward import routes_tasks
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext

_REGISTRIES = ("_parameters", "_buffers", "_non_persistent_buffers_set", "_modules")


class TaskHeadsModel(nn.Module):
    """A model plus one classification head per task; `forward` routes a batch by its `task_id`.

    Without a task id, or for a language-modelling task, the wrapped model runs as it is (logits (B, T, V));
    for a task with a head, the body's last hidden states (B, T, H) are pooled to (B, H) and that head
    gives (B, labels).
    """

    routes_tasks: ClassVar[bool] = True  # read by tuneforge.forward: batches are given with their task_id

    def __init__(self, model: nn.Module, heads: dict[int, tuple[str, nn.Module]], pooling: str,
                 dropout: float):
        super().__init__()
        if "wrapped_model" in model._modules:
            raise ModelError(f"heads: {type(model).__name__} already has a submodule named wrapped_model")
        for registry in _REGISTRIES:  # one set of registries for both (see the module docstring)
            object.__setattr__(self, registry, getattr(model, registry))
        object.__setattr__(self, "wrapped_model", model)  # plain attribute: not registered a second time
        # plain attributes with names no model gives a child (the registries are the base's)
        self._head_of_task = {task_id: name for task_id, (name, _) in heads.items()}  # task id -> module name
        self._pooling, self._dropout_rate = pooling, dropout
        for name, head in heads.values():
            self.add_module(name, head)
        self.train(model.training)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                task_id: Tensor | None = None, inputs_embeds: Tensor | None = None, **kwargs: Any):
        if task_id is not None and bool((task_id != task_id[0]).any()):
            raise ModelError("heads: a batch mixes tasks; every micro-batch must hold one task's items")
        name = self._head_of_task.get(int(task_id[0])) if task_id is not None else None
        if inputs_embeds is not None:  # a caller's own embeddings (a soft prompt is added inside the body)
            kwargs["inputs_embeds"] = inputs_embeds
        if name is None:  # no task or a language-modelling task: the model as it was
            return self.wrapped_model(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        body = self.base_model  # hidden states (B, T, H): real tokens only (see prompt.py)
        states = body(input_ids=input_ids, attention_mask=attention_mask, **kwargs).last_hidden_state
        pooled = pool(states, attention_mask, self._pooling)  # (B, H)
        pooled = F.dropout(pooled, self._dropout_rate, training=self.training)
        return SequenceClassifierOutput(logits=self._modules[name](pooled))

    def train(self, mode: bool = True) -> TaskHeadsModel:
        super().train(mode)
        self.wrapped_model.training = mode  # its children are ours, already switched
        return self

    # ---- what the rest of tuneforge calls on a model, answered by the wrapped one ----
    @property
    def config(self):
        return self.wrapped_model.config

    @property
    def base_model(self) -> nn.Module:
        """The shared body the heads read (a strategy added after `heads` wires into it)."""
        return getattr(self.wrapped_model, "base_model", self.wrapped_model)

    def generate(self, *args: Any, **kwargs: Any):
        """Text generation by the wrapped language model (the heads take no part)."""
        if not hasattr(self.wrapped_model, "generate"):
            raise ModelError(f"heads: {type(self.wrapped_model).__name__} cannot generate text")
        return self.wrapped_model.generate(*args, **kwargs)

    def get_input_embeddings(self) -> nn.Module:
        return self.wrapped_model.get_input_embeddings()

    def get_output_embeddings(self) -> nn.Module | None:
        return self.wrapped_model.get_output_embeddings()

    def gradient_checkpointing_enable(self, **kwargs: Any) -> None:
        self.wrapped_model.gradient_checkpointing_enable(**kwargs)

    def disable_input_require_grads(self) -> None:
        self.wrapped_model.disable_input_require_grads()

    def set_attn_implementation(self, implementation: str) -> None:
        self.wrapped_model.set_attn_implementation(implementation)

    def _can_set_attn_implementation(self) -> bool:
        return self.wrapped_model._can_set_attn_implementation()


class HeadSpec(BaseModel):
    labels: list[str] | None = None
    num_labels: int | None = Field(None, ge=2)
    task_id: int | None = Field(None, ge=0)  # default: the task's place in the run (saved adapters record it)


class HeadsOptions(Options):
    tasks: dict[str, HeadSpec] | None = None  # default: each classification task of the run, labels from data
    pooling: Literal["auto", "mean", "first", "last"] = "auto"
    dropout: float = Field(0.1, ge=0, lt=1)


@register("heads", HeadsOptions)
class TaskHeads(Strategy):
    """One classification head per task on a shared body; batches routed by their task id."""

    identity_start = False  # a classification task gets new, randomly initialised outputs

    param_prefix = "head_"
    provides_heads = True  # the run loads a headless body; this strategy adds one head per task
    options: HeadsOptions

    def refuses_engine(self, engine: str) -> str | None:
        return ("each process's batch reaches only some tasks' heads, and sharded gradients are reduced per "
                "unit over the same parameters on every process (use distributed.engine: ddp)")

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        tasks = self._task_heads(ctx)
        if not tasks:
            raise ModelError("heads: no classification task to put a head on (tasks need text/label data)")
        if routes_tasks(model):
            raise ModelError("heads: the model already has task heads (heads listed twice?)")
        hidden = model.config.hidden_size
        is_decoder = hasattr(model, "lm_head") or getattr(model.config, "is_decoder", False)
        pooling = self.options.pooling
        if pooling == "auto":
            pooling = "last" if is_decoder else "mean"
        device = next(model.parameters()).device
        heads: dict[int, tuple[str, nn.Module]] = {}
        self.resolved = {name: {"num_labels": num_labels, "task_id": task_id}
                         for task_id, name, num_labels in tasks}
        for task_id, name, num_labels in tasks:
            head = nn.Linear(hidden, num_labels, device=device)
            nn.init.normal_(head.weight, std=0.02)
            nn.init.zeros_(head.bias)
            heads[task_id] = (f"head_{name}", head)
        return TaskHeadsModel(model, heads, pooling, self.options.dropout)

    def unused_parameters(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        """When every task has a head, the body's own outputs (a language-model head, BERT's pooler) are
        bypassed: the heads pool the last hidden states. Weights shared with the input (tied) stay usable."""
        if any(task.task_type != "classification" for task in ctx.tasks) or not routes_tasks(model):
            return set()
        bypassed = [model.get_output_embeddings(), getattr(model.base_model, "pooler", None)]
        used = {id(parameter) for parameter in model.get_input_embeddings().parameters()}
        skipped = {id(p) for module in bypassed if module is not None for p in module.parameters()} - used
        return {name for name, parameter in model.named_parameters() if id(parameter) in skipped}

    def adapter_options(self) -> dict:
        """Saved with the head sizes and task ids, so `load_adapter` rebuilds and routes the heads without the
        run's data (a classification task need not be task 0 of a mixture)."""
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
                task_id = spec.task_id if spec.task_id is not None else ids.get(name, index)
                chosen.append((task_id, name, count))
            return chosen
        return [(i, name, len(labels)) for i, (name, kind, labels) in enumerate(run_tasks)
                if kind == "classification"]


def pool(states: Tensor, attention_mask: Tensor | None, how: str) -> Tensor:
    """(B, T, H) -> (B, H): mean over real tokens, the first token, or the last real token."""
    if attention_mask is None:
        attention_mask = torch.ones(states.shape[:2], dtype=torch.long, device=states.device)
    if how == "first":
        return states[:, 0]
    if how == "last":  # the last real token, whichever side the padding is on
        positions = torch.arange(states.size(1), device=states.device)
        last = (positions * attention_mask.to(positions.dtype)).argmax(dim=1)  # (B,)
        return states[torch.arange(states.size(0), device=states.device), last]
    mask = attention_mask.unsqueeze(-1).to(states.dtype)
    return (states * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1)
