"""Tasks of a run: their data, and how optimizer steps are drawn from several of them.

A single `data:` section is one task; `tasks:` lists several. Items of task k carry `task_id = k`
(for task-specific heads). A plan draws whole optimizer steps of `batch_size * grad_accum * world`
items, each of one task, then cuts every step into micro-batches of `batch_size` items per process. So
a head or a per-task loss never sees another task's examples, and how a step is split (batch_size 4 x
grad_accum 1 or 2 x 2) does not change which data it holds.

Sampling across tasks (one "epoch" has as many steps as the tasks' step counts added up):
- proportional: every example once per epoch, tasks interleaved at random (p_i ~ n_i);
- temperature: tasks drawn with p_i ~ n_i^(1/T) (T = 1 proportional, T -> inf uniform; Arivazhagan
  et al. 2019, "Massively Multilingual NMT"), smaller tasks revisited, larger ones subsampled;
- round_robin: tasks in turn, one step each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tuneforge.config import RunConfig, ScheduleConfig, TaskConfig, TrainConfig
from tuneforge.data import (
    Example,
    encode_dataset,
    encode_text_chunks,
    label_vocabulary,
    load_examples,
    split_train_eval,
)
from tuneforge.data.retain import retain_stream, split_retain_documents
from tuneforge.errors import DataError

# (epoch, rank, world) -> this process's optimizer steps, each a list of micro-batches of item indices
Plan = Callable[[int, int, int], list[list[list[int]]]]


@dataclass
class TaskData:
    """One task's examples and, once encoded, its items."""

    name: str
    task_id: int
    task_type: str  # "causal_lm" or "classification"
    train_examples: list[Example]
    eval_examples: list[Example]
    labels: list[str] | None = None
    source: str = ""
    train_items: list[dict] = field(default_factory=list)
    eval_items: list[dict] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # why invalid records were left out (data.skip_invalid)


def load_task(task: TaskConfig, task_id: int, seed: int) -> TaskData:
    """Read a task's train/eval examples (holding out eval when no eval file is given)."""
    data = task.data
    skipped: list[str] | None = [] if data.skip_invalid else None
    examples = load_examples(data.train, data.format, data.template, skipped, data.where)
    if data.eval:
        train_examples = examples
        eval_examples = load_examples(data.eval, data.format, data.template, skipped, data.where)
    else:
        train_examples, eval_examples = split_train_eval(examples, data.eval_fraction, seed, None)
    # Caps take a seeded random subset: files are often sorted (by label, by topic).
    train_examples = _subset(train_examples, data.max_train_examples, seed)
    eval_examples = _subset(eval_examples, data.max_eval_examples, seed)
    if not train_examples:
        raise DataError(f"{data.train}: no training examples")
    classification = train_examples[0].kind == "classification"
    labels = sorted(label_vocabulary(train_examples)) if classification else None
    task_type = "classification" if classification else "causal_lm"
    return TaskData(task.name, task_id, task_type, train_examples, eval_examples, labels, data.train,
                    skipped=skipped or [])


def load_tasks(config: RunConfig) -> list[TaskData]:
    return [load_task(task, index, config.train.seed) for index, task in enumerate(config.task_list())]


def encode_task(task: TaskData, tokenizer, max_seq_len: int, tag: bool) -> TaskData:
    """Tokenize a task's examples; `tag` adds `task_id` to every item (multi-task runs)."""
    label_to_id = {label: i for i, label in enumerate(task.labels)} if task.labels else None
    task.train_items, dropped = encode_dataset(task.train_examples, tokenizer, max_seq_len, task.task_type,
                                               label_to_id)
    if not task.train_items:
        raise DataError(f"{task.source}: every example was dropped "
                        f"({dropped} too long or empty at max_seq_len={max_seq_len})")
    task.eval_items, _ = encode_dataset(task.eval_examples, tokenizer, max_seq_len, task.task_type,
                                        label_to_id)
    if tag:
        for item in task.train_items + task.eval_items:
            item["task_id"] = task.task_id
    return task


@dataclass
class RunData:
    """The run's tasks and its retain data."""

    tasks: list[TaskData]
    retain_items: list[dict] = field(default_factory=list)  # measures forgetting
    retain_pool: list[Example] = field(default_factory=list)  # disjoint retain text for regularisers
    notes: list[str] = field(default_factory=list)  # what the run leaves unused, and why (results.json)

    @property
    def task_type(self) -> str:
        """`classification` when every task is; otherwise the run is a causal-LM run."""
        return "classification" if all(t.task_type == "classification" for t in self.tasks) else "causal_lm"

    @property
    def multi_task(self) -> bool:
        return len(self.tasks) > 1


def load_run_data(config: RunConfig) -> RunData:
    """Read every task's examples (validating every record); no model needed."""
    return RunData(load_tasks(config))


def encode_run_data(run_data: RunData, config: RunConfig, tokenizer, tag_tasks: bool) -> RunData:
    """Tokenize every task; split the retain text into the part measured and the part regularisers use."""
    max_len = config.train.max_seq_len
    for task in run_data.tasks:
        encode_task(task, tokenizer, max_len, tag=tag_tasks)
    if config.retain and run_data.task_type == "causal_lm":
        measure, regularize = split_retain_documents(load_examples(config.retain, "text"))
        run_data.retain_items = encode_text_chunks(measure, tokenizer, max_len,
                                                   config.evaluation.retain_examples)
        run_data.retain_pool = regularize
    elif config.retain:  # never dropped silently: the run prints the note and keeps it in results.json
        note = retain_unused_note(config.retain)
        if note not in run_data.notes:
            run_data.notes.append(note)
    return run_data


