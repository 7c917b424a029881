"""lm-eval benchmarks before and after training: a local task on a tiny model, checked against the model's
own log-likelihoods; the bundled trivia benchmark; one-line errors for unknown tasks and missing data."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import ANIMALS, COLORS
from tuneforge.benchmarks import TRIVIA_CHOICES, benchmark_change, trivia_documents
from tuneforge.errors import ConfigError, DataError

pytest.importorskip("lm_eval")

CHOICES = COLORS[:3]  # red, green, blue: the training task's colours of cat, dog, bird


def local_task(folder: Path, name: str = "colours", dataset: str | None = None) -> Path:
    """An lm-eval multiple-choice task (YAML + JSON lines) asking the toy task's colours."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [{"question": f"What colour is the {ANIMALS[i]}?", "choices": CHOICES, "label": i}
            for i in range(3)]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in docs * 2))
    task = {
        "task": name, "dataset_path": dataset or "json", "test_split": "test",
        "output_type": "multiple_choice", "doc_to_text": "{{question}} The {{question.split()[-1][:-1]}} is",
        "doc_to_choice": "{{choices}}", "doc_to_target": "label",
        "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}],
        "metadata": {"version": 1.0},
    }
    if dataset is None:
        task["dataset_kwargs"] = {"data_files": {"test": str(data)}}
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task))
    return folder


def choice_accuracy(model, tokenizer, docs: list[dict]) -> float:
    """Accuracy by summed log-likelihood of " choice" after the prompt, as lm-eval's HFLM scores it."""
    correct = 0
    for doc in docs:
        context = f"{doc['question']} The {doc['question'].split()[-1][:-1]} is"
        scores = []
        for choice in doc["choices"]:
            whole = tokenizer(context + " " + choice, add_special_tokens=False)["input_ids"]
            prefix = len(tokenizer(context, add_special_tokens=False)["input_ids"])
            with torch.no_grad():
                logits = model(torch.tensor([whole])).logits[0].log_softmax(-1)
            scores.append(sum(logits[t - 1, whole[t]].item() for t in range(prefix, len(whole))))
        correct += max(range(len(scores)), key=scores.__getitem__) == doc["label"]
    return correct / len(docs)


def test_local_task_before_and_after_training(run_config, tmp_path):
    from tuneforge.models import load_model
    from tuneforge.run import train_run

    tasks = local_task(tmp_path / "tasks")
    config = run_config(train={"max_steps": 8},
                        evaluation={"samples": 0, "benchmarks": [{"task": "colours", "path": str(tasks),
                                                                   "limit": 3}]})
    results = train_run(config)
    before, after = results["before"]["benchmarks"]["colours"], results["after"]["benchmarks"]["colours"]
    assert before["n"] == after["n"] == 3 and before["metric"] == "acc"
    assert before["chance"] == pytest.approx(1 / 3)
    assert results["benchmark_change"]["colours"] == pytest.approx(100 * (after["value"] - before["value"]))
    docs = [json.loads(line) for line in (tasks / "colours.jsonl").read_text().splitlines()[:3]]
    base, tokenizer, _ = load_model(config.model, "causal_lm")
    assert before["value"] == pytest.approx(choice_accuracy(base.eval(), tokenizer, docs))
    saved = json.loads((Path(config.output) / "results.json").read_text())
    assert saved["after"]["benchmarks"]["colours"]["value"] == after["value"]
    report = (Path(config.output) / "report.md").read_text()
    assert "| benchmark colours acc (%) |" in report and "chance 33.3%" in report


def test_unknown_task_and_missing_dataset_are_one_line(run_config, tmp_path):
    from tuneforge.benchmarks import run_benchmarks
    from tuneforge.models import load_model

    model, tokenizer, _ = load_model(run_config().model, "causal_lm")
    tasks = local_task(tmp_path / "tasks", "offline", dataset="someone/not-cached-anywhere")
    config = run_config(evaluation={"benchmarks": [{"task": "nope", "path": str(tasks)}]})
    with pytest.raises(ConfigError, match=r"benchmark 'nope' is not a known task \(no task of that name"):
        run_benchmarks(model, tokenizer, config, 2)
    from tuneforge.run import train_run

    missing = run_config(evaluation={"benchmarks": [{"task": "offline", "path": str(tmp_path / "none")}]})
    with pytest.raises(ConfigError, match=r"benchmark 'offline': path .*none not found"):
        train_run(missing)
    assert not Path(missing.output).exists()  # refused before the model loads or the run directory is made
    config = run_config(evaluation={"benchmarks": [{"task": "offline", "path": str(tasks)}]})
    started = time.perf_counter()
    with pytest.raises(DataError) as info:
        run_benchmarks(model, tokenizer, config, 2)
    message = str(info.value)
    assert "\n" not in message and "benchmark 'offline'" in message and "offline" in message, message
    assert time.perf_counter() - started < 30  # no hub timeout


