"""Tests of the ia3 strategy."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import tiny_llama, trainable_count
from tiny_models import ARCHITECTURES, LLAMA_LIKE, tiny_model
from torch import nn

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.ia3 import ia3_modules, unload_ia3


def test_ia3_defaults_and_parameter_count():
    model = tuneforge.prepare(tiny_llama(), [{"ia3": {}}])
    wrapped = {name.split(".")[-1]: module.feedforward for name, module in ia3_modules(model)}
    assert wrapped == {"k_proj": False, "v_proj": False, "down_proj": True}
    assert trainable_count(model) == 4 * (16 + 16 + 64)  # d_out of k and v, d_in of down_proj, per layer


def test_ia3_feedforward_must_be_a_target():
    with pytest.raises(ModelError, match="feedforward_targets match .*down_proj.*list it in targets"):
        tuneforge.prepare(tiny_llama(),
                          [{"ia3": {"targets": ["k_proj"], "feedforward_targets": ["down_proj"]}}])


# Issue 18, cause 2: the default targets per architecture (attention keys/values, feed-forward output input)
IA3_EXPECTED = {
    **dict.fromkeys(LLAMA_LIKE, ({"k_proj", "v_proj"}, {"down_proj"})),
    "phi3": ({"qkv_proj"}, {"down_proj"}),
    "gpt2": ({"c_attn"}, {"mlp.c_proj"}),
    "gpt_neox": ({"query_key_value"}, {"dense_4h_to_h"}),
    "opt": ({"k_proj", "v_proj"}, {"fc2"}),
    "falcon": ({"query_key_value"}, {"dense_4h_to_h"}),
    "bert": ({"attention.self.key", "attention.self.value"}, {"output.dense"}),
}


def short_name(name: str) -> str:
    """`model.layers.0.mlp.down_proj` -> `down_proj`; `transformer.h.0.mlp.c_proj` -> `mlp.c_proj` (GPT-2 has
    two c_proj); BERT's names from the layer on (`attention.self.key`, `output.dense`)."""
    for marker in (".layer.0.", ".layer.1."):
        if marker in name:
            return name.split(marker)[1]
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1] == "c_proj" else parts[-1]


def perturb(model, prefix: str, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if prefix in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.3)


TOKENS = torch.randint(3, 300, (2, 7), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("kind", ARCHITECTURES)
def test_ia3_default_targets_per_architecture_merge_exactly(kind):
    model = tuneforge.prepare(tiny_model(kind), [{"ia3": {}}]).eval()
    attention, feedforward = IA3_EXPECTED[kind]
    wrapped = {short_name(name): module.feedforward for name, module in ia3_modules(model)}
    assert wrapped == {**dict.fromkeys(attention, False), **dict.fromkeys(feedforward, True)}
    assert len(ia3_modules(model)) == 2 * len(wrapped)  # every block
    perturb(model, "ia3_")
    with torch.no_grad():
        adapted = model(input_ids=TOKENS).logits
        merged = unload_ia3(model)(input_ids=TOKENS).logits
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)
    assert not ia3_modules(model)


@pytest.mark.parametrize("kind", ["gpt2", "gpt_neox", "opt", "falcon", "bert", "phi3"])
def test_peft_loads_our_default_ia3_with_equal_logits(kind, tmp_path):
    peft = pytest.importorskip("peft")
    ours = tuneforge.prepare(tiny_model(kind), [{"ia3": {}}]).eval()
    perturb(ours, "ia3_")
    tuneforge.save_adapter(ours, tmp_path / "adapter")
    theirs = peft.PeftModel.from_pretrained(tiny_model(kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        expected = ours(input_ids=TOKENS).logits
        torch.testing.assert_close(theirs(input_ids=TOKENS).logits, expected, atol=1e-5, rtol=1e-5)
    reloaded = tuneforge.load_adapter(tiny_model(kind), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=TOKENS).logits, ours(input_ids=TOKENS).logits)


def test_ia3_error_names_the_option_the_user_set():
    """On OPT the defaults were Llama's: the error spoke of `feedforward_targets`, never set by the user."""
    with pytest.raises(ModelError, match=r"^feedforward_targets \['down_proj'\] matched no linear .*fc2"):
        tuneforge.prepare(tiny_model("opt"), [{"ia3": {"feedforward_targets": ["down_proj"]}}])
    with pytest.raises(ModelError, match=r"^targets \['wq'\] matched no linear layer .*k_proj"):
        tuneforge.prepare(tiny_model("opt"), [{"ia3": {"targets": ["wq"]}}])


def test_ia3_targets_alone_take_the_feed_forward_defaults_among_them():
    model = tuneforge.prepare(tiny_model("opt"), [{"ia3": {"targets": ["v_proj", "fc2"]}}])
    assert {short_name(n): m.feedforward for n, m in ia3_modules(model)} == {"v_proj": False, "fc2": True}
    model = tuneforge.prepare(tiny_llama(), [{"ia3": {"targets": ["k_proj"]}}])  # was: down_proj not a target
    assert {m.feedforward for _, m in ia3_modules(model)} == {False}


class Mystery(nn.Module):
    """An architecture no table names: blocks of `wq`/`wkv`/`ff_out` linears."""

    def __init__(self):
        super().__init__()
        self.config = SimpleNamespace(model_type="mystery", hidden_size=8)
        self.blocks = nn.ModuleList(nn.ModuleDict({"wq": nn.Linear(8, 8), "wkv": nn.Linear(8, 16),
                                                   "ff_out": nn.Linear(16, 8)}) for _ in range(2))


def test_ia3_refuses_an_unknown_architecture_listing_its_linear_layers():
    with pytest.raises(ModelError, match="ia3: no default targets for mystery; set `targets` .*ff_out, wkv"):
        tuneforge.prepare(Mystery(), [{"ia3": {}}])
    options = {"targets": ["wkv", "ff_out"], "feedforward_targets": ["ff_out"]}
    model = tuneforge.prepare(Mystery(), [{"ia3": options}])
    assert len(ia3_modules(model)) == 4


def test_ia3_on_an_unknown_llama_like_architecture_uses_the_llama_layout():
    model = tiny_llama(layers=2)
    model.config.model_type = "my_llama"
    assert {n.rsplit(".", 1)[-1] for n, _ in ia3_modules(tuneforge.prepare(model, [{"ia3": {}}]))} == \
        {"k_proj", "v_proj", "down_proj"}
