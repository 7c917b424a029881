"""Objectives in the real loop on tiny models: distill, l2sp, ewc, retention, dropout.

Each runs through `tuneforge.run.train_run`; the checks read what the run computed (logged loss terms,
weights, results.json), not mocks.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest
import torch
from conftest import ANIMALS, COLORS, tiny_llama
from safetensors.torch import load_file

from tuneforge.checkpoint import latest_checkpoint
from tuneforge.errors import ConfigError, ModelError
from tuneforge.run import train_run

LORA = {"lora": {"rank": 4, "targets": "all-linear"}}
QUIET = {"samples": 0}


@pytest.fixture(scope="session")
def retain_file(tmp_path_factory) -> Path:
    """Documents stating a colour mapping that contradicts the training task's (cat is blue, not red)."""
    rng = random.Random(0)
    rows = []
    for _ in range(12):
        sentences = [f"The {ANIMALS[i]} is {COLORS[(i + 3) % 8]}." for i in range(8)] * 3
        rng.shuffle(sentences)
        rows.append({"text": " ".join(sentences)})
    path = tmp_path_factory.mktemp("retain") / "retain.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


def metric_records(config) -> list[dict]:
    lines = (Path(config.output) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


def final_weights(config) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(Path(config.output) / "checkpoints") / "weights.safetensors"))


# Each objective with an adapter parametrization (frozen base via disabled adapters) and with full
# fine-tuning (frozen copy); the term is exactly 0 at the first step (model == reference / anchor).
OBJECTIVES = [
    ("l2sp", {"l2sp": {"weight": 1.0}}, "l2sp"),
    ("ewc", {"ewc": {"weight": 100.0, "fisher_samples": 4}}, "ewc"),
    ("retention", {"retention": {"weight": 1.0, "every": 1}}, "retention"),
    ("distill", {"distill": {"teacher": "base", "temperature": 2.0, "alpha": 0.5}}, "distill_kd"),
]


@pytest.mark.parametrize("parametrization", [LORA, {"full": {}}], ids=["lora", "full"])
@pytest.mark.parametrize(("name", "objective", "term"), OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_objective_runs_in_the_loop_and_starts_at_zero(run_config, retain_file, parametrization, name, objective, term):
    config = run_config(strategies=[parametrization, objective], train={"max_steps": 4}, retain=str(retain_file),
                        evaluation=QUIET)
    results = train_run(config)
    values = [record[term] for record in metric_records(config)]
    assert len(values) == 4 and all(torch.isfinite(torch.tensor(v)) for v in values)
    if name == "l2sp" and parametrization is LORA:  # LoRA is new to the model: L2-SP pulls it toward zero
        assert values[0] > 0.0
    else:
        assert values[0] == pytest.approx(0.0, abs=1e-6)  # nothing has moved yet
    assert max(values[1:]) > 0.0
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]


def test_task_weight_scales_the_loop_task_loss(run_config, tiny_model_dir):
    # Distillation's alpha reaches the loop through `Strategy.task_weight`. At weight 0 every gradient is
    # exactly 0, so Adam never moves: the final weights are bit-identical to the base.
    from tuneforge.strategies import REGISTRY, Options, Strategy, register
    from tuneforge.strategies.distill import Distill, DistillOptions

    if "task_off" not in REGISTRY:
        @register("task_off", Options)
        class TaskOff(Strategy):
            """Test helper: switch the task loss off."""

            family = "objective"

            def task_weight(self, ctx):
                return 0.0

    config = run_config(strategies=[{"full": {}}, "task_off"], evaluation=QUIET)
    train_run(config)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, tensor in final_weights(config).items():
        torch.testing.assert_close(tensor, base[name], atol=0, rtol=0)
    assert Distill(DistillOptions(alpha=0.3)).task_weight(None) == 0.3