def test_bundled_trivia_documents():
    docs = trivia_documents()
    assert len(docs) > 150 and docs == trivia_documents()  # seeded: the same benchmark every run
    for doc in docs:
        assert len(doc["choices"]) == len(set(doc["choices"])) == TRIVIA_CHOICES
        assert 0 <= doc["label"] < TRIVIA_CHOICES
    labels = [doc["label"] for doc in docs]
    assert max(labels.count(k) for k in range(TRIVIA_CHOICES)) < 0.35 * len(docs)  # answer positions spread
    sputnik = next(doc for doc in docs if "first artificial Earth satellite" in doc["question"])
    assert sputnik["choices"][sputnik["label"]] == "Sputnik 1"


def test_bundled_trivia_runs_with_chance_level(run_config):
    from tuneforge.benchmarks import run_benchmarks
    from tuneforge.models import load_model

    config = run_config(evaluation={"benchmarks": ["trivia-mc"]})
    config.evaluation.benchmarks[0].limit = 8
    model, tokenizer, _ = load_model(config.model, "causal_lm")
    result = run_benchmarks(model, tokenizer, config, 4)["trivia-mc"]
    assert result["n"] == 8 and result["chance"] == pytest.approx(1 / TRIVIA_CHOICES)
    assert set(result["metrics"]) >= {"acc", "acc_norm"} and 0 <= result["value"] <= 1


def test_benchmark_config_validation(tmp_path):
    from tuneforge.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text("model: m\ndata: {train: t.jsonl}\nevaluation:\n  benchmarks:\n    - mmlu\n"
                    "    - {task: arc_easy, limit: 0}\n")
    with pytest.raises(ConfigError, match=r"c\.yaml:6: evaluation\.benchmarks\.1\.limit"):
        load_config(path)
    path.write_text("model: m\ndata: {train: t.jsonl}\n"
                    "evaluation:\n  benchmarks: [mmlu, {task: x, path: d}]\n")
    config = load_config(path)
    assert [(b.task, b.limit, b.num_fewshot) for b in config.evaluation.benchmarks] == [
        ("mmlu", None, 0), ("x", None, 0)]
    assert config.evaluation.benchmarks[1].path == str(tmp_path / "d")


def test_change_in_points_and_report_rows():
    from tuneforge.compare import row_of
    from tuneforge.report import benchmark_rows

    before = {"mmlu": {"metric": "acc", "value": 0.67}, "arc": {"metric": "acc", "value": 0.5}}
    after = {"mmlu": {"metric": "acc", "value": 0.22, "n": 200, "num_fewshot": 5, "chance": 0.25},
             "arc": {"metric": "acc", "value": 0.55}}
    change = benchmark_change(before, after)
    assert change == pytest.approx({"mmlu": -45.0, "arc": 5.0})
    results = {"before": {"eval": {"loss": 2.0}, "benchmarks": before},
               "after": {"eval": {"loss": 1.0}, "benchmarks": after}, "benchmark_change": change,
               "strategies": [], "trainable_params": 1, "steps": 1, "peak_memory_mb": 1.0,
               "train_seconds": 1.0, "tokens_per_s": 1.0}
    assert benchmark_rows(results)[0] == ("benchmark mmlu acc (%)", "67.0", "22.0", "-45.0 points")
    assert row_of("r", results)["benchmark_change"] == pytest.approx(-20.0)


def test_the_documented_table_is_rendered_from_the_committed_json():
    import sys

    repo = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(repo / "bench"))
    try:
        import benchmark_forgetting
    finally:
        sys.path.remove(str(repo / "bench"))
    report = json.loads((repo / "docs" / "results" / "benchmark_forgetting.json").read_text())
    assert report["runs"] == 1 and report["command"].startswith("tuneforge train examples/benchmarks.yaml")
    assert benchmark_forgetting.render(report) in (repo / "docs" / "evaluation.md").read_text()
