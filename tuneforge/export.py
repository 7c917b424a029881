"""Adapters on disk: tuneforge's own layout, which is PEFT's layout whenever PEFT can express it.

A directory holds
- `adapter_model.safetensors`: the injected (and any trained base) weights, keyed as PEFT keys them
  (`base_model.model.<parameter name>`);
- `tuneforge.json`: the strategy list that rebuilds the modules the weights belong to;
- `adapter_config.json`: only for LoRA-only adapters, so `peft.PeftModel.from_pretrained` (and vLLM) load them.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.strategies import Strategy
from tuneforge.surgery import layer_index

PEFT_PREFIX = "base_model.model."
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
TUNEFORGE_CONFIG_NAME = "tuneforge.json"


def adapter_tensors(model: nn.Module, strategies: list[Strategy]) -> dict[str, Tensor]:
    """Every trainable parameter plus each strategy's own adapter state, detached and contiguous."""
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad}
    for strategy in strategies:
        tensors.update(strategy.adapter_state(model))
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def write_adapter(model: nn.Module, strategies: list[Strategy], directory: Path, base_name: str | None = None) -> Path:
    """Write the adapter atomically: into a temporary sibling directory, then rename over `directory`."""
    tensors = adapter_tensors(model, strategies)
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({PEFT_PREFIX + name: t for name, t in tensors.items()}, str(tmp / WEIGHTS_NAME))
    specs = [{s.name: s.adapter_options()} for s in strategies]
    (tmp / TUNEFORGE_CONFIG_NAME).write_text(json.dumps({"format": 1, "strategies": specs}, indent=2) + "\n")
    peft_config = peft_lora_config(model, strategies, tensors, base_name)
    if peft_config is not None:
        (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(peft_config, indent=2) + "\n")
    _replace_dir(tmp, directory)
    return directory


def read_adapter(directory: Path) -> tuple[list[dict], dict[str, Tensor]]:
    """The strategy dicts and the weights (base-model parameter names) of a saved adapter."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{directory}: no {WEIGHTS_NAME} (not an adapter directory)")
    tensors = {name.removeprefix(PEFT_PREFIX): t for name, t in load_file(str(weights)).items()}
    own = directory / TUNEFORGE_CONFIG_NAME
    if own.is_file():
        return json.loads(own.read_text())["strategies"], tensors
    peft = directory / PEFT_CONFIG_NAME
    if peft.is_file():
        return [lora_options_from_peft(json.loads(peft.read_text()), directory)], tensors
    raise ModelError(f"{directory}: neither {TUNEFORGE_CONFIG_NAME} nor {PEFT_CONFIG_NAME} found")


def peft_lora_config(
    model: nn.Module, strategies: list[Strategy], tensors: dict[str, Tensor], base_name: str | None
) -> dict | None:
    """A PEFT `LoraConfig` dict when the adapter is LoRA weights only, else None."""
    if [s.name for s in strategies] != ["lora"] or not all(".lora_" in name for name in tensors):
        return None
    from tuneforge.strategies.lora import lora_modules

    lora, = strategies
    opts = lora.options
    wrapped = [name for name, _ in lora_modules(model)]
    short = sorted({name.rsplit(".", 1)[-1] for name in wrapped})
    layers = sorted({layer_index(name) for name in wrapped})
    # Short names (q_proj) are what PEFT users and vLLM expect; fall back to full names when the
    # short names plus layer indices would select more modules than were wrapped.
    from tuneforge.surgery import linear_modules

    by_short = [n for n, _ in linear_modules(model) if n.rsplit(".", 1)[-1] in short and layer_index(n) in layers]
    exact = sorted(by_short) == sorted(wrapped)
    restricted = opts.layers is not None
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM" if hasattr(model, "generate") and hasattr(model, "lm_head") else None,
        "base_model_name_or_path": base_name,
        "r": opts.rank,
        "lora_alpha": opts.alpha,
        "lora_dropout": opts.dropout,
        "target_modules": short if exact else wrapped,
        "layers_to_transform": layers if restricted and exact else None,
        "layers_pattern": None,
        "use_rslora": opts.rslora,
        "use_dora": opts.dora,
        "fan_in_fan_out": any(m.fan_in_fan_out for _, m in lora_modules(model)),
        "bias": "none",
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
        "revision": None,
    }


def lora_options_from_peft(config: dict, directory: Path) -> dict:
    """Translate a PEFT `adapter_config.json` (LoRA family) into a tuneforge `lora` strategy dict."""
    if config.get("peft_type") != "LORA":
        raise ModelError(f"{directory}: PEFT adapter type {config.get('peft_type')!r} is not supported (LORA only)")
    targets = config.get("target_modules") or ["q_proj", "v_proj"]
    options = {
        "rank": config["r"],
        "alpha": config.get("lora_alpha", config["r"]),
        "dropout": config.get("lora_dropout", 0.0),
        "targets": [targets] if isinstance(targets, str) else targets,
        "rslora": bool(config.get("use_rslora", False)),
        "dora": bool(config.get("use_dora", False)),
    }
    if config.get("layers_to_transform") is not None:
        layers = config["layers_to_transform"]
        options["layers"] = layers if isinstance(layers, list) else [layers]
    return {"lora": options}


@torch.no_grad()
def export_merged(model: nn.Module, tokenizer, output: Path, check_inputs: dict | None = None) -> dict:
    """Merge LoRA into the base weights and write a plain model folder transformers loads alone.

    Before writing, checks that the merge changed the weights and that merged logits equal the
    unmerged ones on `check_inputs` (silently unchanged merges are a common failure of other tools).
    """
    from tuneforge.compose import applied_strategies
    from tuneforge.strategies.lora import lora_modules, unload_lora

    unmergeable = [s.name for s in applied_strategies(model) if s.name not in ("lora", "full", "layerwise")]
    if unmergeable:
        raise ModelError(f"cannot merge {', '.join(unmergeable)} into the base weights: export it as an adapter")
    report = {"merged_layers": len(lora_modules(model))}
    before = {n: m.weight.detach().clone() for n, m in lora_modules(model)}
    model.eval()
    reference = model(**check_inputs).logits if check_inputs else None
    unload_lora(model)
    if before:
        changed = max((model.get_submodule(n).weight - w).abs().max().item() for n, w in before.items())
        report["max_weight_change"] = changed
        if changed == 0.0:
            raise ModelError("the merge left every weight unchanged: the adapter is zero (was it trained?)")
    if reference is not None:
        difference = (model(**check_inputs).logits - reference).abs().max().item()
        report["max_logit_difference"] = difference
        if difference > 1e-4:
            raise ModelError(f"merged logits differ from the unmerged model by {difference:.2e} (> 1e-4); not written")
    tmp = output.with_name(output.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(tmp)
    _replace_dir(tmp, output)
    return report


def _replace_dir(tmp: Path, directory: Path) -> None:
    """Swap a finished temporary directory into place; the old one is removed only after."""
    for path in tmp.iterdir():
        with open(path, "rb") as handle:
            os.fsync(handle.fileno())
    if directory.exists():
        old = directory.with_name(directory.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
        os.replace(tmp, directory)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, directory)
