"""End-to-end runs on the bundled real models (slower: marked e2e)."""

from __future__ import annotations

import pytest
import torch

from tuneforge.config import validate_config
from tuneforge.run import train_run

pytestmark = pytest.mark.e2e


def test_lora_on_bundled_smollm2_learns_measures_forgetting_and_loads_in_peft(tmp_path):
    config = validate_config({
        "model": "smollm2-135m",
        "data": {"train": "builtin:chatterbot", "max_train_examples": 64, "max_eval_examples": 16},
        "retain": "builtin:shakespeare",
        "strategies": [{"lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "up_proj"]}}],
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64},
        "evaluation": {"retain_examples": 4, "samples": 1, "max_new_tokens": 8},
        "output": str(tmp_path / "run"),
    })
    results = train_run(config)
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]
    assert {"loss", "perplexity"} <= set(results["forgetting"])
    assert results["before"]["retain"]["perplexity"] > 1
    assert results["after"]["samples"][0]["output"] is not None

    peft = pytest.importorskip("peft")
    from tuneforge.models import load_model

    base, tokenizer, _ = load_model("smollm2-135m")
    inputs = tokenizer(["What is AI?"], return_tensors="pt")
    import tuneforge

    ours = tuneforge.load_adapter(load_model("smollm2-135m")[0], tmp_path / "run" / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "run" / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_bundled_encoder_classifies_bbc_news(tmp_path):
    config = validate_config({
        "model": "minilm-l6",
        "data": {"train": "builtin:bbc-news", "max_train_examples": 320, "max_eval_examples": 100},
        "strategies": [{"full": {}}],
        "train": {"max_steps": 40, "batch_size": 8, "lr": 2e-4, "max_seq_len": 96, "warmup_steps": 4},
        "output": str(tmp_path / "run"),
    })
    results = train_run(config)
    assert results["task_type"] == "classification"
    assert results["before"]["eval"]["accuracy"] < 0.45  # random head: about chance (5 classes)
    assert results["after"]["eval"]["accuracy"] > 0.7
