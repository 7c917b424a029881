"""Crash safety under SIGKILL: killed runs resume to exactly the weights of an uninterrupted run, and a
killed checkpoint write never leaves a checkpoint that verifies but is not whole.

Run as a script, this file is the harness: it imports tuneforge once and forks one process per training
attempt (`tuneforge.cli.main(["train", ...])`, exactly what `python -m tuneforge.cli train` runs), so every
kill point costs milliseconds rather than an interpreter start. The parent kills each child with SIGKILL
at a seeded random point, checks the checkpoints on disk, and writes a JSON report the tests read.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SEED = 7
TRAIN_KILLS = 3  # kill points during training (the brief: a few, to keep the test well under a minute)
WRITE_KILLS = 20  # kill points while checkpoints are being written back to back
MAX_STEPS = 20


# ---------------------------------------------------------------------------------------------------
# The harness (runs in its own process: `python tests/test_reliability_kill.py WORKDIR CONFIG`)


def _fork(function, *args) -> int:
    pid = os.fork()
    if pid == 0:  # the child: never return into the parent's code
        code = 1
        try:
            code = function(*args)
        finally:
            os._exit(code if isinstance(code, int) else 0)
    return pid


def _train(config: str, output: str, resume: bool, *overrides: str) -> int:
    from tuneforge.cli import main

    log = open(f"{output}.log", "a")  # noqa: SIM115 - the child is killed or exits without cleanup
    os.dup2(log.fileno(), 1)
    os.dup2(log.fileno(), 2)
    return main(["train", config, *overrides, "--output", output, *(["--resume"] if resume else [])])


def _last_step(metrics: Path) -> int:
    try:
        lines = metrics.read_text().splitlines()
    except OSError:
        return 0
    steps = []
    for line in lines:
        try:
            steps.append(json.loads(line)["step"])
        except (ValueError, KeyError):
            pass  # a line being written right now
    return max(steps, default=0)


def _checkpoints_sound(root: Path, expected_weights) -> dict:
    """Every checkpoint that verifies must load whole and hold its own step's weights, which
    `expected_weights(step)` gives (None: nothing to compare with)."""
    from safetensors.torch import load_file

    from tuneforge.checkpoint import latest_checkpoint, list_checkpoints, verify_checkpoint

    verified = [path for path in list_checkpoints(root) if verify_checkpoint(path)]
    compared = []
    for path in verified:
        step = int(path.name.split("-")[1])
        weights = load_file(str(path / "weights.safetensors"))
        load_file(str(path / "optimizer.safetensors"))
        assert json.loads((path / "state.json").read_text())["step"] == step
        expected = expected_weights(step)
        if expected is not None:
            assert weights.keys() == expected.keys(), path
            assert all(bool((weights[name] == expected[name]).all()) for name in weights), path
            compared.append(step)
    leftovers = [p.name for p in root.iterdir() if p.name.endswith(".tmp")] if root.is_dir() else []
    latest = latest_checkpoint(root)
    return {"verified": len(verified), "compared": compared, "partial_write_left": bool(leftovers),
            "latest": latest and latest.name}


def kill_training(workdir: Path, config: str, rng: random.Random) -> dict:
    """Train to the end uninterrupted; then again, killed at `TRAIN_KILLS` random points and resumed."""
    from safetensors.torch import load_file

    # the uninterrupted run keeps every checkpoint: each checkpoint of the killed run is compared with it
    keep_all = f"train.keep_checkpoints={MAX_STEPS}"
    reference = _fork(_train, config, str(workdir / "reference"), False, keep_all)
    _, status = os.waitpid(reference, 0)
    assert os.waitstatus_to_exitcode(status) == 0, "the uninterrupted run failed"

    def reference_weights(step: int) -> dict:
        return load_file(str(workdir / "reference" / "checkpoints" / f"step-{step:08d}"
                             / "weights.safetensors"))

    run = workdir / "killed"
    targets = sorted(rng.sample(range(2, MAX_STEPS - 1), TRAIN_KILLS))
    kills = []
    for index, target in enumerate(targets):
        mid_write = index == 1  # one kill waits for a checkpoint write to be under way
        pid = _fork(_train, config, str(run), index > 0)
        deadline = time.monotonic() + 120
        while _last_step(run / "metrics.jsonl") < target:
            assert os.waitpid(pid, os.WNOHANG) == (0, 0), f"run ended before step {target}"
            assert time.monotonic() < deadline, "run too slow"
            time.sleep(0.001)
        if mid_write:
            while not any(p.name.endswith(".tmp") for p in (run / "checkpoints").iterdir()):
                assert os.waitpid(pid, os.WNOHANG) == (0, 0), "run ended before a checkpoint write was caught"
                time.sleep(0.0002)
        else:
            time.sleep(rng.uniform(0.0, 0.03))  # somewhere in the next step or its checkpoint write
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        kills.append({"after_step": _last_step(run / "metrics.jsonl"), "aimed_mid_write": mid_write,
                      **_checkpoints_sound(run / "checkpoints", reference_weights)})
    final = _fork(_train, config, str(run), True)
    _, status = os.waitpid(final, 0)
    return {"kills": kills, "final_exit": os.waitstatus_to_exitcode(status)}


def _write_forever(root: Path, start: int, started: int) -> int:
    """Checkpoint a small model again and again; each checkpoint's weights equal its step number (the
    bias: minus it)."""
    import torch

    from tuneforge.checkpoint import save_checkpoint

    model = torch.nn.Linear(256, 1024)  # 1 MiB of weights, 2 MiB of AdamW state: each write takes a while
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(2, 256)).sum().backward()
    optimizer.step()
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    os.write(started, b"1")  # tell the parent: writing starts now
    step = start
    while True:
        step += 1
        with torch.no_grad():
            model.weight.fill_(float(step))
            model.bias.fill_(-float(step))
        save_checkpoint(root, step, model, optimizer, scheduler, [], {"step": step}, keep=2)


def kill_writes(workdir: Path, rng: random.Random) -> dict:
    """SIGKILL a process that does nothing but write checkpoints, `WRITE_KILLS` times."""
    import torch

    from tuneforge.checkpoint import latest_checkpoint

    def own_step(step: int) -> dict:  # what `_write_forever` writes into checkpoint N
        return {"weight": torch.full((1024, 256), float(step)), "bias": torch.full((1024,), -float(step))}

    root = workdir / "writes"
    step, reports = 0, []
    for _ in range(WRITE_KILLS):
        started, tell = os.pipe()
        pid = _fork(_write_forever, root, step, tell)
        os.close(tell)
        assert os.read(started, 1) == b"1", "the writer died before writing"  # however loaded the machine
        os.close(started)
        time.sleep(rng.uniform(0.02, 0.25))
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        reports.append(_checkpoints_sound(root, own_step))
        latest = latest_checkpoint(root)
        if latest is not None:
            step = int(latest.name.split("-")[1])  # the next writer goes on from there, as a resume would
    return {"kills": reports}


def harness(workdir: Path, config: str) -> None:
    # import once here, so that the forked runs start in milliseconds
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot
    import torch
    import torch.utils.tensorboard
    import transformers.models.llama.modeling_llama  # noqa: F401 - the tiny model

    import tuneforge.cli
    import tuneforge.export
    import tuneforge.run
    import tuneforge.train  # noqa: F401

    torch.set_num_threads(1)
    rng = random.Random(SEED)
    report = {"training": kill_training(workdir, config, rng), "writes": kill_writes(workdir, rng)}
    (workdir / "report.json").write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    harness(Path(sys.argv[1]), sys.argv[2])
    sys.exit(0)


# ---------------------------------------------------------------------------------------------------
# The tests

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.checkpoint import latest_checkpoint, list_checkpoints


@pytest.fixture(scope="module")
def killed(tmp_path_factory, tiny_model_dir, task_file) -> tuple[Path, dict]:
    workdir = tmp_path_factory.mktemp("kill")
    config = {
        "model": str(tiny_model_dir),
        "data": {"train": str(task_file), "max_eval_examples": 4},
        "retain": None,
        "strategies": [{"lora": {"rank": 4, "targets": "all-linear", "dropout": 0.1}}],  # dropout: RNG state
        "train": {"max_steps": MAX_STEPS, "batch_size": 4, "grad_accum": 2, "lr": 1e-2, "max_seq_len": 64,
                  "schedule": "cosine", "warmup_steps": 2, "log_every": 1, "eval_every": 5, "save_every": 1},
        "evaluation": {"samples": 1, "max_new_tokens": 4},
        "output": "unused",
    }
    path = workdir / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    python_path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": python_path,
           "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    done = subprocess.run([sys.executable, __file__, str(workdir), str(path)], check=False, env=env,
                          cwd=workdir, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return workdir, json.loads((workdir / "report.json").read_text())


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks")
def test_killed_and_resumed_run_ends_with_the_uninterrupted_weights(killed):
    workdir, report = killed
    training = report["training"]
    assert len(training["kills"]) == TRAIN_KILLS and training["final_exit"] == 0
    for kill in training["kills"]:  # after each kill, every checkpoint that verified held the weights
        assert kill["latest"] is not None and kill["verified"] >= 1  # of the uninterrupted run's same step
        assert len(kill["compared"]) == kill["verified"]
    for path in list_checkpoints(workdir / "killed" / "checkpoints"):  # and so do those at the end
        resumed = load_file(str(path / "weights.safetensors"))
        reference = load_file(str(workdir / "reference" / "checkpoints" / path.name / "weights.safetensors"))
        assert reference.keys() == resumed.keys()
        for name in reference:
            torch.testing.assert_close(resumed[name], reference[name], atol=0, rtol=0)
    assert latest_checkpoint(workdir / "killed" / "checkpoints").name == f"step-{MAX_STEPS:08d}"

    def curve(run: str) -> list[tuple]:
        lines = (workdir / run / "metrics.jsonl").read_text().splitlines()
        return [(r["step"], r.get("split"), r["loss"]) for r in map(json.loads, lines)]

    assert curve("killed") == curve("reference")  # every step logged once, with the same loss
    assert json.loads((workdir / "killed" / "results.json").read_text())["steps"] == MAX_STEPS


@pytest.mark.skipif(not hasattr(os, "fork"), reason="the harness forks")
def test_killed_checkpoint_writes_never_leave_a_valid_looking_damaged_checkpoint(killed):
    _, report = killed
    kills = report["writes"]["kills"]
    assert len(kills) == WRITE_KILLS
    assert all(kill["latest"] is not None for kill in kills[1:])  # sound checks ran in the harness
    # every checkpoint that verified held its own step's weights (compared in the harness)
    assert all(len(kill["compared"]) == kill["verified"] for kill in kills)
    # some kills land inside writes: the .tmp directory each left was ignored
    assert sum(kill["partial_write_left"] for kill in kills) >= 3
