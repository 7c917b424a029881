"""Data layer: readers, formats, templates, tokenization with label masking, collation and splitting."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tuneforge.data import (
    FORMATS,
    IGNORE_INDEX,
    Example,
    Record,
    apply_template,
    collate,
    detect_format,
    encode_causal,
    encode_classification,
    encode_dataset,
    encode_text_chunks,
    label_vocabulary,
    load_examples,
    read_records,
    split_train_eval,
    to_example,
)
from tuneforge.errors import DataError

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "hello world, what is the capital of France? Paris is the capital.",
    "The quick brown fox jumps over the lazy dog. user assistant system",
]


def make_tokenizer(chat_template: str | None = CHATML):
    """A byte-level BPE tokenizer trained in memory, ChatML special tokens, eos = <|im_end|>."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    special = ["<|pad|>", "<|im_start|>", "<|im_end|>"]
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=special,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(CORPUS * 5, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        eos_token="<|im_end|>",
        pad_token="<|pad|>",
        additional_special_tokens=["<|im_start|>"],
    )
    tokenizer.chat_template = chat_template
    return tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def write(path: Path, content: str | bytes) -> Path:
    path.write_bytes(content if isinstance(content, bytes) else content.encode("utf-8"))
    return path


def raises_data_error(*fragments: str):
    """Context manager: a DataError whose one-line message contains every fragment."""
    return _DataErrorCheck(fragments)


class _DataErrorCheck:
    def __init__(self, fragments):
        self.fragments = fragments

    def __enter__(self):
        self.context = pytest.raises(DataError)
        self.info = self.context.__enter__()
        return self.info

    def __exit__(self, *exc):
        suppressed = self.context.__exit__(*exc)
        message = str(self.info.value)
        assert "\n" not in message, message
        for fragment in self.fragments:
            assert fragment in message, f"{fragment!r} not in {message!r}"
        return suppressed


def rec(fields: dict, line: int = 3, source: str = "f.jsonl") -> Record:
    return Record(source, line, fields)


# ---------------------------------------------------------------------------------------------------
# Readers


def test_jsonl_skips_blank_lines_and_numbers_lines(tmp_path):
    path = write(tmp_path / "d.jsonl", '{"text": "a"}\n\n  \n{"text": "b"}\n')
    records = read_records(path)
    assert [(r.line, r.fields["text"]) for r in records] == [(1, "a"), (4, "b")]
    assert records[0].source == str(path)


@pytest.mark.parametrize("wrapped", [False, True])
def test_json_array_and_wrapped_array_with_item_lines(tmp_path, wrapped):
    items = '[\n  {"text": "a"},\n  {"text": "b",\n   "label": "x"}\n]'
    content = '{"data":\n' + items + "}" if wrapped else items
    records = read_records(write(tmp_path / "d.json", content))
    assert [r.fields["text"] for r in records] == ["a", "b"]
    assert [r.line for r in records] == ([3, 4] if wrapped else [2, 3])


def test_csv_lines_count_the_header_and_multiline_fields(tmp_path):
    path = write(tmp_path / "d.csv", 'prompt,completion\nhi,"there\nfriend"\nq,a\n')
    records = read_records(path)
    assert [r.line for r in records] == [2, 4]
    assert records[0].fields == {"prompt": "hi", "completion": "there\nfriend"}


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "d.parquet"
    pq.write_table(pa.table({"text": ["a", "b"], "label": ["x", "y"]}), path)
    records = read_records(path)
    assert [(r.line, r.fields) for r in records] == [
        (1, {"text": "a", "label": "x"}),
        (2, {"text": "b", "label": "y"}),
    ]


@pytest.mark.parametrize("suffix", [".txt", ".md"])
def test_plain_text_is_one_record(tmp_path, suffix):
    records = read_records(write(tmp_path / f"doc{suffix}", "line one\nline two\n"))
    assert records == [Record(str(tmp_path / f"doc{suffix}"), 1, {"text": "line one\nline two\n"})]


