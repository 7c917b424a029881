"""A run from config to report: load data and model, apply strategies, evaluate, train, evaluate again.

`train.py` holds the loop; this module does the wiring around it and writes the run directory:
config.yaml (resolved), metrics.jsonl, tensorboard/, checkpoints/, adapter/, results.json, report.md.
"""

from __future__ import annotations

import json
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from tuneforge.compose import apply_strategies, build_strategies, trainable_by_strategy
from tuneforge.config import RunConfig
from tuneforge.data import (
    Example,
    collate,
    encode_dataset,
    encode_text_chunks,
    label_vocabulary,
    load_examples,
    split_train_eval,
)
from tuneforge.errors import ConfigError, DataError
from tuneforge.evaluate import evaluate_classification, evaluate_lm, forgetting, generate_samples
from tuneforge.metrics import peak_memory_mb
from tuneforge.models import (
    BUNDLED_MODELS,
    check_model_available,
    count_parameters,
    load_model,
    model_kind,
    resolve_model_path,
)
from tuneforge.strategies import Strategy, StrategyContext
from tuneforge.surgery import disabled_adapters


@dataclass
class RunData:
    """Examples and encoded items of one run."""

    task_type: str
    train_examples: list[Example]
    eval_examples: list[Example]
    labels: list[str] | None = None
    train_items: list[dict] = field(default_factory=list)
    eval_items: list[dict] = field(default_factory=list)
    retain_items: list[dict] = field(default_factory=list)  # measures forgetting
    retain_pool: list[Example] = field(default_factory=list)  # disjoint retain text for regularisers


def load_run_examples(config: RunConfig) -> RunData:
    """Read train/eval examples (splitting off eval when no eval file is given) and pick the task type."""
    data = config.data
    examples = load_examples(data.train, data.format, data.template)
    if data.eval:
        train_examples, eval_examples = examples, load_examples(data.eval, data.format, data.template)
    else:
        train_examples, eval_examples = split_train_eval(examples, data.eval_fraction, config.train.seed, None)
    # Caps take a seeded random subset: files are often sorted (by label, by topic).
    train_examples = _subset(train_examples, data.max_train_examples, config.train.seed)
    eval_examples = _subset(eval_examples, data.max_eval_examples, config.train.seed)
    if not train_examples:
        raise DataError(f"{data.train}: no training examples")
    classification = train_examples[0].kind == "classification"
    labels = sorted(label_vocabulary(train_examples)) if classification else None
    return RunData("classification" if classification else "causal_lm", train_examples, eval_examples, labels)


def _subset(examples: list[Example], limit: int | None, seed: int) -> list[Example]:
    if limit is None or len(examples) <= limit:
        return examples
    chosen = sorted(random.Random(seed).sample(range(len(examples)), limit))
    return [examples[i] for i in chosen]


def encode_run_data(run_data: RunData, config: RunConfig, tokenizer) -> RunData:
    max_len = config.train.max_seq_len
    label_to_id = {label: i for i, label in enumerate(run_data.labels)} if run_data.labels else None
    run_data.train_items, dropped = encode_dataset(run_data.train_examples, tokenizer, max_len, run_data.task_type, label_to_id)
    if not run_data.train_items:
        raise DataError(f"{config.data.train}: every example was dropped ({dropped} too long or empty at max_seq_len={max_len})")
    run_data.eval_items, _ = encode_dataset(run_data.eval_examples, tokenizer, max_len, run_data.task_type, label_to_id)
    if config.retain and run_data.task_type == "causal_lm":
        measure, regularize = split_retain_documents(load_examples(config.retain, "text"))
        run_data.retain_items = encode_text_chunks(measure, tokenizer, max_len, config.evaluation.retain_examples)
        run_data.retain_pool = regularize
    return run_data


