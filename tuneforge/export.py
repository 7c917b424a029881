"""Adapters on disk: tuneforge's own layout, which is PEFT's layout whenever PEFT can express it.

A directory holds
- `adapter_model.safetensors`: the injected (and any trained base) weights, keyed as PEFT keys them
  (`base_model.model.<parameter name>`, or `prompt_embeddings` for prefix and prompt tuning);
- `tuneforge.json`: the strategy list that rebuilds the modules the weights belong to, and any key renames;
- `adapter_config.json`: for adapters made of one LoRA/DoRA, IA3, prefix or prompt strategy, so
  `peft.PeftModel.from_pretrained` (and vLLM, for LoRA) load them. PEFT-made adapters of those kinds load too.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.faults import as_os_error, save_tensors
from tuneforge.models import is_sequence_classifier
from tuneforge.peft_layout import PEFT_PREFIX, SEQ_CLS_HEADS, our_name, peft_config, strategies_from_peft
from tuneforge.strategies import Strategy
from tuneforge.surgery import is_injected

ADAPTER_DIR = "adapter"  # a run directory's adapter folder (a folder name, not the strategy)
WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_CONFIG_NAME = "adapter_config.json"
TUNEFORGE_CONFIG_NAME = "tuneforge.json"


def adapter_tensors(model: nn.Module, strategies: list[Strategy]) -> dict[str, Tensor]:
    """Trained base parameters plus each strategy's own adapter state, detached and contiguous.

    Injected parameters come only through `adapter_state`, so a strategy can save a folded form
    (prefix tuning's MLP reparametrisation) instead of its training-time parameters.
    """
    tensors = {name: p for name, p in model.named_parameters() if p.requires_grad and not is_injected(name)}
    for strategy in strategies:
        tensors.update(strategy.adapter_state(model))
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def write_adapter(
    model: nn.Module, strategies: list[Strategy], directory: Path, base_name: str | None = None
) -> Path:
    """Write the adapter atomically: into a temporary sibling directory, then rename over `directory`."""
    tensors = adapter_tensors(model, strategies)
    config, renames = peft_config(model, strategies, tensors, base_name)
    keyed = {renames.get(name, PEFT_PREFIX + name): t for name, t in tensors.items()}
    specs = [{s.name: s.adapter_options()} for s in strategies]
    own = {"format": 1, "strategies": specs, "keys": {peft_key: name for name, peft_key in renames.items()}}
    if is_sequence_classifier(model):  # how to load the base again (export, eval): labels in head order
        labels = [model.config.id2label[i] for i in range(model.config.num_labels)]
        own["model"] = {"task_type": "classification", "labels": labels}
    with _staged(directory) as tmp:
        save_tensors(keyed, tmp / WEIGHTS_NAME)
        (tmp / TUNEFORGE_CONFIG_NAME).write_text(json.dumps(own, indent=2) + "\n")
        if config is not None:
            (tmp / PEFT_CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    return directory


def adapter_model(directory: Path) -> tuple[str, list[str] | None]:
    """How the base model of a saved adapter loads (`load_model`'s task type and labels): a sequence
    classifier with its labels, a body for strategies that bring their own heads, or a causal LM. PEFT-made
    `SEQ_CLS` adapters keep no label names: numbered labels, one per row of the saved head."""
    from tuneforge.strategies import REGISTRY  # the registry imports the strategies, which import peft_layout

    own, peft = directory / TUNEFORGE_CONFIG_NAME, directory / PEFT_CONFIG_NAME
    if own.is_file():
        saved = json.loads(own.read_text())
        model = saved.get("model") or {}
        if model.get("task_type") == "classification":
            return "classification", list(model["labels"])
        names = [next(iter(spec)) for spec in saved.get("strategies", [])]
        if any(name in REGISTRY and REGISTRY[name].cls.provides_heads for name in names):
            return "body", None  # the strategy puts its own heads on the body
    elif peft.is_file() and json.loads(peft.read_text()).get("task_type") == "SEQ_CLS":
        _, tensors = read_adapter(directory)
        head = [t for name, t in tensors.items() if name.split(".", 1)[0] in SEQ_CLS_HEADS and t.dim() == 2]
        if head:
            return "classification", [f"LABEL_{i}" for i in range(head[-1].shape[0])]
    return "causal_lm", None


def read_adapter(directory: Path) -> tuple[list[dict], dict[str, Tensor]]:
    """The strategy dicts and the weights (base-model parameter names) of a saved or PEFT-made adapter."""
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise ModelError(f"{directory}: no {WEIGHTS_NAME} (not an adapter directory)")
    own, peft = directory / TUNEFORGE_CONFIG_NAME, directory / PEFT_CONFIG_NAME
    if own.is_file():
        saved = json.loads(own.read_text())
        strategies, renames = saved["strategies"], saved.get("keys", {})
    elif peft.is_file():
        strategies, renames = strategies_from_peft(json.loads(peft.read_text()), directory)
    else:
        raise ModelError(f"{directory}: neither {TUNEFORGE_CONFIG_NAME} nor {PEFT_CONFIG_NAME} found")
    stored = load_file(str(weights))
    tensors = {our_name(key, renames): t for key, t in stored.items()}
    return strategies, tensors


@torch.no_grad()
def export_merged(model: nn.Module, tokenizer, output: Path, check_inputs: dict | None = None) -> dict:
    """Fold every merging parametrization (`merged_modules`, `unload`: LoRA, DoRA, IA3) into the base weights
    and write a plain model folder transformers loads alone.

    Before writing, checks that the merge changed the weights and that merged logits equal the
    unmerged ones on `check_inputs` (silently unchanged merges are a common failure of other tools).
    """
    report = merge_in_place(model, check_inputs)
    with _staged(output) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return report


@torch.no_grad()
def merge_in_place(model: nn.Module, check_inputs: dict | None = None) -> dict:
    """Fold the merging parametrizations into the base weights of `model` (checked as `export_merged` says);
    returns the report: layers merged, the largest weight change and logit difference."""
    from tuneforge.compose import applied_strategies

    strategies = applied_strategies(model)
    # Objectives and schedules leave no weights behind; a parametrization either folds into the base
    # weights (`merged_modules`), or its trained base weights are the model already.
    parametrizations = [s for s in strategies if s.family == "parametrization" and not s.trains_base_weights]
    found = {id(s): s.merged_modules(model) for s in parametrizations}
    unmergeable = [s.name for s in parametrizations if found[id(s)] is None]
    if unmergeable:
        raise ModelError(f"cannot merge {', '.join(unmergeable)} into the base weights (not a weight "
                         f"update); ship the run's adapter/ directory instead (PEFT loads it)")
    wrapped = [(name, module) for s in parametrizations for name, module in found[id(s)]]
    before = {name: module.weight.detach().clone() for name, module in wrapped}
    report = {"merged_layers": len(wrapped)}
    model.eval()
    reference = model(**check_inputs).logits if check_inputs else None
    for strategy in parametrizations:
        strategy.unload(model)
    if before:
        changed = max((model.get_submodule(n).weight - w).abs().max().item() for n, w in before.items())
        report["max_weight_change"] = changed
        if changed == 0.0:
            raise ModelError("the merge left every weight unchanged: the adapter is an identity "
                             "(was it trained?)")
    if reference is not None:
        difference = (model(**check_inputs).logits - reference).abs().max().item()
        report["max_logit_difference"] = difference
        # float32 rounding grows with depth and logit size (1.6e-4 measured on the 30-layer SmolLM2 with
        # logits near 30); a wrong merge is off by orders of magnitude more
        limit = 1e-4 + 2e-5 * reference.abs().max().item()
        if difference > limit:
            raise ModelError(f"merged logits differ from the unmerged model by {difference:.2e} "
                             f"(> {limit:.1e}); not written")
    return report


@contextlib.contextmanager
def _staged(directory: Path) -> Iterator[Path]:
    """A temporary sibling directory to write into; swapped over `directory` when the block succeeds,
    removed when it fails (a full disk), so an existing `directory` is never damaged."""
    tmp = directory.with_name(directory.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        _replace_dir(tmp, directory)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        failed = as_os_error(exc, tmp)  # safetensors' own error type; an OSError naming no file
        if failed is not None and failed.filename is None:
            failed = OSError(failed.errno, failed.strerror, str(tmp))
        if failed is not None and failed is not exc:
            raise failed from None
        raise


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
