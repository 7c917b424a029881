"""Python API for library use: prepare a loaded model, save and load its adapter."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tuneforge.compose import applied_strategies, apply_strategies, build_strategies, new_head_parameters
from tuneforge.errors import ModelError
from tuneforge.strategies import StrategyContext


def prepare(model: nn.Module, strategies: list[dict] | list[str], tokenizer=None) -> nn.Module:
    """Apply a strategy list (the same single-key dicts as in YAML) and set what is trainable.

    >>> model = tuneforge.prepare(model, [{"lora": {"rank": 8, "targets": "all-linear"}}])
    """
    ctx = StrategyContext(tokenizer=tokenizer)
    return apply_strategies(model, build_strategies(strategies), ctx)


def save_adapter(model: nn.Module, directory: str | Path) -> Path:
    """Write the injected (and any trained base) weights plus the strategy list needed to rebuild them.

    An adapter of one strategy PEFT can express (one that declares a `peft_type`: LoRA/DoRA, IA3, prefix,
    prompt) is also a valid PEFT adapter (`adapter_config.json` + `adapter_model.safetensors`).
    """
    from tuneforge.export import write_adapter

    strategies = applied_strategies(model)
    if not strategies:
        raise ModelError("save_adapter: this model was not prepared by tuneforge.prepare "
                         "(no strategies applied)")
    return write_adapter(model, strategies, Path(directory))


def load_adapter(model: nn.Module, directory: str | Path, tokenizer=None) -> nn.Module:
    """Apply the saved strategies to a fresh base model and load the saved weights into it.

    Reads directories written by `save_adapter`, and PEFT adapters of every `peft_type` a strategy declares.
    """
    from tuneforge.export import read_adapter

    strategy_dicts, tensors = read_adapter(Path(directory))
    model = prepare(model, strategy_dicts, tokenizer=tokenizer)
    state = model.state_dict()
    unknown = [name for name in tensors if name not in state]
    if unknown:
        raise ModelError(f"{directory}: adapter weights do not fit this model (no parameter {unknown[0]})")
    misshapen = [n for n, t in tensors.items() if t.shape != state[n].shape]
    if misshapen:
        name = misshapen[0]
        raise ModelError(f"{directory}: {name} has shape {tuple(tensors[name].shape)}, "
                         f"model expects {tuple(state[name].shape)}")
    missing = sorted(new_head_parameters(model) - set(tensors))
    if missing:  # loading would keep the head the loader just drew at random: predictions at chance
        raise ModelError(f"{directory}: the adapter holds no weights for {missing[0]}, a classification "
                         f"head this model initialised at random when loaded (adapters saved before "
                         f"tuneforge trained and saved new heads lack it); train the run again")
    model.load_state_dict(tensors, strict=False)
    return model