@pytest.mark.parametrize(
    "name, content, fragments",
    [
        ("e.jsonl", "", ["e.jsonl", "no records (file is empty)"]),
        ("e.jsonl", "\n\n", ["e.jsonl", "no records"]),
        ("bad.jsonl", '{"text": "a"}\n{"text": "b"\n', ["bad.jsonl:2:", "invalid JSON"]),
        ("bad.json", '[{"text": "a"},\n {"text": }]', ["bad.json:2:", "invalid JSON"]),
        ("row.jsonl", '{"text": "a"}\n["text"]\n', ["row.jsonl:2:", "JSON object", "array"]),
        ("row.json", '[{"text": "a"},\n "b"]', ["row.json:2:", "JSON object", "string"]),
        ("top.json", '{"a": 1, "b": 2}', ["top.json:1:", "JSON array"]),
        ("empty.json", "[]", ["empty.json", "no records"]),
        ("utf.jsonl", b'{"text": "a"}\n{"text": "\xff"}\n', ["utf.jsonl:2:", "not valid UTF-8"]),
        ("utf.csv", b"text,label\na,b\n\xe9t\xe9,c\n", ["utf.csv:3:", "not valid UTF-8"]),
        ("utf.txt", b"ok\nok\n\xff\n", ["utf.txt:3:", "not valid UTF-8"]),
        ("wide.csv", "text,label\na,b,c\n", ["wide.csv:2:", "3 fields", "header has 2"]),
        ("dup.csv", "text,text\na,b\n", ["dup.csv:1:", "duplicate", "text"]),
        ("bad.parquet", b"not parquet at all", ["bad.parquet", "Parquet"]),
        ("data.xlsx", "x", ["data.xlsx", "unsupported", ".jsonl", ".csv", ".parquet"]),
    ],
)
def test_reader_errors_name_file_and_line(tmp_path, name, content, fragments):
    path = write(tmp_path / name, content)
    with raises_data_error(*fragments):
        read_records(path)


def test_missing_file(tmp_path):
    with raises_data_error("nope.jsonl", "file not found"):
        read_records(tmp_path / "nope.jsonl")


# ---------------------------------------------------------------------------------------------------
# Formats


@pytest.mark.parametrize(
    "fields, expected",
    [
        ({"messages": [{"role": "assistant", "content": "x"}]}, "chat"),
        ({"instruction": "i", "input": "", "output": "o"}, "alpaca"),
        ({"prompt": "p", "completion": "c", "id": 1}, "completion"),
        ({"text": "t", "label": "l"}, "classification"),
        ({"text": "t"}, "text"),
    ],
)
def test_detect_format(fields, expected):
    assert detect_format(rec(fields)) == expected
    assert expected in FORMATS


def test_detect_format_error_lists_fields_and_expectations():
    with raises_data_error(
        "f.jsonl:3:", "question, answer", "completion: prompt, completion", "chat: messages"
    ):
        detect_format(rec({"question": "q", "answer": "a"}))


def test_to_example_every_format():
    assert to_example(rec({"prompt": "p", "completion": "c"}), "completion") == Example(
        "completion", "f.jsonl", 3, prompt="p", completion="c"
    )
    alpaca = to_example(rec({"instruction": "Do", "input": "this", "output": "ok"}), "alpaca")
    assert (alpaca.kind, alpaca.prompt, alpaca.completion) == ("completion", "Do\n\nthis", "ok")
    assert to_example(rec({"instruction": "Do", "input": "", "output": "ok"}), "alpaca").prompt == "Do"
    assert to_example(rec({"instruction": "Do", "output": "ok"}), "alpaca").prompt == "Do"
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo", "name": "x"}]
    chat = to_example(rec({"messages": messages}), "chat")
    assert chat.kind == "chat" and chat.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "yo"},
    ]
    classified = to_example(rec({"text": "t", "label": 3}), "classification")
    assert (classified.kind, classified.text, classified.label) == ("classification", "t", "3")
    assert to_example(rec({"text": "t"}), "text") == Example("text", "f.jsonl", 3, text="t")


@pytest.mark.parametrize(
    "fields, fmt, fragments",
    [
        (
            {"prompt": "p"},
            "completion",
            ['missing field "completion"', 'format "completion" needs: prompt, completion'],
        ),
        ({"prompt": "p", "completion": 5}, "completion", ['field "completion" must be a string (got int)']),
        ({"prompt": "p", "completion": " "}, "completion", ['field "completion" is empty']),
        ({"instruction": "i"}, "alpaca", ['missing field "output"', "instruction, output"]),
        ({"instruction": "i", "input": 3, "output": "o"}, "alpaca", ['field "input" must be a string']),
        ({"text": "t"}, "classification", ['missing field "label"']),
        ({"text": "t", "label": ["a"]}, "classification", ['field "label" must be a string (got list)']),
        ({"text": ""}, "text", ['field "text" is empty']),
        ({"messages": "hi"}, "chat", ['field "messages"', "list"]),
        (
            {
                "messages": [
                    {"role": "user", "content": "a"},
                    {"role": "assistant", "content": "b"},
                    {"role": "bot", "content": "c"},
                ]
            },
            "chat",
            ['messages[2].role: "bot" is not one of system, user, assistant'],
        ),
        ({"messages": [{"role": "user"}]}, "chat", ["messages[0]", 'missing field "content"']),
        (
            {"messages": [{"role": "assistant", "content": 1}]},
            "chat",
            ["messages[0].content must be a string"],
        ),
        ({"messages": [{"role": "user", "content": "a"}]}, "chat", ["no assistant message"]),
        ({"messages": ["hi"]}, "chat", ["messages[0] must be an object"]),
        ({"text": "t"}, "tabular", ["unknown data format", "completion"]),
    ],
)
def test_to_example_errors(fields, fmt, fragments):
    with raises_data_error("f.jsonl:3:", *fragments):
        to_example(rec(fields), fmt)


