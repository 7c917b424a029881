"""One contract, every parametrization: the same checks run over each strategy and a few compositions.

For every case: base parameter names unchanged; the trainable set is non-empty and each injecting strategy's
parameters carry its prefix; outputs unchanged at step 0 where the method is zero-initialised; the task loss
goes down in a few optimizer steps; save_adapter -> load_adapter into a fresh base gives equal outputs; and
(decoders) `generate` with its KV cache equals greedy decoding that recomputes the whole sequence.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import pytest
import torch
from conftest import tiny_bert, tiny_llama

import tuneforge
from tuneforge.compose import applied_strategies
from tuneforge.evaluate import token_losses
from tuneforge.strategies import REGISTRY
from tuneforge.surgery import is_injected


@dataclass
class Case:
    id: str
    strategies: list
    # "same": zero-initialised, outputs unchanged; "different": active from step 0
    at_start: str | None = None
    model: str = "llama"  # or "bert"
    lr: float = 1e-2


CASES = [
    Case("full", ["full"], lr=3e-3),
    Case("layerwise", [{"layerwise": {"train_layers": "top:2"}}], lr=3e-3),
    Case("lora", [{"lora": {"rank": 4, "targets": "all-linear"}}], at_start="same"),
    Case("lora+dora", [{"lora": {"rank": 4, "targets": "all-linear", "dora": True, "rslora": True}}],
         at_start="same"),
    Case("adapter-houlsby", [{"adapter": {"placement": "houlsby", "bottleneck_size": 8}}], at_start="same"),
    Case("adapter-pfeiffer", [{"adapter": {"placement": "pfeiffer", "reduction_factor": 4}}],
         at_start="same"),
    Case("adapter-bert", [{"adapter": {"placement": "houlsby", "bottleneck_size": 8}}], at_start="same",
         model="bert"),
    Case("prefix", [{"prefix": {"length": 4}}], lr=3e-2, at_start="different"),
    Case("prefix+reparam", [{"prefix": {"length": 4, "reparam": True, "reparam_hidden": 16}}], lr=1e-2,
         at_start="different"),
    Case("prompt", [{"prompt": {"length": 4}}], lr=3e-2, at_start="different"),
    Case("prompt-bert", [{"prompt": {"length": 4, "init": "random"}}], model="bert", lr=3e-2,
         at_start="different"),
    Case("ia3", [{"ia3": {}}], at_start="same", lr=3e-2),
    Case("prefix+lora", [{"prefix": {"length": 4}}, {"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}],
         lr=1e-2),
    Case("adapter+lora", [{"adapter": {"placement": "houlsby", "bottleneck_size": 8}},
                          {"lora": {"rank": 4, "targets": "all-linear"}}], at_start="same"),
    Case("layerwise+prompt", [{"layerwise": {"train_layers": "top:1", "train_head": False}},
                              {"prompt": {"length": 4}}]),
    Case("ia3+adapter", [{"ia3": {}}, {"adapter": {"placement": "pfeiffer", "bottleneck_size": 8}}],
         at_start="same"),
    Case("heads-bert", [{"heads": {"tasks": {"topic": {"num_labels": 3}}}}], model="bert", lr=3e-2),
]


def build(case: Case):
    return tiny_bert() if case.model == "bert" else tiny_llama()


def make_batch(case: Case) -> dict:
    """A fixed tiny task: memorise 4 right-padded sequences (decoders) or their labels (BERT)."""
    generator = torch.Generator().manual_seed(3)
    input_ids = torch.randint(3, 300, (4, 12), generator=generator)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0  # one padded row
    input_ids[1, 9:] = 0
    if case.model == "bert":
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "labels": torch.tensor([0, 1, 2, 1])}
        if any("heads" in s for s in case.strategies):
            batch["task_id"] = torch.zeros(4, dtype=torch.long)  # routed to the task's head
        return batch
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def logits(model, batch) -> torch.Tensor:
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if "task_id" in batch and "task_id" in inspect.signature(model.forward).parameters:
        inputs["task_id"] = batch["task_id"]  # models with task heads route by it
    return model(**inputs).logits


def mean_loss(model, batch) -> torch.Tensor:
    """The loop's task loss: cross-entropy over classes, or next-token cross-entropy over labelled tokens."""
    if batch["labels"].dim() == 1:
        return torch.nn.functional.cross_entropy(logits(model, batch), batch["labels"])
    total, count = token_losses(logits(model, batch), batch["labels"])
    return total / count


