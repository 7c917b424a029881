"""EWC's Fisher is the per-sequence empirical Fisher, also when the loop feeds packed rows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import COLORS, colour_sequence_tasks, metric_records, tiny_llama
from safetensors.torch import load_file

import tuneforge
from tuneforge.checkpoint import latest_checkpoint
from tuneforge.data import collate
from tuneforge.errors import ConfigError
from tuneforge.packing import packed_collate
from tuneforge.run import train_run
from tuneforge.strategies import StrategyContext
from tuneforge.strategies.ewc import single_examples

PAD = 0
CAPACITY = 13


def documents() -> list[dict]:
    generator = torch.Generator().manual_seed(0)
    items = []
    for length, prompt in ((7, 2), (5, 1), (10, 3)):
        ids = torch.randint(3, 300, (length,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] * prompt + ids[prompt:]})  # prompt tokens masked
    return items


def task_fisher(model, batches: list[dict]) -> dict[str, torch.Tensor]:
    """The Fisher EWC keeps for a finished task whose training batches were `batches`."""
    ewc = next(s for s in model.tuneforge_strategies if s.name == "ewc")
    ewc.penalties, ewc.task_examples = [], []
    ctx = StrategyContext(current_task="t")
    ewc.on_train_start(model, ctx)
    for batch in batches:
        ewc.loss(model, batch, None, ctx)
    ewc.on_task_end(model, "t", ctx)
    (_, fisher), = ewc.penalties
    return fisher


def test_packed_rows_split_into_their_documents():
    items = documents()
    packed = packed_collate(items, PAD, capacity=CAPACITY)
    # row 0: documents 0 and 1 (12 tokens); row 1: document 2 (10 tokens) and 2 padding tokens
    assert packed["input_ids"].shape == (2, 12) and packed["attention_mask"][1].sum() == 10
    examples = single_examples(packed)
    assert len(examples) == 3
    for example, item in zip(examples, items, strict=True):
        assert example["input_ids"].tolist() == [item["input_ids"]]
        assert example["attention_mask"].tolist() == [[1] * len(item["input_ids"])]
        # the first token is no target either way
        assert example["labels"][0, 1:].tolist() == item["labels"][1:]
        assert "position_ids" not in example


def test_fisher_of_packed_rows_equals_the_fisher_of_its_documents_alone():
    model = tuneforge.prepare(tiny_llama(), [{"full": {}}, {"ewc": {"fisher_samples": 8}}])
    items = documents()
    packed = task_fisher(model, [packed_collate(items, PAD, capacity=CAPACITY)])
    alone = task_fisher(model, [collate([item], PAD) for item in items])
    assert packed.keys() == alone.keys()
    for name in alone:
        torch.testing.assert_close(packed[name], alone[name], atol=1e-6, rtol=1e-4, msg=name)
    assert max(value.abs().max().item() for value in alone.values()) > 1e-4  # a Fisher worth comparing


@pytest.mark.parametrize("rows", [1, 2])
def test_padded_batches_still_split_into_rows(rows):
    items = documents()[:rows]
    examples = single_examples(collate(items, PAD))
    assert [e["input_ids"].tolist() for e in examples] == [[item["input_ids"]] for item in items]


LORA = {"lora": {"rank": 4, "targets": "all-linear"}}


QUIET = {"samples": 0}


def final_weights(config) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(Path(config.output) / "checkpoints") / "weights.safetensors"))


@pytest.fixture(scope="session")
def knows_retain_dir(tmp_path_factory, tokenizer, retain_file) -> Path:
    """A tiny Llama trained on the retain documents first: the knowledge the next fine-tune may forget."""
    from tuneforge.data import Example, collate, encode_text_chunks

    texts = [json.loads(line)["text"] for line in retain_file.read_text().splitlines()]
    chunks = encode_text_chunks([Example(kind="text", text=text) for text in texts], tokenizer, 64)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model = tiny_llama(vocab_size=len(tokenizer), seed=1)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(60):
        order = torch.randperm(len(chunks), generator=generator)
        batch = collate([chunks[i] for i in order[:8]], tokenizer.pad_token_id)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    directory = tmp_path_factory.mktemp("knows-retain")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_ewc_without_retain_data_says_what_to_set(run_config):
    with pytest.raises(ConfigError, match="ewc needs data whose knowledge to keep: set `retain:`"):
        train_run(run_config(strategies=[LORA, {"ewc": {}}]))


def test_ewc_with_a_large_weight_forgets_the_first_task_less(run_config, retain_file, knows_retain_dir,
                                                              tmp_path):
    def forgetting(strategies: list, output: str) -> dict:
        config = run_config(model=str(knows_retain_dir), strategies=strategies, retain=str(retain_file),
                            train={"max_steps": 12, "lr": 1e-2}, evaluation=QUIET,
                            output=str(tmp_path / output))
        return train_run(config)

    plain = forgetting([{"full": {}}], "plain")
    ewc = forgetting([{"full": {}}, {"ewc": {"weight": 1e4, "fisher_samples": 16}}], "ewc")
    assert plain["before"]["retain"]["loss"] < 1.0  # the first task was learned
    assert plain["forgetting"]["loss"] > 0.5  # plain fine-tuning on the contradicting task forgets it
    assert ewc["forgetting"]["loss"] < 0.5 * plain["forgetting"]["loss"]
    assert ewc["after"]["eval"]["loss"] < ewc["before"]["eval"]["loss"]  # and the new task still moved


def test_ewc_and_retention_resume_exactly(run_config, retain_file, tmp_path):
    strategies = [{"full": {}}, {"ewc": {"weight": 50.0, "fisher_samples": 4}}, {"retention": {"every": 2}}]
    train = {"schedule": "constant", "save_every": 3}

    def run(max_steps: int, output: str, resume: bool = False):
        config = run_config(strategies=strategies, retain=str(retain_file), evaluation=QUIET,
                            output=str(tmp_path / output), train={**train, "max_steps": max_steps})
        train_run(config, resume=resume)
        return config

    whole = run(6, "whole")
    run(3, "cut")  # "killed" after 3 steps: its last checkpoint is step 3
    stored = load_file(str(latest_checkpoint(tmp_path / "cut" / "checkpoints") / "strategies.safetensors"))
    assert any(k.startswith("ewc.fisher.0.") for k in stored)
    assert any(k.startswith("ewc.anchor.0.") for k in stored)
    resumed = run(6, "cut", resume=True)

    a, b = final_weights(whole), final_weights(resumed)
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    terms = [(r["ewc"], r.get("retention")) for r in metric_records(resumed)]
    assert terms == [(r["ewc"], r.get("retention")) for r in metric_records(whole)]


def test_online_ewc_folds_task_fishers_and_state_round_trips(tokenizer):
    from tuneforge.data import collate, encode_causal
    from tuneforge.data.formats import Example
    from tuneforge.strategies import StrategyContext
    from tuneforge.strategies.ewc import EWC, EWCOptions

    model = tiny_llama(vocab_size=len(tokenizer))
    items = [encode_causal(Example(kind="text", text=f"The cat is {c}."), tokenizer, 32) for c in COLORS]
    batches = [collate(items[i:i + 4], tokenizer.pad_token_id) for i in (0, 4)]
    ctx = StrategyContext(task_type="causal_lm", current_task="a")  # in a sequence, without retain data
    offline = EWC(EWCOptions(fisher_samples=6))
    online = EWC(EWCOptions(fisher_samples=6, online=True, decay=0.5))
    for strategy in (offline, online):
        strategy.on_train_start(model, ctx)
        for task in ("a", "b"):  # same weights and data twice: the same Fisher again
            for batch in batches:
                strategy.loss(model, batch, None, ctx)
            assert len(strategy.task_examples) == 6  # the task's first sequences, padding cut off
            strategy.on_task_end(model, task, ctx)
    assert len(offline.penalties) == 2 and len(online.penalties) == 1
    (_, first), (_, second) = offline.penalties
    (_, folded), = online.penalties
    for name in first:
        torch.testing.assert_close(second[name], first[name])
        torch.testing.assert_close(folded[name], 1.5 * first[name])  # decay * F_a + F_b
    assert max(float(f.abs().max()) for f in first.values()) > 0

    with torch.no_grad():
        model.lm_head.weight.add_(0.1)  # move away from the anchors
    restored = EWC(EWCOptions(online=True, decay=0.5))
    restored.load_state_dict(online.state_dict())
    expected = online.loss(model, batches[0], None, ctx)["ewc"]
    assert expected.item() > 0
    assert restored.loss(model, batches[0], None, ctx)["ewc"].item() == expected.item()


def test_ewc_across_a_task_sequence_keeps_the_first_task(tmp_path, tiny_model_dir):
    from tuneforge.config import validate_config

    tasks = colour_sequence_tasks(tmp_path)  # task 1 remaps every colour: it overwrites task 0

    def sequence(strategies: list, name: str) -> dict:
        return train_run(validate_config({
            "model": str(tiny_model_dir), "retain": None, "tasks": tasks, "schedule": {"mode": "sequence"},
            "strategies": strategies, "evaluation": {"samples": 0}, "output": str(tmp_path / name),
            "train": {"max_steps": 40, "batch_size": 4, "lr": 1e-2, "max_seq_len": 32},
        }))["continual"]

    plain = sequence([{"full": {}}], "plain")
    ewc = sequence([{"full": {}}, {"ewc": {"weight": 1e4, "fisher_samples": 16, "online": True}}], "ewc")
    assert plain["matrix"][0][0] > plain["baseline"][0]  # task 0 was learned ...
    assert plain["bwt"] < 0  # ... and task 1 made the model forget it
    assert ewc["bwt"] > plain["bwt"]  # less backward forgetting with EWC