def test_load_examples_auto_detects_and_names_bad_line(tmp_path):
    path = write(tmp_path / "train.jsonl", '{"prompt": "a", "completion": "b"}\n{"prompt": "c"}\n')
    with raises_data_error("train.jsonl:2:", 'missing field "completion"'):
        load_examples(str(path))
    good = write(tmp_path / "good.csv", "text,label\nx,pos\ny,neg\n")
    examples = load_examples(str(good))
    assert [(e.kind, e.label, e.line) for e in examples] == [
        ("classification", "pos", 2),
        ("classification", "neg", 3),
    ]
    assert [e.kind for e in load_examples(str(good), format="text")] == ["text", "text"]
    with raises_data_error("unknown data format", "auto"):
        load_examples(str(good), format="tsv")


# ---------------------------------------------------------------------------------------------------
# Templates


def template(prompt, completion=None, few_shot=0, separator="\n\n"):
    return SimpleNamespace(prompt=prompt, completion=completion, few_shot=few_shot, separator=separator)


def test_template_fills_fields_and_finds_the_completion():
    records = [rec({"q": "2+2", "answer": "4"}, 1), rec({"q": "3+3", "label": 6}, 2), rec({"q": "1+0"}, 3)]
    examples = apply_template(records, template("Q: {q}\nA:"), few_shot_pool=records)
    assert [(e.kind, e.prompt, e.completion, e.line) for e in examples] == [
        ("completion", "Q: 2+2\nA:", "4", 1),
        ("completion", "Q: 3+3\nA:", "6", 2),
        ("completion", "Q: 1+0\nA:", None, 3),
    ]
    custom = apply_template(records[:1], template("{q}=", " {answer}!"), few_shot_pool=[])
    assert (custom[0].prompt, custom[0].completion) == ("2+2=", " 4!")


def test_few_shot_prepends_other_solved_examples():
    pool = [rec({"q": name, "a": name.upper()}, i) for i, name in enumerate(["x", "y", "z"], start=1)]
    shots = template("Q: {q} A:", " {a}", few_shot=2, separator="\n---\n")
    first, third = apply_template([pool[0], pool[2]], shots, few_shot_pool=pool)
    assert first.prompt == "Q: y A: Y\n---\nQ: z A: Z\n---\nQ: x A:"  # never the record itself
    assert third.prompt == "Q: x A: X\n---\nQ: y A: Y\n---\nQ: z A:"
    assert third.completion == " Z"


def test_template_errors():
    with raises_data_error("f.jsonl:3:", 'template field "question" missing', "record has: a, b"):
        apply_template([rec({"a": 1, "b": 2})], template("{question}"), few_shot_pool=[])
    with raises_data_error("template prompt", "format string"):
        apply_template([rec({"a": 1})], template("{a"), few_shot_pool=[])
    with raises_data_error("f.jsonl:3:", "few-shot example has no completion"):
        apply_template([rec({"a": 1})], template("{a}", few_shot=1), few_shot_pool=[rec({"a": 2})])


def test_load_examples_with_template(tmp_path):
    path = write(
        tmp_path / "qa.jsonl", '{"question": "hi", "answer": "yo"}\n{"question": "a", "answer": "b"}\n'
    )
    config = SimpleNamespace(prompt="Q: {question}\nA:", completion=None, few_shot=1, separator="\n\n")
    examples = load_examples(str(path), template=config)
    assert examples[0].prompt == "Q: a\nA:b\n\nQ: hi\nA:"
    assert examples[1].prompt == "Q: hi\nA:yo\n\nQ: a\nA:"


def test_template_accepts_the_config_model():
    from tuneforge.config import TemplateConfig

    examples = apply_template(
        [rec({"text": "t", "label": "l"})], TemplateConfig(prompt="{text} ->"), few_shot_pool=[]
    )
    assert (examples[0].prompt, examples[0].completion) == ("t ->", "l")


