"""Tokenize examples and mask labels: the loss is taken only on what the model should learn to produce.

completion      prompt -> IGNORE_INDEX, completion + EOS -> labelled (so the model learns to stop)
chat            only assistant contents and their end-of-turn token are labelled
text            every token is labelled; documents are joined with EOS and cut into full blocks
classification  input_ids + one integer label per example (sequence classification head)
"""

from __future__ import annotations

import random
from typing import Any

import torch

from tuneforge.data.formats import Example
from tuneforge.errors import DataError, shown

IGNORE_INDEX = -100  # label value torch.nn.functional.cross_entropy skips
CLASSIFICATION_TEMPLATE_HINT = 'template: {prompt: "{text}\\nTopic:", completion: " {label}"}'


def _eos_id(tokenizer: Any) -> int:
    if tokenizer.eos_token_id is None:
        raise DataError(
            "the tokenizer has no end-of-sequence token; causal fine-tuning needs one to end examples"
        )
    return tokenizer.eos_token_id


def encode_causal(example: Example, tokenizer: Any, max_seq_len: int) -> dict | None:
    """`{"input_ids", "labels"}` for a causal LM, or None when no label token fits in `max_seq_len`."""
    if example.kind == "completion":
        return _encode_completion(example, tokenizer, max_seq_len)
    if example.kind == "chat":
        return _encode_chat(example, tokenizer, max_seq_len)
    if example.kind == "text":
        ids = tokenizer(example.text, add_special_tokens=True)["input_ids"] + [_eos_id(tokenizer)]
        ids = ids[:max_seq_len]
        return {"input_ids": ids, "labels": list(ids)} if ids else None
    if example.kind == "classification":
        raise DataError(
            f"{example.source}:{example.line}: classification data (text, label) cannot train a causal "
            f"language model directly; add a prompt template, e.g. {CLASSIFICATION_TEMPLATE_HINT}"
        )
    raise DataError(f"{example.source}:{example.line}: cannot encode an example of kind {example.kind!r}")


def _encode_completion(example: Example, tokenizer: Any, max_seq_len: int) -> dict | None:
    if example.completion is None:
        raise DataError(
            f"{example.source}:{example.line}: no completion to train on; set template.completion or add a "
            "completion/output/answer field"
        )
    prompt_ids = tokenizer(example.prompt or "", add_special_tokens=True)["input_ids"]
    completion_ids = tokenizer(example.completion, add_special_tokens=False)["input_ids"] + [
        _eos_id(tokenizer)
    ]
    # too long: drop the start of the prompt first (the completion is what is learned),
    # then the end of the completion
    room_for_prompt = max(0, max_seq_len - len(completion_ids))
    if len(prompt_ids) > room_for_prompt:
        prompt_ids = prompt_ids[len(prompt_ids) - room_for_prompt :]
    completion_ids = completion_ids[: max_seq_len - len(prompt_ids)]
    if not completion_ids:
        return None
    return {
        "input_ids": prompt_ids + completion_ids,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + completion_ids,
    }


def _render_chat(tokenizer: Any, messages: list[dict], add_generation_prompt: bool = False) -> str:
    from jinja2 import TemplateError

    try:
        return tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except TemplateError as exc:  # e.g. a template that insists user and assistant turns alternate
        raise DataError("the tokenizer's chat template refuses these messages: "
                        f"{shown(str(exc), 100)}") from None


def assistant_spans(messages: list[dict], tokenizer: Any) -> tuple[str, list[tuple[int, int]]]:
    """The rendered chat and the character spans of each assistant reply, end-of-turn token included.

    A reply starts where the rendering of the messages before it plus the generation prompt ends, and ends
    where the rendering up to it ends (less the newline after the end-of-turn token). When a template does
    not render prefixes as prefixes (e.g. it injects a default system prompt), the reply is searched for.
    """
    full = _render_chat(tokenizer, messages)
    spans, cursor = [], 0
    eos_text = tokenizer.eos_token or ""
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        before = _render_chat(tokenizer, messages[:index], add_generation_prompt=True) if index else None
        through = _render_chat(tokenizer, messages[: index + 1]).rstrip("\r\n")
        if (
            before is not None
            and full.startswith(before)
            and full.startswith(through)
            and len(through) > len(before)
        ):
            start, end = len(before), len(through)
        else:
            start = _find_reply(full, message["content"], cursor, _generation_prompt(tokenizer))
            end = start + len(message["content"])
            if eos_text and full.startswith(eos_text, end):
                end += len(eos_text)
        spans.append((start, end))
        cursor = end
    return full, spans


