"""Tests of the distill strategy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import metric_records, tiny_llama

from tuneforge.errors import ModelError
from tuneforge.run import train_run

LORA = {"lora": {"rank": 4, "targets": "all-linear"}}


QUIET = {"samples": 0}


def test_distill_from_a_model_folder_and_refuse_a_foreign_vocabulary(run_config, tiny_model_dir, tmp_path):
    config = run_config(strategies=[LORA, {"distill": {"teacher": str(tiny_model_dir), "kl": "reverse"}}],
                        evaluation=QUIET)
    train_run(config)
    assert metric_records(config)[0]["distill_kd"] == pytest.approx(0.0, abs=1e-6)  # same weights as the base

    foreign = tmp_path / "foreign"
    tiny_llama(vocab_size=500).save_pretrained(foreign)
    refused = run_config(strategies=[LORA, {"distill": {"teacher": str(foreign)}}],
                         output=str(tmp_path / "r"))
    with pytest.raises(ModelError,
                       match=r"distill: teacher .*500 output tokens, the student \d+; .*same vocabulary"):
        train_run(refused)


def test_student_keeps_chosen_layers_initialised_from_them_and_saves_a_normal_folder(
        run_config, tiny_model_dir, tokenizer, tmp_path):
    from transformers import AutoModelForCausalLM

    from tuneforge import prepare

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    student = prepare(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                      [{"distill": {"student": {"every": 2}}}])
    assert student.config.num_hidden_layers == 2 and len(student.model.layers) == 2
    torch.testing.assert_close(student.model.layers[1].mlp.up_proj.weight,
                               original.model.layers[2].mlp.up_proj.weight)
    assert [layer.self_attn.layer_idx for layer in student.model.layers] == [0, 1]

    config = run_config(strategies=[{"distill": {"student": {"keep_layers": [0, 3]}, "hidden_weight": 0.5}}],
                        train={"max_steps": 5}, evaluation=QUIET)
    results = train_run(config)
    assert results["total_params"] < sum(p.numel() for p in original.parameters())
    assert metric_records(config)[-1]["distill_hidden"] > 0.0  # 2-layer student vs 4-layer teacher

    # The trained student is an ordinary 2-layer model: saved and reloaded by transformers alone.
    from tuneforge import load_adapter

    trained = load_adapter(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                           Path(config.output) / "adapter")
    folder = tmp_path / "student"
    trained.save_pretrained(folder)
    reloaded = AutoModelForCausalLM.from_pretrained(folder)
    assert reloaded.config.num_hidden_layers == 2
    inputs = tokenizer(["What colour is the cat?"], return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**inputs).logits, trained(**inputs).logits)


def test_classification_student_distils_from_a_fine_tuned_encoder_and_refuses_other_labels(
        run_config, tiny_bert_dir, tmp_path):
    from conftest import classification_records
    from transformers import AutoModelForSequenceClassification

    from tuneforge import load_adapter

    data = tmp_path / "topics.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in classification_records("animal")))

    def run(strategies: list, name: str, steps: int = 8) -> dict:
        config = run_config(model=str(tiny_bert_dir), strategies=strategies, data={"train": str(data)},
                            train={"max_steps": steps, "lr": 3e-3}, evaluation=QUIET,
                            output=str(tmp_path / name))
        return train_run(config), config

    # the teacher: the 2-layer encoder fine-tuned
    _, teacher_config = run([{"full": {}}], "teacher", steps=12)
    labels = ["mammal", "other"]
    teacher = AutoModelForSequenceClassification.from_pretrained(
        tiny_bert_dir, num_labels=2, id2label=dict(enumerate(labels)),
        label2id={k: i for i, k in enumerate(labels)})
    teacher = load_adapter(teacher, Path(teacher_config.output) / "adapter")
    teacher.save_pretrained(tmp_path / "teacher-model")

    results, config = run([{"distill": {"teacher": str(tmp_path / "teacher-model"),
                                        "student": {"keep_layers": [1]},
                                        "temperature": 2.0, "alpha": 0.5}}], "student")
    assert results["total_params"] < sum(p.numel() for p in teacher.parameters())  # one layer of two
    kd = [record["distill_kd"] for record in metric_records(config)]
    assert kd[0] > 0 and all(torch.isfinite(torch.tensor(kd)))  # a 1-layer student differs from its teacher

    teacher.config.id2label, teacher.config.label2id = {0: "warm", 1: "cool"}, {"warm": 0, "cool": 1}
    teacher.save_pretrained(tmp_path / "other-task")
    with pytest.raises(ModelError,
                       match=r"distill: teacher .* predicts labels \['warm', 'cool'\], the student"):
        run([{"distill": {"teacher": str(tmp_path / "other-task")}}], "refused")
