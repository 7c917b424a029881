"""An Ollama `Modelfile` for an exported GGUF: FROM, the chat template as a Go template, SYSTEM, stop tokens.

Ollama formats chats with Go's text/template (github.com/ollama/ollama/blob/main/docs/modelfile.md), not
the Jinja template a tokenizer carries, so the Jinja template is translated. Templates of the common shape,
each message written as `<prefix naming the role><content><suffix>` and a generation prompt after a final
non-assistant message (ChatML, as SmolLM2 and Qwen2 use; Llama 3's headers, its leading BOS left to
llama.cpp's tokenizer), are read off renders of probe
conversations. A default system prompt the template injects becomes `SYSTEM`. The translation is then
checked by rendering both on sample chats; when they differ, no TEMPLATE is written and the report says
why (Ollama then passes the prompt through unformatted).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tuneforge.checkpoint import write_atomic

_PROBES = ("SYS-7f3a", "USR-91c2", "AST-5d08", "USR-2b6e")


@dataclass(frozen=True)
class ChatShape:
    """A chat template of the common shape: `head + role + tail + content + suffix` per message."""

    head: str  # before the role name
    tail: str  # after the role name, before the content
    suffix: str  # after the content
    generation: str  # after a final user message, to open the assistant's turn
    default_system: str | None  # a system prompt the template adds when the chat has none

    def render(self, messages: list[dict]) -> str:
        """What the Go template below renders, in Python: the translation's own check."""
        if self.default_system is not None and (not messages or messages[0]["role"] != "system"):
            messages = [{"role": "system", "content": self.default_system}, *messages]
        text = "".join(f"{self.head}{m['role']}{self.tail}{m['content']}{self.suffix}" for m in messages)
        return text + (self.generation if messages and messages[-1]["role"] != "assistant" else "")

    def go_template(self) -> str:
        return ("{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}"
                f"{self.head}{{{{ .Role }}}}{self.tail}{{{{ .Content }}}}{self.suffix}"
                f'{{{{ if and $last (ne .Role "assistant") }}}}{self.generation}{{{{ end }}}}{{{{ end }}}}')


def chat_shape(tokenizer) -> tuple[ChatShape | None, str | None]:
    """The shape of the tokenizer's chat template, or None and the reason it cannot be translated."""
    if not isinstance(getattr(tokenizer, "chat_template", None), str):
        return None, "the tokenizer has no chat template"
    shape, reason = _shape(tokenizer, None)
    bos = getattr(tokenizer, "bos_token", None)
    if shape is None and bos:  # a template that writes BOS first (Llama 3): llama.cpp adds it when tokenizing
        shape = _shape(tokenizer, bos)[0]
    return (shape, None) if shape is not None else (None, reason)


def _shape(tokenizer, bos: str | None) -> tuple[ChatShape | None, str | None]:
    """`chat_shape`, with a leading `bos` cut from every render."""
    system, user, assistant, user2 = _PROBES

    def render(messages: list[tuple[str, str]], generation: bool) -> str:
        chat = [{"role": role, "content": content} for role, content in messages]
        text = tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=generation)
        return text[len(bos):] if bos and text.startswith(bos) else text

    try:
        full = render([("system", system), ("user", user), ("assistant", assistant)], False)
        alone = render([("user", user)], False)
        prompted = render([("user", user)], True)
    except Exception as exc:  # noqa: BLE001 - a template that raises on these chats is not translatable
        return None, f"the chat template fails on a probe chat ({type(exc).__name__}: {str(exc)[:80]})"
    head_role_tail = full[:full.find(system)]
    if full.find(system) < 0 or "system" not in head_role_tail or not prompted.startswith(alone):
        return None, "the chat template does not write each message as prefix + content + suffix"
    head, tail = head_role_tail.rsplit("system", 1)
    between = full[full.find(system) + len(system):full.find(user)]
    user_prefix = f"{head}user{tail}"
    if not between.endswith(user_prefix):
        return None, "the chat template's user prefix differs from its system prefix"
    suffix = between[:len(between) - len(user_prefix)]
    default = alone[:alone.find(user_prefix + user)] if user_prefix + user in alone else None
    default_system = None
    if default:
        opening = f"{head}system{tail}"
        if not (default.startswith(opening) and default.endswith(suffix)):
            return None, "the chat template adds a default system block of another shape"
        default_system = default[len(opening):len(default) - len(suffix)]
    shape = ChatShape(head, tail, suffix, prompted[len(alone):], default_system)
    checks = [[("user", user)], [("system", system), ("user", user)],
              [("user", user), ("assistant", assistant), ("user", user2)],
              [("system", system), ("user", user), ("assistant", assistant), ("user", user2)]]
    for chat in checks:
        messages = [{"role": role, "content": content} for role, content in chat]
        if shape.render(messages) != render(chat, True):
            return None, "the translated template renders sample chats differently from the chat template"
    parts = (head, tail, suffix, shape.generation, default_system or "")
    if any("{{" in part or "}}" in part or '"""' in part for part in parts):
        return None, "the chat template's text contains Go template or Modelfile delimiters"
    return shape, None


def stop_tokens(tokenizer, shape: ChatShape | None) -> list[str]:
    """The end-of-sequence token, and the template's message end when it is a special token."""
    stops = [tokenizer.eos_token] if tokenizer.eos_token else []
    special = set(getattr(tokenizer, "all_special_tokens", []))
    for part in (shape.suffix.strip(),) if shape else ():
        if part in special and part not in stops:
            stops.append(part)
    return stops


def modelfile_text(gguf_name: str, tokenizer) -> tuple[str, str | None]:
    """The Modelfile for `gguf_name` (a file in the same folder) and, when the template is left out, why."""
    shape, reason = chat_shape(tokenizer)
    lines = [f"FROM ./{gguf_name}", ""]
    if shape is not None:
        lines += [f'TEMPLATE """{shape.go_template()}"""', ""]
        if shape.default_system is not None:
            lines += [f'SYSTEM """{shape.default_system}"""', ""]
    for stop in stop_tokens(tokenizer, shape):
        lines.append(f'PARAMETER stop "{stop}"')
    return "\n".join(lines).rstrip() + "\n", reason


def write_modelfile(gguf_path: Path, tokenizer) -> tuple[Path, str | None]:
    """Write `Modelfile` beside `gguf_path` atomically; returns its path and any reason TEMPLATE is absent."""
    text, reason = modelfile_text(gguf_path.name, tokenizer)
    path = gguf_path.with_name("Modelfile")
    write_atomic(path, text)
    return path, reason
