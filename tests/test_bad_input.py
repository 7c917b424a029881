"""Bad input, generated: malformed JSONL/JSON/CSV/parquet, wrong types, empty files and strings, invalid
UTF-8, wrong chat roles and broken YAML configs.

The property everywhere: loading either succeeds or raises a `TuneforgeError` whose message is one short
line naming the file, the line and (where there is one) the field. On the command line that is exit code
2 and no traceback, and no file of a run already in the output directory changes.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import json
import os
import re
import tempfile
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from tuneforge.cli import main
from tuneforge.config import load_config
from tuneforge.data import load_examples
from tuneforge.errors import ConfigError, DataError, TuneforgeError

MAX_MESSAGE = 600  # characters: a message quotes values, never whole records
EXAMPLES = int(os.environ.get("TUNEFORGE_FUZZ_EXAMPLES", "150"))  # per test; raise it for a longer campaign
SETTINGS = settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# text without line breaks, NUL or surrogates: the good records around a bad one
plain = st.text(st.characters(blacklist_categories=("Cs", "Cc", "Zl", "Zp")), max_size=20)
learnable = plain.filter(lambda text: text.strip())
good_records = st.lists(st.fixed_dictionaries({"prompt": plain, "completion": learnable}), min_size=0,
                        max_size=4)
json_scalars = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), plain)
json_values = st.recursive(json_scalars,
                           lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(plain, inner, max_size=3),
                           max_leaves=6)
not_strings = json_values.filter(lambda value: value is not None and not isinstance(value, str))
invalid_utf8 = st.sampled_from([b"\xff", b"\xc3\x28", b"\x80", b"\xed\xa0\x80", b"\xc0\xaf",
                                b"\xf8\x88\x80\x80\x80"])


@contextlib.contextmanager
def scratch():
    """A fresh directory per generated example (hypothesis reruns a test body many times)."""
    with tempfile.TemporaryDirectory() as directory:
        yield Path(directory)


def check_message(error: TuneforgeError, path: Path | str, line: int | None = None,
                  field: str | None = None) -> str:
    message = str(error)
    assert len(message.splitlines()) == 1 and "\n" not in message and "\r" not in message, message
    assert len(message) <= MAX_MESSAGE, message[:200]
    assert message.startswith(str(path)), message
    if line is not None:
        assert f"{path}:{line}:" in message, message
    if field is not None:
        assert field in message, message
    return message


def load_error(path: Path, **kwargs) -> DataError:
    with pytest.raises(DataError) as caught:
        load_examples(str(path), **kwargs)
    return caught.value


# ---------------------------------------------------------------------------------------------------
# One bad line among good ones: JSONL


def bad_jsonl_line():
    """(bytes of the bad line, the field the message must name or None, fragment it must contain)."""
    def not_json(text: str) -> bool:
        try:
            json.loads(text)
        except ValueError:
            return True
        return False

    return st.one_of(
        plain.filter(lambda t: t.strip() and not_json(t)).map(lambda t: (t.encode(), None, "invalid JSON")),
        json_values.filter(lambda v: not isinstance(v, dict)).map(
            lambda v: (json.dumps(v).encode(), None, "JSON object")),
        plain.map(lambda p: (json.dumps({"prompt": p}).encode(), "completion", "completion")),
        st.tuples(st.sampled_from(["prompt", "completion"]), not_strings).map(
            lambda kv: (json.dumps({"prompt": "q", "completion": "a", kv[0]: kv[1]}).encode(), kv[0],
                        "string")),
        st.text(" \t", max_size=3).map(
            lambda blank: (json.dumps({"prompt": "q", "completion": blank}).encode(), "completion", "empty")),
        st.tuples(invalid_utf8, st.integers(0, 30)).map(
            lambda bad: (_with_bytes(b'{"prompt": "q", "completion": "answer here"}', *bad), None, "UTF-8")),
        st.sampled_from([b"[" * 50_000, b"1" * 5_000, b'{"prompt": ' + b"[" * 50_000]).map(
            lambda text: (text, None, "invalid JSON")),
    )


def _with_bytes(line: bytes, bad: bytes, position: int) -> bytes:
    position = min(position, len(line))
    return line[:position] + bad + line[position:]


@SETTINGS
@given(before=good_records, after=good_records, bad=bad_jsonl_line())
def test_jsonl_bad_line_is_named(before, after, bad):
    line_bytes, field, fragment = bad
    lines = [json.dumps(r).encode() for r in before] + [line_bytes] + [json.dumps(r).encode() for r in after]
    with scratch() as directory:
        path = directory / "train.jsonl"
        path.write_bytes(b"\n".join(lines) + b"\n")
        error = load_error(path)
        # the first line decides the format: a first line without `completion` cannot be detected
        message = check_message(error, path, line=len(before) + 1, field=field)
        assert fragment in message or (not before and "cannot tell the data format" in message), message

        skipped: list[str] = []
        if before or after:  # data.skip_invalid: the good records, and one note naming the bad line
            examples = load_examples(str(path), skipped=skipped)
            assert [e.line for e in examples] == [n + 1 for n in range(len(lines)) if n != len(before)]
            assert len(skipped) == 1 and skipped[0].startswith(f"{path}:{len(before) + 1}:")


@SETTINGS
@given(before=good_records, roles=st.lists(st.sampled_from(["system", "user", "assistant"]), max_size=3),
       bad=st.one_of(
           st.tuples(st.just("role"), json_values.filter(lambda v: v not in ("system", "user", "assistant"))),
           st.tuples(st.just("content"), not_strings),
           st.tuples(st.just("drop"), st.sampled_from(["role", "content"])),
           st.tuples(st.just("message"), json_scalars),
           st.tuples(st.just("messages"), json_scalars | st.just([])),
       ))
def test_chat_wrong_roles_and_shapes_are_named(before, roles, bad):
    good = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    records = [{"messages": good} for _ in before]
    kind, value = bad
    messages = [{"role": role, "content": "x"} for role in roles] + [dict(m) for m in good]
    index = len(roles)
    if kind == "role":
        messages[index]["role"] = value
    elif kind == "content":
        messages[index]["content"] = value
    elif kind == "drop":
        del messages[index][value]
    elif kind == "message":
        messages[index] = value
    bad_record = {"messages": value if kind == "messages" else messages}
    with scratch() as directory:
        path = directory / "chat.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in [*records, bad_record]))
        error = load_error(path, format="chat")
        field = "messages" if kind == "messages" else f"messages[{index}]"
        check_message(error, path, line=len(records) + 1, field=field)


# ---------------------------------------------------------------------------------------------------
# CSV, JSON arrays, parquet


@SETTINGS
@given(before=good_records, after=good_records, bad=st.one_of(
    st.integers(1, 4).map(lambda extra: (["q", "a", *["x"] * extra], None, "fields but the header has")),
    st.just((["q"], "completion", "missing")),
    st.text(" \t", max_size=3).map(lambda blank: (["q", blank], "completion", "empty")),
    st.tuples(invalid_utf8, st.integers(0, 5)).map(lambda bad: (bad, None, "UTF-8")),
))
def test_csv_bad_row_is_named(before, after, bad):
    row, field, fragment = bad

    def encode(rows: list[list[str]]) -> bytes:
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows(rows)
        return buffer.getvalue().encode()

    head = encode([["prompt", "completion"], *[[r["prompt"], r["completion"]] for r in before]])
    tail = encode([[r["prompt"], r["completion"]] for r in after])
    middle = _with_bytes(b"q,answer\n", *row) if isinstance(row[0], bytes) else encode([row])
    with scratch() as directory:
        path = directory / "train.csv"
        path.write_bytes(head + middle + tail)
        assume(head.count(b"\n") == len(before) + 1)  # a quoted field may span lines: keep numbering simple
        error = load_error(path)
        message = check_message(error, path, line=len(before) + 2, field=field)
        assert fragment in message or (not before and "cannot tell the data format" in message), message


@SETTINGS
@given(items=st.lists(json_values, min_size=1, max_size=4))
def test_json_array_items_must_be_records(items):
    assume(not all(isinstance(i, dict) and isinstance(i.get("completion"), str) and i["completion"].strip()
                   and isinstance(i.get("prompt"), str) for i in items))
    with scratch() as directory:
        path = directory / "train.json"
        path.write_text(json.dumps(items, indent=1))
        with contextlib.suppress(DataError):
            load_examples(str(path))
            return  # some generated arrays are valid (e.g. text records)
        message = check_message(load_error(path), path)
        starts = _item_lines(items)
        line = int(re.match(re.escape(str(path)) + r":(\d+): ", message)[1])
        objects = [isinstance(item, dict) for item in items]
        if not all(objects):  # reading comes first: the first item that is not an object is named
            assert line == starts[objects.index(False)], message
            return
        assert line in starts, message  # else the first object that is not a record: the ones before load
        first_bad = starts.index(line)
        if first_bad:
            path.write_text(json.dumps(items[:first_bad], indent=1))
            assert len(load_examples(str(path))) == first_bad


def _item_lines(items: list) -> list[int]:
    """Line where each item of `json.dumps(items, indent=1)` starts (the array's `[` is line 1)."""
    starts, line = [], 2
    for item in items:
        starts.append(line)
        line += json.dumps(item, indent=1).count("\n") + 1
    return starts


PARQUET_TYPES = {  # a parquet column has one type: every row of it is wrong, the first is named
    "int": pa.array([1, 2, 3]),
    "float": pa.array([1.5, None, 2.0]),
    "binary": pa.array([b"a", b"b", b"c"]),
    "list": pa.array([["a"], [], ["b", "c"]]),
    "struct": pa.array([{"x": 1}, {"x": 2}, {"x": 3}]),
    "bool": pa.array([True, False, True]),
}


@SETTINGS
@given(column=st.sampled_from(sorted(PARQUET_TYPES)), target=st.sampled_from(["prompt", "completion"]))
def test_parquet_wrong_column_types_name_the_field(column, target):
    columns = {"prompt": pa.array(["q1", "q2", "q3"]), "completion": pa.array(["a1", "a2", "a3"]),
               target: PARQUET_TYPES[column]}
    with scratch() as directory:
        path = directory / "train.parquet"
        pq.write_table(pa.table(columns), path)
        check_message(load_error(path), path, line=1, field=target)


@SETTINGS
@given(value=st.none() | st.text(" \t\n", max_size=3), row=st.integers(0, 4))
def test_parquet_missing_or_empty_completion_names_the_row(value, row):
    completions = ["a"] * 5
    completions[row] = value
    with scratch() as directory:
        path = directory / "train.parquet"
        pq.write_table(pa.table({"prompt": ["q"] * 5, "completion": pa.array(completions, pa.string())}),
                       path)
        check_message(load_error(path), path, line=row + 1, field="completion")


@SETTINGS
@given(data=st.binary(max_size=300), cut=st.integers(0, 2000))
def test_corrupt_parquet_is_one_line(data, cut):
    with scratch() as directory:
        whole = directory / "whole.parquet"
        pq.write_table(pa.table({"prompt": ["q"] * 5, "completion": ["a"] * 5}), whole)
        path = directory / "train.parquet"
        path.write_bytes(whole.read_bytes()[:cut] + data if cut % 2 else data)
        with contextlib.suppress(DataError):
            load_examples(str(path))
            return  # e.g. the whole file, unchanged
        check_message(load_error(path), path)


@pytest.mark.parametrize("suffix", [".jsonl", ".json", ".csv", ".parquet", ".txt"])
@pytest.mark.parametrize("content", [b"", b"\n\n\n", b"   \t ", b"\xef\xbb\xbf", b"\xef\xbb\xbf\n  \n"])
def test_empty_files_say_so(tmp_path, suffix, content):
    path = tmp_path / f"train{suffix}"
    path.write_bytes(content)
    assert "no records" in check_message(load_error(path), path)


def test_empty_parquet_table_and_empty_json_array(tmp_path):
    path = tmp_path / "train.parquet"
    pq.write_table(pa.table({"prompt": pa.array([], pa.string()), "completion": pa.array([], pa.string())}),
                   path)
    assert "no records" in check_message(load_error(path), path)
    path = tmp_path / "train.json"
    path.write_text("[]")
    assert "no records" in check_message(load_error(path), path)


def test_huge_lines(tmp_path):
    path = tmp_path / "train.jsonl"
    huge = "word " * 2_000_000  # a 10 MB completion is data: it loads (and is cut at max_seq_len later)
    path.write_text(json.dumps({"prompt": "q", "completion": huge}) + "\n")
    assert len(load_examples(str(path))[0].completion) == len(huge)
    path.write_text(json.dumps({"prompt": "q", "completion": 5, "x" * 1_000_000: huge}) + "\n")
    check_message(load_error(path), path, line=1, field="completion")
    path.write_text("{" + "x" * 5_000_000 + "\n")
    check_message(load_error(path), path, line=1)
    csv_path = tmp_path / "train.csv"
    csv_path.write_text("prompt,completion\nq," + "y" * 1_000_000 + "\n")  # beyond csv's default field limit
    assert len(load_examples(str(csv_path))[0].completion) == 1_000_000


def test_template_cannot_reach_into_objects(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps({"q": "question", "a": "answer"}) + "\n")
    for prompt in ("{q.__class__.__mro__}", "{q[0]}", "{0}", "{}", "{q:{a}}"):
        template = {"prompt": prompt, "completion": "{a}"}
        with pytest.raises(DataError, match="only plain|format string"):
            load_examples(str(path), template=type("T", (), {**template, "few_shot": 0, "separator": ""})())


# ---------------------------------------------------------------------------------------------------
# Broken YAML configs


CONFIG_LINES = [
    ("model", "model: {model}"),
    ("data", "data:"),
    ("data.train", "  train: {train}"),
    ("data.max_eval_examples", "  max_eval_examples: 4"),
    ("retain", "retain: null"),
    ("strategies", "strategies:"),
    ("strategies.0.lora.rank", "- lora: {{rank: 4}}"),
    ("train", "train:"),
    ("train.max_steps", "  max_steps: 2"),
    ("train.batch_size", "  batch_size: 4"),
    ("train.lr", "  lr: 0.01"),
    ("train.max_seq_len", "  max_seq_len: 64"),
    ("train.warmup_steps", "  warmup_steps: 0"),
    ("evaluation", "evaluation: {{samples: 0}}"),
    ("output", "output: {output}"),
]
SCALAR_KEYS = {i: key for i, (key, line) in enumerate(CONFIG_LINES)
               if line.startswith("  ") and key != "data.train"}


def config_text(directory: Path, model: Path, train: Path) -> str:
    return "\n".join(line.format(model=model, train=train, output=directory / "out")
                     for _, line in CONFIG_LINES) + "\n"


def inline_yaml(value) -> str:
    text = yaml.safe_dump(value, default_flow_style=True, width=float("inf")).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


@pytest.fixture(scope="module")
def config_inputs(tmp_path_factory, tiny_model_dir, task_file):
    return tiny_model_dir, task_file


@SETTINGS
@given(index=st.sampled_from(sorted(SCALAR_KEYS)),
       value=json_values.filter(lambda v: not isinstance(v, str) or "\n" not in v))
def test_config_wrong_types_name_line_and_field(config_inputs, index, value):
    model, train = config_inputs
    with scratch() as directory:
        lines = config_text(directory, model, train).splitlines()
        key = SCALAR_KEYS[index]
        lines[index] = f"  {key.split('.')[-1]}: {inline_yaml(value)}"
        path = directory / "config.yaml"
        path.write_text("\n".join(lines) + "\n")
        try:
            load_config(path)
        except ConfigError as error:
            check_message(error, path, line=index + 1, field=key)


@SETTINGS
@given(position=st.integers(0, 400), garbage=st.text(max_size=30) | st.sampled_from(
    ["\t", ": :", "- - -", "{", "[", "&a", "*b", "!!python/object/apply:os.system ['echo pwned']", "%YAML 9",
     "key: [1, 2", "'unterminated", "? [complex]: key", "---\n---", "\x00", "\ufeff"]))
def test_broken_yaml_is_one_line(config_inputs, position, garbage):
    model, train = config_inputs
    with scratch() as directory:
        text = config_text(directory, model, train)
        path = directory / "config.yaml"
        path.write_text(text[:position] + garbage + text[position:], encoding="utf-8")
        try:
            load_config(path)
        except ConfigError as error:
            check_config_message(error, path)


@SETTINGS
@given(garbage=st.binary(min_size=1, max_size=200))
def test_config_bytes_are_one_line(config_inputs, garbage):
    with scratch() as directory:
        path = directory / "config.yaml"
        path.write_bytes(garbage)
        try:
            load_config(path)
        except ConfigError as error:
            check_config_message(error, path)


def check_config_message(error: ConfigError, path: Path) -> None:
    """One line naming the file and a line of it; only a file without any YAML node has no line to name."""
    message = check_message(error, path)
    named = re.match(re.escape(str(path)) + r":(\d+): ", message)
    if named is None:
        assert yaml.compose(path.read_text(encoding="utf-8")) is None, message
        return
    # YAML also breaks lines at NEL and the Unicode line and paragraph separators, which splitlines knows
    lines = len(path.read_text(encoding="utf-8", errors="replace").splitlines())
    assert 1 <= int(named[1]) <= lines + 1, message


def test_yaml_never_runs_code_nor_blows_up(tmp_path):
    marker = tmp_path / "pwned"
    cases = {
        "tag": f"!!python/object/apply:os.system ['touch {marker}']\n",
        "nested": "a: " + "[" * 20_000 + "\n",
        "aliases": "a: &a [x, x, x, x, x, x, x, x, x, x]\nb: &b [*a, *a, *a, *a, *a, *a, *a, *a, *a, *a]\n"
                   "c: &c [*b, *b, *b, *b, *b, *b, *b, *b, *b, *b]\ndata: {train: *c}\n",
        "utf16": "model: x\n".encode("utf-16"),
    }
    for name, text in cases.items():
        path = tmp_path / f"{name}.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        with pytest.raises(ConfigError) as caught:
            load_config(path)
        check_message(caught.value, path)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------------
# The command line: exit code 2, one line, and the run already in the output directory untouched


def digest(directory: Path) -> dict[str, str]:
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_model_dir, task_file):
    """A run directory as a finished run leaves it (written by hand: only its bytes matter)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    (run / "checkpoints" / "step-00000002").mkdir(parents=True)
    for name in ("config.yaml", "metrics.jsonl", "results.json", "report.md", "evaluation_before.json",
                 "checkpoints/step-00000002/weights.safetensors"):
        (run / name).write_text(f"{name} of the earlier run\n")
    return run


@settings(max_examples=max(1, EXAMPLES * 2 // 5), deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bad=bad_jsonl_line(), flag=st.sampled_from([[], ["--resume"], ["--overwrite"]]),
       command=st.sampled_from(["train", "validate"]))
def test_cli_bad_data_exit_2_one_line_and_run_untouched(finished_run, config_inputs, bad, flag, command):
    model, _ = config_inputs
    before = digest(finished_run)
    with scratch() as directory:
        data = directory / "train.jsonl"
        data.write_bytes(json.dumps({"prompt": "q", "completion": "a"}).encode() + b"\n" + bad[0] + b"\n")
        config = directory / "config.yaml"
        config.write_text(yaml.safe_dump({"model": str(model), "data": {"train": str(data)}, "retain": None,
                                          "output": str(finished_run)}))
        stderr = io.StringIO()
        with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
            code = main([command, str(config), *(flag if command == "train" else [])])
        assert code == 2
        message = stderr.getvalue()
        assert message.startswith("tuneforge: error: ") and message.count("\n") == 1
        assert "Traceback" not in message
        assert f"{data}:2:" in message
        if bad[1] is not None:
            assert bad[1] in message, message
    assert digest(finished_run) == before


def test_skip_invalid_counts_and_reports(run_config, tmp_path):
    data = tmp_path / "mixed.jsonl"
    good = [json.dumps({"prompt": f"What colour is the cat {i}?", "completion": " red."}) for i in range(12)]
    bad = ["not json", json.dumps({"prompt": "q", "completion": ""}), json.dumps([1, 2]), "{\"prompt\": 5"]
    data.write_text("\n".join(good[:5] + bad[:2] + good[5:] + bad[2:]) + "\n")
    from tuneforge.run import train_run

    with pytest.raises(DataError, match=r"mixed.jsonl:6: invalid JSON"):
        train_run(run_config(data={"train": str(data), "max_eval_examples": 2}))
    assert not (tmp_path / "run").exists()  # bad data fails before the output directory is made
    config = run_config(data={"train": str(data), "max_eval_examples": 2, "skip_invalid": True},
                        train={"max_steps": 1}, evaluation={"samples": 0})
    results = train_run(config)
    assert results["skipped"]["count"] == 4
    assert results["skipped"]["examples"][0].startswith(f"{data}:6: invalid JSON")
    saved = json.loads((Path(config.output) / "results.json").read_text())
    assert saved["skipped"]["count"] == 4
    report = (Path(config.output) / "report.md").read_text()
    assert "## Skipped records" in report and "4 invalid record(s)" in report and f"{data}:7:" in report


def test_validate_counts_what_skip_invalid_leaves_out(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "mixed.csv"
    data.write_text("prompt,completion\nq1,a1\nq2\nq3,a3,extra\nq4,a4\n")
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump({"model": str(tiny_model_dir), "retain": None,
                                      "output": str(tmp_path / "run"),
                                      "data": {"train": str(data), "skip_invalid": True}}))
    assert main(["validate", str(config)]) == 0
    out = capsys.readouterr().out
    assert "1 train, 1 eval examples" in out and "skipped 2 invalid record(s)" in out and f"{data}:3:" in out
