"""Data-parallel training: 2 CPU processes (gloo, launched by torchrun) against one process.

One process with batch_size 8 and two processes with batch_size 4 see the same global batches; the loss is
normalised by the global count of label tokens, so both must log the same loss curve (up to float
summation order), and a checkpoint written by the two processes must resume in one.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from tuneforge.checkpoint import latest_checkpoint, list_checkpoints
from tuneforge.config import ScheduleConfig, load_config
from tuneforge.run import train_run
from tuneforge.tasks import mixture_plan

REPO = Path(__file__).resolve().parents[1]
LOSS_TOLERANCE = 1e-4  # measured: < 1e-6 (float summation order differs between 1 and 2 processes)

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


def worker_env() -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "PYTHONPATH": path, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def losses(run_dir: Path) -> dict[tuple[int, str], float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    keys = [(r["step"], r.get("split", "train")) for r in records]
    assert len(keys) == len(set(keys)), "a record was written twice: more than one process writes metrics"
    return {key: r["loss"] for key, r in zip(keys, records, strict=True)}


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "weights.safetensors"))


def test_two_processes_match_one_and_their_checkpoint_resumes_in_one(tmp_path, tiny_model_dir, task_file):
    # LoRA plus gradual unfreezing: layer 2 joins in epoch 1, after DDP wrapped the model
    config = {
        "model": str(tiny_model_dir),
        "data": {"train": str(task_file), "max_eval_examples": 6},
        "retain": None,
        "strategies": [{"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}},
                       {"layerwise": {"train_layers": "2-3", "unfreeze_every_epochs": 1,
                                      "train_head": False}}],
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64, "log_every": 1,
                  "eval_every": 4, "save_every": 4, "keep_checkpoints": 3},
        "evaluation": {"samples": 1, "max_new_tokens": 4},
        "output": "unused",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))

    ddp_dir = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               "-m", "tuneforge.cli", "train", str(path), "--output", str(ddp_dir)]
    done = subprocess.run(command, check=False, env=worker_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("run directory:") == 1  # one summary, printed by the main process only

    single = load_config(path, ["train.batch_size=8"])  # the same global batch in one process
    single.output = str(tmp_path / "single")
    train_run(single)

    one, two = losses(tmp_path / "single"), losses(ddp_dir)
    assert one.keys() == two.keys() and len([k for k in one if k[1] == "eval"]) == 3
    difference = max(abs(one[key] - two[key]) for key in one)
    assert difference < LOSS_TOLERANCE, difference
    assert not [p.name for p in ddp_dir.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")]

    # resume the two-process run in one process from its mid-epoch checkpoint at step 12
    resumed = tmp_path / "resumed"
    shutil.copytree(ddp_dir, resumed)
    for checkpoint in list_checkpoints(resumed / "checkpoints"):
        if checkpoint.name != "step-00000012":
            shutil.rmtree(checkpoint)
    single.output = str(resumed)
    train_run(single, resume=True)
    after = losses(resumed)
    assert max(abs(after[key] - one[key]) for key in one) < LOSS_TOLERANCE
    reference, continued = final_weights(tmp_path / "single"), final_weights(resumed)
    assert reference.keys() == continued.keys()
    for name in reference:
        torch.testing.assert_close(continued[name], reference[name], atol=1e-5, rtol=0)


@settings(max_examples=200, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 40), min_size=1, max_size=3),
    batch_size=st.integers(1, 6),
    world=st.integers(1, 4),
    seed=st.integers(0, 10),
    epoch=st.integers(0, 3),
    sampling=st.sampled_from(["proportional", "temperature", "round_robin"]),
)
def test_every_process_gets_the_same_number_of_micro_batches(sizes, batch_size, world, seed, epoch, sampling):
    plan = mixture_plan(sizes, batch_size, ScheduleConfig(sampling=sampling), seed, grad_accum=2)
    shards = [plan(epoch, rank, world) for rank in range(world)]
    # otherwise one process waits forever in a collective
    assert len({tuple(len(step) for step in shard) for shard in shards}) == 1
    assert all(batch for shard in shards for step in shard for batch in step)  # no empty micro-batch anywhere
    if sampling == "proportional" and len(sizes) == 1:  # the processes split exactly one process's batches
        one_process = mixture_plan(sizes, batch_size * world, ScheduleConfig(sampling=sampling), seed, 2)
        whole = one_process(epoch, 0, 1)
        kept = [[batch for batch in step if len(batch) >= world] for step in whole]
        kept = [batch for step in kept for batch in step]
        mine = [[batch for step in shard for batch in step] for shard in shards]
        assert ([sorted(i for shard in mine for i in shard[b]) for b in range(len(kept))]
                == [sorted(b) for b in kept])


ACCELERATE_CONFIGS = sorted((REPO / "examples" / "accelerate").glob("*.yaml"))


@pytest.mark.parametrize("path", ACCELERATE_CONFIGS, ids=[p.stem for p in ACCELERATE_CONFIGS])
def test_shipped_accelerate_configs_load(path):
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(str(path))
    assert config.num_processes >= 2 and config.mixed_precision == "no"  # tuneforge applies train.precision


@pytest.mark.parametrize("variable", ["ACCELERATE_USE_FSDP", "ACCELERATE_USE_DEEPSPEED"])
def test_sharded_launches_are_refused_before_anything_is_written(tmp_path, tiny_model_dir, task_file,
                                                                 monkeypatch, variable, capsys):
    from tuneforge.cli import main

    monkeypatch.setenv(variable, "true")  # what `accelerate launch --use_fsdp / --use_deepspeed` sets
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "data": {"train": str(task_file)},
                                    "retain": None, "output": str(tmp_path / "run")}))
    assert main(["train", str(path)]) == 2
    err = capsys.readouterr().err
    engine = "fsdp" if variable == "ACCELERATE_USE_FSDP" else "deepspeed"
    assert f"distributed: {{engine: {engine}}}" in err and "docs/distributed.md" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "run").exists()


def test_a_signal_to_one_process_stops_every_process_at_the_same_step(tmp_path, tiny_model_dir, task_file):
    """SIGTERM reaches rank 1 only, during step 3: both processes stop together at a checkpoint (step 4:
    under several processes the flag rides on the next step's collective), and it resumes in one."""
    config = {
        "model": str(tiny_model_dir), "data": {"train": str(task_file), "max_eval_examples": 4},
        "retain": None, "strategies": [{"lora": {"rank": 4}}],
        "train": {"max_steps": 10, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64, "log_every": 1},
        "evaluation": {"samples": 0}, "output": "unused",
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    wrapper = tmp_path / "signal_rank1.py"
    wrapper.write_text(
        "import os, signal, sys\n"
        "import tuneforge.train as train\n"
        "from tuneforge.cli import main\n"
        "original, taken = train.optimizer_step, []\n"
        "def step(*args, **kwargs):\n"
        "    taken.append(1)\n"
        "    if len(taken) == 3 and os.environ['RANK'] == '1':\n"
        "        os.kill(os.getpid(), signal.SIGTERM)\n"
        "    return original(*args, **kwargs)\n"
        "train.optimizer_step = step\n"
        "sys.exit(main(sys.argv[1:]))\n")
    run = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(wrapper), "train", str(path), "--output", str(run)]
    done = subprocess.run(command, check=False, env=worker_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode != 0  # the workers exited 143
    assert done.stderr.count("tuneforge: stopped at step 4 (SIGTERM); resume with:") == 1, done.stderr[-3000:]
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-00000004"]
    assert latest_checkpoint(run / "checkpoints") is not None  # whole: it verifies
    single = load_config(path, ["train.batch_size=8"])
    single.output = str(run)
    train_run(single, resume=True)
    assert json.loads((run / "results.json").read_text())["steps"] == 10