def retain_unused_note(retain: str) -> str:
    """Why a classification run leaves `retain:` unused (forgetting is not measured on it)."""
    return (f"retain: {retain} is not used: forgetting is measured as a language model's loss on retain "
            f"text, and this run's model is a classifier (no language-model head); set `retain: null` to "
            f"silence this")


def retain_batch_source(run_data: RunData, tokenizer, config: RunConfig):
    """`ctx.retain_batches`: a callable `(batch_size=None, device=None)` giving an endless, seeded stream of
    padded batches from the regulariser retain pool (None without one); see `data.retain.retain_stream`."""
    if not run_data.retain_pool:
        return None
    return retain_stream(run_data.retain_pool, tokenizer, config.train.max_seq_len,
                         max(64, 4 * config.evaluation.retain_examples), config.train.batch_size,
                         config.train.seed + 1)


def _subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def task_probabilities(sizes: list[int], schedule: ScheduleConfig) -> list[float]:
    """The share of micro-batches each task gets (round robin: equal shares)."""
    if schedule.sampling == "proportional":
        weights = [float(n) for n in sizes]
    elif schedule.sampling == "temperature":
        weights = [n ** (1.0 / schedule.temperature) for n in sizes]
    else:
        weights = [1.0] * len(sizes)
    total = sum(weights)
    return [w / total for w in weights]


def mixture_plan(sizes: list[int], batch_size: int, schedule: ScheduleConfig, seed: int,
                 grad_accum: int = 1) -> Plan:
    """A plan of single-task optimizer steps over tasks whose items sit at consecutive offsets.

    A step draws `batch_size * grad_accum * world` items of one task (a task's last step in a
    proportional epoch may be short), cut into `grad_accum` (or fewer) global micro-batches of
    `batch_size * world`; each process takes its `rank::world` slice of every global micro-batch.
    Deterministic in (seed, epoch), and the draw never depends on how a step is split.
    """
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    probabilities = task_probabilities(sizes, schedule)

    def plan(epoch: int, rank: int, world: int) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(seed + epoch)
        step_items, micro_items = batch_size * grad_accum * world, batch_size * world
        counts = [math.ceil(n / step_items) for n in sizes]
        total = sum(counts)
        if schedule.sampling == "proportional":
            choices = [task for task, count in enumerate(counts) for _ in range(count)]
            choices = [choices[i] for i in torch.randperm(total, generator=generator).tolist()]
        elif schedule.sampling == "temperature":
            weights = torch.tensor(probabilities, dtype=torch.float64)
            choices = torch.multinomial(weights, total, replacement=True, generator=generator).tolist()
        else:
            choices = [i % len(sizes) for i in range(total)]
        orders = [torch.randperm(n, generator=generator).tolist() for n in sizes]
        cursors = [0] * len(sizes)
        steps = []
        for task in choices:
            chunk = []
            while len(chunk) < min(step_items, sizes[task]):
                if cursors[task] == sizes[task]:  # a revisited small task starts a new pass
                    orders[task], cursors[task] = torch.randperm(sizes[task], generator=generator).tolist(), 0
                take = min(step_items - len(chunk), sizes[task] - cursors[task])
                chunk += orders[task][cursors[task]:cursors[task] + take]
                cursors[task] += take
                if schedule.sampling == "proportional":
                    break  # each example once per epoch: the task's last step may be short
            micro = [chunk[start:start + micro_items] for start in range(0, len(chunk), micro_items)]
            # every process needs an item of every micro-batch (the collectives must match)
            step = [[offsets[task] + i for i in part[rank::world]] for part in micro if len(part) >= world]
            if step:
                steps.append(step)
        return steps

    return plan


def training_plan(items: list[dict], train: TrainConfig, schedule: ScheduleConfig,
                  seed: int) -> tuple[list[dict], Plan]:
    """The items of a training stream, grouped by task, and the plan the loop draws its steps from.

    The one place mixture runs and each task of a sequence get their plan, so `train.packing` and the
    sampling options mean the same in both.
    """
    from tuneforge.packing import packing_plan  # packing builds on this module

    items, sizes = grouped_by_task(items)  # replayed items keep their own task: one task per micro-batch
    if train.packing:  # micro-batches of batch_size rows of max_seq_len tokens, filled with whole examples
        lengths = [len(item["input_ids"]) for item in items]
        plan = packing_plan(lengths, sizes, train.batch_size, train.max_seq_len, seed, train.grad_accum)
        return items, plan
    return items, mixture_plan(sizes, train.batch_size, schedule, seed, train.grad_accum)


def grouped_by_task(items: list[dict]) -> tuple[list[dict], list[int]]:
    """Items reordered so each task's sit together (first-seen task first), and the group sizes.

    Replay mixes earlier tasks' items into the current task's; task-specific heads need every micro-batch
    to hold one task only, which the plans guarantee for consecutive groups.
    """
    order: dict[object, list[dict]] = {}
    for item in items:
        order.setdefault(item.get("task_id"), []).append(item)
    groups = list(order.values())
    return [item for group in groups for item in group], [len(group) for group in groups]
