"""Faults a long run meets, turned into one-line errors that keep every good file: a full disk (or any
failed write), and running out of GPU memory.

Every write goes to a temporary name first (checkpoints, adapters, exports, small JSON files), so a failed
write loses only itself: the writer removes its partial temporary and the caller reports the path, the
operating system's reason, and the last good checkpoint to resume from.
"""

from __future__ import annotations

import contextlib
import errno as errno_codes
import os
import re
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import save_file
from torch import Tensor

from tuneforge.errors import TrainingError

_OS_ERROR = re.compile(r"os error (\d+)")
_warned_free_space: set[str] = set()


def save_tensors(tensors: dict[str, Tensor], path: Path) -> None:
    """`safetensors.torch.save_file`, with a failed write raised as the `OSError` it was underneath."""
    try:
        save_file(tensors, str(path))
    except SafetensorError as exc:
        raise as_os_error(exc, path) or exc from None


def as_os_error(exc: BaseException, path: Path | str | None = None) -> OSError | None:
    """The `OSError` behind an exception: itself, or the `os error N` a safetensors error reports."""
    if isinstance(exc, OSError):
        return exc
    match = _OS_ERROR.search(str(exc)) if isinstance(exc, SafetensorError) else None
    if match is None:
        return None
    code = int(match.group(1))
    return OSError(code, os.strerror(code), None if path is None else str(path))


def describe_os_error(exc: OSError) -> str:
    """`PATH: reason (ENAME)` for an OSError, whatever it carries."""
    reason = exc.strerror or str(exc) or type(exc).__name__
    name = errno_codes.errorcode.get(exc.errno or 0)
    where = f"{exc.filename}: " if exc.filename else ""
    return f"{where}{reason}" + (f" ({name})" if name else "")


def write_failure(exc: OSError, last_good: Path | None) -> TrainingError:
    """The one-line error for a failed write (or read), naming the last good checkpoint (kept untouched)."""
    kept = f"; last good checkpoint: {last_good} (resume with --resume)" if last_good else ""
    full = exc.errno in (errno_codes.ENOSPC, errno_codes.EDQUOT)
    what = "cannot write " if full or exc.errno in (errno_codes.EROFS, errno_codes.EFBIG) else ""
    hint = " (free some space)" if full else ""
    return TrainingError(f"{what}{describe_os_error(exc)}{hint}{kept}")


@contextlib.contextmanager
def writing(path: Path | str) -> Iterator[None]:
    """Name `path` in an `OSError` raised in the block without a file name (a failed `write` or `fsync`
    says only "No space left on device")."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from None
        raise


def out_of_memory_error(exc: BaseException, last_good: Path | None) -> TrainingError:
    """The one-line error for an accelerator out-of-memory error, with what usually makes a run fit."""
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else "out of memory"
    first = first[:160]
    kept = f"; last good checkpoint: {last_good}" if last_good else ""
    return TrainingError(f"out of memory ({first}); to fit, try a smaller train.batch_size with a larger "
                         f"train.grad_accum, train.gradient_checkpointing: true, a shorter "
                         f"train.max_seq_len, a parameter-efficient strategy (lora), or quantize: nf4 "
                         f"under it (`tuneforge inspect` estimates the memory){kept}")


@contextlib.contextmanager
def reported_faults(last_good: Callable[[], Path | None]) -> Iterator[None]:
    """Turn failed writes and out-of-memory errors raised in the block into one-line `TrainingError`s.

    `last_good()` gives the checkpoint to name (looked up only when something failed)."""
    try:
        yield
    except OSError as exc:
        raise write_failure(exc, last_good()) from None
    except torch.OutOfMemoryError as exc:
        raise out_of_memory_error(exc, last_good()) from None


def warn_if_short_of_space(directory: Path, needed: int) -> None:
    """Warn once per directory when its file system has less free space than `needed` bytes (the size of
    the previous checkpoint: the next one will be about as large)."""
    try:
        free = shutil.disk_usage(directory).free
    except OSError:
        return
    if free >= needed or str(directory) in _warned_free_space:
        return
    _warned_free_space.add(str(directory))
    print(f"tuneforge: warning: {directory} has {free / 2**20:.1f} MiB free, and the last checkpoint took "
          f"{needed / 2**20:.1f} MiB: the next checkpoint may not fit", file=sys.stderr, flush=True)


def tree_bytes(path: Path) -> int:
    """Bytes of the files under `path` (0 when it does not exist)."""
    if not path.is_dir():
        return 0
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())

