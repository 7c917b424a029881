"""Dataset registries in LLaMA-Factory's `dataset_info.json` shape, so their data descriptions load unchanged.

`data.train: data/dataset_info.json#identity` reads the entry `identity` of the registry (several names
separated by commas are read one after another, as LLaMA-Factory's `dataset: a,b`). An entry names a
local file or folder (`file_name`, relative to the registry) and how its columns map onto a format:

    "identity": {"file_name": "identity.json", "formatting": "alpaca",
                 "columns": {"prompt": "instruction", "query": "input", "response": "output",
                             "system": "system", "history": "history"}}
    "chats": {"file_name": "chats.jsonl", "formatting": "sharegpt",
              "columns": {"messages": "messages", "system": "system"},
              "tags": {"role_tag": "role", "content_tag": "content", "user_tag": "user",
                       "assistant_tag": "assistant", "system_tag": "system"}}

Defaults are LLaMA-Factory's (LLaMA-Factory `data/README.md`). Each record is mapped onto this project's
own fields (alpaca's instruction/input/output, or chat `messages`), so the rest of the data layer sees
ordinary records; alpaca entries with a system or history column become chat examples. Problems name the
data file, line and the user's own column names; with `skip_invalid` bad records are counted and left out.

Not read: hub-only entries (`hf_hub_url`, `ms_hub_url`, `script_url` without `file_name`: no hub here),
preference data (`ranking`), tool and multimodal columns. `num_samples`, `split`, `subset`, `folder` and
`file_sha1` are hub or sampling settings and are ignored (cap examples with `data.max_train_examples`).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from tuneforge.data.readers import Record, read_records
from tuneforge.data.sharegpt import ShareGPTTags, sharegpt_messages
from tuneforge.errors import DataError, shown

SEPARATOR = "#"
ALPACA_COLUMNS = {
    "prompt": "instruction",
    "query": "input",
    "response": "output",
    "system": None,
    "history": None,
}
SHAREGPT_COLUMNS = {"messages": "conversations", "system": None}
UNSUPPORTED_COLUMNS = {
    "tools": "tool descriptions",
    "images": "images",
    "videos": "videos",
    "audios": "audio",
    "chosen": "preference pairs",
    "rejected": "preference pairs",
    "kto_tag": "KTO labels",
}
TAG_NAMES = (
    "role_tag",
    "content_tag",
    "user_tag",
    "assistant_tag",
    "system_tag",
    "observation_tag",
    "function_tag",
)


def is_registry_spec(spec: object) -> bool:
    """`path/to/registry.json#name[,name...]`."""
    return isinstance(spec, str) and SEPARATOR in spec and spec.split(SEPARATOR, 1)[0].endswith(".json")


def load_registry_records(spec: str, skipped: list[str] | None = None) -> list[Record]:
    """The records of every dataset named after `#`, mapped onto this project's fields."""
    registry_text, names = spec.split(SEPARATOR, 1)
    registry_path = Path(registry_text)
    registry, text = _read_registry(registry_path)
    records: list[Record] = []
    for name in [n.strip() for n in names.split(",")]:
        if name not in registry:
            known = ", ".join(sorted(registry)[:12]) or "none"
            raise DataError(f"{registry_path}: no dataset {shown(name)} (defined: {known})")
        where = f"{registry_path}:{_entry_line(text, name)}: dataset {shown(name)}"
        records += _entry_records(registry_path.parent, registry[name], where, skipped)
    return records


def _read_registry(path: Path) -> tuple[dict, str]:
    if not path.is_file():
        raise DataError(f"{path}: file not found")
    try:
        text = path.read_text(encoding="utf-8-sig")
        registry = json.loads(text)
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read file: {exc}") from None
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON: {exc.msg} (column {exc.colno})") from None
    if not isinstance(registry, dict) or not all(isinstance(v, dict) for v in registry.values()):
        raise DataError(
            f'{path}:1: expected an object of dataset entries, e.g. {{"name": {{"file_name": ...}}}}'
        )
    return registry, text


def _entry_line(text: str, name: str) -> int:
    found = re.search(r"^\s*" + re.escape(json.dumps(name)) + r"\s*:", text, re.MULTILINE)
    return text.count("\n", 0, found.start()) + 1 if found else 1


