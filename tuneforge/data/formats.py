"""Turn `Record`s into typed `Example`s: format detection, validation, and prompt templates.

Formats and the fields they need:

    text            text
    completion      prompt, completion
    alpaca          instruction, output (optional: input)       -> a completion example
    chat            messages: [{role, content}, ...]
    sharegpt        conversations: [{from, value}, ...] (human/gpt/system) -> a chat example
    classification  text, label

A template (`TemplateConfig`: prompt, completion, few_shot, separator) turns records of any shape into
completion examples: `{field}` placeholders are filled from the record (prompt engineering).
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from tuneforge.data.builtin import BUILTIN_PREFIX, load_builtin
from tuneforge.data.readers import Record, read_records
from tuneforge.data.registry import SEPARATOR, is_registry_spec, load_registry_records
from tuneforge.data.sharegpt import sharegpt_messages
from tuneforge.errors import DataError, shown

FORMATS = ("text", "completion", "alpaca", "chat", "sharegpt", "classification")
CHAT_ROLES = ("system", "user", "assistant")
FORMAT_FIELDS = {
    "chat": ("messages",),
    "sharegpt": ("conversations",),
    "alpaca": ("instruction", "output"),
    "completion": ("prompt", "completion"),
    "classification": ("text", "label"),
    "text": ("text",),
}
# where a template without `completion:` finds the answer, first present wins
COMPLETION_FIELDS = ("completion", "output", "answer", "label", "response")


@dataclass
class Example:
    """A validated training example. `kind` is text, completion, chat or classification."""

    kind: str
    source: str = ""
    line: int = 0
    text: str | None = None
    prompt: str | None = None
    completion: str | None = None
    messages: list[dict] | None = None
    label: str | None = None

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}"


class Template(Protocol):
    prompt: str
    completion: str | None
    few_shot: int
    separator: str


def _where(record: Record) -> str:
    return f"{record.source}:{record.line}"


def _field_list(fields: dict, limit: int = 8) -> str:
    """The record's field names for a message: odd names quoted, at most `limit` of them."""
    names = [name if name.isidentifier() and len(name) <= 40 else shown(name, 40)
             for name in list(fields)[:limit]]
    more = f" and {len(fields) - limit} more" if len(fields) > limit else ""
    return ", ".join(names) + more or "no fields"


def _quoted(value: object) -> str:
    """`"value"` for a short printable string, else a cut `repr` (one line whatever the value holds)."""
    if isinstance(value, str) and value.isprintable() and len(value) <= 40 and '"' not in value:
        return f'"{value}"'
    return shown(value, 40)


def detect_format(record: Record) -> str:
    """The format a record's field names fit, checked in the order of `FORMAT_FIELDS`."""
    for fmt, needed in FORMAT_FIELDS.items():
        if all(name in record.fields for name in needed):
            return fmt
    expected = "; ".join(f"{fmt}: {', '.join(needed)}" for fmt, needed in FORMAT_FIELDS.items())
    raise DataError(
        f"{_where(record)}: cannot tell the data format from the fields ({_field_list(record.fields)}); "
        f"expected one of: {expected} (or set data.format / a template)"
    )


def _string(record: Record, fmt: str, name: str, learned: bool = False, optional: bool = False) -> str | None:
    """Field `name` as a string; missing, non-string or (for the learned part) empty values are errors."""
    if name not in record.fields or record.fields[name] is None:
        if optional:
            return None
        raise DataError(
            f'{_where(record)}: missing field "{name}" '
            f'(format "{fmt}" needs: {", ".join(FORMAT_FIELDS[fmt])})'
        )
    value = record.fields[name]
    if not isinstance(value, str):
        raise DataError(f'{_where(record)}: field "{name}" must be a string (got {type(value).__name__})')
    if learned and not value.strip():
        raise DataError(f'{_where(record)}: field "{name}" is empty (the model has nothing to learn from it)')
    return value


