"""Shared fixtures: a tiny tokenizer, tiny Llama-shaped models and a tiny task, all built offline."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch

torch.set_num_threads(1)  # tiny models: threading overhead dwarfs the work, and CI shares 2 cores


@pytest.fixture(autouse=True)
def one_thread():
    """Every test starts on one intra-op thread, whatever an earlier test or library left behind."""
    torch.set_num_threads(1)
    yield


@pytest.fixture(autouse=True)
def registry_restored():
    """Strategies a test registers (crash helpers) leave the global registry with the test: the composition
    matrix and the boundary checks read it."""
    from tuneforge.strategies import REGISTRY

    saved = dict(REGISTRY)
    yield
    REGISTRY.clear()
    REGISTRY.update(saved)

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
COLORS = ["red", "green", "blue", "yellow", "black", "white", "orange", "purple"]
ANIMALS = ["cat", "dog", "bird", "fish", "horse", "cow", "sheep", "mouse"]


def task_records(count: int = 64) -> list[dict]:
    """A learnable toy task: name the animal's colour in a fixed mapping."""
    return [
        {"prompt": f"What colour is the {ANIMALS[i % 8]}?",
         "completion": f" The {ANIMALS[i % 8]} is {COLORS[i % 8]}."}
        for i in range(count)
    ]


def make_tokenizer():
    """Byte-level BPE trained in memory, ChatML special tokens, eos = <|im_end|>, pad = <|pad|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = [r["prompt"] + r["completion"] for r in task_records(16)]
    corpus += ["To be, or not to be, that is the question. user assistant system hello world"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|pad|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    backend.train_from_iterator(corpus * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, eos_token="<|im_end|>", pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = CHATML
    return tokenizer


def tiny_llama(vocab_size: int = 300, layers: int = 4, seed: int = 0, initializer_range: float = 0.2,
               **overrides):
    """A random Llama-shaped causal LM small enough to train in milliseconds.

    Weights are drawn with std 0.2 (not 0.02) so the frozen output head is sharp enough for LoRA alone
    to learn the toy task in a few steps.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        pad_token_id=0, eos_token_id=2, bos_token_id=1, tie_word_embeddings=False,
        initializer_range=initializer_range, **overrides,
    )
    return LlamaForCausalLM(config)


def tiny_bert(seed: int = 0):
    """A random 2-layer BERT sequence classifier (3 labels): the encoder family of the bundled MiniLM."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    config = BertConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_labels=3, max_position_embeddings=64, pad_token_id=0,
                        initializer_range=0.2)
    return BertForSequenceClassification(config)


@pytest.fixture(scope="session")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tokenizer) -> Path:
    """A Hugging Face model folder (config, safetensors, tokenizer) of a tiny Llama."""
    directory = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory, tokenizer) -> Path:
    """A Hugging Face folder of a tiny BERT encoder (no head), sharing the tiny tokenizer."""
    from transformers import BertConfig, BertModel

    directory = tmp_path_factory.mktemp("tiny-bert")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128,
                        pad_token_id=tokenizer.pad_token_id)
    BertModel(config).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def classification_records(kind: str, count: int = 48) -> list[dict]:
    """Toy topic tasks over the animal sentences: `animal` (mammal / other) or `colour` (warm / cool)."""
    warm = {"red", "yellow", "orange"}
    records = []
    for i in range(count):
        animal, colour = ANIMALS[i % 8], COLORS[(i * 3) % 8]
        mammal = animal in ("cat", "dog", "horse", "cow", "sheep", "mouse")
        label = ("mammal" if mammal else "other") if kind == "animal" \
            else ("warm" if colour in warm else "cool")
        records.append({"text": f"The {animal} is {colour}.", "label": label})
    return records


@pytest.fixture(scope="session")
def task_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in task_records(64)))
    return path


@pytest.fixture
def run_config(tmp_path, tiny_model_dir, task_file):
    """A factory of validated tiny run configs; keyword arguments update sections."""
    from tuneforge.config import validate_config

    def make(strategies=None, train=None, data=None, **top):
        raw = {
            "model": str(tiny_model_dir),
            "data": {"train": str(task_file), "max_eval_examples": 8, **(data or {})},
            "retain": None,
            "strategies": (strategies if strategies is not None
                           else [{"lora": {"rank": 4, "targets": "all-linear"}}]),
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64, "log_every": 1,
                      **(train or {})},
            "evaluation": {"samples": 1, "max_new_tokens": 8},
            "output": str(tmp_path / "run"),
            **top,
        }
        return validate_config(raw)

    return make


# ---- helpers shared by the strategy tests ----


def randomize(model, prefix: str, scale: float = 0.3, seed: int = 1) -> None:
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if any(part.startswith(prefix) for part in name.split(".")):
                parameter.add_(torch.randn(parameter.shape, generator=generator) * scale)


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def metric_records(config) -> list[dict]:
    lines = (Path(config.output) / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if "split" not in r]


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


def colour_sequence_tasks(directory: Path) -> list[dict]:
    """Two colour-naming tasks for a sequence run; the second remaps every colour (overwrites the first)."""
    tasks = []
    for index, shift in enumerate((0, 3)):
        path = directory / f"task{index}.jsonl"
        records = [{"prompt": f"What colour is the {ANIMALS[i % 8]}?",
                    "completion": f" {COLORS[(i + shift) % 8]}"} for i in range(32)]
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
        tasks.append({"name": f"t{index}", "data": {"train": str(path), "eval_fraction": 0.25}})
    return tasks


def cli_run_config(directory: Path, model_dir: Path, train_file: Path, strategies: list, train: dict) -> Path:
    """A config file for `tuneforge train` on the tiny model and task (output given on the command line)."""
    import yaml

    config = {"model": str(model_dir), "data": {"train": str(train_file), "max_eval_examples": 4},
              "retain": None, "strategies": strategies,
              "train": {"batch_size": 4, "lr": 1e-2, "max_seq_len": 64, "log_every": 1, **train},
              "evaluation": {"samples": 0}, "output": "unused"}
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def trained_reference(config_file: Path, directory: Path) -> Path:
    """The run of `config_file`, uninterrupted, under `directory/run`."""
    from tuneforge.cli import main

    output = directory / "run"
    assert main(["train", str(config_file), "--output", str(output)]) == 0
    return output

