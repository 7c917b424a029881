"""A run's state as its own process records it: `status.json` in the run directory.

`tuneforge train` writes `{"state": "running", "pid": ..., ...}` once its run directory is ready, and the
state it ended in when it ends: `finished`, `stopped` (a clean stop at a checkpoint: SIGTERM, Ctrl-C,
`train.max_time`; resumable) or `failed` (with the one-line error). A process that dies without a word
(SIGKILL, a power cut, a second signal) leaves `running` behind with a process that no longer exists:
readers report that as `killed`. The process is named by its pid, its start time and the boot it ran in,
so a reused pid is never mistaken for the run. Writes are atomic; readers never write.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import time
from collections.abc import Iterator
from pathlib import Path

STATUS_FILE = "status.json"
STATES = ("running", "finished", "stopped", "failed", "killed", "unknown")


def process_identity(pid: int) -> dict:
    """What names process `pid` beyond its number: its start time (clock ticks after boot) and the boot id;
    empty where /proc does not tell (then the pid alone names it)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        # the command name (field 2) may hold spaces and parentheses: fields count from the last ')'
        start_ticks = int(stat[stat.rindex(")") + 2:].split()[19])
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except (OSError, ValueError, IndexError):
        return {}
    return {"proc_start": start_ticks, "boot_id": boot}


def process_alive(record: dict) -> bool:
    """Whether the process a status record names still runs (a zombie has ended: it is not alive)."""
    pid = record.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        pass
    now = process_identity(pid)
    if not now:
        return True
    if "proc_start" in record and (now["proc_start"], now["boot_id"]) != (record["proc_start"],
                                                                            record.get("boot_id")):
        return False  # the pid was reused by another process
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        return stat[stat.rindex(")") + 2] != "Z"
    except (OSError, ValueError, IndexError):
        return True


def _write(run_dir: Path, record: dict) -> None:
    from tuneforge.checkpoint import write_atomic  # here: readers of the status need no torch

    write_atomic(run_dir / STATUS_FILE, json.dumps(record, indent=1))


def mark_running(run_dir: Path, resume: bool) -> None:
    """Record that this process now runs in `run_dir` (called once the run directory is prepared)."""
    pid = os.getpid()
    _write(run_dir, {"state": "running", "pid": pid, **process_identity(pid), "host": socket.gethostname(),
                     "started": time.time(), "resumed": resume})


def read_record(run_dir: Path) -> dict | None:
    """status.json as written, or None (absent, or unreadable: a run from before status files)."""
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def run_state(run_dir: Path) -> tuple[str, dict]:
    """The run's true state and its status record: `running` only while its process lives; `killed` when
    the process died without recording an end; `finished` for a run with results and no status file;
    `unknown` for a run with neither (from an earlier version, or killed before it could say)."""
    record = read_record(run_dir)
    if record is None:
        return ("finished" if (run_dir / "results.json").is_file() else "unknown"), {}
    state = record.get("state")
    if state == "running":
        if record.get("host") not in (None, socket.gethostname()):
            return "running", record  # on another machine (a shared file system): its word is all we have
        return ("running" if process_alive(record) else "killed"), record
    return (state if state in STATES else "unknown"), record


def _ours(run_dir: Path) -> bool:
    record = read_record(run_dir)
    return bool(record) and record.get("state") == "running" and record.get("pid") == os.getpid() \
        and record.get("proc_start") == process_identity(os.getpid()).get("proc_start")


def mark_ended(run_dir: Path, state: str, **details) -> None:
    """Record how the run ended, if this process is the one that recorded it running (a run refused
    before it started leaves another run's status alone)."""
    if not _ours(run_dir):
        return
    record = read_record(run_dir) or {}
    _write(run_dir, {**record, "state": state, "ended": time.time(), **details})


@contextlib.contextmanager
def recorded_end(run_dir: Path) -> Iterator[None]:
    """Record the state the block ends in: finished, stopped (with its reason and exit code) or failed
    (with the error's first line). Only a status this process marked running is changed."""
    from tuneforge.stopping import Stopped

    try:
        yield
    except Stopped as stopped:
        with contextlib.suppress(OSError):
            mark_ended(run_dir, "stopped", reason=stopped.reason, step=stopped.step,
                       exit_code=stopped.exit_code)
        raise
    except KeyboardInterrupt:
        with contextlib.suppress(OSError):
            mark_ended(run_dir, "stopped", reason="SIGINT", exit_code=130)
        raise
    except BaseException as exc:
        message = " ".join(str(exc).splitlines()) or type(exc).__name__
        with contextlib.suppress(OSError):  # a full disk: the error itself is what the user must see
            mark_ended(run_dir, "failed", error=message[:500], exit_code=2)
        raise
    with contextlib.suppress(OSError):
        mark_ended(run_dir, "finished", exit_code=0)
