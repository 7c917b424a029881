"""Translation between tuneforge strategies and PEFT's adapter format (`adapter_config.json` + key names).

PEFT keys injected weights as `base_model.model.<parameter name>` (LoRA, DoRA, IA3: the same names
tuneforge uses) except for prompt-learning methods, whose single tensor is `prompt_embeddings`. Each
strategy PEFT can express declares its `peft_type` and translates its own options both ways (`to_peft`,
`from_peft`); this module holds what they share: the common fields, the target-name helpers, the choice of
reader by `peft_type`, and the refusal of PEFT options tuneforge does not implement. Only adapters made of
exactly one PEFT-expressible strategy, with no trained base weights, get an `adapter_config.json`; composed
ones stay tuneforge-only.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.strategies.base import Strategy
from tuneforge.surgery import layer_index

PROMPT_KEY = "prompt_embeddings"  # PEFT's key for the one tensor of prompt-learning methods
_UNSUPPORTED_OPTIONS = ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_pattern")


def peft_config(
    model: nn.Module, strategies: list[Strategy], tensors: dict[str, Tensor], base_name: str | None
) -> tuple[dict | None, dict[str, str]]:
    """PEFT's config for this adapter (None if PEFT cannot express it) and the renames {our name: PEFT key}."""
    if len(strategies) != 1 or strategies[0].peft_type is None:
        return None, {}
    strategy, = strategies
    # Every saved tensor must be the strategy's own: trained base weights are not PEFT-expressible.
    if not tensors or set(tensors) != set(strategy.adapter_state(model)):
        return None, {}
    translation = strategy.to_peft(model)
    if translation is None:
        return None, {}
    common = {"base_model_name_or_path": base_name, "task_type": _task_type(model), "inference_mode": True,
              "revision": None, "modules_to_save": None}
    return {**common, **translation.config}, dict(translation.renames)


def strategies_from_peft(config: dict, directory: Path) -> tuple[list[dict], dict[str, str]]:
    """Strategy dicts rebuilding a PEFT adapter, and the renames {PEFT key: our name}."""
    from tuneforge.strategies import REGISTRY  # the registry imports the strategies, which import this module

    readers = {entry.cls.peft_type: entry.cls for entry in REGISTRY.values() if entry.cls.peft_type}
    kind = config.get("peft_type")
    if kind not in readers:
        raise ModelError(f"{directory}: PEFT adapter type {kind!r} is not supported ({', '.join(readers)})")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ModelError(f"{directory}: PEFT option {option}={config[option]!r} is not supported by tuneforge")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{directory}: PEFT option bias={config['bias']!r} is not supported (bias='none' only)")
    strategy = readers[kind]
    options, renames = strategy.from_peft(config)
    return [{strategy.name: options}], renames


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if hasattr(model, "generate") and hasattr(model, "lm_head") else None


def short_targets(
    model: nn.Module, wrapped: list[str], restricted: bool
) -> tuple[list[str], list[int] | None]:
    """Short names (q_proj), plus layer indices when `restricted`, if they select exactly the wrapped modules;
    else the full module names (PEFT matches both). Every module counts, not only the blocks' linear layers:
    PEFT would also adapt BERT's `pooler.dense` for a short `dense`."""
    short = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    layers = sorted({layer_index(name) for name in wrapped})
    selected = [n for n, _ in model.named_modules()
                if n.rsplit(".", 1)[-1] in short and (not restricted or layer_index(n) in layers)]
    if sorted(selected) != sorted(wrapped):
        return sorted(wrapped), None
    return short, (layers if restricted else None)


def peft_targets(config: dict[str, Any]) -> list[str]:
    """A PEFT config's `target_modules` as a list (PEFT also allows one string)."""
    targets = config.get("target_modules")
    if not targets:
        raise ModelError("PEFT adapter has no target_modules (tuneforge needs them listed)")
    return [targets] if isinstance(targets, str) else list(targets)
