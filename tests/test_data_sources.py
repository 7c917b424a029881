"""Data as users have it: ShareGPT records, saved Hugging Face datasets, Arrow/Parquet shards, and
LLaMA-Factory `dataset_info.json` registries; bad records named by file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tuneforge.config import load_config
from tuneforge.data import load_examples
from tuneforge.errors import ConfigError, DataError

FIXTURES = Path(__file__).parent / "fixtures"


def one_line_error(call, *fragments: str) -> str:
    with pytest.raises(DataError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"
    return message


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def turns(*pairs: tuple[str, str]) -> list[dict]:
    return [{"from": role, "value": text} for role, text in pairs]


# ---------------------------------------------------------------------------------------------------
# ShareGPT


def test_sharegpt_is_detected_and_becomes_chat(tmp_path):
    path = write_jsonl(
        tmp_path / "s.jsonl",
        [
            {"conversations": turns(("system", "Be brief."), ("human", "Hi"), ("gpt", "Hello"))},
            {
                "system": "You are kind.",
                "conversations": turns(("human", "2+2?"), ("gpt", "4"), ("human", "x2?"), ("gpt", "8")),
            },
            {"conversations": [{"role": "user", "content": "Yes?"}, {"role": "assistant", "content": "No."}]},
        ],
    )
    examples = load_examples(str(path))
    assert [e.kind for e in examples] == ["chat"] * 3
    assert examples[0].messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert [m["role"] for m in examples[1].messages] == ["system", "user", "assistant", "user", "assistant"]
    assert examples[1].messages[0]["content"] == "You are kind."
    assert examples[2].messages[1] == {"role": "assistant", "content": "No."}


@pytest.mark.parametrize(
    "bad, fragments",
    [
        (
            {"conversations": turns(("human", "Hi"), ("bot", "Hello"))},
            ["conversations[1].from", "'bot'", "gpt"],
        ),
        ({"conversations": turns(("human", "Hi"), ("observation", "{}"))}, ["tool turns are not supported"]),
        (
            {"conversations": [{"from": "human"}, {"from": "gpt", "value": "x"}]},
            ['conversations[0]: missing field "value"'],
        ),
        ({"conversations": turns(("human", "Hi"))}, ["no gpt turn"]),
        ({"conversations": turns(("human", "Hi"), ("gpt", " "))}, ["conversations[1].value is empty"]),
        (
            {"conversations": turns(("human", "Hi"), ("system", "late"), ("gpt", "x"))},
            ["system turn may only come first"],
        ),
        ({"conversations": "Hi"}, ['field "conversations" must be a non-empty list', "got str"]),
        (
            {"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]},
            ["conversations[0].value must be a string (got int)"],
        ),
    ],
)
def test_sharegpt_bad_record_named_and_skippable(tmp_path, bad, fragments):
    good = {"conversations": turns(("human", "Hi"), ("gpt", "Hello"))}
    path = write_jsonl(tmp_path / "s.jsonl", [good, bad, good])
    one_line_error(lambda: load_examples(str(path)), f"{path}:2:", *fragments)
    skipped: list[str] = []
    assert [e.line for e in load_examples(str(path), skipped=skipped)] == [1, 3]
    assert len(skipped) == 1 and skipped[0].startswith(f"{path}:2:")


def test_sharegpt_format_in_config(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("model: m\ndata: {train: t.jsonl, format: sharegpt}\n")
    assert load_config(config).data.format == "sharegpt"
    config.write_text("model: m\ndata: {train: t.jsonl, format: vicuna}\n")
    with pytest.raises(ConfigError, match="sharegpt"):
        load_config(config)


# ---------------------------------------------------------------------------------------------------
# Saved Hugging Face datasets, Arrow and Parquet shards

ROWS = [{"instruction": f"Say {i}", "input": "", "output": f"{i}"} for i in range(5)]


def test_save_to_disk_folder_written_by_datasets():
    """A folder `datasets` 5.2 wrote with `Dataset.save_to_disk` (tests/fixtures/make_fixtures.py)."""
    folder = FIXTURES / "hf_saved" / "train"
    examples = load_examples(str(folder))
    assert [(e.prompt, e.completion) for e in examples] == [(r["instruction"], r["output"]) for r in ROWS]
    arrow = str(folder / "data-00000-of-00001.arrow")
    assert [(e.source, e.line) for e in examples] == [(arrow, n) for n in range(1, 6)]
    one_line_error(
        lambda: load_examples(str(FIXTURES / "hf_saved")),
        "several splits (train, test)",
        str(FIXTURES / "hf_saved" / "train"),
    )


def test_save_to_disk_matches_datasets_when_installed(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"document {i}", "label": ["a", "b"][i % 2]} for i in range(7)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"), num_shards=2)
    examples = load_examples(str(tmp_path / "saved"))
    assert [(e.text, e.label) for e in examples] == [(r["text"], r["label"]) for r in rows]
    assert len({e.source for e in examples}) == 2  # two shards, read in state.json's order


def test_arrow_stream_and_file(tmp_path):
    table = pa.Table.from_pylist(ROWS)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, pa.ipc.new_file(sink, table.schema) as w:
        w.write_table(table)
    for name in ("stream.arrow", "file.arrow"):
        assert [e.completion for e in load_examples(str(tmp_path / name))] == [r["output"] for r in ROWS]
    (tmp_path / "broken.arrow").write_bytes(b"not arrow at all")
    one_line_error(
        lambda: load_examples(str(tmp_path / "broken.arrow")), "broken.arrow", "not a readable Arrow"
    )


def test_parquet_shards_folder_names_shard_and_row(tmp_path):
    shards = tmp_path / "shards"
    shards.mkdir()
    pq.write_table(pa.Table.from_pylist(ROWS[:3]), shards / "train-00000-of-00002.parquet")
    bad = [*ROWS[3:], {"instruction": "Say 9", "input": "", "output": ""}]
    pq.write_table(pa.Table.from_pylist(bad), shards / "train-00001-of-00002.parquet")
    (shards / "README.md").write_text("# a dataset card is not data\n")
    second = shards / "train-00001-of-00002.parquet"
    one_line_error(lambda: load_examples(str(shards)), f"{second}:3:", 'field "output" is empty')
    skipped: list[str] = []
    examples = load_examples(str(shards), skipped=skipped)
    assert [e.completion for e in examples] == ["0", "1", "2", "3", "4"]
    assert len(skipped) == 1 and skipped[0].startswith(f"{second}:3:")
    (shards / "extra.jsonl").write_text('{"instruction": "a", "output": "b"}\n')
    one_line_error(lambda: load_examples(str(shards)), "mixes data files", ".jsonl, .parquet")
    empty = tmp_path / "empty"
    empty.mkdir()
    one_line_error(lambda: load_examples(str(empty)), "holds no data files", "state.json")


def test_broken_save_to_disk_state(tmp_path):
    folder = tmp_path / "saved"
    folder.mkdir()
    (folder / "state.json").write_text('{"_data_files": [{"filename": "data-00000-of-00001.arrow"}]}')
    one_line_error(lambda: load_examples(str(folder)), "state.json", "data-00000-of-00001.arrow not found")
    (folder / "state.json").write_text('{"_data_files": [{"filename": "../x.arrow"}]}')
    one_line_error(lambda: load_examples(str(folder)), "_data_files[0].filename")


# ---------------------------------------------------------------------------------------------------
# LLaMA-Factory dataset_info.json


def registry(tmp_path: Path, entries: dict) -> Path:
    path = tmp_path / "dataset_info.json"
    path.write_text(json.dumps(entries, indent=2), encoding="utf-8")
    return path


def test_registry_alpaca_defaults_and_system_history(tmp_path):
    (tmp_path / "identity.json").write_text(
        json.dumps(
            [
                {"instruction": "Who are you?", "input": "", "output": "A model."},
                {"instruction": "Sum", "input": "1 and 2", "output": "3"},
            ]
        )
    )
    write_jsonl(
        tmp_path / "multi.jsonl",
        [
            {"q": "And now?", "a": "Later.", "sys": "Be terse.", "hist": [["Hi", "Hello"]]},
        ],
    )
    info = registry(
        tmp_path,
        {
            "identity": {"file_name": "identity.json"},
            "multi": {
                "file_name": "multi.jsonl",
                "formatting": "alpaca",
                "columns": {"prompt": "q", "response": "a", "system": "sys", "history": "hist"},
            },
        },
    )
    plain = load_examples(f"{info}#identity")
    assert [(e.kind, e.prompt, e.completion) for e in plain] == [
        ("completion", "Who are you?", "A model."),
        ("completion", "Sum\n\n1 and 2", "3"),
    ]
    chat = load_examples(f"{info}#multi")
    assert chat[0].messages == [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "And now?"},
        {"role": "assistant", "content": "Later."},
    ]
    both = load_examples(f"{info}#identity,identity")
    assert len(both) == 4


def test_registry_sharegpt_tags_map_roles(tmp_path):
    write_jsonl(
        tmp_path / "openai.jsonl",
        [
            {
                "messages": [
                    {"role": "system", "content": "S"},
                    {"role": "user", "content": "Q"},
                    {"role": "assistant", "content": "A"},
                ]
            },
            {"messages": [{"role": "user", "content": "Q"}, {"role": "bot", "content": "A"}]},
        ],
    )
    info = registry(
        tmp_path,
        {
            "chats": {
                "file_name": "openai.jsonl",
                "formatting": "sharegpt",
                "columns": {"messages": "messages"},
                "tags": {
                    "role_tag": "role",
                    "content_tag": "content",
                    "user_tag": "user",
                    "assistant_tag": "assistant",
                    "system_tag": "system",
                },
            }
        },
    )
    data = tmp_path / "openai.jsonl"
    one_line_error(lambda: load_examples(f"{info}#chats"), f"{data}:2:", "messages[1].role", "'bot'")
    skipped: list[str] = []
    examples = load_examples(f"{info}#chats", skipped=skipped)
    assert examples[0].messages == [
        {"role": "system", "content": "S"},
        {"role": "user", "content": "Q"},
        {"role": "assistant", "content": "A"},
    ]
    assert len(examples) == 1 and skipped[0].startswith(f"{data}:2:")


def test_registry_refusals_name_the_entry_line(tmp_path):
    (tmp_path / "d.json").write_text('[{"instruction": "a", "output": "b"}]')
    info = registry(
        tmp_path,
        {
            "ok": {"file_name": "d.json"},
            "hub": {"hf_hub_url": "someone/data"},
            "pairs": {"file_name": "d.json", "ranking": True},
            "odd": {"file_name": "d.json", "formatting": "vicuna"},
            "pics": {"file_name": "d.json", "formatting": "sharegpt", "columns": {"images": "images"}},
            "wrong": {"file_name": "d.json", "columns": {"messages": "conversations"}},
            "col": {"file_name": "d.json", "columns": {"prompt": "question"}},
        },
    )
    text = info.read_text().splitlines()
    line = {
        name: 1 + next(i for i, t in enumerate(text) if t.strip().startswith(f'"{name}"'))
        for name in ("hub", "pairs", "odd", "pics", "wrong")
    }
    one_line_error(lambda: load_examples(f"{info}#hub"), f"{info}:{line['hub']}:", "hf_hub_url", "file_name")
    one_line_error(lambda: load_examples(f"{info}#pairs"), f"{info}:{line['pairs']}:", "ranking")
    one_line_error(
        lambda: load_examples(f"{info}#odd"), f"{info}:{line['odd']}:", "'vicuna'", "alpaca, sharegpt"
    )
    one_line_error(lambda: load_examples(f"{info}#pics"), f"{info}:{line['pics']}:", "columns.images")
    one_line_error(
        lambda: load_examples(f"{info}#wrong"), "columns.messages does not apply to formatting alpaca"
    )
    one_line_error(
        lambda: load_examples(f"{info}#col"), f"{tmp_path / 'd.json'}:1:", 'missing field "question"'
    )
    one_line_error(lambda: load_examples(f"{info}#nope"), "no dataset 'nope'", "defined: col, hub, odd, ok")
    one_line_error(lambda: load_examples(str(info)), "a dataset registry", f"{info}#NAME")
    assert len(load_examples(f"{info}#ok")) == 1
