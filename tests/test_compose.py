"""Adapters, prefix, prompt and IA3 vs closed forms; composition conflicts; merged export; inspect counts."""

from __future__ import annotations

import json
import re

import pytest
import torch
from conftest import metric_records, tiny_llama

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.run import train_run


@pytest.mark.parametrize("strategies, message", [
    ([{"lora": {"targets": ["k_proj"]}}, {"ia3": {}}],
     r"ia3: model\.layers\.0\.self_attn\.k_proj is already wrapped \(LoRALinear\)"),
    ([{"ia3": {}}, {"lora": {"targets": "all-linear"}}], r"lora: .* is already wrapped \(IA3Linear\)"),
    ([{"prefix": {}}, {"prefix": {}}], "prefix is listed twice"),
    ([{"prompt": {}}, {"prompt": {}}], "prompt is listed twice"),
    ([{"adapter": {}}, {"adapter": {}}], "adapter is listed twice"),
])
def test_conflicting_combinations_fail_at_setup(strategies, message):
    with pytest.raises(ModelError, match=message):
        tuneforge.prepare(tiny_llama(), strategies)


@pytest.mark.parametrize("strategy, expected", [
    ({"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}, 4 * (4 * (32 + 32) + 4 * (32 + 16))),
    ({"prefix": {"length": 6}}, 2 * 4 * 16 * 6),
    ({"prompt": {"length": 6}}, 6 * 32),
    ({"ia3": {}}, 4 * (16 + 16 + 64)),
    ({"adapter": {"placement": "houlsby", "bottleneck_size": 8}}, 4 * 2 * (2 * 32 * 8 + 8 + 32)),
])
def test_inspect_counts_match_closed_forms(run_config, strategy, expected):
    from tuneforge.run import inspect_config

    report = inspect_config(run_config(strategies=[strategy]))
    assert report["trainable_by_strategy"] == {next(iter(strategy)): expected}
    assert report["trainable_params"] == expected


LORA = {"lora": {"rank": 4, "targets": "all-linear"}}


QUIET = {"samples": 0}


OBJECTIVES = [
    ("l2sp", {"l2sp": {"weight": 1.0}}, "l2sp"),
    ("ewc", {"ewc": {"weight": 100.0, "fisher_samples": 4}}, "ewc"),
    ("retention", {"retention": {"weight": 1.0, "every": 1}}, "retention"),
    ("distill", {"distill": {"teacher": "base", "temperature": 2.0, "alpha": 0.5}}, "distill_kd"),
]


@pytest.mark.parametrize("parametrization", [LORA, {"full": {}}], ids=["lora", "full"])
@pytest.mark.parametrize(("name", "objective", "term"), OBJECTIVES, ids=[o[0] for o in OBJECTIVES])
def test_objective_runs_in_the_loop_and_starts_at_zero(run_config, retain_file, parametrization, name,
                                                       objective, term):
    config = run_config(strategies=[parametrization, objective], train={"max_steps": 4},
                        retain=str(retain_file), evaluation=QUIET)
    results = train_run(config)
    values = [record[term] for record in metric_records(config)]
    assert len(values) == 4 and all(torch.isfinite(torch.tensor(v)) for v in values)
    if name == "l2sp" and parametrization is LORA:  # LoRA is new to the model: L2-SP pulls it toward zero
        assert values[0] > 0.0
    else:
        assert values[0] == pytest.approx(0.0, abs=1e-6)  # nothing has moved yet
    assert max(values[1:]) > 0.0
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]


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
