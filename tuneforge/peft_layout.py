"""Translation between tuneforge strategies and PEFT's adapter format (`adapter_config.json` + key names).

PEFT keys injected weights as `base_model.model.<parameter name>` (LoRA, DoRA, IA3: the same names
tuneforge uses) except for prompt-learning methods, whose single tensor is `prompt_embeddings`:
prompt tuning (length, hidden), prefix tuning (length, layers * 2 * kv_heads * head_dim). Only adapters
made of exactly one PEFT-expressible strategy get an `adapter_config.json`; composed ones stay tuneforge-only.
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.strategies import Strategy
from tuneforge.surgery import layer_index, linear_modules

PROMPT_KEY = "prompt_embeddings"
PREFIX_WEIGHT = "prefix_encoder.embedding"
PROMPT_WEIGHT = "prompt_encoder.embedding"


def peft_config(
    model: nn.Module, strategies: list[Strategy], tensors: dict[str, Tensor], base_name: str | None
) -> tuple[dict | None, dict[str, str]]:
    """PEFT's config for this adapter (None if PEFT cannot express it) and the renames {our name: PEFT key}."""
    names = [s.name for s in strategies]
    if len(names) != 1 or names[0] not in _WRITERS:
        return None, {}
    strategy, = strategies
    prefix = {"lora": ".lora_", "ia3": ".ia3_", "prefix": PREFIX_WEIGHT, "prompt": PROMPT_WEIGHT}[strategy.name]
    if not tensors or not all(prefix in name for name in tensors):  # also trains base weights: not PEFT-expressible
        return None, {}
    config, renames = _WRITERS[strategy.name](model, strategy)
    common = {"base_model_name_or_path": base_name, "task_type": _task_type(model), "inference_mode": True,
              "revision": None, "modules_to_save": None}
    return {**common, **config}, renames


def strategies_from_peft(config: dict, directory: Path) -> tuple[list[dict], dict[str, str]]:
    """Strategy dicts rebuilding a PEFT adapter, and the renames {PEFT key: our name}."""
    kind = config.get("peft_type")
    if kind not in _READERS:
        raise ModelError(f"{directory}: PEFT adapter type {kind!r} is not supported "
                         f"(LORA, IA3, PREFIX_TUNING, PROMPT_TUNING)")
    for option in ("modules_to_save", "rank_pattern", "alpha_pattern", "layers_pattern"):
        if config.get(option):
            raise ModelError(f"{directory}: PEFT option {option}={config[option]!r} is not supported by tuneforge")
    if config.get("bias", "none") != "none":
        raise ModelError(f"{directory}: PEFT option bias={config['bias']!r} is not supported (bias='none' only)")
    return _READERS[kind](config)


def _task_type(model: nn.Module) -> str | None:
    return "CAUSAL_LM" if hasattr(model, "generate") and hasattr(model, "lm_head") else None


def _short_targets(model: nn.Module, wrapped: list[str], restricted: bool) -> tuple[list[str], list[int] | None]:
    """Short names (q_proj), plus layer indices when `restricted`, if they select exactly the wrapped modules;
    else the full module names (PEFT matches both)."""
    short = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    layers = sorted({layer_index(name) for name in wrapped})
    selected = [n for n, _ in linear_modules(model)
                if n.rsplit(".", 1)[-1] in short and (not restricted or layer_index(n) in layers)]
    if sorted(selected) != sorted(wrapped):
        return sorted(wrapped), None
    return short, (layers if restricted else None)


def _lora_config(model: nn.Module, strategy: Strategy) -> tuple[dict, dict[str, str]]:
    from tuneforge.strategies.lora import lora_modules

    opts = strategy.options
    modules = lora_modules(model)
    targets, layers = _short_targets(model, [n for n, _ in modules], restricted=opts.layers is not None)
    return {
        "peft_type": "LORA", "r": opts.rank, "lora_alpha": opts.alpha, "lora_dropout": opts.dropout,
        "target_modules": targets, "layers_to_transform": layers, "layers_pattern": None,
        "use_rslora": opts.rslora, "use_dora": opts.dora, "bias": "none", "init_lora_weights": True,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in modules),
    }, {}


