"""Tasks of a run: their data, and how micro-batches are drawn from several of them.

A single `data:` section is one task; `tasks:` lists several. Items of task k carry `task_id = k`
(for task-specific heads). Every micro-batch holds items of one task only, so a head or a per-task
loss never sees another task's examples.

Sampling across tasks (one "epoch" has as many micro-batches as the tasks' batch counts added up):
- proportional: every example once per epoch, tasks interleaved at random (p_i ~ n_i);
- temperature: tasks drawn with p_i ~ n_i^(1/T) (T = 1 proportional, T -> inf uniform; Arivazhagan
  et al. 2019, "Massively Multilingual NMT"), smaller tasks revisited, larger ones subsampled;
- round_robin: tasks in turn, one micro-batch each.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from tuneforge.config import RunConfig, ScheduleConfig, TaskConfig
from tuneforge.data import Example, encode_dataset, label_vocabulary, load_examples, split_train_eval
from tuneforge.errors import DataError

Plan = Callable[[int, int, int], list[list[int]]]  # (epoch, rank, world) -> micro-batches of item indices


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
        train_examples, eval_examples = examples, load_examples(data.eval, data.format, data.template, skipped, data.where)
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
    task.train_items, dropped = encode_dataset(task.train_examples, tokenizer, max_seq_len, task.task_type, label_to_id)
    if not task.train_items:
        raise DataError(f"{task.source}: every example was dropped ({dropped} too long or empty at max_seq_len={max_seq_len})")
    task.eval_items, _ = encode_dataset(task.eval_examples, tokenizer, max_seq_len, task.task_type, label_to_id)
    if tag:
        for item in task.train_items + task.eval_items:
            item["task_id"] = task.task_id
    return task


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


def mixture_plan(sizes: list[int], batch_size: int, schedule: ScheduleConfig, seed: int) -> Plan:
    """A plan of single-task micro-batches over tasks whose items sit at consecutive offsets.

    Deterministic in (seed, epoch), so resuming at a micro-batch offset sees exactly the same stream.
    Each process takes its `rank::world` slice of every global batch (all of one task).
    """
    offsets = [sum(sizes[:i]) for i in range(len(sizes))]
    probabilities = task_probabilities(sizes, schedule)

    def plan(epoch: int, rank: int, world: int) -> list[list[int]]:
        generator = torch.Generator().manual_seed(seed + epoch)
        global_batch = batch_size * world
        counts = [math.ceil(n / global_batch) for n in sizes]
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
        batches = []
        for task in choices:
            chunk = []
            while len(chunk) < min(global_batch, sizes[task]):
                if cursors[task] == sizes[task]:  # a revisited small task starts a new pass
                    orders[task], cursors[task] = torch.randperm(sizes[task], generator=generator).tolist(), 0
                take = min(global_batch - len(chunk), sizes[task] - cursors[task])
                chunk += orders[task][cursors[task]:cursors[task] + take]
                cursors[task] += take
                if schedule.sampling == "proportional":
                    break  # each example once per epoch: the task's last batch may be short
            if len(chunk) >= world:
                batches.append([offsets[task] + i for i in chunk[rank::world]])
        return batches

    return plan
