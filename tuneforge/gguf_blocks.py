"""GGUF weight blocks kept packed in memory and decoded on the fly (Q4_0, Q4_1, Q8_0).

llama.cpp's block formats store each row in blocks of 32 weights (little-endian):

    Q4_0  18 bytes: fp16 d, 16 bytes of nibbles         w = d * (q - 8)     4.5 bits/weight
    Q4_1  20 bytes: fp16 d, fp16 m, 16 bytes of nibbles w = d * q + m       5.0 bits/weight
    Q8_0  34 bytes: fp16 d, 32 int8                     w = d * q           8.5 bits/weight

A block's low nibbles are its weights 0-15 and the high nibbles 16-31. `GGUFWeight` holds a layer's
blocks, `(d_out, bytes_per_row)` uint8, as a frozen parameter; `gguf_linear` computes `x W^T + b` with an
autograd function that decodes W in forward and again in backward, so no dense copy of W outlives a call
and a LoRA update on top (as in QLoRA, Dettmers et al. 2023, arXiv:2305.14314) gets exact gradients.

GGUF files of llama-family models store the query and key rows permuted (llama.cpp's converter interleaves
the two rotary halves of each head); `unpermute_rows` undoes it on packed rows, since blocks never cross a
row (`permute_rows` applies it, for export). `read_gguf_linears` reads chosen matrices of a GGUF file as
`GGUFWeight`s in Hugging Face's layout.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.errors import ModelError

BLOCK_WEIGHTS = 32
BLOCK_BYTES = {"Q4_0": 18, "Q4_1": 20, "Q8_0": 34}  # the packed types decoded here
BITS_PER_WEIGHT = {name: 8 * size / BLOCK_WEIGHTS for name, size in BLOCK_BYTES.items()}
PERMUTED_ARCHITECTURES = ("llama", "mistral")  # GGUF converters permute their q/k rows


def decode_blocks(packed: Tensor, block_type: str, columns: int) -> Tensor:
    """Dense float32 `(rows, columns)` from packed rows `(rows, columns / 32 * block bytes)` uint8."""
    rows = packed.shape[0]
    blocks = packed.reshape(rows, columns // BLOCK_WEIGHTS, BLOCK_BYTES[block_type])  # (R, nb, bytes)
    scale = blocks[..., 0:2].contiguous().view(torch.float16).float()  # (R, nb, 1)
    if block_type == "Q8_0":
        values = blocks[..., 2:].contiguous().view(torch.int8).float() * scale
    else:
        nibbles = blocks[..., 4:] if block_type == "Q4_1" else blocks[..., 2:]  # (R, nb, 16)
        quants = torch.cat((nibbles & 0x0F, nibbles >> 4), dim=-1).float()  # (R, nb, 32)
        if block_type == "Q4_0":
            values = (quants - 8.0) * scale
        else:
            minimum = blocks[..., 2:4].contiguous().view(torch.float16).float()
            values = quants * scale + minimum
    return values.reshape(rows, columns)


class GGUFWeight(nn.Parameter):
    """A frozen linear weight `(d_out, d_in)` kept as its GGUF blocks: `(d_out, bytes_per_row)` uint8."""

    block_type: str
    logical_shape: tuple[int, int]

    def __new__(cls, packed: Tensor, block_type: str, shape: tuple[int, int]) -> GGUFWeight:  # noqa: PYI034
        if block_type not in BLOCK_BYTES:
            raise ModelError(f"GGUF block type {block_type} is not decoded here "
                             f"(supported: {', '.join(BLOCK_BYTES)})")
        rows, columns = shape
        expected = (rows, columns // BLOCK_WEIGHTS * BLOCK_BYTES[block_type])
        if columns % BLOCK_WEIGHTS or tuple(packed.shape) != expected or packed.dtype != torch.uint8:
            raise ModelError(f"GGUF {block_type} weight of shape {shape}: expected {expected} uint8 blocks, "
                             f"got {tuple(packed.shape)} {packed.dtype}")
        weight = super().__new__(cls, packed, requires_grad=False)
        weight.block_type, weight.logical_shape = block_type, (rows, columns)
        return weight

    def __init__(self, *args, **kwargs):  # everything happens in __new__
        super().__init__()

    def __deepcopy__(self, memo: dict) -> GGUFWeight:
        copied = GGUFWeight(self.data.clone(), self.block_type, self.logical_shape)
        memo[id(self)] = copied
        return copied

    def __reduce_ex__(self, protocol):  # never pickled: state travels as tensors through safetensors
        raise TypeError("GGUFWeight is not picklable; save tensors with safetensors")

    def dequantize(self) -> Tensor:
        """The dense float32 weight `(d_out, d_in)`."""
        return decode_blocks(self.data, self.block_type, self.logical_shape[1])

    def __repr__(self) -> str:
        return f"GGUFWeight({self.block_type}, shape={self.logical_shape}, {self.nbytes} bytes)"


class _DecodedLinear(torch.autograd.Function):
    """y = x W^T + b with W = decode(weight) in forward, and again in backward (no dense W saved)."""

    @staticmethod
    def forward(ctx, x: Tensor, bias: Tensor | None, weight: Tensor, decode) -> Tensor:
        ctx.weight, ctx.decode = weight, decode  # the packed weight, kept by reference: a few bits a weight
        ctx.bias_shape = None if bias is None else bias.shape
        dense = decode(weight).to(x.dtype)
        return F.linear(x, dense, None if bias is None else bias.to(x.dtype))

    @staticmethod
    def backward(ctx, grad_output: Tensor):
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            grad_x = grad_output @ ctx.decode(ctx.weight).to(grad_output.dtype)  # (..., d_in)
        if ctx.needs_input_grad[1]:
            grad_bias = grad_output.reshape(-1, grad_output.shape[-1]).sum(0).reshape(ctx.bias_shape)
        return grad_x, grad_bias, None, None


def decoded_linear(x: Tensor, weight: Tensor, bias: Tensor | None, decode) -> Tensor:
    """`x W^T + b`, W = `decode(weight)` (dense float) decoded per call; gradients reach `x` and `bias`."""
    return _DecodedLinear.apply(x, bias, weight, decode)


def gguf_linear(x: Tensor, weight: GGUFWeight, bias: Tensor | None = None) -> Tensor:
    """`x W^T + b` for a packed weight; gradients flow to `x` (and `bias`), never to the frozen blocks."""
    return decoded_linear(x, weight, bias, GGUFWeight.dequantize)


def permute_rows(rows: Tensor, heads: int) -> Tensor:
    """llama.cpp's q/k row permutation (`permute(w, n_head)` in `convert_hf_to_gguf.py`): each head's two
    rotary halves interleaved, as its LLAMA architecture's rope expects. `unpermute_rows` undoes it."""
    count = rows.shape[0]
    return rows.reshape(heads, 2, count // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def unpermute_rows(rows: Tensor, heads: int) -> Tensor:
    """Undo llama.cpp's q/k row permutation (its `permute(w, n_head)`) on dense or packed rows."""
    count = rows.shape[0]
    return rows.reshape(heads, count // heads // 2, 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)


def read_gguf_linears(path: Path, names: list[str], config) -> dict[str, GGUFWeight]:
    """Packed `GGUFWeight`s for Hugging Face linear module names (`model.layers.0.self_attn.q_proj`).

    Names map to GGUF tensor names through `gguf`'s own table for the file's architecture; query and key
    rows of llama-family files are un-permuted (`config`: the model's, for its head counts). A name with no
    matrix of a decoded block type in the file is left out of the result (its layer stays dense).
    """
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(str(path))
    architecture = bytes(reader.fields["general.architecture"].parts[-1]).decode()
    arch = next((key for key, value in gguf.MODEL_ARCH_NAMES.items() if value == architecture), None)
    if arch is None:
        raise ModelError(f"{path}: GGUF architecture {architecture!r} is unknown to gguf {gguf.__version__}")
    name_map = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    tensors = {tensor.name: tensor for tensor in reader.tensors}
    heads = {"q_proj": config.num_attention_heads,
             "k_proj": getattr(config, "num_key_value_heads", None) or config.num_attention_heads}
    found = {}
    for name in names:
        gguf_name = name_map.get_name(name)
        tensor = tensors.get(f"{gguf_name}.weight") if gguf_name else None
        if tensor is None or tensor.tensor_type.name not in BLOCK_BYTES:
            continue
        columns, rows = (int(n) for n in tensor.shape[:2])  # GGUF lists the fastest dimension first
        packed = torch.from_numpy(np.array(tensor.data, dtype=np.uint8)).reshape(rows, -1)
        leaf = name.rsplit(".", 1)[-1]
        if architecture in PERMUTED_ARCHITECTURES and leaf in heads:
            packed = unpermute_rows(packed, heads[leaf]).contiguous()
        found[name] = GGUFWeight(packed, tensor.tensor_type.name, (rows, columns))
    return found