def _generation_prompt(tokenizer: Any) -> str:
    """What the template adds to open an assistant turn (e.g. `<|im_start|>assistant\\n` for ChatML)."""
    probe = [{"role": "user", "content": "x"}]
    plain = _render_chat(tokenizer, probe)
    opened = _render_chat(tokenizer, probe, add_generation_prompt=True)
    return opened[len(plain) :] if opened.startswith(plain) else ""


def _find_reply(full: str, content: str, cursor: int, opener: str) -> int:
    """Where `content` starts in the rendered chat at or after `cursor`, preferably right after `opener`."""
    if opener:
        position = full.find(opener + content, cursor)
        if position >= 0:
            return position + len(opener)
    position = full.find(content, cursor)
    if position < 0:
        raise DataError("the chat template changes message contents; cannot find the assistant replies")
    return position


def _encode_chat(example: Example, tokenizer: Any, max_seq_len: int) -> dict | None:
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(
            "chat format needs a tokenizer with a chat template; use format: completion or a template"
        )
    if not getattr(tokenizer, "is_fast", False):
        raise DataError("chat format needs a fast tokenizer (character offsets locate the assistant replies)")
    try:
        text, spans = assistant_spans(example.messages or [], tokenizer)
    except DataError as exc:
        raise DataError(f"{example.where}: {exc}") from None
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoded["input_ids"][:max_seq_len]
    labels = []
    for token_id, (start, end) in zip(input_ids, encoded["offset_mapping"], strict=False):
        inside = end > start and any(
            span_start <= start and end <= span_end for span_start, span_end in spans
        )
        labels.append(token_id if inside else IGNORE_INDEX)
    if all(label == IGNORE_INDEX for label in labels):
        return None
    return {"input_ids": input_ids, "labels": labels}


