"""LoRA: low-rank updates to frozen linear layers (Hu et al. 2021, arXiv:2106.09685).

    h = W x + (alpha / r) * B A x          A: (r, d_in) Kaiming-uniform (or Gaussian), B: (d_out, r) zeros

so the model is unchanged at step 0 (`init: gaussian` draws A from a normal with std 1/r instead).
Options: rsLoRA scaling alpha / sqrt(r) (Kalajdzievski 2023, arXiv:2312.03732) and DoRA (Liu et al.
2024, arXiv:2402.09353), which learns a per-row magnitude m:

    W' = m * (W + s B A) / ||W + s B A||_row      (the norm is treated as a constant in backward, Sec. 4.3)

LoRA dropout drops the input of the low-rank branch only: `W x + s B A drop(x)`. With DoRA the forward
is `m / ||W + s B A||_row * (W x + s B A drop(x)) + b`, the base output on the un-dropped x. Deviation:
PEFT (0.21.2, `DoraLinearVariant`) in training with dropout > 0 computes `W x + b + (scale - 1) W drop(x)
+ scale * s B A drop(x)` (scale = m / ||.||_row): its magnitude correction of the base part sees the
dropped x. Without dropout, and in eval mode, the two are equal (and equal W' x + b), so adapters,
merged weights and inference agree; training steps with DoRA and dropout > 0 differ from PEFT's.

Default targets per architecture (`LORA_DEFAULTS`, keyed by `config.model_type`): the attention query and
value projections (Hu et al.'s choice), or the fused query/key/value projection where the architecture
has one. `targets: all-linear` is every linear layer inside the transformer blocks: output heads,
poolers, classifiers and projections outside the blocks (OPT's `project_in`/`project_out`) are left out.

`LoRALinear` keeps the wrapped layer's own `weight` and `bias` parameters, so base parameter names
(`...q_proj.weight`) never change and base checkpoints still load. Merging folds the update into
`weight` for inference at the base model's speed; unmerging restores it.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tuneforge.errors import ModelError
from tuneforge.peft_layout import peft_targets, short_targets
from tuneforge.quantize import dequantize_weight, frozen_linear, is_quantized
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext
from tuneforge.surgery import (
    architecture_default,
    compute_dtype,
    describe_modules,
    ensure_unwrapped,
    find_linear_targets,
    linear_features,
    linear_names,
    model_type,
    num_layers,
    parse_layer_spec,
    plain_layer,
    replace_module,
    targets_exist,
)

_QUERY_VALUE = ("q_proj", "v_proj")
# Keyed by config.model_type; for other architectures the first entry whose layers exist (in this order)
LORA_DEFAULTS: dict[str, tuple[str, ...]] = {
    **dict.fromkeys(("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "stablelm",
                     "olmo", "olmo2", "granite", "smollm3", "mixtral", "opt", "gptj", "phi"),
                    _QUERY_VALUE),
    "phi3": ("qkv_proj",),
    "gpt2": ("c_attn",),
    **dict.fromkeys(("gpt_neox", "falcon", "bloom"), ("query_key_value",)),
    **dict.fromkeys(("bert", "roberta"), ("query", "value")),
    "deberta-v2": ("query_proj", "value_proj"),
}


class LoRALinear(nn.Module):
    """A linear layer (nn.Linear, GPT-2's Conv1D, or a frozen quantized layer: QLoRA) plus a trainable
    low-rank update. A quantized base is decoded on the fly (`tuneforge.quantize`); it cannot be merged into.
    """

    def __init__(
        self,
        base: nn.Linear | Conv1D,
        rank: int,
        alpha: float,
        dropout: float = 0.0,
        rslora: bool = False,
        dora: bool = False,
        init: str = "kaiming",
    ):
        super().__init__()
        self.fan_in_fan_out = isinstance(base, Conv1D)  # Conv1D stores weight as (d_in, d_out)
        self.base_type = type(base)  # a subclass (FalconLinear) comes back as itself on unwrap
        self.weight = base.weight
        self.bias = base.bias
        d_in, d_out = linear_features(base)
        self.in_features, self.out_features = d_in, d_out
        self.rank = rank
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        factory = {"device": base.weight.device, "dtype": compute_dtype(base.weight)}
        self.lora_A = nn.Linear(d_in, rank, bias=False, **factory)
        self.lora_B = nn.Linear(rank, d_out, bias=False, **factory)
        if init == "gaussian":
            nn.init.normal_(self.lora_A.weight, std=1 / rank)
        else:
            nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        # No dropout op at all when p == 0: it would copy the input for nothing.
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.lora_magnitude_vector = nn.Parameter(self._base_weight().norm(dim=1).detach()) if dora else None
        self.merged = False
        self.injected_disabled = False
        self._merged_norm: Tensor | None = None

    def _base_weight(self) -> Tensor:
        """The base weight as (d_out, d_in) (decoded when it is quantized)."""
        if is_quantized(self.weight):
            return dequantize_weight(self.weight)
        return self.weight.T if self.fan_in_fan_out else self.weight

    def _base_forward(self, x: Tensor) -> Tensor:
        """W x + b of the frozen base layer."""
        if self.fan_in_fan_out:
            return F.linear(x, self.weight.T, self.bias)
        return frozen_linear(x, self.weight, self.bias)

    def delta_weight(self) -> Tensor:
        """s * B A as (d_out, d_in)."""
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def forward(self, x: Tensor) -> Tensor:
        if self.lora_magnitude_vector is None and not (self.merged or self.injected_disabled):
            return self._fused_forward(x)
        result = self._base_forward(x)
        if self.merged or self.injected_disabled:
            return result
        update = self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling
        # DoRA: m / ||W + sBA|| rescales both the base output and the update.
        weight_norm = (self._base_weight() + self.delta_weight()).norm(dim=1).detach()
        scale = self.lora_magnitude_vector / weight_norm  # (d_out,)
        base_out = result if self.bias is None else result - self.bias
        out = scale * (base_out + update)
        return out if self.bias is None else out + self.bias

    def _fused_forward(self, x: Tensor) -> Tensor:
        """W x + b + s B A x with no (tokens, d_out) temporaries: s scales the rank-r activations, and one
        GEMM accumulates B's product into the base output in place (`addmm_` with beta = 1)."""
        flat = x.reshape(-1, self.in_features)  # (N, d_in)
        result = self._base_forward(flat)  # (N, d_out)
        low_rank = self.lora_A(self.lora_dropout(flat)) * self.scaling  # (N, r)
        result.addmm_(low_rank.to(result.dtype), self.lora_B.weight.t().to(result.dtype))
        return result.view(*x.shape[:-1], self.out_features)

    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        if is_quantized(self.weight):
            raise ModelError("lora: cannot merge into a quantized base weight; load the base unquantized "
                             "(export --merged decodes it first)")
        merged = self._base_weight() + self.delta_weight()
        if self.lora_magnitude_vector is not None:
            self._merged_norm = merged.norm(dim=1, keepdim=True)
            merged = merged * (self.lora_magnitude_vector[:, None] / self._merged_norm)
        self.weight.data.copy_(merged.T if self.fan_in_fan_out else merged)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        weight = self._base_weight()
        if self.lora_magnitude_vector is not None:
            weight = weight * (self._merged_norm / self.lora_magnitude_vector[:, None])
        restored = weight - self.delta_weight()
        self.weight.data.copy_(restored.T if self.fan_in_fan_out else restored)
        self.merged = False

    def unwrap(self) -> nn.Linear | Conv1D:
        """The plain layer type it wrapped, holding the current (merged or base) weight."""
        return plain_layer(self.weight, self.bias, self.fan_in_fan_out, self.base_type)

    def extra_repr(self) -> str:
        dora = ", dora" if self.lora_magnitude_vector is not None else ""
        return f"{self.in_features} -> {self.out_features}, rank={self.rank}, scaling={self.scaling:g}{dora}"


class LoRAOptions(Options):
    rank: int = Field(8, ge=1)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    # None: the architecture's attention query and value projections (LORA_DEFAULTS)
    targets: list[str] | Literal["all-linear"] | None = None
    layers: list[int | str] | str | int | None = None  # indices, "8-11", "top:4"; None: all layers
    rslora: bool = False
    dora: bool = False
    init: Literal["kaiming", "gaussian"] = "kaiming"  # how A starts (B always starts at zero)


@register("lora", LoRAOptions)
class LoRA(Strategy):
    """Low-rank adapters on chosen linear layers (LoRA, rsLoRA, DoRA); merge, unmerge, PEFT export."""

    identity_start = True  # B starts at zero

    param_prefix = "lora_"
    parameter_efficient = True
    peft_type = "LORA"
    options: LoRAOptions

    @classmethod
    def label(cls, options: dict[str, Any]) -> str:
        """`lora`, or with the variant its options turn on: `lora (dora)`, `lora (dora, rslora)`."""
        variant = [flag for flag in ("dora", "rslora") if (options or {}).get(flag)]
        return f"{cls.name} ({', '.join(variant)})" if variant else cls.name

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        opts = self.options
        layers = parse_layer_spec(opts.layers, num_layers(model)) if opts.layers is not None else None
        targets = opts.targets
        if targets is None:
            default = architecture_default(model, LORA_DEFAULTS, lambda names: targets_exist(model, names))
            if default is None:
                raise ModelError(f"lora: no default targets for {model_type(model) or type(model).__name__}; "
                                 f"set `targets` to some of its linear layers ({linear_names(model)}) "
                                 f"or all-linear")
            targets = list(default)
        self.target_names = []
        for name, module in find_linear_targets(model, targets, layers):
            ensure_unwrapped(name, module, "lora")
            wrapped = LoRALinear(module, opts.rank, opts.alpha, opts.dropout, opts.rslora, opts.dora,
                                 opts.init)
            replace_module(model, name, wrapped)
            self.target_names.append(name)
        return model

    def describe(self, model: nn.Module) -> str | None:
        return describe_modules([name for name, _ in lora_modules(model)])

    def merged_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        return lora_modules(model)

    def unload(self, model: nn.Module) -> None:
        unload_lora(model)

    def to_peft(self, model: nn.Module) -> PeftTranslation:
        opts = self.options
        modules = lora_modules(model)
        targets, layers = short_targets(model, [n for n, _ in modules], restricted=opts.layers is not None)
        return PeftTranslation({
            "peft_type": self.peft_type, "r": opts.rank, "lora_alpha": opts.alpha,
            "lora_dropout": opts.dropout,
            "target_modules": targets, "layers_to_transform": layers, "layers_pattern": None,
            "use_rslora": opts.rslora, "use_dora": opts.dora, "bias": "none", "init_lora_weights": True,
            "fan_in_fan_out": any(m.fan_in_fan_out for _, m in modules),
        })

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        options = {
            "rank": config["r"], "alpha": config.get("lora_alpha", config["r"]),
            "dropout": config.get("lora_dropout", 0.0), "targets": peft_targets(config),
            "rslora": bool(config.get("use_rslora", False)), "dora": bool(config.get("use_dora", False)),
        }
        if config.get("layers_to_transform") is not None:
            layers = config["layers_to_transform"]
            options["layers"] = layers if isinstance(layers, list) else [layers]
        return options, {}


def lora_modules(model: nn.Module) -> list[tuple[str, LoRALinear]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, LoRALinear)]


def merge_lora(model: nn.Module) -> int:
    """Fold every LoRA update into its base weight; returns how many layers were merged."""
    modules = lora_modules(model)
    for _, module in modules:
        module.merge()
    return len(modules)


def unmerge_lora(model: nn.Module) -> int:
    modules = lora_modules(model)
    for _, module in modules:
        module.unmerge()
    return len(modules)


def unload_lora(model: nn.Module) -> nn.Module:
    """Merge and replace every LoRALinear by a plain nn.Linear: a model transformers can save and load."""
    for name, module in lora_modules(model):
        module.merge()
        replace_module(model, name, module.unwrap())
    return model
