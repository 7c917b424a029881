"""`tuneforge compare`: runs side by side, the prompt-only row, fairness, and the report files."""

from __future__ import annotations

import json

import yaml

from tuneforge.cli import main
from tuneforge.formatting import decimals_for, fixed


def write(tmp_path, name, tiny_model_dir, task_file, strategies, **train):
    config = {
        "model": str(tiny_model_dir), "data": {"train": str(task_file), "max_eval_examples": 4},
        "retain": None,
        "strategies": strategies,
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "max_seq_len": 48, **train},
        "evaluation": {"samples": 0}, "output": str(tmp_path / "unused"),
    }
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return str(path)


def test_compare_trains_collects_and_reports(tmp_path, tiny_model_dir, task_file, capsys):
    lora = write(tmp_path, "lora", tiny_model_dir, task_file, [{"lora": {"rank": 2}}])
    full = write(tmp_path, "full", tiny_model_dir, task_file, [{"full": {}}])
    prompt_only = write(tmp_path, "prompt-only", tiny_model_dir, task_file, [], max_steps=0)
    out = tmp_path / "cmp"
    assert main(["compare", lora, full, prompt_only, "--output", str(out), "train.lr=5e-3"]) == 0
    rows = {row["run"]: row for row in json.loads((out / "comparison.json").read_text())["rows"]}
    assert set(rows) == {"lora", "full", "prompt-only"}
    assert rows["prompt-only"]["trainable_params"] == 0 and rows["prompt-only"]["steps"] == 0
    assert rows["prompt-only"]["strategies"] == "none (prompt only)" and rows["lora"]["strategies"] == "lora"
    assert 0 < rows["lora"]["trainable_params"] < rows["full"]["trainable_params"]
    assert rows["full"]["task"] < rows["prompt-only"]["task"]  # training lowered the eval loss
    report = (out / "report.md").read_text()
    assert "Fair comparison" in report and "train.lr=5e-3" in report
    for name in ("report.html", "metric_vs_params.png", "loss_curves.png"):
        assert (out / name).is_file()
    assert "data:image/png;base64," in (out / "report.html").read_text()  # self-contained

    assert "Summary." in report and "learned most" in report

    other_seed = write(tmp_path, "seed1", tiny_model_dir, task_file, [{"lora": {"rank": 2}}], seed=1)
    assert main(["compare", str(out / "runs" / "lora"), other_seed, "--output", str(tmp_path / "cmp2")]) == 0
    assert "`train.seed` differs" in (tmp_path / "cmp2" / "report.md").read_text()


def test_compare_shows_each_sequence_runs_task_matrix(tmp_path, tiny_model_dir, task_file):
    paths = []
    for name, extra in (("naive", []), ("replay", [{"replay": {"buffer_size": 8, "ratio": 0.5}}])):
        config = {
            "model": str(tiny_model_dir), "retain": None, "evaluation": {"samples": 0},
            "output": str(tmp_path / "unused"),
            "tasks": [{"name": t, "data": {"train": str(task_file), "max_eval_examples": 4}}
                      for t in ("first", "second")],
            "schedule": {"mode": "sequence"}, "strategies": [{"lora": {"rank": 2}}, *extra],
            "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "max_seq_len": 48},
        }
        paths.append(tmp_path / f"{name}.yaml")
        paths[-1].write_text(yaml.safe_dump(config))
    out = tmp_path / "cmp"
    assert main(["compare", *map(str, paths), "--output", str(out)]) == 0
    report, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    for name in ("naive", "replay"):
        assert f"## Continual learning: {name}" in report and f"Continual learning: {name}</h2>" in page
        continual = json.loads((out / "runs" / name / "results.json").read_text())["continual"]
        decimals = decimals_for([v for row in [continual["baseline"], *continual["matrix"]] for v in row], 4)
        last_row = continual["matrix"][-1]
        assert "| second | " + " | ".join(fixed(v, decimals) for v in last_row) + " |" in report
        assert json.loads((out / "comparison.json").read_text())["continual"][name] == continual
    assert "BWT" in report and "BWT" in page


def test_compare_trains_every_config_once_per_seed(tmp_path, tiny_model_dir, task_file):
    lora = write(tmp_path, "lora", tiny_model_dir, task_file, [{"lora": {"rank": 2}}], max_steps=2)
    out = tmp_path / "cmp"
    assert main(["compare", lora, "--seeds", "3,5", "--output", str(out)]) == 0
    for seed in (3, 5):
        config = yaml.safe_load((out / "runs" / f"lora-seed{seed}" / "config.yaml").read_text())
        assert config["train"]["seed"] == seed
    (row,) = json.loads((out / "comparison.json").read_text())["rows"]
    assert row["run"] == "lora" and row["seeds"] == [3, 5] and row["spread"]["task"] is not None
    report = (out / "report.md").read_text()
    assert "seeds (3, 5)" in report and "--seeds 3,5" in report and "±" in report