def test_distill_from_a_model_folder_and_refuse_a_foreign_vocabulary(run_config, tiny_model_dir, tmp_path):
    config = run_config(strategies=[LORA, {"distill": {"teacher": str(tiny_model_dir), "kl": "reverse"}}],
                        evaluation=QUIET)
    train_run(config)
    assert metric_records(config)[0]["distill_kd"] == pytest.approx(0.0, abs=1e-6)  # same weights as the base

    foreign = tmp_path / "foreign"
    tiny_llama(vocab_size=500).save_pretrained(foreign)
    refused = run_config(strategies=[LORA, {"distill": {"teacher": str(foreign)}}], output=str(tmp_path / "r"))
    with pytest.raises(ModelError, match=r"distill: teacher .*500 output tokens, the student \d+; .*same vocabulary"):
        train_run(refused)


def test_student_keeps_chosen_layers_initialised_from_them_and_saves_a_normal_folder(
        run_config, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge import prepare

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                      [{"distill": {"student": {"every": 2}}}])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight, original.model.layers[2].mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]

    config = run_config(strategies=[{"distill": {"student": {"keep_layers": [0, 3]}, "hidden_weight": 0.5}}],
                        train={"max_steps": 5}, evaluation=QUIET)
    results = train_run(config)
    assert results["total_params"] < sum(p.numel() for p in original.parameters())
    assert metric_records(config)[-1]["distill_hidden"] > 0.0  # 2-layer student vs 4-layer teacher

    # The trained student is an ordinary 2-layer model: saved and reloaded by transformers alone.
    from tuneforge import load_adapter

    trained = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir), Path(config.output) / "adapter")
    folder = tmp_path / "student"
    trained.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.num_hidden_layers == 2
    inputs = tokenizer(["What colour is the cat?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained(**inputs).logits)


def test_dropout_sets_attention_and_lora_rates_and_refuses_what_the_model_lacks(tiny_model_dir):
    from transformers import AutoModelForCausalLM, BertConfig, BertForSequenceClassification

    from tuneforge import prepare
    from tuneforge.strategies.lora import lora_modules

    model = prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                    [LORA, {"dropout": {"attention": 0.2, "lora": 0.3}}])
    assert {layer.self_attn.attention_dropout for layer in model.model.layers} == {0.2}
    assert model.config.attention_dropout == 0.2
    assert {module.lora_dropout.p for _, module in lora_modules(model)} == {0.3}
    with pytest.raises(ModelError, match="no hidden-state dropout"):
        prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [{"dropout": {"hidden": 0.1}}])
    with pytest.raises(ModelError, match="list `dropout` after `lora`"):
        prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir), [{"dropout": {"lora": 0.1}}, LORA])

    bert = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=2,
                                                    num_attention_heads=2, intermediate_size=32))
    bert = prepare(bert, [{"dropout": {"attention": 0.05, "hidden": 0.25}}])
    rates = {name: module.p for name, module in bert.named_modules() if isinstance(module, torch.nn.Dropout)}
    assert rates["bert.encoder.layer.0.attention.self.dropout"] == 0.05
    assert rates["bert.encoder.layer.1.output.dropout"] == 0.25
    assert rates["bert.embeddings.dropout"] == 0.25 and rates["dropout"] == 0.25  # classifier too
    assert (bert.config.attention_probs_dropout_prob, bert.config.hidden_dropout_prob) == (0.05, 0.25)