def split_retain_documents(documents: list[Example]) -> tuple[list[Example], list[Example]]:
    """Retain documents for measuring forgetting, and disjoint ones that regularisers may train on.

    Objectives such as EWC or the retention loss must not see the text forgetting is measured on, or
    "forgets less" would partly be "memorised the test". Every third document goes to the regulariser pool.
    """
    if len(documents) < 3:
        return documents, documents
    return [d for i, d in enumerate(documents) if i % 3 != 2], [d for i, d in enumerate(documents) if i % 3 == 2]


def retain_batch_source(run_data: RunData, tokenizer, config: RunConfig):
    """A callable giving an endless, seeded stream of padded batches from the regulariser retain pool.

    Encoded on first use, so runs whose strategies never ask for retain data pay nothing.
    """
    cache: list[dict] = []

    def stream(batch_size: int | None = None, device=None):
        if not cache:
            cache.extend(encode_text_chunks(run_data.retain_pool, tokenizer, config.train.max_seq_len,
                                            max(64, 4 * config.evaluation.retain_examples)))
        size = batch_size or config.train.batch_size
        generator = torch.Generator().manual_seed(config.train.seed + 1)
        while True:
            order = torch.randperm(len(cache), generator=generator).tolist()
            for start in range(0, len(order) - size + 1, size):
                batch = collate([cache[i] for i in order[start:start + size]], tokenizer.pad_token_id)
                yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    return stream if run_data.retain_pool else None


def evaluate_all(model: nn.Module, tokenizer, run_data: RunData, config: RunConfig, device, samples: bool = True) -> dict:
    """Task metrics on the eval set, retain metrics, and a few greedy samples."""
    batch_size = config.evaluation.batch_size or config.train.batch_size
    pad = tokenizer.pad_token_id
    if run_data.task_type == "classification":
        return {"eval": evaluate_classification(model, run_data.eval_items, batch_size, pad, device)}
    result = {"eval": evaluate_lm(model, run_data.eval_items, batch_size, pad, device)}
    if run_data.retain_items:
        result["retain"] = evaluate_lm(model, run_data.retain_items, batch_size, pad, device)
    if samples and config.evaluation.samples:
        chosen = run_data.eval_examples[:config.evaluation.samples]
        result["samples"] = generate_samples(model, tokenizer, chosen, config.evaluation.max_new_tokens, device)
    return result


def prepare_output(config: RunConfig, resume: bool, overwrite: bool) -> Path:
    """Create the run directory; refuse to clobber another run unless asked. Checked before any model loads."""
    run_dir = Path(config.output)
    existing = (run_dir / "config.yaml").is_file()
    if existing and not (resume or overwrite):
        raise ConfigError(f"{run_dir}: a run already exists there (use --resume to continue it or --overwrite)")
    if resume and not existing:
        raise ConfigError(f"{run_dir}: --resume but no run there")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / ".write-test"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: output directory is not writable ({exc.strerror})") from None
    if overwrite and not resume:
        for name in ("metrics.jsonl", "evaluation_before.json", "results.json"):
            (run_dir / name).unlink(missing_ok=True)
        import shutil

        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    return run_dir


def build_model(config: RunConfig, run_data: RunData) -> tuple[nn.Module, object, list[Strategy], StrategyContext]:
    model, tokenizer, _ = load_model(config.model, run_data.task_type, run_data.labels, config.trust_remote_code)
    strategies = build_strategies(config.strategies)
    ctx = StrategyContext(tokenizer=tokenizer, task_type=run_data.task_type, num_epochs=config.train.epochs)
    model = apply_strategies(model, strategies, ctx)
    if config.train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model, tokenizer, strategies, ctx


def parameter_report(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext) -> dict:
    total, trainable = count_parameters(model)
    sizes = dict(model.named_parameters())
    by_strategy = {name: sum(sizes[n].numel() for n in names) for name, names in trainable_by_strategy(model, strategies, ctx).items()}
    return {"total_params": total, "trainable_params": trainable, "trainable_by_strategy": by_strategy}


