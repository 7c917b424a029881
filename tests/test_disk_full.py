"""A full disk at every place a run writes (and out of memory): one line naming the path, the reason and
the last good checkpoint; no partial `.tmp` left; nothing already written damaged; and once space is back,
`--resume` finishes with the weights of a run that never failed.

The failure is injected: a write (through `open`, safetensors or TensorBoard) to a matching path raises
`OSError(ENOSPC)`, exactly what a full file system raises; safetensors raises its own error type, which
is what users saw as a traceback before.
"""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch
from conftest import cli_run_config, trained_reference
from safetensors import SafetensorError
from safetensors.torch import load_file

import tuneforge.faults
from tuneforge.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint
from tuneforge.cli import main

STEPS = 8


class HalfWritten:
    """A file whose `write` stores half the data, then fails as a full disk does: `OSError(ENOSPC)` with
    no file name (the name is only known to whoever opened the file)."""

    def __init__(self, handle):
        self.handle = handle

    def write(self, data):
        self.handle.write(data[: len(data) // 2])
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


class FullDisk:
    """Fail writes to paths containing `fragment` with ENOSPC, from the `after`-th such file on."""

    def __init__(self, monkeypatch, fragment: str, after: int = 1):
        self.fragment, self.after, self.seen = fragment, after, 0
        real_open, real_save = builtins.open, tuneforge.faults.save_file

        def failing_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            if any(flag in mode for flag in "wax+") and self.hit(file):
                return HalfWritten(handle)  # opens fine; the write runs out of space half-way
            return handle

        def failing_save(tensors, filename, *args, **kwargs):
            if self.hit(filename):  # what safetensors raises on a full disk
                raise SafetensorError("Error while serializing: I/O error: No space left on device "
                                      "(os error 28)")
            return real_save(tensors, filename, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", failing_open)
        monkeypatch.setattr(io, "open", failing_open)
        monkeypatch.setattr(tuneforge.faults, "save_file", failing_save)
        import transformers.modeling_utils  # a merged export's weights go through transformers

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", failing_save)

    def hit(self, path) -> bool:
        if self.fragment not in str(path):
            return False
        self.seen += 1
        return self.seen >= self.after


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model_dir, task_file) -> Path:
    return cli_run_config(tmp_path_factory.mktemp("disk-config"), tiny_model_dir, task_file,
                          [{"lora": {"rank": 4, "targets": "all-linear"}}],
                          {"max_steps": STEPS, "save_every": 3, "keep_checkpoints": 5})


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> Path:
    return trained_reference(config_file, tmp_path_factory.mktemp("reference"))


def one_error_line(capfd) -> str:
    err = capfd.readouterr().err
    assert "Traceback" not in err
    errors = [line for line in err.splitlines() if "tuneforge: error:" in line]
    assert len(errors) == 1, err[-2000:]
    line = errors[0]
    assert line.startswith("tuneforge: error:"), line  # on a line of its own, not after a progress bar
    return line


def no_partial_writes(run: Path) -> None:
    leftovers = [str(p) for p in run.rglob("*.tmp")]
    assert not leftovers, leftovers


def snapshot(run: Path) -> dict[str, bytes]:
    return {str(p.relative_to(run)): p.read_bytes() for p in sorted(run.rglob("*"))
            if p.is_file() and "checkpoints" in p.parts}


# (where the write fails, which write of it, what the error names, the last good checkpoint's step)
TRAINING_SITES = [
    ("step-00000006.tmp/optimizer.safetensors", 1, "optimizer.safetensors", 3),
    ("step-00000006.tmp/manifest.json", 1, "manifest.json", 3),
    ("step-00000003.tmp/weights.safetensors", 1, "weights.safetensors", None),
    ("metrics.jsonl", 5, "metrics.jsonl", 3),
]


@pytest.mark.parametrize(("fragment", "after", "named", "last_good"), TRAINING_SITES,
                         ids=[site[0] for site in TRAINING_SITES])
def test_full_disk_while_training(config_file, reference, tmp_path, monkeypatch, capfd,
                                  fragment, after, named, last_good):
    run = tmp_path / "run"
    FullDisk(monkeypatch, fragment, after)
    assert main(["train", str(config_file), "--output", str(run)]) == 2
    line = one_error_line(capfd)
    assert named in line and "No space left on device (ENOSPC)" in line, line
    if last_good is None:
        assert "last good checkpoint" not in line
    else:
        good = run / "checkpoints" / f"step-{last_good:08d}"
        assert f"last good checkpoint: {good}" in line and verify_checkpoint(good)
    no_partial_writes(run)
    monkeypatch.undo()  # space is back
    resume = [] if last_good is None else ["--resume"]
    assert main(["train", str(config_file), "--output", str(run), *resume,
                 *([] if resume else ["--overwrite"])]) == 0
    final, expected = (load_file(str(latest_checkpoint(r / "checkpoints") / "weights.safetensors"))
                       for r in (run, reference))
    for name in expected:
        torch.testing.assert_close(final[name], expected[name], atol=0, rtol=0)


def test_full_disk_in_tensorboard(config_file, tmp_path, monkeypatch, capfd):
    from torch.utils.tensorboard import SummaryWriter

    calls = []

    def add_scalar(self, *args, **kwargs):
        calls.append(1)
        if len(calls) > 12:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(Path(self.log_dir) / "events"))

    monkeypatch.setattr(SummaryWriter, "add_scalar", add_scalar)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run)]) == 2
    line = one_error_line(capfd)
    assert "tensorboard" in line and "ENOSPC" in line and "last good checkpoint" in line
    no_partial_writes(run)


