"""Stopping a run cleanly: on SIGTERM (preemption: SLURM, Kubernetes, spot instances), Ctrl-C (SIGINT), or
before `train.max_time` runs out.

The signal handler only records the request. The loop finishes the optimizer step it is in (and an
evaluation or checkpoint write already under way), writes an atomic checkpoint at that step, flushes the
metrics, and raises `Stopped`; the command line prints one line naming the resume command and exits 143
(SIGTERM), 130 (SIGINT) or 75 (max_time, EX_TEMPFAIL: try again). A second signal aborts at once.
Under several processes every process checks the same reduced flag, so all stop at the same step.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading
import time
from collections.abc import Iterator

from tuneforge.errors import TuneforgeError

EXIT_CODES = {"SIGTERM": 128 + signal.SIGTERM, "SIGINT": 128 + signal.SIGINT, "max_time": 75}
HANDLED = (signal.SIGTERM, signal.SIGINT)
REASONS = ("max_time", "SIGINT", "SIGTERM")  # in rising precedence when processes disagree
REPEAT_WINDOW = 3.0  # seconds within which a repeated SIGTERM counts as the same one
_NUMBER = r"(\d+(?:\.\d+)?)"
_DURATION = re.compile("".join(f"(?:{_NUMBER}{unit})?" for unit in "dhms"))


class Stopped(TuneforgeError):
    """Training stopped early at a checkpoint, on request; the run resumes from it with `--resume`."""

    def __init__(self, step: int, reason: str, checkpoint: str | None = None):
        self.step, self.reason, self.checkpoint = step, reason, checkpoint
        super().__init__(f"stopped at step {step} ({reason})")

    @property
    def exit_code(self) -> int:
        return EXIT_CODES.get(self.reason, 1)


def parse_duration(text: str | float) -> float:
    """Seconds in `3h30m`, `90m`, `1d2h`, `45s`, `2.5h`, or a bare number of seconds."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = _DURATION.fullmatch(str(text).strip().replace(" ", ""))
        if not str(text).strip() or match is None or not any(match.groups()):
            raise ValueError(f"not a duration: {text!r} (write e.g. 3h30m, 90m, 45s)")
        days, hours, minutes, secs = (float(g) if g else 0.0 for g in match.groups())
        seconds = ((days * 24 + hours) * 60 + minutes) * 60 + secs
    if not seconds > 0:
        raise ValueError(f"duration must be positive, got {text!r}")
    return seconds


class StopRequest:
    """Why the run should stop at the next step boundary, if it should (set by a signal or the clock)."""

    def __init__(self, max_time: float | None = None, started: float | None = None):
        self.reason: str | None = None
        self.started = time.monotonic() if started is None else started
        self.deadline = None if max_time is None else self.started + max_time
        self._signals = 0
        self._last: dict[int, float] = {}  # when each signal last arrived

    def handle(self, signum: int, frame) -> None:
        """The signal handler: the first signal asks for a stop; a second one aborts at once.

        A SIGTERM repeated within `REPEAT_WINDOW` seconds is the same request: SLURM signals every process
        of a job step and torchrun forwards what it gets, so a worker can receive one SIGTERM twice.
        Messages go through `os.write`: a handler that prints could interrupt a print (tqdm's) in progress.
        """
        name = signal.Signals(signum).name
        now = time.monotonic()
        repeated = signum == signal.SIGTERM and now - self._last.get(signum, -1e9) < REPEAT_WINDOW
        self._last[signum] = now
        if repeated:
            return
        self._signals += 1
        if self._signals > 1:
            _say(f"\ntuneforge: second {name}: aborting now (the last checkpoint is kept)\n")
            for handled in HANDLED:
                signal.signal(handled, signal.SIG_DFL)
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signum)
            return
        self.reason = name if self.reason in (None, "max_time") else self.reason
        _say(f"\ntuneforge: {name} received: stopping after this step, with a checkpoint "
             f"(send it again to abort at once)\n")

    def due(self, next_step_seconds: float = 0.0) -> str | None:
        """The reason to stop now: a signal, or a deadline the next step would run past."""
        late = self.deadline is not None and time.monotonic() + next_step_seconds >= self.deadline
        if self.reason is None and late:
            self.reason = "max_time"
        return self.reason

    def code(self, next_step_seconds: float = 0.0) -> int:
        """`due` as a number processes can reduce with max: 0 to go on, else its place in `REASONS` + 1."""
        reason = self.due(next_step_seconds)
        return 0 if reason is None else REASONS.index(reason) + 1


def _say(text: str) -> None:
    """Write to stderr from a signal handler (no Python buffering to re-enter)."""
    try:
        os.write(sys.stderr.fileno(), text.encode())
    except (OSError, ValueError):
        pass


def reason_of(code: int) -> str | None:
    """The reason a stop code (`StopRequest.code`, reduced over processes) stands for."""
    return REASONS[code - 1] if code else None


_current: StopRequest | None = None


def current_request() -> StopRequest:
    """The request of the command in progress (a fresh, never-set one outside `stop_requests`)."""
    return _current if _current is not None else StopRequest()


@contextlib.contextmanager
def stop_requests(max_time: float | None = None) -> Iterator[StopRequest]:
    """Route SIGTERM and SIGINT to a `StopRequest` while the block runs (main thread only; restored after)."""
    global _current
    request = StopRequest(max_time)
    previous_request, _current = _current, request
    installed = threading.current_thread() is threading.main_thread()
    previous = {signum: signal.getsignal(signum) for signum in HANDLED} if installed else {}
    if previous.get(signal.SIGINT) is signal.SIG_IGN:  # started with Ctrl-C ignored (`nohup ... &`): keep it
        del previous[signal.SIGINT]
    try:
        for signum in previous:
            signal.signal(signum, request.handle)
        yield request
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _current = previous_request
