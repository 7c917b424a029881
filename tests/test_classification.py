"""Classification runs as a user brings them (issue 18, causes 6-8): a sequence classifier loaded from a body
or language-model checkpoint gets a new head, which trains with every parametrization and is saved (PEFT's
`modules_to_save`); `eval --adapter` and `export` load it back; EWC and retention say what a classifier
lacks.
"""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
import yaml

import tuneforge
from tuneforge.cli import main
from tuneforge.config import validate_config
from tuneforge.errors import ConfigError, ModelError
from tuneforge.models import load_model, new_head_modules
from tuneforge.run import train_run

COLOURS = ["red", "green", "blue", "yellow"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow"]
LABELS = sorted(COLOURS)


def colour_records(count: int = 48) -> list[dict]:
    """A separable 4-label task (chance: 0.25): the label is the colour the sentence names."""
    return [{"text": f"The {ANIMALS[i % 6]} is {COLOURS[(i * 5) % 4]}.", "label": COLOURS[(i * 5) % 4]}
            for i in range(count)]


@pytest.fixture(scope="module")
def colour_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("cls") / "colours.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in colour_records()))
    return path


def model_dir(request, name: str) -> Path:
    return request.getfixturevalue("tiny_model_dir" if name == "llama" else "tiny_bert_dir")


def write_config(tmp_path: Path, model: Path, data: Path, strategies: list, output: str = "run",
                 **top) -> Path:
    raw = {"model": str(model), "data": {"train": str(data), "eval": str(data)}, "retain": None,
           "strategies": strategies,
           "train": {"max_steps": 40, "batch_size": 8, "lr": 1e-2, "max_seq_len": 32, "seed": 0},
           "evaluation": {"samples": 0}, "output": str(tmp_path / output), **top}
    path = tmp_path / f"{output}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def cli(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(list(argv))
    return code, out.getvalue(), err.getvalue()


def inputs(tokenizer) -> dict:
    texts = [r["text"] for r in colour_records(8)]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def classifier(folder: Path, seed: int):
    """The run's base as `load_model` builds it; `seed` draws a different random head each time."""
    torch.manual_seed(seed)
    return load_model(str(folder), "classification", LABELS)


def test_a_classifier_on_a_body_checkpoint_has_a_new_head(tiny_model_dir, tiny_bert_dir):
    assert new_head_modules(classifier(tiny_model_dir, 0)[0]) == ("score",)
    assert new_head_modules(classifier(tiny_bert_dir, 0)[0]) == ("classifier",)
    assert new_head_modules(load_model(str(tiny_model_dir))[0]) == ()  # a causal LM loads whole


# Cause 8: a parametrization that leaves the base frozen still trains and saves the new head.
@pytest.mark.parametrize(("kind", "strategies"), [
    ("llama", [{"lora": {"rank": 4, "targets": "all-linear"}}]),
    ("bert", [{"lora": {"rank": 4, "targets": "all-linear"}}]),
    ("llama", [{"ia3": {}}]),
    ("llama", [{"adapter": {}}]),
    ("llama", [{"prompt": {"length": 2}}]),
])
def test_new_head_trains_with_every_parametrization_and_reloads(kind, strategies, request, tmp_path,
                                                                colour_file):
    folder = model_dir(request, kind)
    path = write_config(tmp_path, folder, colour_file, strategies)
    config = validate_config(yaml.safe_load(path.read_text()))
    results = train_run(config)
    head = new_head_modules(classifier(folder, 0)[0])[0]
    assert results["trainable_by_strategy"]["new head"] > 0
    assert results["before"]["eval"]["accuracy"] <= 0.5
    assert results["after"]["eval"]["accuracy"] >= 0.75, results["after"]["eval"]
    adapter = tmp_path / "run" / "adapter"
    saved = json.loads((adapter / "tuneforge.json").read_text())
    assert saved["model"] == {"task_type": "classification", "labels": LABELS}
    from safetensors.torch import load_file

    keys = list(load_file(str(adapter / "adapter_model.safetensors")))
    assert sum(head in key for key in keys) >= 1 and len(keys) == len(set(keys))
    # reloaded on two different random heads: equal logits, the trained ones
    first, tokenizer, _ = classifier(folder, 1)
    second, _, _ = classifier(folder, 2)
    batch = inputs(tokenizer)
    with torch.no_grad():
        one = tuneforge.load_adapter(first, adapter, tokenizer).eval()(**batch).logits
        two = tuneforge.load_adapter(second, adapter, tokenizer).eval()(**batch).logits
    torch.testing.assert_close(one, two, atol=0, rtol=0)


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_eval_adapter_is_deterministic_and_equals_the_run(kind, request, tmp_path, colour_file):
    lora = [{"lora": {"rank": 4, "targets": "all-linear"}}]
    config = write_config(tmp_path, model_dir(request, kind), colour_file, lora)
    assert cli("train", str(config))[0] == 0
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    accuracies = []
    for _ in range(2):
        code, out, err = cli("eval", str(config), "--adapter", str(tmp_path / "run" / "adapter"), "--json")
        assert code == 0, err
        accuracies.append(json.loads(out)["eval"]["accuracy"])
    assert accuracies[0] == accuracies[1] == results["after"]["eval"]["accuracy"]
    # without an adapter: the base with the head the run drew (seeded as the run is), its "before"
    code, out, err = cli("eval", str(config), "--json")
    assert code == 0, err
    assert json.loads(out)["eval"]["accuracy"] == results["before"]["eval"]["accuracy"]


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_peft_loads_our_classifier_adapter_and_we_load_its(kind, request, tmp_path):
    """Both directions with task_type SEQ_CLS: the head is PEFT's `modules_to_save`, keyed as PEFT keys it."""
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForSequenceClassification

    folder = model_dir(request, kind)
    model, tokenizer, _ = classifier(folder, 0)
    # explicit targets: PEFT's all-linear also takes BERT's pooler, ours does not (target data, not the head)
    targets = "all-linear" if kind == "llama" else ["query", "value", "dense"]
    model = tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": targets}}]).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.requires_grad:
                parameter.add_(torch.randn_like(parameter) * 0.3)
    batch = inputs(tokenizer)
    expected = model(**batch).logits.detach()
    tuneforge.save_adapter(model, tmp_path / "ours")
    config = json.loads((tmp_path / "ours" / "adapter_config.json").read_text())
    head = new_head_modules(model)[0]
    assert config["task_type"] == "SEQ_CLS" and config["modules_to_save"] == [head]

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=4)
    base.config.pad_token_id = tokenizer.pad_token_id
    theirs = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(theirs(**batch).logits, expected, atol=1e-5, rtol=1e-5)
        theirs.save_pretrained(tmp_path / "theirs")  # PEFT's own SEQ_CLS adapter, written by PEFT
        ours = tuneforge.load_adapter(classifier(folder, 4)[0], tmp_path / "theirs", tokenizer).eval()
        torch.testing.assert_close(ours(**batch).logits, expected, atol=1e-5, rtol=1e-5)


