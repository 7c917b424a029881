"""Translation between tuneforge strategies and PEFT's adapter format (`adapter_config.json` + key names).

PEFT keys injected weights as `base_model.model.<parameter name>` (LoRA, DoRA, IA3: the same names
tuneforge uses) except for prompt-learning methods, whose single tensor is `prompt_embeddings`. Each
strategy PEFT can express declares its `peft_type` and translates its own options both ways (`to_peft`,
`from_peft`); this module holds what they share: the common fields, the target-name helpers, the choice of
reader by `peft_type`, and the refusal of PEFT options tuneforge does not implement. Only adapters made of
exactly one PEFT-expressible strategy, with no trained base weights, get an `adapter_config.json`; composed
ones stay tuneforge-only.

A classification head the loader initialised at random (`models.new_head_modules`) trains with every
parametrization; PEFT calls such modules `modules_to_save` (`task_type: SEQ_CLS` adds `classifier` and `score`
itself). PEFT 0.21 keys their tensors `base_model.model.<name>` (LoRA, IA3), or `base_model.<name>` next to
the `prompt_embeddings` of prompt-learning methods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.models import is_sequence_classifier, new_head_modules
from tuneforge.strategies.base import Strategy
from tuneforge.surgery import is_injected, layer_index

PROMPT_KEY = "prompt_embeddings"  # PEFT's key for the one tensor of prompt-learning methods
PEFT_PREFIX = "base_model.model."  # PEFT's key of a parameter: `base_model.model.<parameter name>`
PROMPT_LEARNING_PREFIX = "base_model."  # ... but `base_model.<name>` for the heads of prompt-learning methods
SEQ_CLS_HEADS = ("classifier", "score")  # what PEFT's `task_type: SEQ_CLS` adds to `modules_to_save`
_UNSUPPORTED_OPTIONS = ("rank_pattern", "alpha_pattern", "layers_pattern")


def peft_config(
    model: nn.Module, strategies: list[Strategy], tensors: dict[str, Tensor], base_name: str | None
) -> tuple[dict | None, dict[str, str]]:
    """PEFT's config for this adapter (None if PEFT can't express it) and the renames {our name: PEFT key}."""
    if len(strategies) != 1 or strategies[0].peft_type is None:
        return None, {}
    strategy, = strategies
    # Every saved tensor must be the strategy's own or a new head's: other trained base weights are not
    # PEFT-expressible.
    heads = new_head_modules(model)
    head = {name for name in tensors if name.split(".", 1)[0] in heads and not is_injected(name)}
    if not tensors or set(tensors) - head != set(strategy.adapter_state(model)):
        return None, {}
    translation = strategy.to_peft(model)
    if translation is None:
        return None, {}
    renames = dict(translation.renames)
    prefix = PROMPT_LEARNING_PREFIX if PROMPT_KEY in renames.values() else PEFT_PREFIX
    renames.update({name: prefix + name for name in head})
    modules_to_save = sorted({name.split(".", 1)[0] for name in head}) or None
    common = {"base_model_name_or_path": base_name, "task_type": _task_type(model, bool(head)),
              "inference_mode": True, "revision": None, "modules_to_save": modules_to_save}
    return {**common, **translation.config}, renames


def strategies_from_peft(config: dict, directory: Path) -> tuple[list[dict], dict[str, str]]:
    """Strategy dicts rebuilding a PEFT adapter, and the renames {PEFT key: our name}."""
    from tuneforge.strategies import REGISTRY  # the registry imports the strategies, which import this module

    readers = {entry.cls.peft_type: entry.cls for entry in REGISTRY.values() if entry.cls.peft_type}
    kind = config.get("peft_type")
    if kind not in readers:
        raise ModelError(f"{directory}: PEFT adapter type {kind!r} is not supported ({', '.join(readers)})")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ModelError(f"{directory}: PEFT option {option}={config[option]!r} "
                             f"is not supported by tuneforge")
    extra = [name for name in config.get("modules_to_save") or []
             if not (config.get("task_type") == "SEQ_CLS" and name in SEQ_CLS_HEADS)]
    if extra:  # a classification head (task_type SEQ_CLS) loads as the model's own; other modules do not
        raise ModelError(f"{directory}: PEFT option modules_to_save={extra!r} is not supported by tuneforge "
                         f"(only a classification head with task_type SEQ_CLS: {', '.join(SEQ_CLS_HEADS)})")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{directory}: PEFT option bias={config['bias']!r} "
                         f"is not supported (bias='none' only)")
    strategy = readers[kind]
    options, renames = strategy.from_peft(config)
    return [{strategy.name: options}], renames


def _task_type(model: nn.Module, head_saved: bool) -> str | None:
    """PEFT's task type. `SEQ_CLS` makes PEFT expect the classification head among the saved tensors, so it
    is declared only when the head is saved (a new head); a classifier whose head came trained stays None."""
    if is_sequence_classifier(model):
        return "SEQ_CLS" if head_saved else None
    return "CAUSAL_LM" if hasattr(model, "generate") and hasattr(model, "lm_head") else None


def our_name(key: str, renames: dict[str, str]) -> str:
    """The parameter name of a stored adapter key (PEFT's or ours)."""
    if key in renames:
        return renames[key]
    if key.startswith(PEFT_PREFIX):
        return key.removeprefix(PEFT_PREFIX)
    return key.removeprefix(PROMPT_LEARNING_PREFIX)  # a prompt-learning adapter's modules_to_save


def short_targets(
    model: nn.Module, wrapped: list[str], restricted: bool
) -> tuple[list[str], list[int] | None]:
    """Short names (q_proj), plus layer indices when `restricted`, if they select exactly the wrapped modules;
    else the full module names (PEFT matches both). PEFT matches a short name anywhere in the model, outside
    the transformer blocks too (BERT's `pooler.dense` for `dense`), so every module is a candidate."""
    short = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    layers = sorted({layer_index(name) for name in wrapped})
    selected = [n for n, _ in model.named_modules()
                if n.rsplit(".", 1)[-1] in short and not is_injected(n)
                and (not restricted or layer_index(n) in layers)]
    if sorted(selected) != sorted(wrapped):
        return sorted(wrapped), None
    return short, (layers if restricted else None)


def peft_targets(config: dict[str, Any]) -> list[str]:
    """A PEFT config's `target_modules` as a list (PEFT also allows one string)."""
    targets = config.get("target_modules")
    if not targets:
        raise ModelError("PEFT adapter has no target_modules (tuneforge needs them listed)")
    return [targets] if isinstance(targets, str) else list(targets)
