"""status.json: a run records that it runs and how it ended, so a reader tells a live run from a finished,
stopped, failed or killed one (and never mistakes a reused pid for the run)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys

from conftest import cli_run_config

import tuneforge.train
from tuneforge.cli import main
from tuneforge.run_status import STATUS_FILE, process_identity, read_record, run_state


def test_finished_stopped_and_failed_runs_record_their_end(tmp_path, tiny_model_dir, task_file, monkeypatch):
    config = cli_run_config(tmp_path, tiny_model_dir, task_file, [{"lora": {"rank": 2}}], {"max_steps": 4})
    finished = tmp_path / "finished"
    assert main(["train", str(config), "--output", str(finished)]) == 0
    state, record = run_state(finished)
    assert state == "finished" and record["pid"] == os.getpid() and record["exit_code"] == 0
    assert record["proc_start"] == process_identity(os.getpid())["proc_start"]

    original, taken = tuneforge.train.optimizer_step, []

    def step_and_signal(*args, **kwargs):  # SIGTERM at step 2: a clean stop at a checkpoint
        taken.append(1)
        if len(taken) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(tuneforge.train, "optimizer_step", step_and_signal)
    stopped = tmp_path / "stopped"
    assert main(["train", str(config), "--output", str(stopped)]) == 143
    state, record = run_state(stopped)
    assert (state, record["reason"], record["step"], record["exit_code"]) == ("stopped", "SIGTERM", 2, 143)
    monkeypatch.undo()

    # a run refused before it starts (a run already there) leaves the other run's status alone
    before = (finished / STATUS_FILE).read_text()
    assert main(["train", str(config), "--output", str(finished)]) == 2
    assert (finished / STATUS_FILE).read_text() == before

    failed = tmp_path / "failed"
    assert main(["train", str(config), "--output", str(failed), "train.lr=1e30"]) == 2  # the loss blows up
    state, record = run_state(failed)
    assert state == "failed" and "loss became" in record["error"]


def test_a_killed_run_reads_as_killed_and_a_reused_pid_is_not_the_run(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        record = {"state": "running", "pid": child.pid, **process_identity(child.pid)}
        (run / STATUS_FILE).write_text(json.dumps(record))
        assert run_state(run)[0] == "running"
        (run / STATUS_FILE).write_text(json.dumps({**record, "proc_start": record["proc_start"] - 1}))
        assert run_state(run)[0] == "killed"  # same pid, another process start: not the run
        (run / STATUS_FILE).write_text(json.dumps(record))
        child.kill()
        child.wait()
        assert run_state(run)[0] == "killed"
    finally:
        child.kill()
        child.wait()
    (run / STATUS_FILE).unlink()
    assert run_state(run) == ("unknown", {})  # no status and no results: a run from before status files
    (run / "results.json").write_text("{}")
    assert run_state(run)[0] == "finished"
    assert read_record(run) is None
