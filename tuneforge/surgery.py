"""Find modules by name pattern, replace them, and tell which transformer layer a name belongs to."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from tuneforge.errors import ModelError
from tuneforge.quantize import QuantizedLinear, is_quantized

# `model.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`, `blocks.3.`
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# Output heads are never "all-linear" targets: adapting them breaks weight tying and PEFT export.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler", "head")

LINEAR_TYPES = (nn.Linear, Conv1D)  # and their subclasses (Falcon's FalconLinear) whose forward is W x + b
# layers wrappers take over: the linear types, and a linear layer whose frozen weight stays quantized
WRAPPABLE_TYPES = (*LINEAR_TYPES, QuantizedLinear)

Entry = TypeVar("Entry")


def injected_prefixes() -> tuple[str, ...]:
    """The registered strategies' parameter prefixes; base parameter names never carry one."""
    from tuneforge.strategies import injected_prefixes as registered  # the registry imports this module

    return registered()


def is_injected(name: str) -> bool:
    """Whether a parameter or module name belongs to a module a strategy injected."""
    prefixes = injected_prefixes()
    return any(part.startswith(prefixes) for part in name.split("."))


def layer_index(name: str) -> int | None:
    """Index of the transformer block a parameter or module name belongs to (None: embeddings, heads)."""
    match = _LAYER_RE.search(name)
    return int(match.group(1)) if match else None


def num_layers(model: nn.Module) -> int:
    """Number of transformer blocks, read from the module names."""
    indices = {layer_index(name) for name, _ in model.named_modules()}
    indices.discard(None)
    if not indices:
        raise ModelError(f"{type(model).__name__}: no transformer layers found "
                         f"(expected names like model.layers.0)")
    return max(indices) + 1


def transformer_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The transformer blocks: modules named `...layers.N` (`h.N`, `layer.N`, ...), one per index."""
    found = {}
    for name, module in model.named_modules():
        index = layer_index(name)
        if index is not None and name.rsplit(".", 1)[-1] == str(index) and index not in found:
            found[index] = (name, module)
    if not found:
        raise ModelError(f"{type(model).__name__}: no transformer layers found "
                         f"(expected names like model.layers.0)")
    return [found[i] for i in sorted(found)]


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer inside the transformer blocks (output heads excluded)."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if layer_index(name) is None or is_injected(name) or any(p in _HEAD_NAMES for p in parts):
            continue
        # Already-wrapped layers are listed too, so a second wrapper fails with a clear conflict error.
        if isinstance(module, WRAPPABLE_TYPES) or is_wrapper(module):
            found.append((name, module))
    return found


def find_linear_targets(
    model: nn.Module, targets: list[str] | str, layers: set[int] | None = None, option: str = "targets"
) -> list[tuple[str, nn.Module]]:
    """Linear modules matching `targets`: `all-linear`, a list of name suffixes (`q_proj`), or regexes.

    A target string matches a module when it equals the module's last name part, is a suffix of its
    dotted name, or (if it contains regex characters) `re.fullmatch`es the whole name. Every string must
    match some layer (a typo is an error, not a silently smaller adapter); `option` names the user's
    option in that error.
    """
    candidates = linear_modules(model)
    if targets == "all-linear" or targets == ["all-linear"]:
        matched = candidates
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        missing = [p for p in patterns if not any(_matches(n, p) for n, _ in candidates)]
        if missing:
            raise ModelError(f"{option} {missing!r} matched no linear layer in {type(model).__name__} "
                             f"(available: {linear_names(model)}, or all-linear)")
        matched = [(n, m) for n, m in candidates if any(_matches(n, p) for p in patterns)]
    if layers is not None:
        matched = [(n, m) for n, m in matched if layer_index(n) in layers]
    if not matched:
        raise ModelError(f"{option} {targets!r} matched no linear layer of the chosen layers in "
                         f"{type(model).__name__} (available: {linear_names(model)}, or all-linear)")
    return matched


def linear_names(model: nn.Module) -> str:
    """The last name parts of the model's block linear layers, for error messages: `c_attn, c_fc, c_proj`."""
    return ", ".join(sorted({name.rsplit(".", 1)[-1] for name, _ in linear_modules(model)})) or "none"


