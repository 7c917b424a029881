"""Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS, arXiv:1612.00796).

    loss = task + weight / 2 * sum_k sum_i F_k,i (theta_i - theta*_k,i)^2

Each protected "task" k contributes its anchor theta*_k (the weights when it was learned) and the
diagonal Fisher F_k estimated there (`tuneforge.losses.fisher_diagonal`), over the trainable parameters:
- the base model's knowledge: when the run has retain data (a language model's run: a classifier has no
  LM head to score retain text with, so EWC on a classifier needs a task sequence), F_0 is estimated on
  `fisher_samples`
  retain sequences (one sequence per gradient: the per-sequence empirical Fisher, or the true Fisher with
  `fisher: true`) at the starting weights, before the first update;
- each finished task of a sequence (`on_task_end`): F on `fisher_samples` of that task's training
  sequences (the first ones the loop fed it, kept on the CPU; a packed row is split into its documents,
  `train.packing`), anchored at the weights after the task.
  In a sequence without retain data the first task trains unpenalised.
With `online: true` (online EWC: Schwarz et al. 2018, arXiv:1805.06370; Huszar 2018) there is one
running penalty, F <- decay * F + F_new, anchored at the latest weights, so memory does not grow with
the number of tasks.

Fisher and anchors are part of `state_dict`, so a resumed run uses exactly the same penalty.
"""

from __future__ import annotations

import itertools
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from tuneforge.errors import ConfigError
from tuneforge.forward import model_inputs, routes_tasks
from tuneforge.losses import ewc_penalty, fisher_diagonal, sampled_label_nll, token_losses
from tuneforge.reference import eval_mode
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext


class EWCOptions(Options):
    weight: float = Field(100.0, ge=0)  # lambda
    fisher_samples: int = Field(64, ge=1)  # sequences the Fisher is averaged over
    online: bool = False
    decay: float = Field(1.0, gt=0, le=1)  # online EWC's gamma: how much older tasks' Fisher is kept
    fisher: Literal["empirical", "true"] = "empirical"  # observed next tokens, or ones the model samples


@register("ewc", EWCOptions)
class EWC(Strategy):
    """Elastic weight consolidation: Fisher-weighted pull toward the weights that knew the old data."""

    identity_start = True  # an objective: the model is untouched

    family = "objective"
    step_penalty = True  # a weight penalty: counted once per optimizer step
    options: EWCOptions

    def refuses_engine(self, engine: str) -> str | None:
        return ("it keeps the anchor weights and their Fisher information; under sharding "
                "that copy would be whole on every process, and its weight reads would see one "
                "process's shards (use distributed.engine: ddp)")

    def __init__(self, options: EWCOptions):
        super().__init__(options)
        self.penalties: list[tuple[dict[str, Tensor], dict[str, Tensor]]] = []  # (anchors, fisher) per task
        self.task_examples: list[dict[str, Tensor]] = []  # this task's first sequences, for its Fisher
        self._pending_start: Any = None  # retain stream factory until the starting Fisher is estimated

    def needs_logits(self) -> bool:
        return False  # the penalty reads the weights only

    @classmethod
    def refuses_run(cls, task_type: str, sequence: bool) -> str | None:
        if task_type == "classification" and not sequence:
            return ("ewc on a classifier protects earlier tasks of a sequence: `retain:` text cannot be "
                    "scored by a classification model (it has no language-model head), so a single task "
                    "has no old knowledge to keep; train a task sequence (`tasks:` + "
                    "`schedule: {mode: sequence}`) or remove ewc")
        return None

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        reason = self.refuses_run(ctx.task_type, ctx.current_task is not None)
        if reason:
            raise ConfigError(reason)
        if self.penalties:
            return
        if ctx.retain_batches is not None:
            # Estimated at the first step (still the starting weights) unless a checkpoint restores it.
            self._pending_start = lambda: ctx.retain_batches(batch_size=1, device=ctx.device)
        elif ctx.current_task is None:  # set by the continual schedule for each task of a sequence
            raise ConfigError("ewc needs data whose knowledge to keep: set `retain:` (a text file or "
                              "builtin:shakespeare), or train a task sequence")

    def held_bytes(self, model: nn.Module, trainable: set[str], ctx: StrategyContext) -> int:
        """An fp32 anchor and Fisher per protected task (one running pair when online)."""
        sizes = dict(model.named_parameters())
        per_task = 2 * 4 * sum(sizes[name].numel() for name in trainable if name in sizes)
        protected = 1 if self.options.online else max(1, len(ctx.tasks) if ctx.current_task else 1)
        return per_task * protected

    def loss(self, model: nn.Module, batch: dict, outputs, ctx: StrategyContext) -> dict[str, Tensor]:
        if self._pending_start is not None:
            self.add_task(model, self._pending_start(), ctx)
            self._pending_start = None
        if len(self.task_examples) < self.options.fisher_samples:
            missing = self.options.fisher_samples - len(self.task_examples)
            self.task_examples += single_examples(batch)[:missing]
        if not self.penalties:
            return {}
        params = dict(model.named_parameters())
        self._follow_device(params)
        total = sum(ewc_penalty(params, anchors, fisher, self.options.weight)
                    for anchors, fisher in self.penalties)
        return {"ewc": total}

    def _follow_device(self, params: dict[str, Tensor]) -> None:
        """Tensors restored from a checkpoint arrive on the CPU; move them next to the parameters once."""
        for anchors, fisher in self.penalties:
            for tensors in (anchors, fisher):
                for name, tensor in tensors.items():
                    if tensor.device != params[name].device:
                        tensors[name] = tensor.to(params[name].device)

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        device = next(model.parameters()).device
        self.add_task(model, ({k: v.to(device) for k, v in e.items()} for e in self.task_examples), ctx)
        self.task_examples = []

    @torch.no_grad()
    def add_task(self, model: nn.Module, batches, ctx: StrategyContext) -> None:
        """Estimate the Fisher at the current weights on `fisher_samples` single-sequence batches and
        add it as a penalty (or fold it into the running one when online)."""
        from tuneforge.compose import trainable_in_any_epoch  # compose imports the registry

        names = trainable_in_any_epoch(model, ctx)
        params = {name: p for name, p in model.named_parameters() if name in names}
        frozen_now = [p for p in params.values() if not p.requires_grad]  # unfrozen in a later epoch
        try:
            for parameter in frozen_now:
                parameter.requires_grad_(True)
            with torch.enable_grad():
                samples = itertools.islice(batches, self.options.fisher_samples)
                fisher = estimate_fisher(model, params, samples, ctx.task_type, self.options.fisher)
        finally:
            for parameter in frozen_now:
                parameter.requires_grad_(False)
        anchors = {name: p.detach().clone() for name, p in params.items()}
        if self.options.online and self.penalties:
            _, previous = self.penalties[0]
            fisher = {name: self.options.decay * previous[name] + value for name, value in fisher.items()}
            self.penalties = []
        self.penalties.append((anchors, fisher))

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"tasks": len(self.penalties), "examples": len(self.task_examples)}
        for index, (anchors, fisher) in enumerate(self.penalties):
            state.update({f"anchor.{index}.{name}": tensor for name, tensor in anchors.items()})
            state.update({f"fisher.{index}.{name}": tensor for name, tensor in fisher.items()})
        for index, example in enumerate(self.task_examples):
            state.update({f"example.{index}.{key}": tensor for key, tensor in example.items()})
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.penalties = []
        for index in range(int(state.get("tasks", 0))):
            anchors = _with_prefix(state, f"anchor.{index}.")
            fisher = _with_prefix(state, f"fisher.{index}.")
            self.penalties.append((anchors, fisher))
        self.task_examples = [_with_prefix(state, f"example.{i}.")
                              for i in range(int(state.get("examples", 0)))]
        if self.penalties:
            self._pending_start = None