def test_prompt_learning_heads_use_peft_keys(tiny_model_dir, tmp_path):
    """PEFT keys a prompt-learning method's head `base_model.<name>`; ours round-trips through that key."""
    from safetensors.torch import load_file

    model, tokenizer, _ = classifier(tiny_model_dir, 0)
    model = tuneforge.prepare(model, [{"prompt": {"length": 2}}], tokenizer).eval()
    with torch.no_grad():
        model.score.weight.add_(1.0)
    tuneforge.save_adapter(model, tmp_path / "adapter")
    assert set(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))) == \
        {"prompt_embeddings", "base_model.score.weight"}
    loaded = tuneforge.load_adapter(classifier(tiny_model_dir, 5)[0], tmp_path / "adapter", tokenizer)
    torch.testing.assert_close(loaded.score.weight, model.score.weight)


@pytest.mark.parametrize("strategies", [[{"full": {}}],
                                        [{"layerwise": {"train_layers": "top:1", "train_head": False}}]])
def test_base_weight_strategies_train_the_new_head_and_save_it_once(strategies, tiny_bert_dir, tmp_path):
    from safetensors.torch import load_file

    model, tokenizer, _ = classifier(tiny_bert_dir, 0)
    model = tuneforge.prepare(model, strategies, tokenizer)
    assert model.classifier.weight.requires_grad
    tuneforge.save_adapter(model, tmp_path / "adapter")
    keys = list(load_file(str(tmp_path / "adapter" / "adapter_model.safetensors")))
    assert keys.count("base_model.model.classifier.weight") == 1
    assert not (tmp_path / "adapter" / "adapter_config.json").exists()  # trained base weights: tuneforge only