def targets_exist(model: nn.Module, targets: list[str] | tuple[str, ...]) -> bool:
    """Whether every target string matches at least one block linear layer."""
    names = [name for name, _ in linear_modules(model)]
    return all(any(_matches(n, p) for n in names) for p in targets)


def model_type(model: nn.Module) -> str | None:
    """The architecture's `config.model_type` (`llama`, `gpt2`, ...; the text model's for multimodal ones)."""
    config = getattr(model, "config", None)
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    return getattr(text, "model_type", None) or getattr(config, "model_type", None)


def architecture_default(
    model: nn.Module, table: dict[str, Entry], fits: Callable[[Entry], bool]
) -> Entry | None:
    """A strategy's per-architecture default: the entry for the model's `model_type`; for an architecture the
    table does not name, the first entry (in table order) whose modules exist in the model; else None."""
    kind = model_type(model)
    if kind in table:
        return table[kind]
    return next((entry for entry in table.values() if fits(entry)), None)


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    if any(ch in pattern for ch in "*+?[]()|^$\\"):
        return re.fullmatch(pattern, name) is not None
    return False


def describe_modules(names: list[str]) -> str:
    """Module names in one line, layer indices folded:
    `8 modules: model.layers.*.self_attn.{q_proj,v_proj}`."""
    if not names:
        return "0 modules"
    groups: dict[str, set[str]] = {}
    for name in names:
        folded = _LAYER_RE.sub(lambda m: m.group(0).replace(m.group(1), "*", 1), name, count=1)
        parent, _, leaf = folded.rpartition(".")
        groups.setdefault(parent, set()).add(leaf)
    parts = []
    for parent, leaves in sorted(groups.items()):
        leaf = next(iter(leaves)) if len(leaves) == 1 else "{" + ",".join(sorted(leaves)) + "}"
        parts.append(f"{parent}.{leaf}" if parent else leaf)
    count = f"{len(names)} module" + ("s" if len(names) != 1 else "")
    return f"{count}: {', '.join(parts)}"


def plain_layer(
    weight: nn.Parameter,
    bias: nn.Parameter | None,
    fan_in_fan_out: bool,
    layer_type: type[nn.Module] | None = None,
) -> nn.Module:
    """A layer of `layer_type` (default nn.Linear, or GPT-2's Conv1D) holding these very parameters: what a
    wrapper gives back on unload. A subclass (FalconLinear) is rebuilt as itself, so unloading gives back
    the model's own layer types."""
    if is_quantized(weight):  # a quantized base layer comes back as it was
        d_out, d_in = _quantized_shape(weight)
        return QuantizedLinear(weight, bias, d_in, d_out)
    plain = Conv1D if fan_in_fan_out else nn.Linear
    layer_type = layer_type or plain
    layer = layer_type.__new__(layer_type)
    nn.Module.__init__(layer)
    if fan_in_fan_out:  # Conv1D stores weight as (d_in, d_out)
        layer.nx, layer.nf = weight.shape
    else:
        layer.out_features, layer.in_features = weight.shape
    layer.weight = weight
    layer.register_parameter("bias", bias)
    return layer


def _quantized_shape(weight: torch.Tensor) -> tuple[int, int]:
    """(d_out, d_in) of a quantized weight: GGUF blocks and 4-bit bitsandbytes weights keep it aside."""
    if hasattr(weight, "logical_shape"):
        return tuple(weight.logical_shape)
    state = getattr(weight, "quant_state", None)
    return tuple(state.shape) if state is not None else tuple(weight.shape)


def linear_features(module: nn.Module) -> tuple[int, int]:
    """(d_in, d_out) of a linear layer a wrapper takes over: nn.Linear, Conv1D or a `QuantizedLinear`."""
    if isinstance(module, Conv1D):  # Conv1D stores weight as (d_in, d_out)
        return tuple(module.weight.shape)
    if isinstance(module, QuantizedLinear):
        return module.in_features, module.out_features
    return tuple(module.weight.shape[::-1])


def compute_dtype(weight: torch.Tensor) -> torch.dtype:
    """The dtype injected parameters next to `weight` take: float32 for a quantized (integer) weight."""
    return torch.float32 if is_quantized(weight) else weight.dtype


def is_wrapper(module: nn.Module) -> bool:
    """Whether a module is one a strategy injected in place of a base layer (it can be switched off)."""
    return hasattr(module, "injected_disabled")


def ensure_unwrapped(name: str, module: nn.Module, strategy: str) -> None:
    """Refuse to wrap a layer another strategy already wrapped (two wrappers would fight over it), or a
    linear subclass whose forward is not `W x + b` (a wrapper computes exactly that, so it would change the
    model)."""
    if is_wrapper(module):
        raise ModelError(
            f"{strategy}: {name} is already wrapped ({type(module).__name__}); "
            f"give the two strategies different targets"
        )
    if type(module) not in WRAPPABLE_TYPES and not _computes_affine_map(module):
        raise ModelError(
            f"{strategy}: {name} is a {type(module).__name__} whose forward is not W x + b; "
            f"wrapping it would change the model, so leave it out of the targets"
        )


@torch.no_grad()
def _computes_affine_map(module: nn.Module) -> bool:
    """Whether a Linear/Conv1D subclass computes the plain affine map, probed on a fixed input (no RNG)."""
    weight = module.weight
    if weight.is_meta or not weight.is_floating_point():
        return False
    fan_in_fan_out = isinstance(module, Conv1D)
    d_in = weight.shape[0] if fan_in_fan_out else weight.shape[1]
    probe = torch.linspace(-1, 1, 2 * d_in, device=weight.device, dtype=weight.dtype).view(2, d_in)
    expected = torch.nn.functional.linear(probe, weight.T if fan_in_fan_out else weight, module.bias)
    try:
        output = type(module).forward(module, probe)  # the layer's own computation, without its hooks
    except Exception:  # noqa: BLE001 - a forward that cannot take a plain tensor is not a plain linear layer
        return False
    tolerance = 1e-2 if weight.dtype in (torch.float16, torch.bfloat16) else 1e-5
    close = isinstance(output, torch.Tensor) and output.shape == expected.shape
    return close and torch.allclose(output, expected, rtol=tolerance, atol=tolerance)


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base model: every injected module acts as the identity inside this block.

    Serves as the distillation teacher or the retention reference without a second copy in memory.
    """
    modules = [m for m in model.modules() if is_wrapper(m)]
    previous = [m.injected_disabled for m in modules]
    for module in modules:
        module.injected_disabled = True
    try:
        yield model
    finally:
        for module, state in zip(modules, previous):
            module.injected_disabled = state


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` was; returns the old module.

    Forward hooks on the old module move to the new one: a strategy that hooks a layer's output (adapters
    after OPT's `fc2`) keeps working when another strategy wraps that layer, in either order.
    """
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    for hooks in ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                  "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs"):
        getattr(new, hooks).update(getattr(old, hooks))
    setattr(parent, child, new)
    return old


def parse_layer_spec(spec: list[int | str] | str | int, total: int) -> set[int]:
    """Layer indices from `[0, 1, "8-11"]`, `"top:4"`, `"bottom:2"`, `"all"` or negative indices."""
    items = spec if isinstance(spec, list) else [spec]
    chosen: set[int] = set()
    for item in items:
        if isinstance(item, int):
            index = item + total if item < 0 else item
            if not 0 <= index < total:
                raise ModelError(f"layer {item} out of range (the model has {total} layers: 0-{total - 1})")
            chosen.add(index)
            continue
        text = str(item).strip()
        if text == "all":
            chosen.update(range(total))
        elif text.startswith(("top:", "bottom:")):
            where, _, count = text.partition(":")
            n = _int(count, text)
            if not 0 < n <= total:
                raise ModelError(f"layers {text!r}: count must be 1-{total}")
            chosen.update(range(total - n, total) if where == "top" else range(n))
        elif "-" in text.lstrip("-"):
            start, _, end = text.partition("-")
            first, last = _int(start, text), _int(end, text)
            if not 0 <= first <= last < total:
                raise ModelError(f"layers {text!r} out of range "
                                 f"(the model has {total} layers: 0-{total - 1})")
            chosen.update(range(first, last + 1))
        else:
            chosen |= parse_layer_spec([_int(text, text)], total)
    return chosen


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ModelError(f"layers {spec!r}: expected an index, a range like 8-11, "
                         f"top:N or bottom:N") from None
