"""LoRA math against closed forms, and our adapter loading in PEFT with equal logits."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny_llama as _tiny_llama
from tiny_models import ARCHITECTURES, LLAMA_LIKE, tiny_model
from transformers.pytorch_utils import Conv1D

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.lora import LoRALinear, lora_modules, merge_lora, unload_lora, unmerge_lora


def tiny_llama():
    return _tiny_llama(initializer_range=0.02)  # standard init: closed-form checks at 1e-5


def randomize_lora(model, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_" in name:
                parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.mark.parametrize("base_type", ["linear", "conv1d"])
@pytest.mark.parametrize("dora", [False, True])
def test_forward_equals_closed_form(base_type, dora):
    torch.manual_seed(0)
    base = torch.nn.Linear(6, 5) if base_type == "linear" else Conv1D(5, 6)
    layer = LoRALinear(base, rank=3, alpha=6.0, dora=dora)
    torch.nn.init.normal_(layer.lora_B.weight)
    x = torch.randn(4, 6)
    weight = base.weight if base_type == "linear" else base.weight.T  # (d_out, d_in)
    updated = weight + 2.0 * layer.lora_B.weight @ layer.lora_A.weight
    if dora:
        updated = weight.norm(dim=1, keepdim=True) * updated / updated.norm(dim=1, keepdim=True)
    torch.testing.assert_close(layer(x), x @ updated.T + base.bias, atol=1e-5, rtol=1e-5)


def test_zero_initialised_b_leaves_outputs_unchanged():
    model = tiny_llama()
    x = torch.randint(0, 300, (2, 9))
    reference = model(x).logits
    tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": "all-linear"}}])
    torch.testing.assert_close(model(x).logits, reference, atol=0, rtol=0)


@pytest.mark.parametrize("options", [{}, {"rslora": True}, {"dora": True}])
def test_merged_equals_unmerged_and_unmerge_restores_base(options):
    model = tiny_llama()
    base_weights = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": "all-linear", **options}}])
    randomize_lora(model)
    x = torch.randint(0, 300, (2, 9))
    unmerged = model(x).logits
    assert merge_lora(model) == 4 * 7  # q, k, v, o, gate, up, down in 4 layers
    merged_weight = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    assert not torch.equal(merged_weight, base_weights["model.layers.0.self_attn.q_proj.weight"])
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-5)
    unmerge_lora(model)
    for name, parameter in model.named_parameters():
        if name in base_weights:
            torch.testing.assert_close(parameter, base_weights[name], atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(model(x).logits, unmerged, atol=1e-5, rtol=1e-5)


def test_unload_gives_a_plain_model_with_the_same_outputs():
    model = tiny_llama()
    tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": ["q_proj", "down_proj"]}}])
    randomize_lora(model)
    x = torch.randint(0, 300, (2, 9))
    reference = model(x).logits
    unload_lora(model)
    assert not lora_modules(model) and type(model.model.layers[0].self_attn.q_proj) is torch.nn.Linear
    torch.testing.assert_close(model(x).logits, reference, atol=1e-5, rtol=1e-5)


def test_base_parameter_names_kept_and_only_lora_trainable():
    model = tiny_llama()
    names_before = {n for n, _ in model.named_parameters()}
    tuneforge.prepare(model, [{"lora": {"rank": 2, "targets": ["q_proj", "v_proj"], "layers": "top:2"}}])
    names_after = {n for n, _ in model.named_parameters()}
    assert names_before <= names_after
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_" in n for n in trainable)
    assert {int(n.split(".")[2]) for n in trainable} == {2, 3}
    # closed form: rank * (d_in + d_out) per adapted matrix; q: 32 -> 32, v: 32 -> 16 (2 kv heads of 8)
    count = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert count == 2 * (2 * (32 + 32) + 2 * (32 + 16))


def test_targets_that_match_nothing_say_what_exists():
    with pytest.raises(ModelError, match=r"matched no linear layer.*q_proj"):
        tuneforge.prepare(tiny_llama(), [{"lora": {"targets": ["query"]}}])


def test_regex_targets():
    model = tuneforge.prepare(tiny_llama(),
                              [{"lora": {"targets": [r"model\.layers\.[01]\.mlp\.(up|down)_proj"]}}])
    assert sorted(n for n, _ in lora_modules(model)) == [f"model.layers.{i}.mlp.{p}_proj"
                                                         for i in (0, 1) for p in ("down", "up")]


def test_peft_loads_our_adapter_with_equal_logits(tmp_path):
    peft = pytest.importorskip("peft")
    model = tuneforge.prepare(tiny_llama(),
                              [{"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"]}}])
    randomize_lora(model)
    x = torch.randint(0, 300, (2, 9))
    ours = model(x).logits
    tuneforge.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(theirs(x).logits, ours, atol=1e-5, rtol=1e-5)


def test_save_and_load_adapter_round_trip(tmp_path):
    model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 4, "targets": "all-linear", "dora": True}}])
    randomize_lora(model)
    x = torch.randint(0, 300, (2, 9))
    tuneforge.save_adapter(model, tmp_path / "adapter")
    loaded = tuneforge.load_adapter(tiny_llama(), tmp_path / "adapter")
    torch.testing.assert_close(loaded(x).logits, model(x).logits, atol=1e-6, rtol=1e-6)


TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def test_lora_gaussian_init_keeps_outputs_and_draws_a_with_std_one_over_rank():
    model = tiny_llama().eval()
    reference = model(TOKENS).logits
    tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": "all-linear", "init": "gaussian"}}])
    torch.testing.assert_close(model(TOKENS).logits, reference, atol=0, rtol=0)
    a_values = torch.cat([p.flatten() for n, p in model.named_parameters() if n.endswith("lora_A.weight")])
    assert abs(a_values.std().item() - 1 / 4) < 0.02  # ~6k draws; Kaiming-uniform would give ~0.10 here


# The default targets per architecture: attention query and value, or the fused qkv projection
LORA_EXPECTED = {
    **dict.fromkeys(LLAMA_LIKE + ("opt",), frozenset({"q_proj", "v_proj"})), "phi3": {"qkv_proj"},
    "gpt2": {"c_attn"}, "gpt_neox": {"query_key_value"}, "falcon": {"query_key_value"},
    "bert": {"query", "value"},
}


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_lora_default_targets_per_architecture(kind):
    model = tuneforge.prepare(tiny_model(kind), [{"lora": {"rank": 2}}])
    names = [name for name, _ in lora_modules(model)]
    assert {name.rsplit(".", 1)[-1] for name in names} == LORA_EXPECTED[kind]
    assert len(names) == 2 * len(LORA_EXPECTED[kind])


@pytest.mark.parametrize("options", [{}, {"dora": True}])
def test_lora_on_falcon_wraps_and_merges_exactly(options):
    """Issue 18, cause 3: Falcon's FalconLinear layers were refused as "already wrapped"."""
    lora = {"lora": {"rank": 4, "targets": "all-linear", **options}}
    model = tuneforge.prepare(tiny_model("falcon"), [lora]).eval()
    randomize_lora(model)
    with torch.no_grad():
        unmerged = model(TOKENS).logits
        merge_lora(model)
        torch.testing.assert_close(model(TOKENS).logits, unmerged, atol=1e-5, rtol=1e-5)
        unload_lora(model)
        torch.testing.assert_close(model(TOKENS).logits, unmerged, atol=1e-5, rtol=1e-5)
    # its own layer type back
    assert type(model.transformer.h[0].self_attention.query_key_value).__name__ == "FalconLinear"


