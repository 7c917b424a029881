"""ShareGPT conversations -> chat messages.

ShareGPT records hold a list of turns under `conversations`, each `{"from": ..., "value": ...}` with the
roles `human`, `gpt` and `system` (the layout of the ShareGPT dumps used by Vicuna, and LLaMA-Factory's
`sharegpt` formatting). Some exports use `role`/`content` keys or `user`/`assistant` roles in the same
list; both are read. A top-level `system` string becomes the first message.

`ShareGPTTags` renames the keys and roles, as LLaMA-Factory's `dataset_info.json` `tags` do
(`role_tag`, `content_tag`, `user_tag`, `assistant_tag`, `system_tag`).
"""

from __future__ import annotations

from dataclasses import dataclass

from tuneforge.data.readers import Record
from tuneforge.errors import DataError, shown

# Tool turns: LLaMA-Factory's observation_tag / function_tag defaults and the OpenAI names.
TOOL_ROLES = ("observation", "function_call", "function", "tool")


@dataclass(frozen=True)
class ShareGPTTags:
    """Where a turn keeps its role and text, and which role values mean user, assistant and system."""

    role_tag: str = "from"
    content_tag: str = "value"
    user_tag: str = "human"
    assistant_tag: str = "gpt"
    system_tag: str = "system"
    lenient: bool = True  # also read role/content keys and user/assistant roles (plain ShareGPT files)

    def role(self, value: object) -> str | None:
        """`user`, `assistant` or `system` for a role value, None when it is none of them."""
        names = {self.user_tag: "user", self.assistant_tag: "assistant", self.system_tag: "system"}
        if self.lenient:
            names = {"user": "user", "assistant": "assistant", "chatgpt": "assistant", **names}
        return names.get(value) if isinstance(value, str) else None


DEFAULT_TAGS = ShareGPTTags()


def sharegpt_messages(
    record: Record,
    column: str = "conversations",
    tags: ShareGPTTags = DEFAULT_TAGS,
    system_column: str | None = "system",
) -> list[dict]:
    """The record's turns as `[{role, content}, ...]`; any problem is a `DataError` naming line and field."""
    where = f"{record.source}:{record.line}"
    turns = record.fields.get(column)
    if not isinstance(turns, list) or not turns:
        got = "missing" if turns is None else f"got {type(turns).__name__}"
        raise DataError(
            f'{where}: field "{column}" must be a non-empty list of '
            f"{{{tags.role_tag}, {tags.content_tag}}} turns ({got})"
        )
    messages = []
    system = record.fields.get(system_column) if system_column else None
    if system is not None:
        if not isinstance(system, str):
            raise DataError(
                f'{where}: field "{system_column}" must be a string (got {type(system).__name__})'
            )
        if system.strip():
            messages.append({"role": "system", "content": system})
    for index, turn in enumerate(turns):
        field = f"{column}[{index}]"
        if not isinstance(turn, dict):
            raise DataError(
                f"{where}: {field} must be an object with {tags.role_tag} and {tags.content_tag} "
                f"(got {type(turn).__name__})"
            )
        role_key, content_key = _keys(turn, tags)
        for key in (role_key, content_key):
            if key not in turn:
                raise DataError(
                    f'{where}: {field}: missing field "{key}" (each turn needs: {role_key}, {content_key})'
                )
        value, content = turn[role_key], turn[content_key]
        role = tags.role(value)
        if role is None:
            known = ", ".join(sorted({tags.user_tag, tags.assistant_tag, tags.system_tag}))
            hint = " (tool turns are not supported)" if value in TOOL_ROLES else ""
            raise DataError(f"{where}: {field}.{role_key}: {shown(value, 40)} is not one of {known}{hint}")
        if not isinstance(content, str):
            raise DataError(f"{where}: {field}.{content_key} must be a string (got {type(content).__name__})")
        if role == "system" and (index > 0 or messages):
            raise DataError(f"{where}: {field}: a system turn may only come first")
        if role == "assistant" and not content.strip():
            raise DataError(
                f"{where}: {field}.{content_key} is empty (assistant turns are what the model learns)"
            )
        messages.append({"role": role, "content": content})
    if not any(message["role"] == "assistant" for message in messages):
        raise DataError(
            f"{where}: {column} has no {tags.assistant_tag} turn (nothing for the model to learn)"
        )
    return messages


def _keys(turn: dict, tags: ShareGPTTags) -> tuple[str, str]:
    """The turn's role and content keys: the tags', or role/content when lenient and only those exist."""
    if tags.lenient and tags.role_tag not in turn and "role" in turn:
        return "role", "content"
    return tags.role_tag, tags.content_tag