# ---------------------------------------------------------------------------------------------------
# Tokenization and label masking


def labelled(item: dict) -> list[int]:
    return [label for label in item["labels"] if label != IGNORE_INDEX]


def test_completion_masks_the_prompt_and_ends_with_eos(tokenizer):
    example = Example("completion", prompt="what is the capital of France?", completion=" Paris")
    item = encode_causal(example, tokenizer, 128)
    prompt_len = len(tokenizer(example.prompt)["input_ids"])
    assert item["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert item["labels"][prompt_len:] == item["input_ids"][prompt_len:]
    assert item["labels"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(labelled(item)) == " Paris<|im_end|>"


def test_long_prompt_is_cut_from_the_left_keeping_the_completion(tokenizer):
    example = Example("completion", prompt="hello world " * 30 + "END", completion=" the capital")
    full = encode_causal(example, tokenizer, 1000)
    item = encode_causal(example, tokenizer, 16)
    assert len(item["input_ids"]) == 16
    assert labelled(item) == labelled(full)
    assert item["input_ids"] == full["input_ids"][-16:]  # the end of the prompt survives
    tiny = encode_causal(
        Example("completion", prompt="hello", completion=" the capital of France"), tokenizer, 3
    )
    assert (
        tiny["labels"] == tiny["input_ids"] and len(tiny["input_ids"]) == 3
    )  # completion cut from the right


def test_chat_labels_only_assistant_replies_with_end_of_turn(tokenizer):
    messages = [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "what is the capital of France?"},
        {"role": "assistant", "content": "Paris is the capital."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hello world"},
    ]
    item = encode_causal(Example("chat", messages=messages), tokenizer, 512)
    assert len(item["labels"]) == len(item["input_ids"])
    assert tokenizer.decode(labelled(item)) == "Paris is the capital.<|im_end|>hello world<|im_end|>"
    assert item["labels"][-1] == IGNORE_INDEX  # the newline after the last <|im_end|>
    eos_positions = [i for i, token in enumerate(item["input_ids"]) if token == tokenizer.eos_token_id]
    assert [item["labels"][i] != IGNORE_INDEX for i in eos_positions] == [False, False, True, False, True]


SMOLLM2_TEMPLATE = (  # injects a default system prompt: prefixes of the chat do not render as prefixes
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful assistant<|im_end|>\\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


@pytest.mark.parametrize("first_role", ["user", "assistant"])
def test_chat_masking_with_a_default_system_prompt(first_role):
    tokenizer = make_tokenizer(chat_template=SMOLLM2_TEMPLATE)
    messages = [
        {"role": first_role, "content": "You are"},  # also found in the default system prompt
        {"role": "assistant" if first_role == "user" else "user", "content": "the capital"},
        {"role": "assistant", "content": "Paris is the capital."},
    ]
    item = encode_causal(Example("chat", messages=messages), tokenizer, 512)
    expected = ("" if first_role == "user" else "You are<|im_end|>") + "Paris is the capital.<|im_end|>"
    if first_role == "user":
        expected = "the capital<|im_end|>" + expected
    assert tokenizer.decode(labelled(item)) == expected
    assert "helpful assistant" in tokenizer.decode(item["input_ids"])


def test_text_example_is_all_labels_with_eos(tokenizer):
    item = encode_causal(Example("text", text="hello world"), tokenizer, 64)
    assert item["labels"] == item["input_ids"] and item["input_ids"][-1] == tokenizer.eos_token_id
    assert len(encode_causal(Example("text", text="hello world " * 20), tokenizer, 5)["input_ids"]) == 5


def test_chat_truncation_and_drop(tokenizer):
    messages = [{"role": "user", "content": "hello world " * 20}, {"role": "assistant", "content": "Paris"}]
    assert encode_causal(Example("chat", messages=messages), tokenizer, 20) is None
    assert encode_causal(Example("chat", messages=messages), tokenizer, 500) is not None


def test_chat_needs_a_chat_template():
    plain = make_tokenizer(chat_template=None)
    example = Example("chat", messages=[{"role": "assistant", "content": "hi"}])
    with raises_data_error("chat format needs a tokenizer with a chat template", "format: completion"):
        encode_causal(example, plain, 64)


def test_classification_with_causal_model_asks_for_a_template(tokenizer):
    with raises_data_error("f.csv:4:", "template", "{label}"):
        encode_causal(Example("classification", "f.csv", 4, text="t", label="l"), tokenizer, 64)


def test_text_chunks_are_full_blocks(tokenizer):
    docs = [Example("text", text=text) for text in CORPUS * 3]
    total = sum(len(tokenizer(d.text)["input_ids"]) + 1 for d in docs)
    chunks = encode_text_chunks(docs, tokenizer, 8)
    assert len(chunks) == total // 8
    assert all(len(c["input_ids"]) == 8 and c["labels"] == c["input_ids"] for c in chunks)
    joined = [token for chunk in chunks for token in chunk["input_ids"]]
    assert joined.count(tokenizer.eos_token_id) >= 2  # documents are separated by EOS
    assert len(encode_text_chunks(docs, tokenizer, 8, max_chunks=5)) == 5
    short = encode_text_chunks([Example("text", text="hello")], tokenizer, 64)
    assert len(short) == 1 and short[0]["input_ids"][-1] == tokenizer.eos_token_id


def test_text_chunks_with_max_chunks_spread_over_documents(tokenizer):
    docs = [Example("text", text=f"{i} " + "hello world " * 50) for i in range(10)]
    chunks = encode_text_chunks(docs, tokenizer, 16, max_chunks=10)
    assert chunks == encode_text_chunks(docs, tokenizer, 16, max_chunks=10)  # deterministic
    firsts = {tokenizer.decode(c["input_ids"]).split()[0] for c in chunks}
    assert len(firsts) >= 5  # starts of many different documents, not one document cut ten times


def test_encode_classification_and_unknown_label(tokenizer):
    example = Example("classification", "f.csv", 2, text="hello world " * 20, label="pos")
    item = encode_classification(example, tokenizer, 8, {"neg": 0, "pos": 1})
    assert item["labels"] == 1 and len(item["input_ids"]) == 8 and item["attention_mask"] == [1] * 8
    with raises_data_error("f.csv:2:", 'label "pos"', "neg"):
        encode_classification(example, tokenizer, 8, {"neg": 0})


def test_encode_dataset_counts_drops(tokenizer):
    chat = [{"role": "user", "content": "hello world " * 20}, {"role": "assistant", "content": "Paris"}]
    examples = [
        Example("completion", prompt="a", completion=" b"),
        Example("chat", messages=chat),
        Example("text", text="hello world " * 10),
    ]
    items, dropped = encode_dataset(examples, tokenizer, 12, task="causal_lm")
    assert dropped == 1
    assert len(items) >= 2 and all(len(i["input_ids"]) <= 12 for i in items)
    labels = [Example("classification", text="x", label=name) for name in ["b", "a", "b"]]
    assert label_vocabulary(labels) == {"a": 0, "b": 1}
    encoded, dropped = encode_dataset(labels, tokenizer, 12, task="classification")
    assert [i["labels"] for i in encoded] == [1, 0, 1] and dropped == 0


# ---------------------------------------------------------------------------------------------------
# Batching and splitting


def test_collate_pads_right():
    batch = collate(
        [
            {"input_ids": [5, 6, 7], "labels": [-100, 6, 7], "task_id": 1},
            {"input_ids": [8], "labels": [8], "task_id": 0},
        ],
        pad_token_id=0,
    )
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert batch["task_id"].tolist() == [1, 0] and batch["task_id"].dtype == torch.long


def test_collate_classification_labels():
    batch = collate(
        [{"input_ids": [1, 2], "attention_mask": [1, 1], "labels": 3}, {"input_ids": [4], "labels": 0}], 9
    )
    assert batch["labels"].shape == (2,) and batch["labels"].tolist() == [3, 0]
    assert batch["input_ids"].tolist() == [[1, 2], [4, 9]]


def test_split_is_deterministic_and_disjoint():
    items = list(range(50))
    train, evaluation = split_train_eval(items, 0.2, seed=7, max_eval=None)
    assert (train, evaluation) == split_train_eval(items, 0.2, seed=7, max_eval=None)
    assert len(evaluation) == 10 and sorted(train + evaluation) == items
    assert split_train_eval(items, 0.2, seed=8, max_eval=None)[1] != evaluation
    assert len(split_train_eval(items, 0.2, seed=7, max_eval=3)[1]) == 3
    assert [len(part) for part in split_train_eval([1, 2], 0.01, seed=0, max_eval=None)] == [1, 1]
    assert split_train_eval([1], 0.5, seed=0, max_eval=None) == ([1], [])


def test_json_helper_roundtrip(tmp_path):
    rows = [{"prompt": f"p{i}", "completion": f"c{i}"} for i in range(3)]
    path = write(tmp_path / "rows.json", json.dumps(rows, indent=2))
    assert [e.completion for e in load_examples(str(path))] == ["c0", "c1", "c2"]
    assert [e.line for e in load_examples(str(path))] == [2, 6, 10]