def to_example(record: Record, fmt: str) -> Example:
    """Validate `record` against format `fmt` and convert it (alpaca becomes a completion example)."""
    base = {"source": record.source, "line": record.line}
    if fmt == "completion":
        prompt = _string(record, fmt, "prompt")
        return Example(
            "completion", prompt=prompt, completion=_string(record, fmt, "completion", True), **base
        )
    if fmt == "alpaca":
        prompt = _string(record, fmt, "instruction")
        extra = _string(record, fmt, "input", optional=True)
        if extra and extra.strip():
            prompt = f"{prompt}\n\n{extra}"
        return Example("completion", prompt=prompt, completion=_string(record, fmt, "output", True), **base)
    if fmt == "chat":
        return Example("chat", messages=_messages(record), **base)
    if fmt == "sharegpt":
        return Example("chat", messages=sharegpt_messages(record), **base)
    if fmt == "classification":
        label = record.fields.get("label")
        if isinstance(label, int) and not isinstance(label, bool):
            label = str(label)
            record = Record(record.source, record.line, {**record.fields, "label": label})
        return Example(
            "classification",
            text=_string(record, fmt, "text", True),
            label=_string(record, fmt, "label", True),
            **base,
        )
    if fmt == "text":
        return Example("text", text=_string(record, fmt, "text", True), **base)
    raise DataError(f"{_where(record)}: unknown data format {fmt!r} (known: auto, {', '.join(FORMATS)})")


def _messages(record: Record) -> list[dict]:
    where = _where(record)
    messages = record.fields.get("messages")
    if not isinstance(messages, list) or not messages:
        got = "missing" if messages is None else f"got {type(messages).__name__}"
        raise DataError(f'{where}: field "messages" must be a non-empty list of {{role, content}} ({got})')
    clean = []
    for index, message in enumerate(messages):
        field = f"messages[{index}]"
        if not isinstance(message, dict):
            raise DataError(
                f"{where}: {field} must be an object with role and content (got {type(message).__name__})"
            )
        for key in ("role", "content"):
            if key not in message:
                raise DataError(
                    f'{where}: {field}: missing field "{key}" (each message needs: role, content)'
                )
        role, content = message["role"], message["content"]
        if role not in CHAT_ROLES:
            raise DataError(f'{where}: {field}.role: {_quoted(role)} is not one of {", ".join(CHAT_ROLES)}')
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}.content must be a string (got {type(content).__name__})")
        if role == "assistant" and not content.strip():
            raise DataError(
                f"{where}: {field}.content is empty (assistant messages are what the model learns)"
            )
        clean.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in clean):
        raise DataError(f"{where}: messages has no assistant message (nothing for the model to learn)")
    return clean


# ---------------------------------------------------------------------------------------------------
# Templates (prompt engineering)


def _render(text: str, record: Record, what: str) -> str:
    """Fill `{field}` placeholders from the record.

    Only plain field names are allowed: `{field.attribute}` or `{field[0]}` would let a config reach into
    Python objects, so a template is data, never code.
    """
    try:
        parts = []
        for literal, name, spec, conversion in string.Formatter().parse(text):
            parts.append(literal)
            if name is None:
                continue
            if not name.isidentifier() or (spec and "{" in spec):
                raise ValueError(f"{{{name}}}: only plain {{field}} placeholders are allowed")
            value = record.fields[name]
            value = {"r": repr, "a": ascii, "s": str, None: lambda v: v}[conversion](value)
            parts.append(format(value, spec or ""))
        return "".join(parts)
    except KeyError as exc:
        raise DataError(
            f"{_where(record)}: template field {_quoted(exc.args[0])} missing "
            f"(record has: {_field_list(record.fields)})"
        ) from None
    except (IndexError, ValueError, AttributeError, TypeError) as exc:
        raise DataError(
            f"template {what} {shown(text)} is not a valid format string ({shown(str(exc), 80)[1:-1]}); use "
            "{field} placeholders and double braces {{ }} for literal ones"
        ) from None


def _template_completion(record: Record, template: Template) -> str | None:
    if template.completion is not None:
        return _render(template.completion, record, "completion")
    for name in COMPLETION_FIELDS:
        value = record.fields.get(name)
        if value is None:
            continue
        if isinstance(value, int) and not isinstance(value, bool):
            return str(value)
        if not isinstance(value, str):
            raise DataError(f'{_where(record)}: field "{name}" must be a string (got {type(value).__name__})')
        return value
    return None  # eval-only prompting: nothing to learn, only to generate


