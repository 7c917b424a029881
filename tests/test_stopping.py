"""Preemption and Ctrl-C: SIGTERM or SIGINT stops at a checkpoint, and `--resume` ends bit-equal to a run
never interrupted; a second signal aborts at once; `train.max_time` stops the same way before a limit.

Most tests send the signal from inside the run (at a chosen step, during an evaluation, during a checkpoint
write) to the test process itself, so the real handler runs at a known point; one sends SIGTERM from
outside to a `tuneforge train` process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import cli_run_config, trained_reference
from safetensors.torch import load_file

import tuneforge.checkpoint
import tuneforge.train
from tuneforge.checkpoint import latest_checkpoint, list_checkpoints
from tuneforge.cli import main
from tuneforge.stopping import Stopped, StopRequest, parse_duration, stop_requests

REPO = Path(__file__).resolve().parents[1]
STEPS = 12


@pytest.fixture(scope="module")
def config_file(tmp_path_factory, tiny_model_dir, task_file) -> Path:
    return cli_run_config(tmp_path_factory.mktemp("stop-config"), tiny_model_dir, task_file,
                          [{"lora": {"rank": 4, "targets": "all-linear", "dropout": 0.1}}],  # RNG state
                          {"max_steps": STEPS, "grad_accum": 2, "schedule": "cosine", "warmup_steps": 2,
                           "eval_every": 4})


@pytest.fixture(scope="module")
def reference(config_file, tmp_path_factory) -> Path:
    """The same run, never interrupted."""
    return trained_reference(config_file, tmp_path_factory.mktemp("reference"))


def final_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run / "checkpoints") / "weights.safetensors"))


def curve(run: Path) -> list[tuple]:
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r.get("split"), r["loss"]) for r in records]


def assert_same_run(run: Path, reference: Path) -> None:
    resumed, expected = final_weights(run), final_weights(reference)
    assert resumed.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], atol=0, rtol=0)
    assert curve(run) == curve(reference)  # every step and eval logged once, with the same loss
    assert json.loads((run / "results.json").read_text())["steps"] == STEPS


def signal_at_step(monkeypatch, signum: int, step: int, times: int = 1) -> None:
    """Send `signum` to this process while optimizer step `step` (1-based) is being taken."""
    original, taken = tuneforge.train.optimizer_step, []

    def step_and_signal(*args, **kwargs):
        taken.append(1)
        if len(taken) == step:
            for _ in range(times):
                os.kill(os.getpid(), signum)
        return original(*args, **kwargs)

    monkeypatch.setattr(tuneforge.train, "optimizer_step", step_and_signal)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_signal_stops_at_a_checkpoint_and_resume_is_bit_equal(config_file, reference, tmp_path, monkeypatch,
                                                              capfd, signum, code):
    run = tmp_path / "run"
    # a test runner started in the background ignores SIGINT; a terminal's Ctrl-C is what is tested here
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    signal_at_step(monkeypatch, signum, 5)
    try:
        assert main(["train", str(config_file), "--output", str(run)]) == code
    finally:
        restored = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
        signal.signal(signal.SIGINT, previous)
    name = signal.Signals(signum).name
    err = capfd.readouterr().err
    assert f"tuneforge: stopped at step 5 ({name}); resume with: tuneforge train {config_file} " \
           f"--output {run} --resume" in err
    assert "Traceback" not in err
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000005"]  # no save_every
    assert not (run / "results.json").exists()
    assert restored == handlers  # the run put the handlers back
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


def test_signal_during_evaluation_stops_after_it(config_file, reference, tmp_path, monkeypatch):
    """The evaluation at step 4 completes and is logged; the stop comes right after, at step 4."""
    from tuneforge.run import Session

    original, calls = Session.periodic_eval, []

    def evaluate_and_signal(self, model):
        calls.append(1)
        if len(calls) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(self, model)

    monkeypatch.setattr(Session, "periodic_eval", evaluate_and_signal)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run)]) == 143
    assert latest_checkpoint(run / "checkpoints").name == "step-00000004"
    assert curve(run)[-1][:2] == (4, "eval")
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


def test_signal_during_a_checkpoint_write_lets_it_finish(config_file, reference, tmp_path, monkeypatch):
    """SIGTERM while checkpoint 3 (save_every: 3) is being written: that write completes, and the run stops
    at it without writing it twice."""
    original, writes = tuneforge.checkpoint._write_checkpoint, []

    def write_and_signal(tmp, *args, **kwargs):
        writes.append(tmp.name)
        if len(writes) == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return original(tmp, *args, **kwargs)

    monkeypatch.setattr(tuneforge.checkpoint, "_write_checkpoint", write_and_signal)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run), "train.save_every=3"]) == 143
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000003"]
    assert writes == ["step-00000003.tmp"]  # the stop reuses the periodic checkpoint: one write
    assert not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir())
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume", "train.save_every=3"]) == 0
    assert_same_run(run, reference)


def test_signal_after_the_last_step_stops_before_the_final_evaluation(config_file, reference, tmp_path,
                                                                    monkeypatch):
    run = tmp_path / "run"
    signal_at_step(monkeypatch, signal.SIGTERM, STEPS)
    assert main(["train", str(config_file), "--output", str(run)]) == 143
    assert latest_checkpoint(run / "checkpoints").name == f"step-{STEPS:08d}"
    assert not (run / "results.json").exists()
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


def test_max_time_stops_at_a_checkpoint_and_resume_is_bit_equal(config_file, reference, tmp_path,
                                                               monkeypatch, capfd):
    """Ten seconds a step on a faked clock and max_time 55 s: after step 5 (50 s), the next step and the
    stop's checkpoint would end past the limit, so the run stops there; exit 75 (try again), resume
    exactly."""
    clock = {"now": 0.0}
    monkeypatch.setattr("tuneforge.stopping.time.monotonic", lambda: clock["now"])
    monkeypatch.setattr("tuneforge.train.time.perf_counter", lambda: clock["now"])
    original = tuneforge.train.optimizer_step

    def step_and_tick(*args, **kwargs):
        clock["now"] += 10.0  # every step takes ten "seconds"
        return original(*args, **kwargs)

    monkeypatch.setattr(tuneforge.train, "optimizer_step", step_and_tick)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run), "train.max_time=55s"]) == 75
    assert "stopped at step 5 (max_time)" in capfd.readouterr().err
    assert latest_checkpoint(run / "checkpoints").name == "step-00000005"
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


def test_a_second_signal_aborts_at_once(config_file, tmp_path):
    """Two SIGTERMs: the process dies of the second at once (no checkpoint); two SIGINTs: exit 130."""
    script = (
        "import os, signal, sys\n"
        "signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a terminal, also under nohup\n"
        "import tuneforge.train as t\n"
        "from tuneforge.cli import main\n"
        "original, taken = t.optimizer_step, []\n"
        "import time, tuneforge.stopping\n"
        "tuneforge.stopping.REPEAT_WINDOW = 0.0  # a second SIGTERM counts at once\n"
        "def step(*a, **k):\n"
        "    taken.append(1)\n"
        "    if len(taken) == 3:\n"
        "        os.kill(os.getpid(), int(sys.argv[1]))\n"
        "        time.sleep(0.05)  # the first is handled before the second arrives\n"
        "        os.kill(os.getpid(), int(sys.argv[1]))\n"
        "        time.sleep(5)\n"
        "    return original(*a, **k)\n"
        "t.optimizer_step = step\n"
        "sys.exit(main(['train', sys.argv[2], '--output', sys.argv[3]]))\n"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for signum, expected in ((signal.SIGTERM, -signal.SIGTERM), (signal.SIGINT, 130)):
        run = tmp_path / signal.Signals(signum).name
        done = subprocess.run([sys.executable, "-c", script, str(int(signum)), str(config_file), str(run)],
                              env=env, capture_output=True, text=True, timeout=300, check=False)
        assert done.returncode == expected, done.stderr[-2000:]
        assert f"second {signal.Signals(signum).name}: aborting now" in done.stderr
        assert latest_checkpoint(run / "checkpoints") is None


def test_a_sigterm_repeated_at_once_is_one_request(config_file, reference, tmp_path, monkeypatch):
    """SLURM signals every process of a job step and torchrun forwards what it gets: a worker may see one
    SIGTERM twice within moments. That is one stop, with its checkpoint, not an abort."""
    original, taken = tuneforge.train.optimizer_step, []

    def step_and_signal_twice(*args, **kwargs):
        taken.append(1)
        if len(taken) == 5:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.05)
            os.kill(os.getpid(), signal.SIGTERM)
        return original(*args, **kwargs)

    monkeypatch.setattr(tuneforge.train, "optimizer_step", step_and_signal_twice)
    run = tmp_path / "run"
    assert main(["train", str(config_file), "--output", str(run)]) == 143
    assert latest_checkpoint(run / "checkpoints").name == "step-00000005"
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


def test_a_stop_right_after_resuming_keeps_the_checkpoint_untouched(config_file, reference, tmp_path,
                                                                  monkeypatch):
    """Stopped at step 5, resumed, and stopped again before any step: the checkpoint it resumed from is
    not rewritten (a kill during a rewrite could lose it)."""
    run = tmp_path / "run"
    signal_at_step(monkeypatch, signal.SIGTERM, 5)
    assert main(["train", str(config_file), "--output", str(run)]) == 143
    monkeypatch.undo()
    checkpoint = latest_checkpoint(run / "checkpoints")
    before = {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in checkpoint.iterdir()}
    original = tuneforge.train.resumed_state

    def resume_and_signal(*args, **kwargs):
        loaded = original(*args, **kwargs)
        os.kill(os.getpid(), signal.SIGTERM)
        return loaded

    monkeypatch.setattr(tuneforge.train, "resumed_state", resume_and_signal)
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 143
    assert {p.name: (p.stat().st_mtime_ns, p.read_bytes()) for p in checkpoint.iterdir()} == before
    monkeypatch.undo()
    assert main(["train", str(config_file), "--output", str(run), "--resume"]) == 0
    assert_same_run(run, reference)


def test_a_stop_in_a_task_sequence_resumes_exactly(tmp_path, tiny_model_dir, monkeypatch):
    """A continual run (one loop per task): SIGTERM in the second task, then --resume, ends with the
    weights and the accuracy matrix of the run never interrupted."""
    import yaml
    from conftest import colour_sequence_tasks

    config = {"model": str(tiny_model_dir), "tasks": colour_sequence_tasks(tmp_path), "retain": None,
              "schedule": {"mode": "sequence"}, "strategies": [{"lora": {"rank": 4, "dropout": 0.1}}],
              "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64, "log_every": 1},
              "evaluation": {"samples": 0}, "output": "unused"}
    path = tmp_path / "sequence.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    reference = tmp_path / "reference"
    assert main(["train", str(path), "--output", str(reference)]) == 0
    run = tmp_path / "run"
    signal_at_step(monkeypatch, signal.SIGTERM, 9)  # the third step of task t1
    assert main(["train", str(path), "--output", str(run)]) == 143
    assert latest_checkpoint(run / "checkpoints" / "t1").name == "step-00000003"
    monkeypatch.undo()
    assert main(["train", str(path), "--output", str(run), "--resume"]) == 0
    for task in ("t0", "t1"):
        expected = load_file(str(latest_checkpoint(reference / "checkpoints" / task) / "weights.safetensors"))
        resumed = load_file(str(latest_checkpoint(run / "checkpoints" / task) / "weights.safetensors"))
        for name in expected:
            torch.testing.assert_close(resumed[name], expected[name], atol=0, rtol=0)
    matrix = [json.loads((r / "results.json").read_text())["continual"]["matrix"] for r in (reference, run)]
    assert matrix[0] == matrix[1]


def test_sigterm_from_outside_stops_a_real_process(config_file, tmp_path):
    """What SLURM or Kubernetes does: SIGTERM to a `tuneforge train` process while it trains."""
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    process = subprocess.Popen([sys.executable, "-m", "tuneforge.cli", "train", str(config_file),
                                "--output", str(run), "train.max_steps=100000"],
                               env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not (run / "metrics.jsonl").is_file() or len((run / "metrics.jsonl").read_text().splitlines()) < 3:
        assert process.poll() is None, process.stderr.read()[-2000:]
        assert time.monotonic() < deadline, "the run did not start training in time"
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    err = process.communicate(timeout=120)[1]
    assert process.returncode == 143, err[-2000:]
    line = next(line for line in err.splitlines() if line.startswith("tuneforge: stopped at step"))
    step = int(line.split()[4])
    assert latest_checkpoint(run / "checkpoints").name == f"step-{step:08d}"
    assert "resume with: tuneforge train" in line and "Traceback" not in err


def test_durations_parse_and_bad_ones_are_config_errors(run_config):
    assert parse_duration("3h30m") == 12600 and parse_duration("90m") == 5400
    assert parse_duration("1d2h") == 93600 and parse_duration("2.5h") == 9000 and parse_duration(45) == 45
    for bad in ("", "soon", "3x", "-1h", "0s"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert run_config(train={"max_time": "1h"}).train.max_time == 3600
    from tuneforge.errors import ConfigError

    with pytest.raises(ConfigError, match="max_time"):
        run_config(train={"max_time": "soon"})


def test_a_stop_request_outside_a_run_changes_nothing():
    with stop_requests() as request:
        assert request.due() is None
    assert StopRequest(max_time=1e9).code() == 0
    assert Stopped(3, "SIGTERM").exit_code == 143 and Stopped(3, "max_time").exit_code == 75