def train_run(config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run `config` end to end and return its results (also written to results.json and report.md)."""
    from tuneforge.export import write_adapter
    from tuneforge.report import write_report
    from tuneforge.train import fit

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    run_dir = prepare_output(config, resume, overwrite)
    accelerator = Accelerator(mixed_precision="bf16" if config.train.precision == "bf16" else "no")
    if accelerator.is_main_process and not resume:
        (run_dir / "config.yaml").write_text(yaml.safe_dump(config.resolved_dict(), sort_keys=False))
    set_seed(config.train.seed)
    run_data = load_run_examples(config)
    model, tokenizer, strategies, ctx = build_model(config, run_data)
    encode_run_data(run_data, config, tokenizer)
    model.to(accelerator.device)
    ctx.device = accelerator.device
    ctx.retain_batches = retain_batch_source(run_data, tokenizer, config)
    params = parameter_report(model, strategies, ctx)
    accelerator.print(
        f"tuneforge: {len(run_data.train_items)} train / {len(run_data.eval_items)} eval / "
        f"{len(run_data.retain_items)} retain items; trainable {params['trainable_params']:,} of "
        f"{params['total_params']:,} parameters ({', '.join(s.name for s in strategies) or 'full'})"
    )

    before_path = run_dir / "evaluation_before.json"
    if resume and before_path.is_file():
        before = json.loads(before_path.read_text())
    else:
        accelerator.print("tuneforge: evaluating the base model ...")
        with disabled_adapters(model):
            before = evaluate_all(model, tokenizer, run_data, config, accelerator.device)
        if accelerator.is_main_process:
            before_path.write_text(json.dumps(before, indent=1))

    def periodic_eval(current: nn.Module) -> dict:
        result = evaluate_all(current, tokenizer, run_data, config, accelerator.device, samples=False)
        # Retain metrics along the way give a forgetting curve: objectives compare at equal task loss.
        return {**result["eval"], **{f"retain_{k}": v for k, v in result.get("retain", {}).items()}}

    started = time.perf_counter()
    state = fit(model, strategies, ctx, run_data.train_items, config.train, accelerator, run_dir,
                tokenizer.pad_token_id, periodic_eval, resume=resume)
    wall = time.perf_counter() - started
    model = accelerator.unwrap_model(model)
    accelerator.print("tuneforge: evaluating the fine-tuned model ...")
    after = evaluate_all(model, tokenizer, run_data, config, accelerator.device)

    results = {
        "model": config.model, "strategies": [s.as_dict() for s in config.strategies], "task_type": run_data.task_type,
        **params,
        "before": before, "after": after,
        "forgetting": forgetting(before.get("retain", {}), after.get("retain", {})),
        "steps": state.step, "train_seconds": state.elapsed, "wall_seconds": wall,
        "tokens_per_s": state.tokens / max(state.elapsed, 1e-9), "peak_memory_mb": peak_memory_mb(accelerator.device),
    }
    if accelerator.is_main_process:
        write_adapter(model, strategies, run_dir / "adapter", base_name=str(resolve_model_path(config.model)))
        results["adapter_bytes"] = sum(p.stat().st_size for p in (run_dir / "adapter").iterdir())
        (run_dir / "results.json").write_text(json.dumps(results, indent=1))
        write_report(run_dir, results)
    return results


def inspect_config(config: RunConfig) -> dict:
    """Parameter counts of the configured model and strategies, without training."""
    run_data = load_run_examples(config)
    model, _, strategies, ctx = build_model(config, run_data)
    return parameter_report(model, strategies, ctx)


def validate_run(config: RunConfig) -> dict:
    """Check everything that can be checked before a model loads: data files, every record, the model."""
    run_data = load_run_examples(config)
    check_model_available(config.model)
    kind = BUNDLED_MODELS[config.model].kind if config.model in BUNDLED_MODELS else model_kind(Path(config.model))
    if run_data.task_type == "causal_lm" and kind != "causal_lm":
        raise ConfigError(f"model {config.model!r} is an encoder: it needs classification data (text/label)")
    if config.retain:
        load_examples(config.retain, "text")
    return {"train_examples": len(run_data.train_examples), "eval_examples": len(run_data.eval_examples),
            "task_type": run_data.task_type, "labels": run_data.labels}