def _ia3_config(model: nn.Module, strategy: Strategy) -> tuple[dict, dict[str, str]]:
    from tuneforge.strategies.ia3 import ia3_modules

    modules = ia3_modules(model)
    targets, _ = _short_targets(model, [n for n, _ in modules], restricted=False)
    feedforward = [n for n, m in modules if m.feedforward]
    short = len(targets) == 0 or "." not in targets[0]
    feedforward = sorted({n.rsplit(".", 1)[-1] for n in feedforward}) if short else sorted(feedforward)
    return {
        "peft_type": "IA3", "target_modules": targets, "feedforward_modules": feedforward,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in modules), "init_ia3_weights": True,
    }, {}


def _prefix_config(model: nn.Module, strategy: Strategy) -> tuple[dict, dict[str, str]]:
    encoder = model.prefix_encoder
    return {
        "peft_type": "PREFIX_TUNING", "num_virtual_tokens": encoder.length, "num_layers": encoder.layers,
        "token_dim": encoder.kv_heads * encoder.head_dim, "num_attention_heads": encoder.kv_heads,
        "num_transformer_submodules": 1, "prefix_projection": False,
        "encoder_hidden_size": model.config.get_text_config().hidden_size,
    }, {PREFIX_WEIGHT: PROMPT_KEY}


def _prompt_config(model: nn.Module, strategy: Strategy) -> tuple[dict, dict[str, str]]:
    config = model.config.get_text_config()
    return {
        "peft_type": "PROMPT_TUNING", "num_virtual_tokens": model.prompt_encoder.length,
        "token_dim": config.hidden_size, "num_transformer_submodules": 1,
        "num_attention_heads": config.num_attention_heads, "num_layers": config.num_hidden_layers,
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
    }, {PROMPT_WEIGHT: PROMPT_KEY}


_WRITERS = {"lora": _lora_config, "ia3": _ia3_config, "prefix": _prefix_config, "prompt": _prompt_config}


def _targets(config: dict) -> list[str]:
    targets = config.get("target_modules")
    if not targets:
        raise ModelError("PEFT adapter has no target_modules (tuneforge needs them listed)")
    return [targets] if isinstance(targets, str) else list(targets)


def _read_lora(config: dict) -> tuple[list[dict], dict[str, str]]:
    options = {
        "rank": config["r"], "alpha": config.get("lora_alpha", config["r"]),
        "dropout": config.get("lora_dropout", 0.0), "targets": _targets(config),
        "rslora": bool(config.get("use_rslora", False)), "dora": bool(config.get("use_dora", False)),
    }
    if config.get("layers_to_transform") is not None:
        layers = config["layers_to_transform"]
        options["layers"] = layers if isinstance(layers, list) else [layers]
    return [{"lora": options}], {}


def _read_ia3(config: dict) -> tuple[list[dict], dict[str, str]]:
    feedforward = config.get("feedforward_modules") or []
    feedforward = [feedforward] if isinstance(feedforward, str) else list(feedforward)
    return [{"ia3": {"targets": _targets(config), "feedforward_targets": feedforward}}], {}


def _read_prefix(config: dict) -> tuple[list[dict], dict[str, str]]:
    # PEFT saves the reparametrised prefix already folded, like tuneforge.
    return [{"prefix": {"length": config["num_virtual_tokens"]}}], {PROMPT_KEY: PREFIX_WEIGHT}


def _read_prompt(config: dict) -> tuple[list[dict], dict[str, str]]:
    return [{"prompt": {"length": config["num_virtual_tokens"], "init": "random"}}], {PROMPT_KEY: PROMPT_WEIGHT}


_READERS = {"LORA": _read_lora, "IA3": _read_ia3, "PREFIX_TUNING": _read_prefix, "PROMPT_TUNING": _read_prompt}