def estimate_fisher(
    model: nn.Module, params: dict[str, Tensor], batches, task_type: str, kind: str = "empirical"
) -> dict[str, Tensor]:
    """Diagonal Fisher of `model` over `batches`: summed NLL per batch, observed or sampled labels."""

    with_task = routes_tasks(model)

    def nll(batch: dict) -> Tensor:
        logits = model(**model_inputs(batch, with_task)).logits
        if task_type == "classification":
            if kind == "true":
                return sampled_label_nll(logits)
            return F.cross_entropy(logits.float(), batch["labels"], reduction="sum")
        if kind == "true":
            return sampled_label_nll(logits[:, :-1], mask=batch["labels"][:, 1:] != -100)
        return token_losses(logits, batch["labels"])[0]

    with eval_mode(model):  # no dropout noise in the Fisher
        fisher = fisher_diagonal(params, batches, nll)
    return {name: value.to(params[name].dtype) for name, value in fisher.items()}


def single_examples(batch: dict) -> list[dict[str, Tensor]]:
    """A batch as one-sequence batches on the CPU, so the Fisher squares one sequence's gradient at a time.

    A padded batch: each row, padding cut off (collate pads on the right). A packed batch (it carries
    `position_ids`, see `tuneforge.packing`): each document of each row on its own, as if never packed.
    """
    if "position_ids" in batch:
        return _unpacked_documents(batch)
    lengths = batch["attention_mask"].sum(-1).tolist()
    examples = []
    for row, length in enumerate(lengths):
        example = {}
        for key, value in batch.items():
            if not isinstance(value, Tensor):
                continue
            value = value[row:row + 1]
            example[key] = (value[:, :length] if value.dim() == 2 else value).detach().cpu().clone()
        examples.append(example)
    return examples


def _unpacked_documents(batch: dict) -> list[dict[str, Tensor]]:
    """The documents of packed rows, each its own example: input_ids, labels, an attention mask of ones
    (and the row's task_id), without `position_ids`. Run as one sequence it sees only itself, as in the
    packed forward; re-running the whole row without its positions would attend across documents."""
    examples = []
    for row in range(batch["input_ids"].shape[0]):
        length = int(batch["attention_mask"][row].sum())  # real tokens come first; padding ends the row
        starts = (batch["position_ids"][row, :length] == 0).nonzero().flatten().tolist()  # positions restart
        starts = sorted({0, *starts})
        for start, end in zip(starts, [*starts[1:], length], strict=True):
            example = {key: batch[key][row:row + 1, start:end] for key in ("input_ids", "labels")}
            example["attention_mask"] = torch.ones_like(example["input_ids"])
            if "task_id" in batch:
                example["task_id"] = batch["task_id"][row:row + 1]
            examples.append({key: value.detach().cpu().clone() for key, value in example.items()})
    return examples


def _with_prefix(state: dict[str, Any], prefix: str) -> dict[str, Tensor]:
    return {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
