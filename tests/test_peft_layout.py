"""Interop with PEFT in both directions: our adapters load in `peft.PeftModel`, PEFT's load in tuneforge.

Each direction compares logits on the same base model. PEFT is a test dependency only.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tiny_llama

import tuneforge
from tuneforge.errors import ModelError

peft = pytest.importorskip("peft")

TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def perturb(model, names: str, scale: float = 0.3, seed: int = 1) -> None:
    """Move every trainable parameter off its initial value, as training would."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad and names in name:
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def greedy(model, prompt: torch.Tensor, steps: int = 5) -> list[int]:
    """Greedy continuation recomputing the whole sequence each step (no KV cache involved)."""
    sequence = prompt
    with torch.no_grad():
        for _ in range(steps):
            next_token = model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    return sequence[0, prompt.shape[1]:].tolist()


OURS = {
    "lora": [{"lora": {"rank": 4, "alpha": 8, "targets": ["q_proj", "v_proj", "up_proj"]}}],
    "lora-layers": [{"lora": {"rank": 2, "targets": ["k_proj", "o_proj"], "layers": "top:2",
                              "rslora": True}}],
    "dora": [{"lora": {"rank": 4, "targets": "all-linear", "dora": True}}],
    "ia3": [{"ia3": {}}],
    "ia3-regex": [{"ia3": {"targets": [r"model\.layers\.[02]\.(self_attn\.v_proj|mlp\.down_proj)"],
                           "feedforward_targets": [r"model\.layers\.[02]\.mlp\.down_proj"]}}],
    "prefix": [{"prefix": {"length": 3}}],
    "prefix+reparam": [{"prefix": {"length": 3, "reparam": True, "reparam_hidden": 8}}],
    "prompt": [{"prompt": {"length": 3}}],
}


@pytest.mark.parametrize("method", list(OURS))
def test_peft_loads_our_adapter_with_equal_logits(method, tmp_path):
    ours = tuneforge.prepare(tiny_llama(), OURS[method]).eval()
    perturb(ours, "_")
    expected = ours(input_ids=TOKENS).logits
    tuneforge.save_adapter(ours, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    theirs = peft.PeftModel.from_pretrained(tiny_llama(), tmp_path / "adapter").eval()
    assert theirs.peft_config["default"].peft_type.value == config["peft_type"]
    logits = theirs(input_ids=TOKENS).logits
    virtual = logits.shape[1] - TOKENS.shape[1]  # PEFT's prompt tuning returns the virtual positions too
    torch.testing.assert_close(logits[:, virtual:], expected, atol=1e-4, rtol=1e-4)
    # Our cached `generate` continues exactly as PEFT's model does (PEFT's own generate is not used as the
    # reference: with transformers 5.24 its prefix/prompt generation diverges from its forward pass).
    prompt = TOKENS[:1, :5]
    generated = ours.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                              do_sample=False, pad_token_id=0, eos_token_id=None)
    assert generated[0, 5:].tolist() == greedy(theirs, prompt)


def test_dora_matches_peft_in_training_including_gradients():
    """Same weights in both: DoRA outputs and the gradients of A, B and the magnitude agree with PEFT."""
    options = {"rank": 4, "alpha": 8, "targets": ["q_proj", "down_proj"], "dora": True}
    ours = tuneforge.prepare(tiny_llama(), [{"lora": options}])
    perturb(ours, "lora_")
    theirs = peft.get_peft_model(tiny_llama(), peft.LoraConfig(r=4, lora_alpha=8,
                                                                target_modules=["q_proj", "down_proj"],
                                                                use_dora=True))
    state = {n: p for n, p in ours.named_parameters() if "lora_" in n}
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if "lora_" in name:
                ours_name = name.removeprefix("base_model.model.").replace(".default", "")
                ours_name = ours_name.removesuffix(".weight") if "magnitude" in ours_name else ours_name
                parameter.copy_(state[ours_name].view_as(parameter))
    ours.train()
    theirs.train()
    loss_ours = ours(input_ids=TOKENS).logits.logsumexp(-1).mean()
    loss_theirs = theirs(input_ids=TOKENS).logits.logsumexp(-1).mean()
    torch.testing.assert_close(loss_ours, loss_theirs)
    loss_ours.backward()
    loss_theirs.backward()
    gradients = {n.removeprefix("base_model.model.").replace(".default", "").removesuffix(".weight")
                 if "magnitude" in n else n.removeprefix("base_model.model.").replace(".default", ""): p.grad
                 for n, p in theirs.named_parameters() if "lora_" in n}
    assert len(gradients) == len(state) == 2 * 4 * 3
    for name, parameter in state.items():
        torch.testing.assert_close(parameter.grad, gradients[name].view_as(parameter.grad),
                                   atol=1e-5, rtol=1e-4)


