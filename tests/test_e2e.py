"""End-to-end runs on the bundled real models (slower: marked e2e)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tuneforge.config import validate_config
from tuneforge.run import train_run

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def smollm2_lora_run(tmp_path_factory) -> tuple[Path, dict]:
    """A LoRA run on the bundled SmolLM2 (4 steps), shared by the tests that check what it left behind."""
    run = tmp_path_factory.mktemp("smollm2") / "run"
    config = validate_config({
        "model": "smollm2-135m",
        "data": {"train": "builtin:chatterbot", "max_train_examples": 64, "max_eval_examples": 16},
        "retain": "builtin:shakespeare",
        "strategies": [{"lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj", "up_proj"]}}],
        "train": {"max_steps": 4, "batch_size": 4, "lr": 1e-3, "max_seq_len": 64},
        "evaluation": {"retain_examples": 4, "samples": 1, "max_new_tokens": 8},
        "output": str(run),
    })
    return run, train_run(config)


def test_lora_on_bundled_smollm2_learns_measures_forgetting_and_loads_in_peft(smollm2_lora_run):
    run, results = smollm2_lora_run
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]
    assert {"loss", "perplexity"} <= set(results["forgetting"])
    assert results["before"]["retain"]["perplexity"] > 1
    assert results["after"]["samples"][0]["output"] is not None

    peft = pytest.importorskip("peft")
    from tuneforge.models import load_model

    base, tokenizer, _ = load_model("smollm2-135m")
    inputs = tokenizer(["What is AI?"], return_tensors="pt")
    import tuneforge

    ours = tuneforge.load_adapter(load_model("smollm2-135m")[0], run / "adapter").eval()
    theirs = peft.PeftModel.from_pretrained(base, run / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**inputs).logits, ours(**inputs).logits, atol=1e-4, rtol=1e-4)


def test_smollm2_exported_to_gguf_by_the_readme_example_reloads_with_its_logits(smollm2_lora_run, tmp_path):
    """The README's `tuneforge export RUN --gguf ...` line, run as written (paths moved into tmp_path)."""
    import shlex

    from transformers import AutoModelForCausalLM

    import tuneforge
    from tuneforge.cli import main
    from tuneforge.models import load_model

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    lines = readme.splitlines()
    line = next(text for text in lines if text.startswith("tuneforge export") and "--gguf" in text)
    words = shlex.split(line.split("#")[0])
    out = tmp_path / Path(words[words.index("--gguf") + 1]).name
    words[2], words[words.index("--gguf") + 1] = str(smollm2_lora_run[0]), str(out)
    assert main(words[1:]) == 0
    quant = words[words.index("--quant") + 1] if "--quant" in words else "f32"
    assert (tmp_path / "Modelfile").read_text().startswith(f"FROM ./{out.name}")
    base, tokenizer, _ = load_model("smollm2-135m")
    tuned = tuneforge.load_adapter(base, smollm2_lora_run[0] / "adapter").eval()
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "What is AI?"}], tokenize=False,
                                         add_generation_prompt=True)
    inputs = tokenizer([chat], return_tensors="pt", add_special_tokens=False)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=out.name, dtype=torch.float32).eval()
    with torch.no_grad():
        expected, got = tuned(**inputs).logits[0], reloaded(**inputs).logits[0]
    # (max, mean) |logit difference|: about twice what docs/export.md measured on a tuned SmolLM2 (largest
    # |logit| 39): f16 0.031/0.0046, bf16 0.41/0.052, q8_0 1.5/0.20, q4_1 5.8/0.76
    bounds = {"f32": (1e-3, 1e-4), "f16": (0.1, 0.01), "bf16": (1.0, 0.15), "q8_0": (3.0, 0.5),
              "q4_1": (12.0, 2.0)}[quant]
    difference = (got - expected).abs()
    assert difference.max().item() <= bounds[0] and difference.mean().item() <= bounds[1]
    assert (got.argmax(-1) == expected.argmax(-1)).float().mean().item() >= 0.9


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
