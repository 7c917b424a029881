"""Read data files into `Record`s: one dict of fields per example, tagged with its file and line.

Every problem with a user's file becomes a one-line `DataError` naming the file and line
(`data/train.jsonl:17: invalid JSON: ...`), never a raw traceback.
"""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from tuneforge.data.folders import folder_files, read_arrow_rows
from tuneforge.errors import DataError, shown

SUPPORTED_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt", ".md")
# a folder's data files: not .md, which a dataset folder holds as its README
FOLDER_EXTENSIONS = (".jsonl", ".json", ".csv", ".parquet", ".arrow", ".txt")

_JSON_TYPE_NAMES = {
    list: "an array",
    str: "a string",
    int: "a number",
    float: "a number",
    bool: "a boolean",
    type(None): "null",
}


@dataclass(frozen=True)
class Record:
    """One raw example: `fields` as read from `source`, at 1-based `line` (see `read_records`)."""

    source: str
    line: int
    fields: dict


def read_records(path: str | Path, skipped: list[str] | None = None) -> list[Record]:
    """Read every record of a data file, chosen by extension.

    Line numbers are 1-based: the line in a `.jsonl` file, the first line of a `.csv` row (the header is
    line 1), the line where an item of a `.json` array starts, the row number of a `.parquet` or `.arrow`
    file, and 1 for `.txt`/`.md` files, which are one record `{"text": <whole file>}`. A folder is read
    file by file (see `tuneforge.data.folders`): a saved Hugging Face dataset, or shards of one kind.

    A problem with one record (a line that is not JSON, a CSV row with too many fields, bytes that are not
    UTF-8 in a line) raises a `DataError`; with a `skipped` list its message is appended there instead and
    reading goes on (`data.skip_invalid`). Problems with the whole file are always errors.
    """
    path = Path(path)
    source = str(path)
    if not path.exists():
        raise DataError(f"{source}: file not found")
    problems = _Problems(skipped)
    if path.is_dir():
        records = []
        for file in folder_files(path, FOLDER_EXTENSIONS):
            records += _read_file(file, problems, empty_ok=True)
    else:
        records = _read_file(path, problems)
    if not records:
        detail = f"every record is invalid, e.g. {skipped[0]}" if skipped else "file is empty"
        raise DataError(f"{source}: no records ({detail})")
    return records


def _read_file(path: Path, problems: _Problems, empty_ok: bool = False) -> list[Record]:
    source = str(path)
    suffix = path.suffix.lower()
    if suffix not in SUPPORTED_EXTENSIONS:
        raise DataError(
            f"{source}: unsupported file type {shown(suffix) if suffix else '(no extension)'} "
            f"(supported: {', '.join(SUPPORTED_EXTENSIONS)}, or a folder of them)"
        )
    if suffix == ".arrow":
        return [Record(source, row, fields) for row, fields in enumerate(read_arrow_rows(path), start=1)]
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"{source}: cannot read file: {exc.strerror or exc}") from None
    if not data.removeprefix(codecs.BOM_UTF8).strip():
        if empty_ok:
            return []
        raise DataError(f"{source}: no records (file is empty)")
    if suffix == ".parquet":
        return _read_parquet(path, source)
    if suffix == ".jsonl":
        return _read_jsonl(data, source, problems)
    if suffix == ".json":
        return _read_json(data, source, problems)
    if suffix == ".csv":
        return _read_csv(data, source, problems)
    return [Record(source, 1, {"text": _decode(data, source)})]


class _Problems:
    """Raise a record's problem, or note it and go on when the caller collects skipped records."""

    def __init__(self, skipped: list[str] | None):
        self.skipped = skipped

    def __call__(self, message: str) -> None:
        if self.skipped is None:
            raise DataError(message)
        self.skipped.append(message)


def _decode(data: bytes, source: str, first_line: int = 1) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = first_line + data.count(b"\n", 0, exc.start)
        raise DataError(f"{source}:{line}: not valid UTF-8 (save the file as UTF-8)") from None


def _require_object(value: object, source: str, line: int) -> dict:
    if not isinstance(value, dict):
        kind = _JSON_TYPE_NAMES.get(type(value), type(value).__name__)
        raise DataError(f"{source}:{line}: each record must be a JSON object with named fields, got {kind}")
    return value


def _read_jsonl(data: bytes, source: str, problem: _Problems) -> list[Record]:
    records = []
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if not raw.strip():
            continue  # blank lines (including a trailing newline) are not records
        try:
            value = _parse_json(_decode(raw, source, first_line=number), source, number)
            records.append(Record(source, number, _require_object(value, source, number)))
        except DataError as exc:
            problem(str(exc))
    return records


