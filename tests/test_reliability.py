"""Guards and security: refused hyperparameters, NaN stops, output directory rules, nothing unpickled or
executed, nothing written outside the run directory."""

from __future__ import annotations

import ast
import contextlib
import hashlib
import io
import json
import math
import re
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tuneforge.checkpoint import REQUIRED_FILES, latest_checkpoint, list_checkpoints, verify_checkpoint
from tuneforge.cli import main
from tuneforge.errors import ConfigError, ModelError
from tuneforge.metrics import MetricsLogger, read_metrics

PACKAGE = Path(__file__).resolve().parents[1] / "tuneforge"


def write_config(directory: Path, model: Path, data: Path | str, **sections) -> Path:
    config = {
        "model": str(model),
        "data": {"train": str(data), "max_eval_examples": 4},
        "retain": None,
        "strategies": [{"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}],
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64},
        "evaluation": {"samples": 0},
        "output": str(directory / "run"),
        **sections,
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def cli(*argv) -> tuple[int, str]:
    """Run the CLI in-process; returns (exit code, stderr), checking an error is one line."""
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main([str(a) for a in argv])
    err = stderr.getvalue()
    if code == 2:  # progress bars may come first, each closed with a newline; the error is the last line
        last = err.rstrip("\n").split("\n")[-1]
        assert last.startswith("tuneforge: error: ") and err.count("tuneforge: error") == 1, err
        assert err.endswith("\n") and "Traceback" not in err, err
        err = last
    return code, err


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------------
# Guards


@pytest.mark.parametrize("override, field", [
    ("train.lr=-1", "train.lr"),
    ("train.lr=.inf", "train.lr"),
    ("train.lr=.nan", "train.lr"),
    ("train.batch_size=0", "train.batch_size"),
    ("train.epochs=0", "train.epochs"),
    ("train.warmup_steps=-1", "train.warmup_steps"),
    ("train.max_grad_norm=0", "train.max_grad_norm"),
    ("train.max_seq_len=4", "train.max_seq_len"),
    ("strategies=[{lora: {rank: 0}}]", "strategies.0.lora.rank"),
    ("strategies=[{lora: {rank: 4, dropout: 1.5}}]", "strategies.0.lora.dropout"),
])
def test_out_of_range_hyperparameters_are_refused_at_validate(tmp_path, tiny_model_dir, task_file, override,
                                                              field):
    code, err = cli("validate", write_config(tmp_path, tiny_model_dir, task_file), override)
    assert code == 2 and field in err


def test_max_seq_len_above_the_model_limit(tmp_path, tiny_model_dir, task_file):
    path = write_config(tmp_path, tiny_model_dir, task_file)  # the tiny model has 256 positions
    code, err = cli("validate", path, "train.max_seq_len=512")
    assert code == 2 and "(override train.max_seq_len)" in err and "limit of 256" in err
    text = path.read_text().replace("max_seq_len: 64", "max_seq_len: 300")
    path.write_text(text)
    line = text.splitlines().index("  max_seq_len: 300") + 1
    code, err = cli("validate", path)
    assert code == 2 and f"{path}:{line}: train.max_seq_len: 300" in err
    code, err = cli("train", path)  # refused at train time too, before any work is done
    assert code == 2 and "limit of 256" in err and not (tmp_path / "run" / "checkpoints").exists()
    assert cli("validate", path, "train.max_seq_len=256")[0] == 0
    # a run that stopped before doing any work is no run to protect: the corrected config just trains
    assert cli("train", path, "train.max_seq_len=64", "train.max_steps=1")[0] == 0


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, tiny_model_dir, task_file):
    path = write_config(tmp_path, tiny_model_dir, task_file, strategies=[{"full": {}}],
                        train={"max_steps": 8, "batch_size": 4, "lr": 1e30, "max_grad_norm": None,
                               "save_every": 1, "keep_checkpoints": 3, "log_every": 1})
    code, err = cli("train", path)
    assert code == 2
    step = int(re.search(r"loss became (?:nan|inf|-inf) at step (\d+)", err).group(1))
    root = tmp_path / "run" / "checkpoints"
    latest = latest_checkpoint(root)
    assert latest is not None and f"last good checkpoint: {latest}" in err
    assert latest.name == f"step-{step - 1:08d}" and all(verify_checkpoint(p) for p in list_checkpoints(root))
    assert all(torch.isfinite(t).all() for t in load_file(str(latest / "weights.safetensors")).values())
    logged = [r["step"] for r in read_metrics(tmp_path / "run" / "metrics.jsonl")]
    assert logged == list(range(1, step)) and all(math.isfinite(r["loss"])
                                                  for r in read_metrics(tmp_path / "run" / "metrics.jsonl"))


def test_output_directory_is_checked_writable_before_the_model_loads(tmp_path, tiny_model_dir, task_file,
                                                                     monkeypatch):
    import tuneforge.run

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the output directory was checked")

    monkeypatch.setattr(tuneforge.run, "build_model", no_model)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    path = write_config(tmp_path, tiny_model_dir, task_file, output=str(blocker / "run"))
    code, err = cli("train", path)
    assert code == 2 and "output directory is not writable" in err and str(blocker / "run") in err


def test_a_run_is_never_overwritten_unless_asked(tmp_path, tiny_model_dir, task_file):
    path = write_config(tmp_path, tiny_model_dir, task_file,
                        train={"max_steps": 1, "batch_size": 4, "max_seq_len": 64})
    assert cli("train", path)[0] == 0
    before = digest(tmp_path / "run")
    code, err = cli("train", path)
    assert code == 2 and "a run already exists there" in err and "--overwrite" in err
    assert digest(tmp_path / "run") == before

    stranger = tmp_path / "stranger"  # a directory with someone else's files is not a run to write into
    stranger.mkdir()
    (stranger / "report.md").write_text("my own notes")
    code, err = cli("train", path, "--output", stranger)
    assert code == 2 and "not empty and holds no run" in err
    assert (stranger / "report.md").read_text() == "my own notes"

    assert cli("train", path, "--overwrite")[0] == 0
    after = digest(tmp_path / "run")
    assert {k for k in after if "tfevents" not in k} == {k for k in before if "tfevents" not in k}


@pytest.mark.parametrize("where", ["home", "root", "holds-data"])
def test_output_in_a_protected_place_is_refused(tmp_path, tiny_model_dir, task_file, where):
    output = {"home": str(Path.home()), "root": "/", "holds-data": str(task_file.parent)}[where]
    code, err = cli("train", write_config(tmp_path, tiny_model_dir, task_file, output=output))
    assert code == 2 and "output:" in err and "directory of its own" in err


def test_torn_metrics_line_from_a_kill_is_dropped_on_resume(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1, "loss": 2.0}\n{"step": 2, "loss": 1.5}\n{"step": 3, "lo')
    assert [r["step"] for r in read_metrics(path)] == [1, 2]
    logger = MetricsLogger(tmp_path, tensorboard=False)
    logger.truncate_after(2)
    logger.log({"step": 3, "loss": 1.0})
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]


def test_a_manifest_must_list_every_file_and_only_files_inside(run_config):
    from tuneforge.run import train_run

    config = run_config(train={"max_steps": 1})
    train_run(config)
    checkpoint = latest_checkpoint(Path(config.output) / "checkpoints")
    manifest = json.loads((checkpoint / "manifest.json").read_text())
    assert set(REQUIRED_FILES) <= set(manifest) and verify_checkpoint(checkpoint)
    for edit in ({k: v for k, v in manifest.items() if k != "weights.safetensors"},
                 {**manifest, "../../etc/hostname": "0" * 64}, ["not", "a", "mapping"]):
        (checkpoint / "manifest.json").write_text(json.dumps(edit))
        assert not verify_checkpoint(checkpoint)


# ---------------------------------------------------------------------------------------------------
# Security


def calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node, ast.unparse(node.func)


def test_source_never_unpickles_evaluates_or_trusts_remote_code():
    problems = []
    for path in sorted(PACKAGE.rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [alias.name for alias in node.names] + [getattr(node, "module", None) or ""]
                if any(name.split(".")[0] in ("pickle", "dill", "marshal", "shelve", "cloudpickle")
                       for name in names):
                    problems.append(f"{path.name}:{node.lineno}: imports a pickle-like module")
        for node, name in calls(tree):
            keywords = {k.arg: k.value for k in node.keywords}
            if name in ("eval", "exec", "compile", "__import__", "os.system", "torch.save", "yaml.load",
                        "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"):
                problems.append(f"{path.name}:{node.lineno}: calls {name}")
            if name == "torch.load" and not (isinstance(keywords.get("weights_only"), ast.Constant)
                                             and keywords["weights_only"].value is True):
                problems.append(f"{path.name}:{node.lineno}: torch.load without weights_only=True")
            remote = keywords.get("trust_remote_code")
            if isinstance(remote, ast.Constant) and remote.value is True:
                problems.append(f"{path.name}:{node.lineno}: trust_remote_code=True")
            if name.endswith("save_pretrained"):
                safe = keywords.get("safe_serialization")
                if isinstance(safe, ast.Constant) and safe.value is False:
                    problems.append(f"{path.name}:{node.lineno}: save_pretrained without safetensors")
    assert problems == []


def test_model_folders_asking_to_run_their_own_code_are_refused(tmp_path, tiny_model_dir):
    from tuneforge.config import RunConfig
    from tuneforge.models import load_model

    assert RunConfig.model_fields["trust_remote_code"].default is False
    folder = tmp_path / "custom"
    shutil.copytree(tiny_model_dir, folder)
    marker = tmp_path / "code-ran"
    config = json.loads((folder / "config.json").read_text())
    config.update(model_type="custom-arch", architectures=["CustomForCausalLM"],
                  auto_map={"AutoConfig": "custom.CustomConfig",
                            "AutoModelForCausalLM": "custom.CustomForCausalLM"})
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    with pytest.raises(ModelError) as caught:
        load_model(str(folder))
    assert "\n" not in str(caught.value) and str(folder) in str(caught.value)
    assert not marker.exists()


def test_paths_resolve_from_the_config_and_nothing_is_written_outside_the_run(tmp_path, tiny_model_dir,
                                                                             task_file, monkeypatch):
    inputs, work = tmp_path / "inputs", tmp_path / "work"
    (inputs / "data").mkdir(parents=True)
    work.mkdir()
    shutil.copy(task_file, inputs / "data" / "train.jsonl")
    shutil.copytree(tiny_model_dir, tmp_path / "model")
    config = {"model": "../model", "data": {"train": "data/train.jsonl", "max_eval_examples": 4},
              "retain": None,
              "strategies": [{"lora": {"rank": 2, "targets": ["q_proj"]}}],
              "train": {"max_steps": 2, "batch_size": 4, "max_seq_len": 64, "save_every": 1},
              "evaluation": {"samples": 1, "max_new_tokens": 2}, "output": "runs/relative"}
    (inputs / "config.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.chdir(work)  # data and model resolve from the config's folder; output from here
    before = digest(tmp_path)
    assert cli("train", inputs / "config.yaml")[0] == 0
    after = digest(tmp_path)
    changed = {name for name in after if before.get(name) != after[name]} | (before.keys() - after.keys())
    assert changed and all(name.startswith("work/runs/relative/") for name in changed), sorted(changed)
    assert (work / "runs" / "relative" / "adapter" / "adapter_model.safetensors").is_file()


def test_config_values_are_data_not_code(tmp_path, tiny_model_dir, task_file):
    from tuneforge.config import load_config

    marker = tmp_path / "pwned"
    path = write_config(tmp_path, tiny_model_dir, task_file)
    path.write_text(path.read_text() + f"extra: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    code, err = cli("validate", write_config(tmp_path, tiny_model_dir, task_file),
                    "train.lr=__import__('os')")
    assert code == 2 and "train.lr" in err
    assert not marker.exists()
