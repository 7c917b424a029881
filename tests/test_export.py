"""Adapters, prefix, prompt and IA3 against closed forms; composition conflicts; merged export; inspect
counts."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize, tiny_llama

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.ia3 import IA3Linear

TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def test_ia3_closed_forms_and_exact_merge():
    torch.manual_seed(0)
    x = torch.randn(4, 6)
    for feedforward in (False, True):
        base = torch.nn.Linear(6, 5)
        layer = IA3Linear(base, feedforward=feedforward)
        assert layer.ia3_l.shape == ((1, 6) if feedforward else (5, 1))
        torch.testing.assert_close(layer(x), base(x))  # ones: unchanged at step 0
        with torch.no_grad():
            layer.ia3_l.uniform_(0.5, 1.5)
        scale = layer.ia3_l.flatten()
        expected = base(x * scale) if feedforward else base(x) * scale
        torch.testing.assert_close(layer(x), expected)
        weight, bias = base.weight.detach().clone(), base.bias.detach().clone()
        layer.merge()
        torch.testing.assert_close(torch.nn.functional.linear(x, layer.weight, layer.bias), expected)
        layer.unmerge()
        torch.testing.assert_close(layer.weight, weight)
        torch.testing.assert_close(layer.bias, bias)


@pytest.mark.parametrize("strategies", [
    [{"ia3": {}}],
    [{"lora": {"rank": 4, "dora": True, "targets": "all-linear"}}],
    [{"ia3": {"targets": ["k_proj", "down_proj"]}}, {"lora": {"targets": ["q_proj"]}}],
])
def test_merged_export_loads_with_transformers_alone(strategies, tmp_path, tokenizer):
    from transformers import AutoModelForCausalLM

    from tuneforge.export import export_merged

    model = tuneforge.prepare(tiny_llama(), strategies).eval()
    randomize(model, "ia3_", scale=0.2)
    randomize(model, "lora_", scale=0.2)
    expected = model(TOKENS).logits.detach()
    report = export_merged(model, tokenizer, tmp_path / "merged", {"input_ids": TOKENS})
    assert report["max_weight_change"] > 0 and report["max_logit_difference"] <= 1e-4
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert not any("ia3" in n or "lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(TOKENS).logits, expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("strategy", [{"adapter": {}}, {"prefix": {}}, {"prompt": {}}])
def test_methods_that_cannot_merge_say_so(strategy, tmp_path):
    from tuneforge.export import export_merged

    model = tuneforge.prepare(tiny_llama(), [strategy])
    with pytest.raises(ModelError, match=f"cannot merge {next(iter(strategy))} .*adapter/ directory"):
        export_merged(model, None, tmp_path / "merged")


def test_untrained_ia3_merge_is_refused(tmp_path):
    from tuneforge.export import export_merged

    with pytest.raises(ModelError, match="left every weight unchanged"):
        export_merged(tuneforge.prepare(tiny_llama(), [{"ia3": {}}]), None, tmp_path / "merged")


def test_cli_export_of_an_ia3_run(run_config, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge.cli import main
    from tuneforge.models import load_model
    from tuneforge.run import train_run

    config = run_config(strategies=[{"ia3": {}}], train={"max_steps": 2})
    train_run(config)
    assert main(["export", config.output, "--merged", str(tmp_path / "merged")]) == 0
    base, tokenizer, _ = load_model(config.model)
    unmerged = tuneforge.load_adapter(base, f"{config.output}/adapter").eval()
    inputs = tokenizer(["What colour is the cat?"], return_tensors="pt")
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    torch.testing.assert_close(merged(**inputs).logits, unmerged(**inputs).logits, atol=1e-4, rtol=1e-4)
    assert (tmp_path / "merged" / "tokenizer_config.json").is_file()
    assert (tmp_path / "merged" / "generation_config.json").is_file()