def _parse_json(text: str, source: str, line: int) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        line += exc.lineno - 1
        raise DataError(f"{source}:{line}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    except RecursionError:
        raise DataError(f"{source}:{line}: invalid JSON: nested too deeply") from None
    except ValueError as exc:  # e.g. an integer with more digits than Python converts
        raise DataError(f"{source}:{line}: invalid JSON: {str(exc).splitlines()[0][:120]}") from None


def _read_json(data: bytes, source: str, problem: _Problems) -> list[Record]:
    text = _decode(data, source)
    value = _parse_json(text, source, 1)
    if isinstance(value, dict) and len(value) == 1 and isinstance(next(iter(value.values())), list):
        items = next(iter(value.values()))
    elif isinstance(value, list):
        items = value
    else:
        raise DataError(
            f"{source}:1: expected a JSON array of objects, or an object with one array value "
            'such as {"data": [...]}'
        )
    if not items:
        raise DataError(f"{source}: no records (the JSON array is empty)")
    records = []
    for item, line in zip(items, _array_item_lines(text, len(items)), strict=True):
        try:
            records.append(Record(source, line, _require_object(item, source, line)))
        except DataError as exc:
            problem(str(exc))
    return records


def _array_item_lines(text: str, count: int) -> list[int]:
    """Line where each item of the file's (only) array starts; falls back to index + 1 if unsure."""
    decoder = json.JSONDecoder()
    try:
        position = _skip_space(text, 0)
        if text[position] == "{":  # {"key": [ ... ]}: step over the key and the colon
            _, position = decoder.raw_decode(text, _skip_space(text, position + 1))
            position = _skip_space(text, position)
            if text[position] != ":":
                raise ValueError
            position = _skip_space(text, position + 1)
        if text[position] != "[":
            raise ValueError
        starts = []
        position += 1
        for _ in range(count):
            position = _skip_space(text, position)
            if text[position] == ",":
                position = _skip_space(text, position + 1)
            starts.append(text.count("\n", 0, position) + 1)
            _, position = decoder.raw_decode(text, position)
        return starts
    except (IndexError, ValueError):
        return list(range(1, count + 1))


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_csv(data: bytes, source: str, problem: _Problems) -> list[Record]:
    # Bytes that are not UTF-8 are kept as surrogates so that only the rows holding them are refused.
    try:
        text, undecodable = data.decode("utf-8-sig"), None
    except UnicodeDecodeError:
        text = data.removeprefix(codecs.BOM_UTF8).decode("utf-8", errors="surrogateescape")
        undecodable = re.compile("[\udc80-\udcff]")
    csv.field_size_limit(max(csv.field_size_limit(), len(text)))  # a long text field is data, not an error
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        header = reader.fieldnames
    except csv.Error as exc:
        raise DataError(f"{source}:1: invalid CSV header: {exc}") from None
    if not header:
        return []
    if undecodable and any(undecodable.search(name) for name in header):
        raise DataError(f"{source}:1: not valid UTF-8 (save the file as UTF-8)")
    if len(set(header)) != len(header):
        duplicates = sorted({name for name in header if header.count(name) > 1})
        raise DataError(f"{source}:1: duplicate column name(s) in the header: {_names(duplicates)}")
    records = []
    last_line = reader.line_num
    while True:
        try:
            row = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            problem(f"{source}:{last_line + 1}: invalid CSV: {exc}")
            last_line = reader.line_num
            continue
        line = last_line + 1  # a quoted field may span lines: the row starts after the previous one
        last_line = reader.line_num
        if None in row:
            problem(
                f"{source}:{line}: row has {len(header) + len(row[None])} fields but the header has "
                f"{len(header)} ({_names(header)})"
            )
        elif undecodable and any(isinstance(v, str) and undecodable.search(v) for v in row.values()):
            problem(f"{source}:{line}: not valid UTF-8 (save the file as UTF-8)")
        else:
            # a short row leaves later columns as None: treat them as missing fields
            present = {key: value for key, value in row.items() if value is not None}
            records.append(Record(source, line, present))
    return records


def _names(names: list[str], limit: int = 8) -> str:
    """Column or field names for a message: quoted when odd, at most `limit` of them."""
    plain = [name if name.isidentifier() and len(name) <= 40 else shown(name, 40) for name in names[:limit]]
    more = f" and {len(names) - limit} more" if len(names) > limit else ""
    return ", ".join(plain) + more


def _read_parquet(path: Path, source: str) -> list[Record]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as exc:
        message = str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        raise DataError(f"{source}: not a readable Parquet file: {message}") from None
    return [Record(source, index, row) for index, row in enumerate(rows, start=1)]
