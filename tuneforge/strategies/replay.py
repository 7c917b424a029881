"""Experience replay for continual learning: a reservoir of past-task examples mixed into later tasks.

The buffer is a uniform sample of every example seen so far (reservoir sampling, Vitter 1985,
Algorithm R): the n-th example replaces a random slot with probability size / n. When a task starts,
`ratio` x (its size) stored examples join its training items (Rolnick et al. 2019, "Experience Replay
for Continual Learning"; Chaudhry et al. 2019, "On Tiny Episodic Memories").
"""

from __future__ import annotations

import random
from typing import Any

from pydantic import Field
from torch import nn

from tuneforge.checkpoint import jsonable, tuplify
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext


class ReplayOptions(Options):
    buffer_size: int = Field(200, ge=1)
    ratio: float = Field(0.5, gt=0)  # replayed examples per new example


@register("replay", ReplayOptions)
class Replay(Strategy):
    """Mix a reservoir sample of earlier tasks' examples into each new task's training data."""

    identity_start = True  # a data schedule: the model is untouched

    family = "schedule"
    options: ReplayOptions

    def __init__(self, options: ReplayOptions):
        super().__init__(options)
        self.buffer: list[dict] = []
        self.seen = 0
        self.rng = random.Random(0)
        self.pending: list[dict] = []

    def task_items(self, items: list[dict], ctx: StrategyContext) -> list[dict]:
        self.pending = items  # enters the reservoir when the task ends
        if not self.buffer:
            return items
        count = min(len(self.buffer), round(self.options.ratio * len(items)))
        replayed = random.Random(self.seen).sample(self.buffer, count)
        return items + replayed

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        for item in self.pending:
            self.add(item)
        self.pending = []

    def add(self, item: dict) -> None:
        """Reservoir step: every example seen so far is in the buffer with equal probability."""
        self.seen += 1
        if len(self.buffer) < self.options.buffer_size:
            self.buffer.append(item)
            return
        slot = self.rng.randrange(self.seen)
        if slot < self.options.buffer_size:
            self.buffer[slot] = item

    def state_dict(self) -> dict[str, Any]:
        return {"buffer": self.buffer, "seen": self.seen, "rng": jsonable(self.rng.getstate())}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if "buffer" in state:
            self.buffer, self.seen = state["buffer"], state["seen"]
            self.rng.setstate(tuplify(state["rng"]))