def apply_template(
    records: list[Record], template: Template, few_shot_pool: list[Record], skipped: list[str] | None = None
) -> list[Example]:
    """Render each record through `template` into a completion example.

    With `template.few_shot = k > 0`, the first k records of `few_shot_pool` (never the record itself),
    rendered as prompt + completion, are joined with `template.separator` in front of the prompt.
    With a `skipped` list, records that cannot be rendered are noted there instead of raising.
    """
    shots: list[tuple[Record, str]] = []
    for candidate in few_shot_pool[: template.few_shot + 1]:
        completion = _template_completion(candidate, template)
        if completion is None:
            raise DataError(
                f"{_where(candidate)}: few-shot example has no completion (record has: "
                f"{_field_list(candidate.fields)}); set template.completion or add a completion field"
            )
        shots.append((candidate, _render(template.prompt, candidate, "prompt") + completion))
    examples = []
    for record in records:
        chosen = [text for candidate, text in shots if candidate is not record][: template.few_shot]
        try:
            prompt = template.separator.join([*chosen, _render(template.prompt, record, "prompt")])
            completion = _template_completion(record, template)
        except DataError as exc:
            if skipped is None or not str(exc).startswith(_where(record)):  # a broken template is no bad row
                raise
            skipped.append(str(exc))
            continue
        examples.append(Example("completion", record.source, record.line, prompt=prompt,
                                completion=completion))
    return examples


# ---------------------------------------------------------------------------------------------------
# Loading


def load_records(spec: str | Path, skipped: list[str] | None = None) -> list[Record]:
    """Records of a data file or folder, of a bundled dataset (`builtin:NAME`), or of registered datasets
    (`path/dataset_info.json#NAME`, see `tuneforge.data.registry`)."""
    if isinstance(spec, str) and spec.startswith(BUILTIN_PREFIX):
        return load_builtin(spec.removeprefix(BUILTIN_PREFIX))
    if is_registry_spec(spec):
        return load_registry_records(str(spec), skipped)
    path = Path(spec)
    if path.name == "dataset_info.json" and path.is_file() and not (path.parent / "state.json").exists():
        raise DataError(f"{spec}: a dataset registry; name one of its datasets: {spec}{SEPARATOR}NAME")
    return read_records(spec, skipped)


def select_records(records: list[Record], where: dict[str, list], spec: str | Path) -> list[Record]:
    """Records whose fields take one of the listed values (`data.where: {category: [ai, science]}`)."""
    wanted = {field: {str(v) for v in values} for field, values in where.items()}
    chosen = [r for r in records if all(str(r.fields.get(f)) in values for f, values in wanted.items())]
    if not chosen:
        fields = ", ".join(f"{f} in {sorted(v)}" for f, v in wanted.items())
        raise DataError(f"{spec}: no record has {fields} (data.where)")
    return chosen


def load_examples(
    spec: str | Path,
    format: str = "auto",
    template: Any = None,
    skipped: list[str] | None = None,
    where: dict[str, list] | None = None,
) -> list[Example]:
    """Load and validate every example of `spec` (a path or `builtin:NAME`).

    `format="auto"` detects the format from the first record; every record must then fit it. A template
    overrides the format: records of any shape become completion examples.

    Any invalid record raises a `DataError` naming its file, line and field. With a `skipped` list
    (`data.skip_invalid: true`), invalid records are left out and their messages appended there; the
    format is then detected from the first record that fits one.
    """
    if format != "auto" and format not in FORMATS:
        raise DataError(f"unknown data format {format!r} (choose one of: auto, {', '.join(FORMATS)})")
    first_skipped = len(skipped) if skipped is not None else 0
    records = load_records(spec, skipped)
    if where:
        records = select_records(records, where, spec)
    if template is not None:
        examples = apply_template(records, template, few_shot_pool=records, skipped=skipped)
    elif skipped is None:
        fmt = detect_format(records[0]) if format == "auto" else format
        examples = [to_example(record, fmt) for record in records]
    else:
        fmt, examples = format, []
        for record in records:
            try:
                if fmt == "auto":
                    fmt = detect_format(record)
                examples.append(to_example(record, fmt))
            except DataError as exc:
                skipped.append(str(exc))
    if skipped:  # in file order, whichever check refused the record
        skipped[first_skipped:] = sorted(skipped[first_skipped:], key=_line_in_message)
    if not examples and skipped:
        raise DataError(f"{spec}: no valid records (every record was skipped, e.g. {skipped[first_skipped]})")
    return examples


def _line_in_message(message: str) -> int:
    found = re.match(r".*?:(\d+): ", message)
    return int(found.group(1)) if found else 0
