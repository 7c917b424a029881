"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard."""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch


class MetricsLogger:
    """Appends records to `metrics.jsonl` and TensorBoard; only the main process writes."""

    def __init__(self, directory: Path, enabled: bool = True, tensorboard: bool = True, extra: dict | None = None):
        self.path = directory / "metrics.jsonl"
        self.enabled = enabled
        self.extra = extra or {}  # fields added to every record, e.g. {"task": "b"} in a continual run
        self.writer = None
        if enabled and tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(directory / "tensorboard"))
            except ImportError:  # tensorboard is optional at run time
                self.writer = None

    def truncate_after(self, step: int) -> None:
        """On resume: drop records a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.is_file():
            return
        def keep(record: dict) -> bool:
            ours = all(record.get(key) == value for key, value in self.extra.items())
            return not ours or record.get("step", 0) <= step

        kept = [line for line in self.path.read_text().splitlines() if line and keep(json.loads(line))]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, **self.extra}
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record.get("step", 0)
            prefix = "/".join(str(p) for p in (record.get("task"), record.get("split", "train")) if p)
            for key, value in record.items():
                if isinstance(value, (int, float)) and key not in ("step", "epoch"):
                    self.writer.add_scalar(f"{prefix}/{key}", value, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def peak_memory_mb(device: torch.device | None = None) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak resident set size."""
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
