"""Model cards: every adapter and export carries a README.md in the Hub's format, with the run's numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from tuneforge.formatting import significant
from tuneforge.model_card import card_text, front_matter, write_card


def parsed(path: Path) -> tuple[dict, str]:
    """The front matter (YAML between the first two `---` lines) and the body of a card."""
    text = path.read_text(encoding="utf-8")
    assert text.startswith("---\n")
    head, body = text[4:].split("\n---\n", 1)
    return yaml.safe_load(head), body


@pytest.fixture
def lora_run(run_config, retain_file):
    from tuneforge.run import train_run

    config = run_config(retain=str(retain_file), train={"max_steps": 2},
                        evaluation={"samples": 0, "retain_examples": 4})
    train_run(config)
    return Path(config.output)


def test_adapter_card_states_the_runs_numbers(lora_run):
    results = json.loads((lora_run / "results.json").read_text())
    meta, body = parsed(lora_run / "adapter" / "README.md")
    assert meta["library_name"] == "peft" and meta["pipeline_tag"] == "text-generation"
    assert meta["tags"] == ["tuneforge", "lora"]
    assert "base_model" not in meta  # a local folder naming no Hub model
    metrics = {m["type"]: m["value"] for m in meta["model-index"][0]["results"][0]["metrics"]}
    expected = {f"{split}_{key}_{moment}": value for moment in ("before", "after")
                for split in ("eval", "retain")
                for key, value in results[moment][split].items() if key != "tokens"}
    expected.update({f"forgetting_{key}": value for key, value in results["forgetting"].items()})
    assert metrics == expected and "forgetting_loss" in metrics
    for split in ("eval", "retain"):
        before, after = results["before"][split]["loss"], results["after"][split]["loss"]
        row = f"| {split} | loss | {significant(before, 4)} | {significant(after, 4)} | " \
              f"{significant(after - before, 4, signed=True)} |"
        assert row in body
    assert f"retain set {'rose' if results['forgetting']['loss'] > 0 else 'did not rise'}" in body
    assert significant(results["forgetting"]["loss"], 4, signed=True) in body.split("## Forgetting")[1]
    assert "- `lora`: rank=4" in body and "2 steps, seed 0" in body
    assert f"{results['trainable_params']:,} of {results['total_params']:,} parameters" in body


def test_merged_export_gets_a_card_and_a_users_readme_is_kept(lora_run, tmp_path):
    from tuneforge.cli import main

    assert main(["export", str(lora_run), "--merged", str(tmp_path / "merged")]) == 0
    meta, body = parsed(tmp_path / "merged" / "README.md")
    assert meta["library_name"] == "transformers" and "a merged fine-tune of" in body
    own = tmp_path / "mine"
    own.mkdir()
    (own / "README.md").write_text("my notes\n")
    assert write_card(own, json.loads((lora_run / "results.json").read_text()), {}, "gguf") is None
    assert (own / "README.md").read_text() == "my notes\n"


def test_bundled_base_and_non_peft_adapters_are_named_for_the_hub():
    results = {"model": "smollm2-135m", "strategies": [{"adapter": {"placement": "houlsby"}}],
               "task_type": "causal_lm", "before": {}, "after": {}}
    meta = front_matter(results, {"model": "smollm2-135m"}, "adapter", peft=False)
    assert meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["library_name"] == "tuneforge" and "model-index" not in meta
    text = card_text(results, {"model": "smollm2-135m"}, "adapter", peft=False)
    assert "Not measured (no retain set)." in text and "- `adapter`: placement=houlsby" in text
