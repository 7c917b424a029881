"""report_to: W&B (offline) and MLflow (file store) get the run's config, every metrics record with its
loss terms, the results (forgetting included) and the run's files; checked by reading back what they
stored."""

from __future__ import annotations

import glob
import importlib.util
import json
import struct
from pathlib import Path

import pytest

from tuneforge.errors import ConfigError
from tuneforge.trackers import Trackers, flatten

pytest.importorskip("wandb")
pytest.importorskip("mlflow")


def wandb_records(run_dir: Path) -> list:
    """The protobuf records of an offline W&B run: its `.wandb` file is a LevelDB-style log of 32 KiB
    blocks, each record a 7-byte header (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    (path,) = glob.glob(str(run_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    raw, position, chunks, records = Path(path).read_bytes(), 7, b"", []
    while position + 7 <= len(raw):
        room = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", raw[position:position + 7]) if room >= 7 else (0, 0, 0)
        if room < 7 or (length == 0 and kind == 0):
            position += room
            continue
        chunks += raw[position + 7:position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
        elif kind == 2:
            chunks = raw[position - length:position]
    return records


def test_wandb_offline_and_mlflow_file_store_read_back(run_config, retain_file, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from tuneforge.run import train_run

    store = f"file:{tmp_path / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps the file store for opt-in use
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    strategies = [{"lora": {"rank": 4, "targets": "all-linear"}}, {"l2sp": {"weight": 0.1}}]
    config = run_config(strategies=strategies,
                        retain=str(retain_file), report_to=["tensorboard", "wandb", "mlflow"],
                        train={"max_steps": 4, "log_every": 1, "eval_every": 2},
                        evaluation={"samples": 0, "retain_examples": 2})
    results = train_run(config)
    run_dir = Path(config.output)
    train = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in train if "split" not in r]
    assert [r["step"] for r in train] == [1, 2, 3, 4] and all("l2sp" in r for r in train)

    client = MlflowClient(store)
    (run,) = client.search_runs([client.get_experiment_by_name("tuneforge").experiment_id])
    assert run.info.run_name == run_dir.name and run.data.params["train.lr"] == "0.01"
    assert run.data.params["strategies"].startswith("[{'lora'")
    for key in ("loss", "l2sp"):
        logged = client.get_metric_history(run.info.run_id, f"train/{key}")
        history = sorted((m.step, m.value) for m in logged)
        assert history == [(r["step"], pytest.approx(r[key])) for r in train]
    assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/retain_loss")] == [2]
    assert run.data.metrics["results/forgetting.loss"] == pytest.approx(results["forgetting"]["loss"])
    assert run.data.metrics["results/after.retain.loss"] == pytest.approx(results["after"]["retain"]["loss"])
    artifacts = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"results.json", "report.md", "config.yaml"} <= artifacts

    records = wandb_records(run_dir)
    (run_record,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run_record.display_name == run_dir.name
    config_items = {item.key: json.loads(item.value_json) for r in records
                    if r.WhichOneof("record_type") == "config" for item in r.config.update}
    assert config_items["train.lr"] == 0.01 and config_items["data.max_eval_examples"] == 8
    history = [{item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
               for r in records if r.WhichOneof("record_type") == "history"]
    logged = [(h["_step"], h["train/loss"], h["train/l2sp"]) for h in history if "train/loss" in h]
    assert logged == [(r["step"], pytest.approx(r["loss"]), pytest.approx(r["l2sp"])) for r in train]
    final = next(h for h in history if "results/forgetting.loss" in h)
    assert final["results/forgetting.loss"] == pytest.approx(results["forgetting"]["loss"])
    saved = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
    assert {"results.json", "report.md", "config.yaml"} <= saved


def test_missing_tracker_is_one_line(run_config, tmp_path):
    from tuneforge.run import train_run

    if importlib.util.find_spec("aim") is not None:
        pytest.skip("aim is installed here")
    (tmp_path / "c.yaml").write_text("")
    config = run_config(report_to="aim")
    with pytest.raises(ConfigError, match=r"report_to: aim is not installed \(pip install aim==3\.29\.1"):
        train_run(config)
    assert not Path(config.output).exists()  # refused before the run directory is made


def test_steps_keep_increasing_across_tasks():
    class Recorder:
        name = "recorder"

        def __init__(self):
            self.steps = []

        def log(self, values, step):
            self.steps.append(step)

        def finish(self):
            pass

    recorder = Recorder()
    trackers = Trackers([recorder])
    for step in (1, 2, 3, 1, 2, 2):  # a second task restarts its steps; a repeated step is an eval record
        trackers.log({"x": 1.0}, step)
    assert recorder.steps == [1, 2, 3, 4, 5, 5]


def test_flatten_config():
    assert flatten({"train": {"lr": 0.1, "seed": 0}, "strategies": [{"lora": {}}], "retain": None}) == {
        "train.lr": 0.1, "train.seed": 0, "strategies": "[{'lora': {}}]", "retain": None}


def test_tracker_that_cannot_start_is_one_line(tmp_path, monkeypatch):
    from tuneforge.config import validate_config
    from tuneforge.trackers import open_trackers

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'mlruns'}")
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)  # MLflow 3 refuses a file store without it
    config = validate_config({"model": "m", "data": {"train": "x"}, "report_to": "mlflow"})
    with pytest.raises(ConfigError) as info:
        open_trackers(config, tmp_path / "run")
    message = str(info.value)
    assert "\n" not in message and "report_to: mlflow could not start (MlflowException: " in message
    assert message.endswith("(a file: store needs MLFLOW_ALLOW_FILE_STORE=true)")
