"""A Hugging Face tokenizer as GGUF `tokenizer.*` metadata, as llama.cpp's `convert_hf_to_gguf.py` writes it.

Byte-level BPE vocabularies (GPT-2 style: SmolLM2, Qwen2, Llama 3, Mistral's Tekken) are stored as
`tokenizer.ggml.model = "gpt2"`: every id's token in the byte-to-unicode spelling, its type, the merges in
rank order, and the special token ids. `tokenizer.ggml.pre` names the regex that splits text before the
merges; it is read off the tokenizer's own pre-tokenizer (llama.cpp's names, see `llama-vocab.cpp`).
Sentencepiece-style BPE vocabularies (Metaspace, `<0xNN>` byte fallback: Llama 2, Mistral 7B) are stored
as `tokenizer.ggml.model = "llama"`: tokens in their `▁` spelling, byte tokens typed BYTE, the merges, and
scores that rank each merged token by its merge (llama.cpp's sentencepiece tokenizer merges the pair whose
result scores highest, so this reproduces the BPE order). Embedding rows past the tokenizer's last id become
`[PAD<id>]` tokens of type UNUSED, as llama.cpp does.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

from tuneforge.errors import ModelError

# llama.cpp token types (gguf.TokenType)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
                r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPLIT_NAMES = {LLAMA3_SPLIT: "llama-bpe", QWEN2_SPLIT: "qwen2", GPT2_SPLIT: "gpt-2"}


@dataclass
class VocabFields:
    """What goes under `tokenizer.*` in the file."""

    model: str
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    chat_template: str | None = None
    scores: list[float] | None = None  # sentencepiece-style vocabularies only
    add_space_prefix: bool | None = None
    notes: list[str] = field(default_factory=list)


def vocab_fields(tokenizer, vocab_size: int) -> VocabFields:
    """The GGUF tokenizer metadata of a fast (`tokenizers`-backed) tokenizer, for `vocab_size` embeddings."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise ModelError(f"{type(tokenizer).__name__}: only fast (tokenizers-backed) tokenizers export "
                         f"to GGUF")
    spec = json.loads(backend.to_str())
    model = spec.get("model") or {}
    sentencepiece = model.get("type") == "BPE" and model.get("byte_fallback") and _is_metaspace(spec)
    byte_level = _is_byte_level(spec) and not model.get("byte_fallback")
    if model.get("type") != "BPE" or not (sentencepiece or byte_level):
        kind = f"{model.get('type')}{' with byte fallback' if model.get('byte_fallback') else ''}"
        raise ModelError(f"tokenizer of kind {kind} does not export to GGUF yet (byte-level BPE: SmolLM2, "
                         f"Qwen2, Llama 3; sentencepiece-style BPE: Llama 2, Mistral 7B)")
    pre, notes = ("default", []) if sentencepiece else _pre_name(spec.get("pre_tokenizer"))
    by_id = {index: token for token, index in tokenizer.get_vocab().items()}
    if len(by_id) > vocab_size:
        raise ModelError(f"the tokenizer has {len(by_id)} tokens but the model only {vocab_size} "
                         f"embedding rows")
    added = {item["id"]: item for item in spec.get("added_tokens", [])}
    tokens, types = [], []
    for index in range(vocab_size):
        if index not in by_id:
            tokens.append(f"[PAD{index}]")
            types.append(UNUSED)
        elif index in added:
            tokens.append(by_id[index])
            types.append(CONTROL if added[index].get("special") else USER_DEFINED)
        else:
            tokens.append(by_id[index])
            token = by_id[index]
            byte = sentencepiece and len(token) == 6 and token.startswith("<0x") and token.endswith(">")
            types.append(BYTE if byte else UNKNOWN if token == model.get("unk_token") else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]
    scores = None
    if sentencepiece:  # a merged token scores minus its merge's rank; tokens no merge makes score lowest
        rank = {merge.replace(" ", ""): -float(k) for k, merge in reversed(list(enumerate(merges)))}
        scores = [rank.get(token, -1e9 if types[i] == NORMAL else 0.0) for i, token in enumerate(tokens)]
    special = {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "unk", "pad")}
    probe = tokenizer("a", add_special_tokens=True)["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    template = tokenizer.chat_template if isinstance(tokenizer.chat_template, str) else None
    return VocabFields(
        model="llama" if sentencepiece else "gpt2", pre=pre, tokens=tokens, token_types=types, merges=merges,
        special_ids={name: value for name, value in special.items() if isinstance(value, int)},
        add_bos=len(probe) > len(plain) and probe[0] == special["bos"],
        add_eos=len(probe) > len(plain) and probe[-1] == special["eos"],
        chat_template=template, notes=notes, scores=scores,
        add_space_prefix='"prepend_scheme": "never"' not in json.dumps(spec) if sentencepiece else None,
    )


def write_vocab(writer, fields: VocabFields) -> None:
    """Add `fields` to a `gguf.GGUFWriter`."""
    writer.add_tokenizer_model(fields.model)
    writer.add_tokenizer_pre(fields.pre)
    writer.add_token_list(fields.tokens)
    writer.add_token_types(fields.token_types)
    writer.add_token_merges(fields.merges)
    if fields.scores is not None:
        writer.add_token_scores(fields.scores)
    if fields.add_space_prefix is not None:
        writer.add_add_space_prefix(fields.add_space_prefix)
    adders = {"bos": writer.add_bos_token_id, "eos": writer.add_eos_token_id,
              "unk": writer.add_unk_token_id, "pad": writer.add_pad_token_id}
    for name, token_id in fields.special_ids.items():
        adders[name](token_id)
    writer.add_add_bos_token(fields.add_bos)
    writer.add_add_eos_token(fields.add_eos)
    if fields.chat_template:
        writer.add_chat_template(fields.chat_template)


def _is_byte_level(spec: dict) -> bool:
    """Byte-level BPE: a ByteLevel pre-tokenizer or decoder somewhere in the pipeline."""
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("decoder")])
    return '"ByteLevel"' in parts


def _is_metaspace(spec: dict) -> bool:
    """Sentencepiece-style: words marked with `▁` by a Metaspace pre-tokenizer or a normalizer."""
    parts = json.dumps([spec.get("pre_tokenizer"), spec.get("normalizer"), spec.get("decoder")])
    return '"Metaspace"' in parts or '"\\u2581"' in parts


def _pre_name(pre_tokenizer: dict | None) -> tuple[str, list[str]]:
    """llama.cpp's name for the split a byte-level pre-tokenizer does, and a note when none fits."""
    sequence = bool(pre_tokenizer) and pre_tokenizer.get("type") == "Sequence"
    steps = pre_tokenizer.get("pretokenizers", []) if sequence else [pre_tokenizer or {}]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2", []
    digits = kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits")
    if digits and steps[1].get("use_regex", True):
        return "smollm", []
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        name = SPLIT_NAMES.get((steps[0].get("pattern") or {}).get("Regex"))
        if name is not None:
            return name, []
    note = (f"pre-tokenizer {'+'.join(map(str, kinds))} has no llama.cpp name; llama.cpp will split text "
            f"with its default regex, so its token ids may differ from this tokenizer's")
    return "default", [note]