@pytest.mark.parametrize("fragment", ["adapter.tmp/adapter_model.safetensors", "results.json",
                                      "report.md"])
def test_full_disk_after_training_keeps_every_checkpoint(config_file, tmp_path, monkeypatch, capfd,
                                                         fragment):
    run = tmp_path / "run"
    FullDisk(monkeypatch, fragment)
    assert main(["train", str(config_file), "--output", str(run)]) == 2
    line = one_error_line(capfd)
    assert Path(fragment).name in line and "ENOSPC" in line
    assert f"last good checkpoint: {run / 'checkpoints' / f'step-{STEPS:08d}'}" in line
    assert [p.name for p in list_checkpoints(run / "checkpoints")][-1] == f"step-{STEPS:08d}"
    no_partial_writes(run)
    before = snapshot(run)
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert json.loads((run / "results.json").read_text())["steps"] == STEPS
    assert (run / "adapter" / "adapter_model.safetensors").is_file()
    kept = snapshot(run)
    assert all(kept.get(name) == data for name, data in before.items() if "step-00000003" in name)


def test_full_disk_before_training(config_file, tmp_path, monkeypatch, capfd):
    run = tmp_path / "run"
    FullDisk(monkeypatch, "evaluation_before.json")
    assert main(["train", str(config_file), "--output", str(run)]) == 2
    line = one_error_line(capfd)
    assert "evaluation_before.json" in line and "ENOSPC" in line and "last good" not in line
    no_partial_writes(run)


def test_full_disk_during_export_keeps_the_existing_export(reference, tmp_path, monkeypatch, capfd):
    merged = tmp_path / "merged"
    assert main(["export", str(reference), "--merged", str(merged)]) == 0
    before = {p.name: p.read_bytes() for p in merged.iterdir()}
    capfd.readouterr()
    FullDisk(monkeypatch, "merged.tmp/model.safetensors")
    assert main(["export", str(reference), "--merged", str(merged)]) == 2
    line = one_error_line(capfd)
    assert f"{tmp_path / 'merged.tmp'}: No space left on device (ENOSPC)" in line
    assert {p.name: p.read_bytes() for p in merged.iterdir()} == before
    assert not (tmp_path / "merged.tmp").exists()


def test_low_free_space_warns_before_a_checkpoint(config_file, tmp_path, monkeypatch, capfd):
    import shutil

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(tuneforge.faults.shutil, "disk_usage",
                        lambda path: usage._replace(free=1000))
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run)]) == 0
    err = capfd.readouterr().err
    warnings = [line for line in err.splitlines() if "the next checkpoint may not fit" in line]
    assert len(warnings) == 1 and str(run / "checkpoints") in warnings[0]


def test_out_of_memory_is_one_line_with_advice_and_keeps_the_checkpoint(config_file, tmp_path, monkeypatch,
                                                                       capfd):
    """What CUDA raises when a step does not fit (raised here on the CPU at step 5): one line, the advice,
    and the checkpoint of step 3 kept."""
    import tuneforge.train

    original, steps = tuneforge.train.train_step, []

    def step_or_oom(*args, **kwargs):
        steps.append(1)
        if len(steps) == 5:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 23.6 GiB "
                                         "total capacity; 21.9 GiB already allocated)\nmore detail")
        return original(*args, **kwargs)

    monkeypatch.setattr(tuneforge.train, "train_step", step_or_oom)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run)]) == 2
    line = one_error_line(capfd)
    assert "out of memory (CUDA out of memory. Tried to allocate 2.00 GiB" in line
    assert "train.gradient_checkpointing: true" in line and "train.grad_accum" in line
    good = run / "checkpoints" / "step-00000003"
    assert f"last good checkpoint: {good}" in line and verify_checkpoint(good)
    no_partial_writes(run)
