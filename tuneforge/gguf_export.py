"""A merged causal LM as one GGUF file, for llama.cpp, Ollama and LM Studio, written in pure Python.

The file follows llama.cpp's converter (`convert_hf_to_gguf.py`) and the GGUF spec
(github.com/ggml-org/ggml/blob/master/docs/gguf.md): hyperparameters under `<arch>.*`, the tokenizer under
`tokenizer.*` (`gguf_vocab`), tensors renamed by `gguf`'s own table for the architecture, query and key rows
of llama-family models permuted the llama way (`gguf_blocks.permute_rows`), and Gemma's RMSNorm weights
stored as `1 + w` (llama.cpp multiplies by the weight; Gemma by one plus it).

Quantization is `gguf.quants.quantize` (llama.cpp's reference rounding): 1-D tensors (norms, biases) stay
F32; a matrix whose rows are not whole 32-weight blocks falls back to F16. With `q4_1` the token embedding
and output head are Q8_0, as in the bundled SmolLM2 file: they are the most sensitive matrices.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from tuneforge.errors import ModelError
from tuneforge.faults import writing
from tuneforge.gguf_blocks import BLOCK_WEIGHTS, permute_rows
from tuneforge.gguf_vocab import vocab_fields, write_vocab

QUANTS = ("f32", "f16", "bf16", "q8_0", "q4_1")


@dataclass(frozen=True)
class Family:
    """How one Hugging Face `model_type` is written: gguf's architecture name and its conversions."""

    arch: str  # a gguf.MODEL_ARCH member name
    permute_qk: bool = False  # llama.cpp's LLAMA architecture expects interleaved rotary halves
    norm_offset: float = 0.0  # added to RMSNorm weights (Gemma)


FAMILIES = {
    "llama": Family("LLAMA", permute_qk=True),  # Llama 2/3, SmolLM2
    "mistral": Family("LLAMA", permute_qk=True),  # llama.cpp runs Mistral as LLAMA
    "qwen2": Family("QWEN2"),
    "gemma2": Family("GEMMA2", norm_offset=1.0),
}


def export_family(model: nn.Module) -> Family:
    """The family of `model`, or a one-line refusal naming the supported ones."""
    config = model.config
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES or not type(model).__name__.endswith("ForCausalLM"):
        raise ModelError(f"GGUF export supports causal LMs of the families {', '.join(FAMILIES)}; "
                         f"this model is {model_type} ({type(model).__name__})")
    scaling = getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in (None, "default"):
        raise ModelError(f"GGUF export does not write rope scaling {rope_type!r} yet (model {model_type})")
    if model_type == "gemma2" and config.query_pre_attn_scalar != config.head_dim:
        raise ModelError(f"gemma2 with query_pre_attn_scalar {config.query_pre_attn_scalar} != head_dim "
                         f"{config.head_dim}: llama.cpp scales attention by head_dim, so it is not exported")
    return FAMILIES[model_type]


def write_gguf(model: nn.Module, tokenizer, path: Path, quant: str = "f32", name: str | None = None) -> dict:
    """Write `model` (plain weights: merge adapters first) and its tokenizer to `path` atomically.

    Returns a report: tensor count, bytes, seconds, the tensor types written and any tokenizer notes.
    """
    import gguf

    if quant not in QUANTS:
        raise ModelError(f"--quant {quant!r}: expected one of {', '.join(QUANTS)}")
    family = export_family(model)
    started = time.perf_counter()
    arch = gguf.MODEL_ARCH[family.arch]
    config = model.config
    vocab = vocab_fields(tokenizer, model.get_input_embeddings().weight.shape[0])
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[arch])
    # never the bare name "mistral": transformers reads that general.name as an architecture gguf lacks
    name = name or "tuneforge-export"
    _write_hyperparameters(writer, config, f"{name}-export" if name == "mistral" else name, quant)
    write_vocab(writer, vocab)
    types = {}
    for gguf_name, array in _tensors(model, family, arch):
        data, qtype = _quantized(gguf_name, array, quant)
        writer.add_tensor(gguf_name, data, raw_dtype=qtype)
        types[qtype.name] = types.get(qtype.name, 0) + 1
    try:
        with writing(tmp):
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            for handle in writer.fout or []:
                handle.flush()
                os.fsync(handle.fileno())
        writer.close()
        os.replace(tmp, path)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    return {"file": str(path), "quant": quant, "architecture": gguf.MODEL_ARCH_NAMES[arch],
            "tensors": sum(types.values()), "tensor_types": types, "bytes": path.stat().st_size,
            "seconds": round(time.perf_counter() - started, 3), "tokenizer_pre": vocab.pre,
            "notes": vocab.notes}


def _write_hyperparameters(writer, config, name: str, quant: str) -> None:
    import gguf

    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    writer.add_name(name)
    writer.add_type("model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    rope = getattr(config, "rope_parameters", None) or {}  # transformers 5 keeps rope_theta in here
    writer.add_rope_freq_base(float(getattr(config, "rope_theta", None) or rope.get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(head_dim)
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(config.vocab_size)
    if head_dim * heads != config.hidden_size or config.model_type == "gemma2":
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    if config.model_type == "gemma2":
        writer.add_attn_logit_softcapping(float(config.attn_logit_softcapping or 0.0))
        writer.add_final_logit_softcapping(float(config.final_logit_softcapping or 0.0))
        writer.add_sliding_window(int(config.sliding_window))
    file_types = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16", "q8_0": "MOSTLY_Q8_0",
                  "q4_1": "MOSTLY_Q4_1"}
    writer.add_file_type(gguf.LlamaFileType[file_types[quant]])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def _tensors(model: nn.Module, family: Family, arch):
    """(GGUF name, float32 array) for every weight, converted as llama.cpp expects."""
    import gguf

    config = model.config
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    tied = bool(getattr(config, "tie_word_embeddings", False))
    for hf_name, tensor in model.state_dict().items():
        if tied and hf_name == "lm_head.weight":
            continue  # llama.cpp reuses token_embd when there is no output tensor
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            if "rotary_emb" in hf_name:
                continue  # computed buffers, not weights
            raise ModelError(f"GGUF export: no {gguf.MODEL_ARCH_NAMES[arch]} tensor name for {hf_name}")
        weight = tensor.detach().to(torch.float32).cpu()
        leaf = hf_name.split(".")[-2] if hf_name.count(".") else hf_name
        if family.permute_qk and leaf in heads:
            weight = permute_rows(weight, heads[leaf])
        if family.norm_offset and hf_name.endswith("norm.weight"):
            weight = weight + family.norm_offset
        yield gguf_name, weight.contiguous().numpy()


def _quantized(gguf_name: str, array: np.ndarray, quant: str):
    """The stored bytes of one tensor and its GGML type under `quant`."""
    from gguf import GGMLQuantizationType as T
    from gguf.quants import quantize

    if array.ndim < 2 or quant == "f32":
        return array, T.F32
    qtype = {"f16": T.F16, "bf16": T.BF16, "q8_0": T.Q8_0, "q4_1": T.Q4_1}[quant]
    if quant == "q4_1" and gguf_name in ("token_embd.weight", "output.weight"):
        qtype = T.Q8_0
    if qtype in (T.Q8_0, T.Q4_1) and array.shape[-1] % BLOCK_WEIGHTS:
        qtype = T.F16  # rows of partial blocks: llama.cpp falls back the same way
    return quantize(array, qtype), qtype
