"""Task heads as a real wrapper module: independent deep copies, frozen references that stay frozen,
composition with a soft prompt in either order, and adapter save/load."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from conftest import ANIMALS, COLORS, classification_records, task_records, tiny_llama

import tuneforge
from tuneforge.config import validate_config
from tuneforge.forward import routes_tasks
from tuneforge.run import train_run
from tuneforge.surgery import disabled_adapters

TOKENS = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
TOPIC = {"heads": {"tasks": {"topic": {"num_labels": 3}}}}


def task_id(task: int, rows: int = 2) -> torch.Tensor:
    return torch.full((rows,), task, dtype=torch.long)


def heads_model(*strategies: dict, seed: int = 0) -> torch.nn.Module:
    return tuneforge.prepare(tiny_llama(seed=seed), list(strategies))


def test_heads_keep_the_base_parameter_names_and_route_by_class():
    base_names = {name for name, _ in tiny_llama().named_parameters()}
    model = heads_model({"full": {}}, TOPIC)
    names = {name for name, _ in model.named_parameters()}
    assert names == base_names | {"head_topic.weight", "head_topic.bias"}
    assert routes_tasks(model) and not routes_tasks(tiny_llama())
    assert "forward" not in vars(model)  # a real module: no per-instance forward


def test_deepcopy_of_a_heads_model_is_independent():
    model = heads_model({"full": {}}, TOPIC).eval()
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        lm_before = duplicate(input_ids=TOKENS).logits.clone()
        heads_before = duplicate(input_ids=TOKENS, task_id=task_id(0)).logits.clone()
        for parameter in model.parameters():
            parameter.add_(0.5)
        assert not torch.allclose(model(input_ids=TOKENS).logits, lm_before)
        torch.testing.assert_close(duplicate(input_ids=TOKENS).logits, lm_before, atol=0, rtol=0)
        torch.testing.assert_close(duplicate(input_ids=TOKENS, task_id=task_id(0)).logits, heads_before,
                                   atol=0, rtol=0)


def test_frozen_reference_of_full_heads_keeps_the_original_outputs():
    from tuneforge.strategies.retention import FrozenReference  # retention's and distill's (teacher: base)

    model = heads_model({"full": {}}, TOPIC).eval()
    with torch.no_grad():
        original = model(input_ids=TOKENS).logits.clone()
    reference = FrozenReference(model)
    with torch.no_grad():
        model.model.embed_tokens.weight.add_(0.5)
    torch.testing.assert_close(reference(input_ids=TOKENS).logits, original, atol=0, rtol=0)


def write_jsonl(path: Path, records: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_full_heads_and_retention_compare_against_a_frozen_original(tmp_path, tiny_model_dir):
    retain = [{"text": " ".join(f"The {a} is {c}." for a, c in zip(ANIMALS, COLORS[3:] + COLORS[:3]))}] * 8
    config = validate_config({
        "model": str(tiny_model_dir),
        "retain": write_jsonl(tmp_path / "retain.jsonl", retain),
        "tasks": [
            {"name": "qa", "data": {"train": write_jsonl(tmp_path / "qa.jsonl", task_records(16))}},
            {"name": "colour",
             "data": {"train": write_jsonl(tmp_path / "c.jsonl", classification_records("colour"))}},
        ],
        "strategies": [{"full": {}}, {"heads": {}}, {"retention": {"weight": 1.0}}],
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "max_seq_len": 48, "log_every": 1},
        "evaluation": {"samples": 1, "max_new_tokens": 4},  # generate through the wrapper
        "output": str(tmp_path / "run"),
    })
    train_run(config)
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    values = [r["retention"] for r in map(json.loads, lines) if "split" not in r]
    assert len(values) == 3
    assert values[0] == pytest.approx(0.0, abs=1e-6)  # nothing has moved yet
    assert min(values[1:]) > 1e-6  # the reference stayed where it was while the model moved


@pytest.mark.parametrize("order", ["heads,prompt", "prompt,heads"])
def test_heads_and_prompt_compose_in_either_order(order):
    strategies = {"heads": TOPIC, "prompt": {"prompt": {"length": 3}}}
    model = heads_model(*(strategies[name] for name in order.split(","))).train()
    names = {name for name, p in model.named_parameters() if p.requires_grad}
    assert names == {"prompt_encoder.embedding", "head_topic.weight", "head_topic.bias"}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    mask = torch.ones_like(TOKENS)
    mask[1, 6:] = 0
    logits = model(input_ids=TOKENS, attention_mask=mask, task_id=task_id(0)).logits  # (B, labels)
    assert logits.shape == (2, 3)
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 2]))
    loss = loss + model(input_ids=TOKENS, attention_mask=mask).logits.logsumexp(-1).mean()  # the LM path too
    loss.backward()
    assert model.prompt_encoder.embedding.grad.abs().sum() > 0
    assert model.head_topic.weight.grad.abs().sum() > 0
    optimizer.step()

    # the head reads the last real token: a right-padded row scores as it does alone
    model.eval()
    with torch.no_grad():
        with disabled_adapters(model):
            without_prompt = model(input_ids=TOKENS, task_id=task_id(0)).logits
        with_prompt = model(input_ids=TOKENS, task_id=task_id(0)).logits
        assert not torch.allclose(with_prompt, without_prompt, atol=1e-4)
        padded = model(input_ids=TOKENS, attention_mask=mask, task_id=task_id(0)).logits[1]
        alone = model(input_ids=TOKENS[1:, :6], task_id=task_id(0, 1)).logits[0]
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
        # the prompt is on in both paths, and generate (KV cache) agrees with recomputing the sequence
        prompt = TOKENS[:1, :5]
        generated = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=4,
                                   do_sample=False, pad_token_id=0, eos_token_id=None)
        sequence = prompt
        for _ in range(4):
            next_token = model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert generated.tolist() == sequence.tolist()


@pytest.mark.parametrize("strategies", [
    [{"lora": {"rank": 4, "targets": "all-linear"}}, TOPIC],
    [TOPIC, {"prompt": {"length": 3}}],
], ids=["lora+heads", "heads+prompt"])
def test_heads_model_saves_and_loads_its_adapter(strategies, tmp_path):
    model = heads_model(*strategies).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    trained = (model(input_ids=TOKENS).logits, model(input_ids=TOKENS, task_id=task_id(0)).logits)
    tuneforge.save_adapter(model, tmp_path / "adapter")
    loaded = tuneforge.load_adapter(tiny_llama(), tmp_path / "adapter").eval()
    torch.testing.assert_close(loaded(input_ids=TOKENS).logits, trained[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loaded(input_ids=TOKENS, task_id=task_id(0)).logits, trained[1],
                               atol=1e-5, rtol=1e-5)