def _entry_records(folder: Path, entry: dict, where: str, skipped: list[str] | None) -> list[Record]:
    file_name = entry.get("file_name")
    if file_name is None:
        hub = next(
            (key for key in ("hf_hub_url", "ms_hub_url", "om_hub_url", "script_url") if key in entry), None
        )
        if hub:
            raise DataError(
                f"{where}: {hub} needs a dataset hub, which is not used here; download the "
                "data and set file_name to the local file or folder"
            )
        raise DataError(
            f'{where}: field "file_name" missing (the data file or folder, relative to the registry)'
        )
    if not isinstance(file_name, str) or not file_name:
        raise DataError(f'{where}: field "file_name" must be a file or folder name')
    if entry.get("ranking"):
        raise DataError(f"{where}: preference data (ranking: true) is not supported")
    formatting = entry.get("formatting", "alpaca")
    if formatting not in ("alpaca", "sharegpt"):
        raise DataError(f"{where}: formatting {shown(formatting)} is not one of alpaca, sharegpt")
    columns = _mapping(entry, "columns", where)
    for key, what in UNSUPPORTED_COLUMNS.items():
        if columns.get(key):
            raise DataError(f"{where}: columns.{key}: {what} are not supported")
    defaults = ALPACA_COLUMNS if formatting == "alpaca" else SHAREGPT_COLUMNS
    unknown = sorted(set(columns) - set(defaults))
    if unknown:
        raise DataError(
            f"{where}: columns.{unknown[0]} does not apply to formatting {formatting} "
            f"(its columns: {', '.join(defaults)})"
        )
    columns = {**defaults, **columns}
    raw = read_records(folder / file_name, skipped)
    if formatting == "alpaca":
        convert = _alpaca_converter(columns)
    else:
        tags_given = _mapping(entry, "tags", where)
        unknown = sorted(set(tags_given) - set(TAG_NAMES))
        if unknown:
            raise DataError(f"{where}: tags.{unknown[0]} is not one of {', '.join(TAG_NAMES)}")
        tag_values = {k: v for k, v in tags_given.items() if k not in ("observation_tag", "function_tag")}
        tags = ShareGPTTags(**tag_values, lenient=False)
        convert = _sharegpt_converter(columns, tags)
    records = []
    for record in raw:
        try:
            records.append(Record(record.source, record.line, convert(record)))
        except DataError as exc:
            if skipped is None:
                raise
            skipped.append(str(exc))
    return records


def _mapping(entry: dict, key: str, where: str) -> dict:
    value = entry.get(key) or {}
    if not isinstance(value, dict) or not all(isinstance(v, str) or v is None for v in value.values()):
        raise DataError(f"{where}: {key} must map names to column names")
    return value


def _alpaca_converter(columns: dict):
    def convert(record: Record) -> dict:
        prompt = _text(record, columns["prompt"], required=True)
        query = _text(record, columns["query"])
        response = _text(record, columns["response"], required=True)
        if query and query.strip():
            prompt = f"{prompt}\n\n{query}"
        system = _text(record, columns["system"])
        history = _history(record, columns["history"])
        if not system and not history:
            return {"instruction": prompt, "output": response}
        messages = [{"role": "system", "content": system}] if system else []
        for user, assistant in history:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
        return {
            "messages": [
                *messages,
                {"role": "user", "content": prompt},
                {"role": "assistant", "content": response},
            ]
        }

    return convert


def _sharegpt_converter(columns: dict, tags: ShareGPTTags):
    def convert(record: Record) -> dict:
        return {"messages": sharegpt_messages(record, columns["messages"], tags, columns["system"])}

    return convert


def _text(record: Record, column: str | None, required: bool = False) -> str | None:
    where = f"{record.source}:{record.line}"
    value = record.fields.get(column) if column else None
    if value is None:
        if required:
            raise DataError(
                f'{where}: missing field "{column}" (record has: {", ".join(record.fields) or "no fields"})'
            )
        return None
    if not isinstance(value, str):
        raise DataError(f'{where}: field "{column}" must be a string (got {type(value).__name__})')
    return value


def _history(record: Record, column: str | None) -> list[tuple[str, str]]:
    value = record.fields.get(column) if column else None
    if not value:
        return []
    where = f"{record.source}:{record.line}"
    if not isinstance(value, list):
        raise DataError(f'{where}: field "{column}" must be a list of [query, response] pairs')
    for index, pair in enumerate(value):
        if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(p, str) for p in pair)):
            raise DataError(f"{where}: {column}[{index}] must be a [query, response] pair of strings")
    return [tuple(pair) for pair in value]
