"""Per-document attention for packed rows: each example attends within itself, one SDPA call per example.

A packed row holds several examples (tuneforge.packing). transformers keeps them apart with a block-diagonal
4-D mask, and with a mask PyTorch's CPU attention computes every one of the row's L x L scores: attention
work grows as L^2 however short the examples are (docs/scaling.md measured 64% of a step at L 4096, and
8.3 GB). Here attention runs once per example, causal and maskless, so it costs sum(n_i^2) and SDPA can use
its fused kernel. The boundaries travel as the variable-length keyword arguments transformers defines for
FlashAttention-2's varlen kernel (`cu_seq_lens_q/k`: cumulative example starts over the flattened batch,
as in Dao 2023, arXiv:2307.08691, and transformers' `DataCollatorWithFlattening`), so the same inputs mean
the same thing to a flash-attention model.

The function is registered in transformers' AttentionInterface under ATTENTION_NAME with sdpa's mask
builder. A call without the boundaries (evaluation, generation, a wrapper that drops keyword arguments) is
plain sdpa with the model's own mask, so turning it on can never change what a model computes:
`check_packing` compares packed and separate outputs with it on, and turns it off again if they differ.
"""

from __future__ import annotations

import functools
import inspect
import itertools

import torch
from torch import Tensor, nn
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
from transformers.modeling_utils import AttentionInterface

ATTENTION_NAME = "tuneforge_documents"
# Below this row length the mask is kept: at rows of 512 (SmolLM2-135M shape, LoRA, 1 thread) per-document
# attention was 1.07x the mask with overlapping ranges over 3 runs (bench/results/2026-11-30-document-
# attention-512.json), and under `train.compile` it breaks the graph at attention; from 1024 on it is
# measured faster (bench/results/2026-11-29-document-attention.json, docs/scaling.md).
MIN_ROW_LENGTH = 1024


@functools.cache
def _register() -> None:
    """Make `document_attention` known to transformers, once, at the first use (not at import)."""
    AttentionInterface.register(ATTENTION_NAME, document_attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


@torch.compiler.disable  # boundaries are data: a compiled block runs this call eagerly (one graph break)
def document_attention(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                       attention_mask: Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                       cu_seq_lens_q: Tensor | None = None, cu_seq_lens_k: Tensor | None = None,
                       **kwargs) -> tuple[Tensor, None]:
    """sdpa per example when the call carries the boundaries, else plain sdpa with the model's mask.

    query (B, H, L, D), key/value (B, H_kv, L, D); returns (B, L, H, D) as every attention function does.
    """
    batch, _, length, _ = query.shape
    starts = [] if cu_seq_lens_q is None else cu_seq_lens_q.tolist()
    # plain sdpa with the model's mask: no boundaries, a KV cache in use, rows the boundaries do not
    # describe (e.g. a soft prompt added inside the model), or per-row biases that cannot be sliced here
    if (not starts or starts[-1] != batch * length or key.shape[2] != length
            or kwargs.get("position_bias") is not None or kwargs.get("s_aux") is not None):
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    rows: list[list[Tensor]] = [[] for _ in range(batch)]
    for start, end in itertools.pairwise(starts):
        row, offset = divmod(start, length)
        if (end - 1) // length != row:
            raise ValueError(f"document_attention: an example spans rows {row} and {(end - 1) // length}")
        piece = slice(offset, offset + end - start)
        out, _ = sdpa_attention_forward(module, query[row:row + 1, :, piece], key[row:row + 1, :, piece],
                                        value[row:row + 1, :, piece], None, dropout, scaling, **kwargs)
        rows[row].append(out)
    return torch.cat([torch.cat(pieces, dim=1) for pieces in rows], dim=0), None


def boundaries(position_ids: Tensor) -> dict[str, Tensor]:
    """The varlen keyword arguments for packed rows whose `position_ids` restart at 0 with every example
    (padding continues the last example): starts over the flattened (B * L) tokens, ending at B * L.
    (No `max_length_q/k`: a Python int would make a compiled block recompile for every batch.)"""
    flat = position_ids.reshape(-1)
    starts = torch.nonzero(flat == 0).flatten()
    cu = torch.cat([starts, starts.new_tensor([flat.numel()])]).to(torch.int32)
    return {"cu_seq_lens_q": cu, "cu_seq_lens_k": cu}


def _text_config(model: nn.Module):
    config = getattr(getattr(model, "module", model), "config", None)  # DDP / DeepSpeed wrap in .module
    return config.get_text_config() if config is not None and hasattr(config, "get_text_config") else config


def uses_document_attention(model: nn.Module) -> bool:
    """Whether `model` attends per document (packed batches then carry the boundaries)."""
    config = _text_config(model)
    return getattr(config, "_attn_implementation", None) == ATTENTION_NAME


def why_not(model: nn.Module, row_length: int, device: torch.device | str = "cpu") -> str | None:
    """Why per-document attention cannot stand in for this model's sdpa attention, or None."""
    config = _text_config(model)
    name = type(model).__name__
    if torch.device(device).type != "cpu":  # one kernel launch per example and layer: unmeasured there
        return f"it is measured on CPU only; on {torch.device(device).type} the mask path is kept"
    if config is None or not hasattr(model, "set_attn_implementation"):
        return f"{name} is not a transformers model"
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ATTENTION_NAME):
        return f"its attention is {getattr(config, '_attn_implementation', None)!r}, not 'sdpa'"
    if not model._can_set_attn_implementation():
        return f"{name} computes attention outside transformers' AttentionInterface"
    if getattr(config, "alibi", False) or getattr(config, "attn_logit_softcapping", None) is not None:
        return "its attention adds ALiBi biases or caps logits, which live in the mask or eager code"
    if row_length < MIN_ROW_LENGTH:
        return f"rows of {row_length} tokens are shorter than {MIN_ROW_LENGTH}, where the mask costs no more"
    for field in ("sliding_window", "attention_chunk_size"):  # windows and chunks live in the mask
        window = getattr(config, field, None)
        if isinstance(window, int) and window < row_length:
            return f"its {field.replace('_', ' ')} ({window}) is shorter than a row ({row_length})"
    other = set(getattr(config, "layer_types", None) or []) - {"full_attention", "sliding_attention"}
    if other:  # hybrids: their linear-attention layers read the boundaries too
        return f"it has layers of kind {min(other)!r}"
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in inspect.signature(model.forward).parameters
               .values()):
        return f"{name}.forward takes no extra keyword arguments to carry the boundaries"
    return None


def enable(model: nn.Module, row_length: int, device: torch.device | str = "cpu") -> bool:
    """Switch an sdpa model to per-document attention; False (and nothing changed) when `why_not` says no."""
    if why_not(model, row_length, device) is not None:
        return False
    _register()
    model.set_attn_implementation(ATTENTION_NAME)
    return True


def disable(model: nn.Module) -> None:
    """Back to plain sdpa (the model computes exactly what it did before `enable`)."""
    if uses_document_attention(model):
        model.set_attn_implementation("sdpa")