def encode_text_chunks(
    examples: list[Example], tokenizer: Any, max_seq_len: int, max_chunks: int | None = None
) -> list[dict]:
    """Cut text documents into full `max_seq_len` blocks where every token is a label.

    Without `max_chunks`, all documents are tokenized in order, joined with EOS, and cut into blocks; the
    last partial block is dropped (kept only when the texts are too short to fill a single block).

    With `max_chunks` (e.g. a retain set) the result is a deterministic sample spread over the documents:
    they are visited in a fixed shuffled order (seed 0), taking at most `ceil(max_chunks / documents)`
    blocks from evenly spaced places in each. A long document is tokenized only around those places, so a
    few blocks from a whole play cost milliseconds; short documents are joined with EOS as above.
    """
    eos = _eos_id(tokenizer)
    if max_chunks is None:
        buffer: list[int] = []
        for example in examples:
            buffer += tokenizer(example.text, add_special_tokens=True)["input_ids"] + [eos]
        return _as_items(_cut_blocks(buffer, max_seq_len) or _short_block(buffer, max_seq_len))
    order = list(range(len(examples)))
    random.Random(0).shuffle(order)
    per_document = -(-max_chunks // max(1, min(len(examples), max_chunks)))
    chunks: list[list[int]] = []
    spare: list[list[int]] = []  # blocks of short documents not chosen, to fill a shortfall
    buffer = []
    for index in order:
        take = min(per_document, max_chunks - len(chunks))
        if take <= 0:
            break
        text = examples[index].text or ""
        windows = _window_blocks(text, tokenizer, max_seq_len, take)
        if windows is not None:
            chunks += windows
            continue
        buffer += tokenizer(text, add_special_tokens=True)["input_ids"] + [eos]
        blocks = _cut_blocks(buffer, max_seq_len)
        buffer = buffer[len(blocks) * max_seq_len :]
        chosen = _evenly_spaced(len(blocks), min(take, len(blocks)))
        chunks += [block for i, block in enumerate(blocks) if i in chosen]
        spare += [block for i, block in enumerate(blocks) if i not in chosen]
    chunks += spare[: max(0, max_chunks - len(chunks))]
    return _as_items(chunks or _short_block(buffer, max_seq_len))


def _cut_blocks(ids: list[int], size: int) -> list[list[int]]:
    return [ids[start : start + size] for start in range(0, len(ids) - size + 1, size)]


def _short_block(ids: list[int], size: int) -> list[list[int]]:
    """Texts too short for one full block still give one (shorter) block rather than nothing."""
    return [ids[:size]] if ids else []


def _as_items(blocks: list[list[int]]) -> list[dict]:
    return [{"input_ids": block, "labels": list(block)} for block in blocks]


def _window_blocks(text: str, tokenizer: Any, max_seq_len: int, take: int) -> list[list[int]] | None:
    """`take` blocks tokenized from evenly spaced character windows of a long text; None if too short."""
    window = max_seq_len * 8  # characters; a token is rarely longer than 8
    if len(text) < 2 * window * take:
        return None
    blocks = []
    for offset in sorted(_evenly_spaced(len(text) - window, take)):
        ids = tokenizer(text[offset : offset + window], add_special_tokens=False)["input_ids"]
        ids = ids[1:] if offset else ids  # the window may start inside a word
        if len(ids) < max_seq_len:
            return None
        blocks.append(ids[:max_seq_len])
    return blocks


def _evenly_spaced(count: int, take: int) -> set[int]:
    """`take` indices spread evenly over range(count), first and last included."""
    if take <= 1:
        return set(range(take))
    return {round(i * (count - 1) / (take - 1)) for i in range(take)}


def encode_classification(
    example: Example, tokenizer: Any, max_seq_len: int, label_to_id: dict[str, int]
) -> dict:
    """`{"input_ids", "attention_mask", "labels": int}` for a sequence classification head."""
    if example.kind != "classification":
        raise DataError(
            f"{example.source}:{example.line}: task classification needs text + label examples, "
            f"got {example.kind}"
        )
    if example.label not in label_to_id:
        raise DataError(
            f'{example.source}:{example.line}: label "{example.label}" is not one of the training labels '
            f"({', '.join(label_to_id)})"
        )
    encoded = tokenizer(example.text, truncation=True, max_length=max_seq_len)
    return {
        "input_ids": list(encoded["input_ids"]),
        "attention_mask": list(encoded["attention_mask"]),
        "labels": label_to_id[example.label],
    }


def label_vocabulary(examples: list[Example]) -> dict[str, int]:
    """Sorted unique labels -> ids 0..n-1."""
    return {
        label: index for index, label in enumerate(sorted({e.label for e in examples if e.label is not None}))
    }


def encode_dataset(
    examples: list[Example],
    tokenizer: Any,
    max_seq_len: int,
    task: str = "causal_lm",
    label_to_id: dict[str, int] | None = None,
) -> tuple[list[dict], int]:
    """Encode every example for `task` ("causal_lm" or "classification").

    Returns the encoded items and how many examples were dropped because no label token fit. Text examples
    become full blocks (`encode_text_chunks`) placed after the other examples.
    """
    if task == "classification":
        label_to_id = label_to_id or label_vocabulary(examples)
        return [encode_classification(e, tokenizer, max_seq_len, label_to_id) for e in examples], 0
    if task != "causal_lm":
        raise DataError(f"unknown task {task!r} (choose causal_lm or classification)")
    items, dropped = [], 0
    for example in examples:
        if example.kind == "text":
            continue
        item = encode_causal(example, tokenizer, max_seq_len)
        if item is None:
            dropped += 1
        else:
            items.append(item)
    texts = [example for example in examples if example.kind == "text"]
    if texts:
        items += encode_text_chunks(texts, tokenizer, max_seq_len)
    return items, dropped


def collate(items: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad a batch: input_ids with `pad_token_id`, token labels with IGNORE_INDEX, attention_mask 1/0.

    Integer fields (a classification `labels`, a `task_id`) become LongTensors of shape (B,).
    """
    if pad_token_id is None:
        raise DataError(
            "the tokenizer has no padding token; set one (e.g. tokenizer.pad_token = tokenizer.eos_token)"
        )
    width = max(len(item["input_ids"]) for item in items)
    batch = {
        "input_ids": torch.tensor(
            [item["input_ids"] + [pad_token_id] * (width - len(item["input_ids"])) for item in items]
        ),
        "attention_mask": torch.tensor(
            [[1] * len(item["input_ids"]) + [0] * (width - len(item["input_ids"])) for item in items]
        ),
    }  # (B, T)
    for key in items[0]:
        if key in batch:
            continue
        values = [item[key] for item in items]
        if all(isinstance(value, int) for value in values):
            batch[key] = torch.tensor(values, dtype=torch.long)  # (B,)
        elif key == "labels":
            batch[key] = torch.tensor(
                [value + [IGNORE_INDEX] * (width - len(value)) for value in values]
            )  # (B, T)
    return batch


def split_train_eval(
    items: list, eval_fraction: float, seed: int, max_eval: int | None = None
) -> tuple[list, list]:
    """Deterministic shuffled split; at least one eval item when there are two or more items.

    Both parts keep the items' original order.
    """
    if len(items) < 2:
        return list(items), []
    count = max(1, min(len(items) - 1, round(len(items) * eval_fraction)))
    if max_eval is not None:
        count = max(1, min(count, max_eval))
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    eval_indices = set(order[:count])
    train = [item for index, item in enumerate(items) if index not in eval_indices]
    evaluation = [item for index, item in enumerate(items) if index in eval_indices]
    return train, evaluation
