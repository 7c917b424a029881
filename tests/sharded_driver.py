"""Run under torchrun by tests/test_sharded.py: for each (config, output, resume) triple, train, then (when
`resume` is 1) stop-and-resume.

The resume starts from a copy of the finished run with its last checkpoint removed: exactly what a run
killed after its step-3 checkpoint leaves (checkpoints are atomic), so `--resume` must end equal.
Everything happens in one launch (one process group) to keep the test fast.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch.distributed as dist

from tuneforge.checkpoint import list_checkpoints
from tuneforge.cli import main


def run_all(triples: list[str]) -> int:
    for config, output, resume in zip(triples[::3], triples[1::3], triples[2::3], strict=True):
        if main(["train", config, "--output", output]) != 0:
            return 1
        if resume != "1":
            continue
        resumed = Path(output + "-resumed")
        if dist.get_rank() == 0:
            shutil.copytree(output, resumed)
            shutil.rmtree(list_checkpoints(resumed / "checkpoints")[-1])
            (resumed / "results.json").unlink()
        dist.barrier()
        if main(["train", config, "--output", str(resumed), "--resume"]) != 0:
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(run_all(sys.argv[1:]))
