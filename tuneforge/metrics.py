"""Run metrics: one JSON object per line in `metrics.jsonl`, mirrored to TensorBoard."""

from __future__ import annotations

import json
import os
import resource
import sys
from pathlib import Path

import torch

from tuneforge.faults import writing


class MetricsLogger:
    """Appends records to `metrics.jsonl` and TensorBoard; only the main process writes."""

    def __init__(self, directory: Path, enabled: bool = True, tensorboard: bool = True,
                 extra: dict | None = None, trackers=None):
        self.path = directory / "metrics.jsonl"
        self.enabled = enabled
        self.trackers = trackers  # `tuneforge.trackers.Trackers`: W&B, MLflow, Aim (report_to)
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

        # a line cut short by the kill is not JSON: it goes too.
        # Rewritten atomically: a second kill keeps the old file
        kept = [line for line in self.path.read_text().splitlines()
                if (record := _parse(line)) and keep(record)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        os.replace(tmp, self.path)

    def log(self, record: dict) -> None:
        if not self.enabled:
            return
        record = {**record, **self.extra}
        with writing(self.path), open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        prefix = "/".join(str(p) for p in (record.get("task"), record.get("split", "train")) if p)
        scalars = {f"{prefix}/{key}": value for key, value in record.items()
                   if isinstance(value, (int, float)) and not isinstance(value, bool)
                   and key not in ("step", "epoch")}
        if self.writer is not None:
            with writing(self.writer.log_dir):
                for key, value in scalars.items():
                    self.writer.add_scalar(key, value, step)
        if self.trackers:
            self.trackers.log(scalars, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [record for line in path.read_text().splitlines() if (record := _parse(line))]


def _parse(line: str) -> dict | None:
    """A metrics record, or None for a blank line or one a killed process left half written."""
    try:
        record = json.loads(line) if line.strip() else None
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


_EARLIER_PEAK_MB = 0.0  # the peak before the last `reset_peak_memory` (loading, the first evaluation)


def peak_memory_mb(device: torch.device | None = None, since_reset: bool = False) -> float:
    """Peak memory of this process: CUDA allocator peak on a GPU, else peak resident set size.

    On Linux the peak is the memory map's high-water mark (`VmHWM`), which starts afresh when a process
    execs; `ru_maxrss` keeps the parent's resident size from the fork, so a run started by a large
    process (a test runner, `tuneforge compare`) would report at least that. `since_reset`: the peak
    since the last `reset_peak_memory` only (training, without the loading before it).
    """
    current = _current_peak_mb(device)
    return current if since_reset else max(current, _EARLIER_PEAK_MB)


def reset_peak_memory(device: torch.device | None = None) -> None:
    """Start a new peak (training, after loading and sharding), keeping the old one for the run's overall
    peak. Freed heap memory is handed back first (`malloc_trim`), so the new peak starts from what the
    process holds, not from what the C library kept after loading."""
    global _EARLIER_PEAK_MB
    _EARLIER_PEAK_MB = max(_EARLIER_PEAK_MB, _current_peak_mb(device))
    if device is not None and device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/clear_refs", "w") as handle:  # Linux: VmHWM restarts from VmRSS
            handle.write("5")
    except (OSError, AttributeError):
        pass  # elsewhere the training peak includes loading


def resident_memory_mb() -> float:
    """What this process holds now, in MiB: the resident set after a garbage collection and after freed
    heap memory is handed back (`malloc_trim`); 0 where /proc is absent."""
    import gc

    gc.collect()
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 2**10
    except (OSError, AttributeError, ValueError, IndexError):
        pass
    return 0.0


def _current_peak_mb(device: torch.device | None) -> float:
    if device is not None and device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux
