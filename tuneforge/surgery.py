"""Find modules by name pattern, replace them, and tell which transformer layer a name belongs to."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn
from transformers.pytorch_utils import Conv1D

from tuneforge.errors import ModelError

# `model.layers.3.`, `transformer.h.3.`, `encoder.layer.3.`, `blocks.3.`
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?:\.|$)")

# Output heads are never "all-linear" targets: adapting them breaks weight tying and PEFT export.
_HEAD_NAMES = ("lm_head", "classifier", "score", "qa_outputs", "pooler", "head")

LINEAR_TYPES = (nn.Linear, Conv1D)

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
        raise ModelError(f"{type(model).__name__}: no transformer layers found (expected names like model.layers.0)")
    return max(indices) + 1


def linear_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every linear layer inside the transformer blocks (output heads excluded)."""
    found = []
    for name, module in model.named_modules():
        parts = name.split(".")
        if layer_index(name) is None or is_injected(name) or any(p in _HEAD_NAMES for p in parts):
            continue
        # Already-wrapped layers are listed too, so a second wrapper fails with a clear conflict error.
        if isinstance(module, LINEAR_TYPES) or hasattr(module, "injected_disabled"):
            found.append((name, module))
    return found


def find_linear_targets(
    model: nn.Module, targets: list[str] | str, layers: set[int] | None = None
) -> list[tuple[str, nn.Module]]:
    """Linear modules matching `targets`: `all-linear`, a list of name suffixes (`q_proj`), or regexes.

    A target string matches a module when it equals the module's last name part, is a suffix of its
    dotted name, or (if it contains regex characters) `re.fullmatch`es the whole name.
    """
    candidates = linear_modules(model)
    if targets == "all-linear" or targets == ["all-linear"]:
        matched = candidates
    else:
        patterns = [targets] if isinstance(targets, str) else list(targets)
        matched = [(n, m) for n, m in candidates if any(_matches(n, p) for p in patterns)]
    if layers is not None:
        matched = [(n, m) for n, m in matched if layer_index(n) in layers]
    if not matched:
        available = sorted({name.split(".")[-1] for name, _ in candidates})
        raise ModelError(
            f"targets {targets!r} matched no linear layer in {type(model).__name__} "
            f"(available: {', '.join(available)}, or all-linear)"
        )
    return matched


def _matches(name: str, pattern: str) -> bool:
    if name == pattern or name.endswith("." + pattern):
        return True
    if any(ch in pattern for ch in "*+?[]()|^$\\"):
        return re.fullmatch(pattern, name) is not None
    return False


def plain_layer(weight: nn.Parameter, bias: nn.Parameter | None, fan_in_fan_out: bool) -> nn.Linear | Conv1D:
    """An nn.Linear (or GPT-2 Conv1D) holding these very parameters: what a wrapper gives back on unload."""
    if fan_in_fan_out:  # Conv1D stores weight as (d_in, d_out)
        layer = Conv1D(weight.shape[1], weight.shape[0])
    else:
        layer = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None)
    layer.weight = weight
    if bias is not None:
        layer.bias = bias
    return layer


def ensure_unwrapped(name: str, module: nn.Module, strategy: str) -> None:
    """Refuse to wrap a layer another strategy already wrapped (two wrappers would fight over it)."""
    if type(module) not in LINEAR_TYPES:
        raise ModelError(
            f"{strategy}: {name} is already wrapped ({type(module).__name__}); "
            f"give the two strategies different targets"
        )


@contextmanager
def disabled_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Run the frozen base model: every injected module acts as the identity inside this block.

    Serves as the distillation teacher or the retention reference without a second copy in memory.
    """
    modules = [m for m in model.modules() if hasattr(m, "injected_disabled")]
    previous = [m.injected_disabled for m in modules]
    for module in modules:
        module.injected_disabled = True
    try:
        yield model
    finally:
        for module, state in zip(modules, previous):
            module.injected_disabled = state


def replace_module(model: nn.Module, name: str, new: nn.Module) -> nn.Module:
    """Put `new` where `name` was; returns the old module."""
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
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
                raise ModelError(f"layers {text!r} out of range (the model has {total} layers: 0-{total - 1})")
            chosen.update(range(first, last + 1))
        else:
            chosen |= parse_layer_spec([_int(text, text)], total)
    return chosen


def _int(text: str, spec: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ModelError(f"layers {spec!r}: expected an index, a range like 8-11, top:N or bottom:N") from None