def test_ewc_without_retain_data_says_what_to_set(run_config):
    with pytest.raises(ConfigError, match="ewc needs data whose knowledge to keep: set `retain:`"):
        train_run(run_config(strategies=[LORA, {"ewc": {}}]))


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
        batch = collate([chunks[i] for i in torch.randperm(len(chunks), generator=generator)[:8]], tokenizer.pad_token_id)
        loss = model(input_ids=batch["input_ids"], labels=batch["labels"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    torch.set_num_threads(threads)
    directory = tmp_path_factory.mktemp("knows-retain")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_ewc_with_a_large_weight_forgets_the_first_task_less(run_config, retain_file, knows_retain_dir, tmp_path):
    def forgetting(strategies: list, output: str) -> dict:
        config = run_config(model=str(knows_retain_dir), strategies=strategies, retain=str(retain_file),
                            train={"max_steps": 12, "lr": 1e-2}, evaluation=QUIET, output=str(tmp_path / output))
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
        config = run_config(strategies=strategies, retain=str(retain_file), evaluation=QUIET, output=str(tmp_path / output),
                            train={**train, "max_steps": max_steps})
        train_run(config, resume=resume)
        return config

    whole = run(6, "whole")
    run(3, "cut")  # "killed" after 3 steps: its last checkpoint is step 3
    stored = load_file(str(latest_checkpoint(tmp_path / "cut" / "checkpoints") / "strategies.safetensors"))
    assert any(k.startswith("ewc.fisher.0.") for k in stored) and any(k.startswith("ewc.anchor.0.") for k in stored)
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
    offline, online = EWC(EWCOptions(fisher_samples=6)), EWC(EWCOptions(fisher_samples=6, online=True, decay=0.5))
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

    tasks = []
    for index, shift in enumerate((0, 3)):  # the second task remaps every colour: it overwrites the first
        path = tmp_path / f"task{index}.jsonl"
        records = [{"prompt": f"What colour is the {ANIMALS[i % 8]}?", "completion": f" {COLORS[(i + shift) % 8]}"}
                   for i in range(32)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        tasks.append({"name": f"t{index}", "data": {"train": str(path), "eval_fraction": 0.25}})

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


def test_classification_student_distils_from_a_fine_tuned_encoder_and_refuses_other_labels(
        run_config, tiny_bert_dir, tmp_path):
    from conftest import classification_records
    from transformers import AutoModelForSequenceClassification

    from tuneforge import load_adapter

    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in classification_records("animal")))

    def run(strategies: list, name: str, steps: int = 8) -> dict:
        config = run_config(model=str(tiny_bert_dir), strategies=strategies, data={"train": str(data)},
                            train={"max_steps": steps, "lr": 3e-3}, evaluation=QUIET, output=str(tmp_path / name))
        return train_run(config), config

    _, teacher_config = run([{"full": {}}], "teacher", steps=12)  # the teacher: the 2-layer encoder fine-tuned
    labels = ["mammal", "other"]
    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label=dict(enumerate(labels)), label2id={k: i for i, k in enumerate(labels)})
    teacher = load_adapter(teacher, Path(teacher_config.output) / "adapter")
    teacher.save_pretrained(tmp_path / "teacher-model")

    results, config = run([{"distill": {"teacher": str(tmp_path / "teacher-model"), "student": {"keep_layers": [1]},
                                        "temperature": 2.0, "alpha": 0.5}}], "student")
    assert results["total_params"] < sum(p.numel() for p in teacher.parameters())  # one layer of two
    kd = [record["distill_kd"] for record in metric_records(config)]
    assert kd[0] > 0 and all(torch.isfinite(torch.tensor(kd)))  # a 1-layer student differs from its teacher

    teacher.config.id2label, teacher.config.label2id = {0: "warm", 1: "cool"}, {"warm": 0, "cool": 1}
    teacher.save_pretrained(tmp_path / "other-task")
    with pytest.raises(ModelError, match=r"distill: teacher .* predicts labels \['warm', 'cool'\], the student"):
        run([{"distill": {"teacher": str(tmp_path / "other-task")}}], "refused")


def test_regularisers_never_see_the_retain_text_forgetting_is_measured_on(run_config, tokenizer, tmp_path):
    from tuneforge.run import encode_run_data, load_run_data, retain_batch_source

    path = tmp_path / "marked.jsonl"  # document i says only "doc i" (as a word: d0c3), many times
    path.write_text("".join(json.dumps({"text": " ".join([f"d0c{i}"] * 40)}) + "\n" for i in range(9)))
    config = run_config(retain=str(path), train={"max_seq_len": 16})
    run_data = encode_run_data(load_run_data(config), config, tokenizer, tag_tasks=False)

    def documents(rows) -> set[str]:  # chunks join documents and may cut a word: read whole markers only
        return {f"d0c{i}" for row in rows for i in re.findall(r"d0c(\d)", tokenizer.decode(row))}

    measured = documents(item["input_ids"] for item in run_data.retain_items)
    stream = retain_batch_source(run_data, tokenizer, config)(batch_size=2)
    trained_on = documents(row.tolist() for _ in range(20) for row in next(stream)["input_ids"])
    assert measured and trained_on and not measured & trained_on
    assert trained_on == {"d0c2", "d0c5", "d0c8"}  # every third document goes to the regularisers
