"""Frozen base weights kept quantized (`quantize:`), so parameter-efficient strategies train on a small base.

QLoRA (Dettmers et al. 2023, arXiv:2305.14314) freezes a 4-bit NormalFloat base and trains LoRA on top;
gradients flow through the dequantized weight to the adapter. The same holds for any strategy that leaves
the base frozen (adapters, IA3, prefix, prompt, heads). Modes:

    nf4   4-bit NormalFloat, blocks of 64 with an fp32 absmax each    ~4.5 bits/weight   (bitsandbytes)
    fp4   4-bit float, same blocks                                    ~4.5 bits/weight   (bitsandbytes)
    int8  absmax int8 rows as LLM.int8() stores them (Dettmers et al. 2022, arXiv:2208.07339), decoded
          on the fly (weight-only: activations stay float, no outlier split)  8 bits + a row scale
    gguf  the GGUF file's own blocks, decoded on the fly (`tuneforge.gguf_blocks`): Q4_0, Q4_1, Q8_0

Every `nn.Linear` inside the transformer blocks becomes a `QuantizedLinear`; embeddings, norms and output
heads stay dense (as in QLoRA). The quantized weight keeps its parameter name (`...q_proj.weight`) and
carries what decoding needs (bitsandbytes' quant state, or the GGUF block type), so a wrapper that takes
over the layer's `weight` computes with `frozen_linear` and `dequantize_weight` alone.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.gguf_blocks import GGUFWeight, decoded_linear, gguf_linear

MODES = ("none", "nf4", "fp4", "int8", "gguf")
BNB_MODES = ("nf4", "fp4", "int8")
BNB_PIN = "bitsandbytes==0.50.2"


class QuantizeError(ModelError):
    """`quantize:` cannot apply to this model (the run names the config line)."""


def _bnb():
    try:
        import bitsandbytes
    except ImportError:
        raise QuantizeError(f"quantize: nf4, fp4 and int8 need bitsandbytes: pip install {BNB_PIN}") from None
    return bitsandbytes


def _bnb_kind(weight: Tensor) -> str | None:
    """`4bit` or `int8` for bitsandbytes' quantized parameters (checked by name: no import needed)."""
    if type(weight) in (Tensor, nn.Parameter):  # dense: also keeps `torch.compile` from a graph break here
        return None
    if type(weight).__module__.startswith("bitsandbytes"):
        return {"Params4bit": "4bit", "Int8Params": "int8"}.get(type(weight).__name__)
    return None


def is_quantized(weight: Tensor | None) -> bool:
    """Whether a weight is stored quantized (packed blocks or integers plus scales)."""
    return weight is not None and (isinstance(weight, GGUFWeight) or _bnb_kind(weight) is not None)


def dequantize_weight(weight: Tensor) -> Tensor:
    """The dense float32 `(d_out, d_in)` value of a quantized weight (a dense one is returned as is)."""
    if isinstance(weight, GGUFWeight):
        return weight.dequantize()
    kind = _bnb_kind(weight)
    if kind == "4bit":
        return _bnb().functional.dequantize_4bit(weight.data, weight.quant_state).float()
    if kind == "int8":  # LLM.int8() rows: W = CB * SCB / 127
        return weight.data.float() * (weight.SCB.float()[:, None] / 127.0)
    return weight


def frozen_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """`x W^T + b` for a dense or a quantized frozen weight `(d_out, d_in)`; gradients reach `x` only.

    4-bit weights use bitsandbytes' own matmul (CPU and CUDA alike); int8 rows and GGUF blocks decode in
    forward and again in backward.
    """
    if isinstance(weight, GGUFWeight):
        return gguf_linear(x, weight, bias)
    kind = _bnb_kind(weight)
    if kind == "4bit":
        return _bnb().matmul_4bit(x, weight, bias=None if bias is None else bias.to(x.dtype),
                                  quant_state=weight.quant_state)
    if kind == "int8":
        return decoded_linear(x, weight, bias, dequantize_weight)
    return F.linear(x, weight, bias)


class QuantizedLinear(nn.Module):
    """A frozen linear layer whose weight stays quantized: `y = x W^T + b`, W decoded on the fly."""

    def __init__(self, weight: Tensor, bias: nn.Parameter | None, in_features: int, out_features: int):
        super().__init__()
        self.weight = weight
        self.bias = bias
        self.in_features, self.out_features = in_features, out_features

    def forward(self, x: Tensor) -> Tensor:
        return frozen_linear(x, self.weight, self.bias)

    def dequantized(self) -> nn.Linear:
        """A plain nn.Linear holding the decoded weight (and this layer's bias)."""
        layer = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                          device="meta")
        layer.weight = nn.Parameter(dequantize_weight(self.weight), requires_grad=False)
        layer.bias = self.bias
        return layer

    def extra_repr(self) -> str:
        return f"{self.in_features} -> {self.out_features}, {storage_kind(self.weight)}"


def storage_kind(weight: Tensor) -> str:
    """How a weight is stored: `nf4`, `fp4`, `int8`, a GGUF block type such as `Q4_1`, or its dtype."""
    if isinstance(weight, GGUFWeight):
        return weight.block_type
    kind = _bnb_kind(weight)
    if kind == "4bit":
        return str(weight.quant_state.quant_type)
    if kind == "int8":
        return "int8"
    return str(weight.dtype).replace("torch.", "")