def test_every_registered_parametrization_has_a_case():
    covered = {(s if isinstance(s, str) else next(iter(s))) for case in CASES for s in case.strategies}
    parametrizations = {name for name, entry in REGISTRY.items() if entry.family == "parametrization"}
    assert parametrizations <= covered, f"add a contract case for {sorted(parametrizations - covered)}"


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_contract(case: Case, tmp_path):
    batch = make_batch(case)
    model = build(case).eval()
    base_names = {name for name, _ in model.named_parameters()}
    reference = logits(model, batch).detach()

    model = tuneforge.prepare(model, case.strategies).eval()

    # 1. base parameter names unchanged; everything new is an injected (prefixed) name
    names = {name for name, _ in model.named_parameters()}
    assert base_names <= names
    assert all(is_injected(name) for name in names - base_names)

    # 2. trainable set non-empty; each injecting strategy trains parameters with its prefix, and only those
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable
    for strategy in applied_strategies(model):
        own = strategy.trainable(model, None) if strategy.param_prefix else set()
        if strategy.param_prefix:
            assert own and own <= trainable
            assert all(any(part.startswith(strategy.param_prefix) for part in n.split(".")) for n in own)
    assert all(name in base_names or is_injected(name) for name in trainable)

    # 3. zero-initialised methods leave the outputs unchanged at step 0
    start = logits(model, batch).detach()
    assert start.shape == reference.shape  # virtual tokens never leak into the logits
    if case.at_start == "same":
        torch.testing.assert_close(start, reference, atol=1e-6, rtol=1e-6)
    elif case.at_start == "different":
        assert not torch.allclose(start, reference, atol=1e-4)

    # 4. the loss goes down in a few steps
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=case.lr)
    losses = []
    for _ in range(8):
        loss = mean_loss(model, batch)
        losses.append(loss.item())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    final = mean_loss(model, batch).item()
    assert final < 0.9 * losses[0], losses + [final]

    # 5. save, reload into a fresh base, equal outputs
    trained = logits(model, batch).detach()
    tuneforge.save_adapter(model, tmp_path / "adapter")
    reloaded = tuneforge.load_adapter(build(case), tmp_path / "adapter").eval()
    torch.testing.assert_close(logits(reloaded, batch), trained, atol=1e-5, rtol=1e-5)

    # 6. generation: the KV-cached loop agrees with recomputing the whole sequence at every step
    if case.model != "bert":
        prompt = batch["input_ids"][:1, :6]
        with torch.no_grad():
            generated = reloaded.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=5,
                                          do_sample=False, pad_token_id=0, eos_token_id=None)
            sequence = prompt
            for _ in range(5):
                next_token = reloaded(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
                sequence = torch.cat([sequence, next_token], dim=1)
        assert generated.tolist() == sequence.tolist()


@pytest.mark.parametrize("names, words", [
    (["full", "layerwise"], "full and layerwise together"),
    (["full", "prefix"], "full and prefix together"),
])
def test_meaningless_combinations_are_refused_before_loading(names, words):
    from tuneforge.compose import build_strategies
    from tuneforge.errors import ModelError

    with pytest.raises(ModelError, match=words):
        build_strategies([{name: {}} for name in names])


def test_full_with_task_heads_is_allowed():
    from tuneforge.compose import build_strategies

    assert [s.name for s in build_strategies([{"full": {}}, {"heads": {}}])] == ["full", "heads"]