@pytest.mark.parametrize("kind", ["falcon", "gpt_neox", "opt", "gpt2", "bert", "phi3"])
def test_peft_loads_our_all_linear_lora_with_equal_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    lora = {"lora": {"rank": 4, "alpha": 8, "targets": "all-linear"}}
    model = tuneforge.prepare(tiny_model(kind), [lora]).eval()
    randomize_lora(model)
    tuneforge.save_adapter(model, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path / "adapter").eval()
    # PEFT adapts exactly our modules: no pooler or head picked up by a short name
    assert {n.removeprefix("base_model.model.").removesuffix(".lora_A") for n, _ in theirs.named_modules()
            if n.endswith("lora_A")} == {n for n, _ in lora_modules(model)}
    with torch.no_grad():
        expected = model(input_ids=TOKENS).logits
        torch.testing.assert_close(theirs(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=1e-5)


def test_inspect_shows_the_modules_each_strategy_matched(tmp_path, tiny_model_dir, task_file, capsys):
    import json

    import yaml

    from tuneforge.cli import main

    config = {"model": str(tiny_model_dir), "data": {"train": str(task_file)}, "retain": None,
              "strategies": [{"lora": {"rank": 2}}, {"ia3": {"targets": ["k_proj", "down_proj"]}}],
              "train": {"max_steps": 1, "max_seq_len": 32}, "output": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["inspect", str(path), "--json"]) == 0
    matched = json.loads(capsys.readouterr().out)["matched"]
    assert matched == {"lora": "8 modules: model.layers.*.self_attn.{q_proj,v_proj}",
                       "ia3": "8 modules: model.layers.*.mlp.down_proj, model.layers.*.self_attn.k_proj "
                              "(input rescaled: 4 modules: model.layers.*.mlp.down_proj)"}
    assert main(["inspect", str(path)]) == 0
    assert "lora: 8 modules: model.layers.*.self_attn.{q_proj,v_proj}" in capsys.readouterr().out