def quantize_tensor(weight: Tensor, mode: str) -> Tensor:
    """A dense `(d_out, d_in)` weight quantized by bitsandbytes (`nf4`, `fp4` or `int8`), frozen."""
    bnb = _bnb()
    dense = weight.detach().to(torch.float32).contiguous()
    if mode == "int8":
        quantized = bnb.nn.Int8Params(dense, requires_grad=False, has_fp16_weights=False)
    else:
        quantized = bnb.nn.Params4bit(dense, requires_grad=False, quant_type=mode, blocksize=64,
                                       compress_statistics=False)  # fp32 absmax per 64: 4.5 bits a weight
    return quantized.to(weight.device)  # the move to a device is what quantizes


def quantizable_linears(model: nn.Module) -> list[tuple[str, nn.Linear]]:
    """The plain `nn.Linear` layers inside the transformer blocks (heads, embeddings and subclasses with
    their own forward stay dense)."""
    from tuneforge.surgery import linear_modules  # surgery imports this module

    return [(name, module) for name, module in linear_modules(model) if type(module) is nn.Linear]


def replace_linear(model: nn.Module, name: str, layer: nn.Linear, weight: Tensor) -> None:
    """Put a `QuantizedLinear` holding `weight` (and the layer's bias, frozen) where `name` was."""
    from tuneforge.surgery import replace_module

    if layer.bias is not None:
        layer.bias.requires_grad_(False)
    replace_module(model, name, QuantizedLinear(weight, layer.bias, layer.in_features, layer.out_features))


def refusal(mode: str, strategies: list[type]) -> str | None:
    """Why `quantize: mode` cannot train with these strategy classes (None: it can). A strategy that trains
    base weights (`trains_base_weights`), or none listed (full fine-tuning implied), would train the frozen
    quantized layers."""
    from tuneforge.strategies import REGISTRY, default_parametrization

    if mode == "none":
        return None
    training = [cls for cls in strategies if cls.trains_base_weights]
    if not any(cls.family == "parametrization" for cls in strategies):
        implied = default_parametrization()
        training = [implied] if implied.trains_base_weights else []
    if not training:
        return None
    efficient = ", ".join(name for name, entry in REGISTRY.items() if entry.cls.parameter_efficient)
    return (f"quantize: {mode} keeps the base weights frozen and quantized, but {training[0].name} trains "
            f"them; list a strategy that leaves the base frozen ({efficient}) or set quantize: none")


def quantize_model(model: nn.Module, mode: str, packed: dict[str, GGUFWeight] | None = None) -> int:
    """Swap every block `nn.Linear` for a `QuantizedLinear` in place; returns how many were swapped.

    `nf4`/`fp4`/`int8` quantize the layer's own weight; `gguf` takes the packed weight from `packed`
    (`gguf_blocks.read_gguf_linears`) and leaves a layer the file holds unpacked dense.
    """
    if mode == "none":
        return 0
    count = 0
    for name, layer in quantizable_linears(model):
        if mode == "gguf":
            weight = (packed or {}).get(name)
            if weight is None:
                continue
        else:
            weight = quantize_tensor(layer.weight, mode)
        replace_linear(model, name, layer, weight)
        count += 1
    if count == 0:
        raise QuantizeError(f"quantize: {mode}: {type(model).__name__} has no plain linear layer inside its "
                         f"transformer blocks to quantize")
    return count


def dequantize_model(model: nn.Module) -> int:
    """Replace every `QuantizedLinear` by a plain nn.Linear with the decoded weight; returns how many."""
    from tuneforge.surgery import replace_module

    layers = [(name, m) for name, m in model.named_modules() if isinstance(m, QuantizedLinear)]
    for name, module in layers:
        replace_module(model, name, module.dequantized())
    return len(layers)


def base_weight_bytes(model: nn.Module) -> dict[str, Any]:
    """Bytes held by base (not injected) parameters and buffers, by storage kind, with their dense fp32
    size: `{"by_kind": {"nf4": {"bytes", "weights"}, "float32": ...}, "bytes", "fp32_bytes"}`.

    A bitsandbytes 4-bit weight counts its packed bytes plus its quant state (absmax per block, codebook);
    an int8 weight its row scales. Shared (tied) tensors count once.
    """
    from tuneforge.surgery import is_injected

    seen: set[int] = set()
    by_kind: dict[str, dict[str, int]] = {}
    tensors = [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
    for name, tensor in tensors:
        if is_injected(name) or id(tensor) in seen:
            continue
        seen.add(id(tensor))
        kind = storage_kind(tensor)
        weights, size = _stored(tensor)
        entry = by_kind.setdefault(kind, {"bytes": 0, "weights": 0})
        entry["bytes"] += size
        entry["weights"] += weights
    total = sum(entry["bytes"] for entry in by_kind.values())
    dense = sum(4 * entry["weights"] for entry in by_kind.values())
    return {"by_kind": by_kind, "bytes": total, "fp32_bytes": dense}


def _stored(tensor: Tensor) -> tuple[int, int]:
    """(logical weights, bytes held) of one tensor."""
    if isinstance(tensor, GGUFWeight):
        rows, columns = tensor.logical_shape
        return rows * columns, tensor.nbytes
    kind = _bnb_kind(tensor)
    if kind == "4bit":
        state = tensor.quant_state
        extra = sum(t.nbytes for t in (state.absmax, state.code) if isinstance(t, Tensor))
        if state.state2 is not None:  # nested (double) quantization of the absmax values
            extra += sum(t.nbytes for t in (state.state2.absmax, state.state2.code) if isinstance(t, Tensor))
        return int(torch.Size(state.shape).numel()), tensor.nbytes + extra
    if kind == "int8":
        return tensor.numel(), tensor.nbytes + tensor.SCB.nbytes
    return tensor.numel(), tensor.nbytes
