"""Every shipped example config validates against the real bundled data, and runs a few steps when its
model is swapped for a tiny one of the same family (decoder or encoder)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from tuneforge.compose import build_strategies
from tuneforge.config import load_config, validate_config
from tuneforge.run import train_run, validate_run

ROOT = Path(__file__).parent.parent / "examples"
# accelerate: launcher files
EXAMPLES = sorted(p for p in ROOT.rglob("*.yaml") if p.parent.name != "accelerate")
IDS = [str(p.relative_to(ROOT).with_suffix("")) for p in EXAMPLES]
# distributed: sharded engines, run on 2 processes by tests/test_sharded.py
SINGLE_PROCESS = [p for p in EXAMPLES if p.parent.name != "distributed"]


@pytest.mark.parametrize("path", EXAMPLES, ids=IDS)
def test_example_config_validates(path):
    config = load_config(path)
    summary = validate_run(config)
    assert summary["train_examples"] > 0
    assert [s.name for s in build_strategies(config.strategies)] == [s.name for s in config.strategies]


@pytest.fixture(scope="module")
def tiny_deep_llama_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama with 8 layers, so layer specs such as `top:6` mean what they say."""
    from tests.conftest import tiny_llama

    directory = tmp_path_factory.mktemp("tiny-deep-llama")
    model = tiny_llama(vocab_size=len(tokenizer), layers=8)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def shrunk(raw: dict, decoder: Path, encoder: Path, output: Path) -> dict:
    """The example with a tiny model of its family, 2 steps of batch 2, few eval items."""
    model = encoder if raw["model"] == "minilm-l6" else decoder
    raw = {**raw, "model": str(model), "output": str(output)}
    train = {k: v for k, v in raw.get("train", {}).items() if k not in ("epochs", "eval_every")}
    raw["train"] = {**train, "max_steps": min(train.get("max_steps", 2), 2), "batch_size": 2,
                    "max_seq_len": 128, "warmup_steps": 0}
    raw["evaluation"] = {**raw.get("evaluation", {}), "samples": 0, "retain_examples": 2}
    if "benchmarks" in raw["evaluation"]:  # lm-eval runs, on a few documents
        raw["evaluation"]["benchmarks"] = [{**b, "limit": 4} for b in raw["evaluation"]["benchmarks"]]
    small = {"max_eval_examples": 4}
    if model == decoder:  # classification keeps its training data: a subset could miss a label the eval has
        small["max_train_examples"] = 64
    if "data" in raw:
        raw["data"] = {**raw["data"], **small}
    if "tasks" in raw:
        raw["tasks"] = [{**task, "data": {**task["data"], **small}} for task in raw["tasks"]]
    strategies = []
    for spec in raw.get("strategies") or []:
        (name, options), = spec.items()
        if name == "distill" and options.get("teacher") not in (None, "base"):
            # a fine-tuned teacher folder: the tiny original stands in
            options = {**options, "teacher": "base"}
        if name == "ewc":
            options = {**options, "fisher_samples": 2}
        strategies.append({name: options})
    raw["strategies"] = strategies
    return raw


@pytest.mark.parametrize("path", SINGLE_PROCESS, ids=[i for p, i in zip(EXAMPLES, IDS, strict=True)
                                                     if p in SINGLE_PROCESS])
def test_example_runs_on_a_tiny_model(path, tmp_path, tiny_deep_llama_dir, tiny_bert_dir):
    raw = yaml.safe_load(path.read_text())
    config = validate_config(shrunk(raw, tiny_deep_llama_dir, tiny_bert_dir, tmp_path / "run"),
                             source=str(path))
    results = train_run(config)
    tasks_in_turn = len(config.tasks or []) if config.schedule.mode == "sequence" else 1
    assert results["steps"] == config.train.max_steps * tasks_in_turn
    assert (tmp_path / "run" / "results.json").is_file() and (tmp_path / "run" / "report.md").is_file()