THEIRS = {
    "lora": lambda: peft.LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj", "gate_proj"]),
    "lora-layers": lambda: peft.LoraConfig(r=2, target_modules=["k_proj"], layers_to_transform=[1, 3],
                                           use_rslora=True),
    "dora": lambda: peft.LoraConfig(r=4, target_modules="all-linear", use_dora=True),
    "ia3": lambda: peft.IA3Config(),
    "prefix": lambda: peft.PrefixTuningConfig(num_virtual_tokens=3),
    "prefix-projection": lambda: peft.PrefixTuningConfig(num_virtual_tokens=3, prefix_projection=True,
                                                         encoder_hidden_size=8),
    "prompt": lambda: peft.PromptTuningConfig(num_virtual_tokens=3),
}


@pytest.mark.parametrize("method", list(THEIRS))
def test_we_load_a_peft_adapter_with_equal_logits(method, tmp_path):
    config = THEIRS[method]()
    config.task_type = "CAUSAL_LM"
    theirs = peft.get_peft_model(tiny_llama(), config)
    perturb(theirs, "", scale=0.3)
    theirs.eval()
    theirs.save_pretrained(tmp_path / "peft")
    assert not (tmp_path / "peft" / "tuneforge.json").exists()
    expected = theirs(input_ids=TOKENS).logits
    ours = tuneforge.load_adapter(tiny_llama(), tmp_path / "peft").eval()
    logits = ours(input_ids=TOKENS).logits
    torch.testing.assert_close(logits, expected[:, expected.shape[1] - TOKENS.shape[1]:],
                               atol=1e-5, rtol=1e-5)


def test_unsupported_peft_adapters_are_refused_by_name(tmp_path):
    theirs = peft.get_peft_model(tiny_llama(), peft.LoHaConfig(r=2, target_modules=["q_proj"]))
    theirs.save_pretrained(tmp_path / "loha")
    with pytest.raises(ModelError, match="PEFT adapter type 'LOHA' is not supported"):
        tuneforge.load_adapter(tiny_llama(), tmp_path / "loha")


def test_composed_adapters_stay_tuneforge_only(tmp_path):
    model = tuneforge.prepare(tiny_llama(), [{"prefix": {"length": 2}}, {"lora": {"targets": ["q_proj"]}}])
    tuneforge.save_adapter(model, tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()  # PEFT cannot express the combination
    saved = json.loads((tmp_path / "adapter" / "tuneforge.json").read_text())["strategies"]
    assert [next(iter(s)) for s in saved] == ["prefix", "lora"]


def test_peft_modules_to_save_other_than_a_classification_head_is_refused(tmp_path):
    """PEFT's SEQ_CLS heads (`classifier`, `score`) load as the model's new head; other modules do not."""
    config = peft.LoraConfig(r=2, target_modules=["q_proj"], modules_to_save=["lm_head"],
                             task_type="CAUSAL_LM")
    theirs = peft.get_peft_model(tiny_llama(), config)
    theirs.save_pretrained(tmp_path / "peft")
    with pytest.raises(ModelError, match=r"modules_to_save=\['lm_head'\] is not supported"):
        tuneforge.load_adapter(tiny_llama(), tmp_path / "peft")