def test_an_adapter_without_the_new_head_is_refused(tiny_model_dir, tmp_path):
    model, tokenizer, _ = classifier(tiny_model_dir, 0)
    model = tuneforge.prepare(model, [{"lora": {"rank": 2}}], tokenizer)
    tuneforge.save_adapter(model, tmp_path / "adapter")
    from safetensors.torch import load_file, save_file

    weights = tmp_path / "adapter" / "adapter_model.safetensors"
    save_file({k: v for k, v in load_file(str(weights)).items() if "score" not in k}, str(weights))
    with pytest.raises(ModelError, match="no weights for score.weight, a classification head"):
        tuneforge.load_adapter(classifier(tiny_model_dir, 1)[0], tmp_path / "adapter", tokenizer)


# Cause 6: export of a classification run loads the base as the run did.
@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_export_of_a_classification_run_reloads_with_equal_logits(kind, request, tmp_path, colour_file):
    from transformers import AutoModelForSequenceClassification

    folder = model_dir(request, kind)
    config = write_config(tmp_path, folder, colour_file, [{"lora": {"rank": 4, "targets": "all-linear"}}],
                          train={"max_steps": 4, "batch_size": 8, "lr": 1e-2, "max_seq_len": 32})
    assert cli("train", str(config))[0] == 0
    code, _, err = cli("export", str(tmp_path / "run"), "--merged", str(tmp_path / "merged"))
    assert code == 0, err
    model, tokenizer, _ = classifier(folder, 1)
    model = tuneforge.load_adapter(model, tmp_path / "run" / "adapter", tokenizer).eval()
    merged = AutoModelForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    assert merged.config.id2label == dict(enumerate(LABELS))
    assert not any("lora" in name for name, _ in merged.named_parameters())
    batch = inputs(tokenizer)
    with torch.no_grad():
        torch.testing.assert_close(merged(**batch).logits, model(**batch).logits, atol=1e-4, rtol=1e-4)


# Cause 7: what needs a language model's retain text says so on a classifier; an unused retain is a note.
@pytest.mark.parametrize(("strategy", "says"), [
    ("ewc", "ewc on a classifier protects earlier tasks of a sequence"),
    ("retention", "retention keeps a language model's predictions"),
])
def test_ewc_and_retention_on_a_classifier_refuse_with_the_true_reason(strategy, says, tiny_bert_dir,
                                                                       tmp_path, colour_file):
    strategies = [{"lora": {"targets": "all-linear"}}, {strategy: {}}]
    config = write_config(tmp_path, tiny_bert_dir, colour_file, strategies, retain="builtin:shakespeare")
    code, _, err = cli("validate", str(config))
    assert code == 2 and says in err and "no language-model head" in err, err
    with pytest.raises(ConfigError, match=says):
        train_run(validate_config(yaml.safe_load(config.read_text())))


def test_ewc_on_a_classification_sequence_uses_the_tasks(tiny_bert_dir, tmp_path, colour_file):
    """In a sequence, each finished task's Fisher protects it: no retain text is needed or asked for."""
    raw = {"model": str(tiny_bert_dir), "retain": None, "schedule": {"mode": "sequence"},
           "tasks": [{"name": name, "data": {"train": str(colour_file)}} for name in ("a", "b")],
           "strategies": [{"full": {}}, {"heads": {}}, {"ewc": {"fisher_samples": 4}}],
           "train": {"max_steps": 2, "batch_size": 4, "max_seq_len": 32}, "evaluation": {"samples": 0},
           "output": str(tmp_path / "run")}
    results = train_run(validate_config(raw))
    assert results["steps"] > 0


def test_an_unused_retain_is_a_note_in_results_not_dropped_silently(tiny_bert_dir, tmp_path, colour_file):
    config = write_config(tmp_path, tiny_bert_dir, colour_file, [{"lora": {"targets": "all-linear"}}],
                          retain="builtin:shakespeare",
                          train={"max_steps": 1, "batch_size": 8, "max_seq_len": 32})
    code, out, _ = cli("validate", str(config))
    assert code == 0 and "is not used" in out
    results = train_run(validate_config(yaml.safe_load(config.read_text())))
    notes = results["notes"]
    assert any("retain: builtin:shakespeare is not used" in note and "classifier" in note for note in notes)
    assert "retain" not in results["after"]
