"""A run from config to report: load data and model, apply strategies, evaluate, train, evaluate again.

`train.py` holds the loop; this module does the wiring around it and writes the run directory:
config.yaml (resolved), metrics.jsonl, tensorboard/, checkpoints/, adapter/, results.json, report.md.
Several tasks train as a mixture (one stream) or, with `schedule: {mode: sequence}`, one after another
(`tuneforge.continual`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml
from accelerate import Accelerator
from accelerate.utils import set_seed
from torch import nn

from tuneforge.benchmarks import check_benchmarks
from tuneforge.checkpoint import latest_checkpoint, write_atomic
from tuneforge.compiling import check_compile
from tuneforge.compose import apply_strategies, build_strategies, check_combination, trainable_by_strategy
from tuneforge.config import RunConfig, check_output_location, config_location
from tuneforge.data import load_examples
from tuneforge.data.retain import split_retain_documents  # noqa: F401  (public here before it moved)
from tuneforge.distributed import SHARDED_LAUNCHES, agreed_stop, make_accelerator  # noqa: F401  (public here before)
from tuneforge.engines import Engine, check_engine, make_engine
from tuneforge.errors import ConfigError
from tuneforge.evaluate import evaluate_all, evaluate_task, forgetting, mean_metrics  # noqa: F401  (public here)
from tuneforge.faults import reported_faults
from tuneforge.metrics import peak_memory_mb
from tuneforge.models import (
    BUNDLED_MODELS,
    check_model_available,
    check_sequence_length,
    count_parameters,
    load_model,
    model_kind,
    resolve_model_path,
)
from tuneforge.packing import check_packing
from tuneforge.run_status import mark_running, recorded_end
from tuneforge.stopping import Stopped, current_request, reason_of
from tuneforge.strategies import REGISTRY, Strategy, StrategyContext, TaskInfo, default_parametrization
from tuneforge.surgery import disabled_adapters
from tuneforge.tasks import (
    RunData,
    encode_run_data,
    load_run_data,
    retain_batch_source,
    training_plan,
)
from tuneforge.trackers import Trackers, check_trackers, open_trackers

RUN_WORK = ("metrics.jsonl", "evaluation_before.json", "checkpoints", "results.json", "adapter")


def prepare_output(config: RunConfig, resume: bool, overwrite: bool,
                   accelerator: Accelerator | None = None) -> Path:
    """Create the run directory; refuse to clobber another run unless asked. Checked before any model loads.

    Every process checks (and fails alike); only the main process clears, while the others wait for it.
    """
    check_output_location(config)
    run_dir = Path(config.output)
    existing = (run_dir / "config.yaml").is_file()
    # a run that stopped before doing any work (e.g. a config error found once the model loaded) may be redone
    has_work = existing and any((run_dir / name).exists() for name in RUN_WORK)
    if has_work and not (resume or overwrite):
        raise ConfigError(f"{run_dir}: a run already exists there "
                          f"(use --resume to continue it or --overwrite)")
    if resume and not existing:
        raise ConfigError(f"{run_dir}: --resume but no run there")
    if not existing and not overwrite and run_dir.is_dir() and any(run_dir.iterdir()):
        raise ConfigError(f"{run_dir}: directory is not empty and holds no run "
                          f"(use --overwrite to write into it)")
    if accelerator is not None:
        accelerator.wait_for_everyone()  # all have looked before the main process writes config.yaml
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write-test-{os.getpid()}"
        probe.write_text("")
        probe.unlink()
    except OSError as exc:
        raise ConfigError(f"{run_dir}: output directory is not writable ({exc.strerror or exc})") from None
    if overwrite and not resume and (accelerator is None or accelerator.is_main_process):
        for name in ("metrics.jsonl", "evaluation_before.json", "results.json", "continual.json"):
            (run_dir / name).unlink(missing_ok=True)
        shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
        shutil.rmtree(run_dir / "tensorboard", ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return run_dir


def load_base_model(config: RunConfig, run_data: RunData, strategy_names: list[str], loader=load_model):
    """Load the model in the shape the tasks need (with `loader`, `load_model` by default).

    Language-model tasks only: a causal LM. One classification task without `heads`: the model with a
    sequence-classification head. Otherwise (several classification tasks, or classification mixed with
    language modelling) the `heads` strategy puts one head per task on the shared body.
    """
    classification = [t for t in run_data.tasks if t.task_type == "classification"]
    if not classification:
        return loader(config.model, "causal_lm", None, config.trust_remote_code, config.quantize)
    if not any(REGISTRY[name].cls.provides_heads for name in strategy_names):
        if len(run_data.tasks) == 1:
            labels = classification[0].labels
            return loader(config.model, "classification", labels, config.trust_remote_code, config.quantize)
        providers = [name for name, entry in REGISTRY.items() if entry.cls.provides_heads]
        raise ConfigError(f"several tasks with classification need task-specific heads: "
                          f"add `- {providers[0]}: {{}}` to strategies")
    return loader(config.model, "body", None, config.trust_remote_code, config.quantize)


def check_quantize(config: RunConfig) -> None:
    """`quantize:` refusals known before a model loads: strategies training base weights, gguf without a
    GGUF file; one line naming the config line."""
    from tuneforge.models import gguf_file
    from tuneforge.quantize import refusal

    where = config_location(config, "quantize")
    reason = refusal(config.quantize, [REGISTRY[spec.name].cls for spec in config.strategies])
    if reason:
        raise ConfigError(f"{where}: {reason}")
    if config.quantize == "gguf" and gguf_file(config.model) is None:
        raise ConfigError(f"{where}: quantize: gguf needs a GGUF base (the bundled smollm2-135m, or a model "
                          f"folder holding one .gguf file); {config.model!r} has none")


def build_model(config: RunConfig,
                run_data: RunData) -> tuple[nn.Module, object, list[Strategy], StrategyContext]:
    from tuneforge.quantize import QuantizeError

    strategies = build_strategies(config.strategies)
    check_quantize(config)
    try:
        model, tokenizer, _ = load_base_model(config, run_data, [s.name for s in strategies])
    except QuantizeError as exc:
        raise ConfigError(f"{config_location(config, 'quantize')}: {exc}") from None
    tasks = tuple(TaskInfo(t.name, t.task_type, tuple(t.labels) if t.labels else None)
                  for t in run_data.tasks)
    ctx = StrategyContext(tokenizer=tokenizer, task_type=run_data.task_type, tasks=tasks,
                          num_epochs=config.train.epochs)
    model = apply_strategies(model, strategies, ctx)
    if config.train.gradient_checkpointing and hasattr(model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Non-reentrant checkpointing needs no grad on the embeddings' output; transformers' hook forcing one
        # would push gradients through every frozen layer below the lowest trainable one.
        model.disable_input_require_grads()
    return model, tokenizer, strategies, ctx


def parameter_report(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext) -> dict:
    total, trainable = count_parameters(model)
    sizes = dict(model.named_parameters())
    groups = trainable_by_strategy(model, strategies, ctx)
    by_strategy = {name: sum(sizes[n].numel() for n in names) for name, names in groups.items()}
    return {"total_params": total, "trainable_params": trainable, "trainable_by_strategy": by_strategy}


@dataclass
class Session:
    """Everything a run has set up; shared by the mixture path here and the sequence path in continual.py."""

    config: RunConfig
    run_dir: Path
    accelerator: Accelerator
    model: nn.Module
    tokenizer: object
    strategies: list[Strategy]
    ctx: StrategyContext
    data: RunData
    engine: Engine | None = None  # how the model is spread over processes (`distributed.engine`)
    trackers: Trackers = field(default_factory=lambda: Trackers([]))  # report_to: W&B, MLflow, Aim

    def evaluate(self, model: nn.Module | None = None, samples: bool = True,
                 benchmarks: bool = False) -> dict:
        return evaluate_all(model or self.model, self.tokenizer, self.data, self.config,
                            self.accelerator.device, samples, benchmarks)

    def periodic_eval(self, model: nn.Module) -> dict:
        result = self.evaluate(model, samples=False)
        flat = dict(result["eval"])
        for name, metrics in result.get("tasks", {}).items():
            flat.update({f"{name}/{k}": v for k, v in metrics.items()})
        # Retain metrics along the way give a forgetting curve: objectives compare at equal task loss.
        flat.update({f"retain_{k}": v for k, v in result.get("retain", {}).items()})
        return flat


def start_session(config: RunConfig, resume: bool, overwrite: bool) -> Session:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    check_trackers(config)
    check_benchmarks(config)
    run_data = load_run_data(config)  # bad data fails here, before the output directory is touched
    strategies = build_strategies(config.strategies)
    check_engine(config, strategies, config_location(config, "distributed.engine"))
    check_compile(config, strategies, config_location(config, "train.compile"))
    # bf16 autocast is applied by the loop itself: Accelerate's mixed-precision setting is process-wide state.
    accelerator = make_accelerator()
    engine = make_engine(config, accelerator)
    run_dir = prepare_output(config, resume, overwrite, accelerator)
    if accelerator.is_main_process and not resume:
        write_atomic(run_dir / "config.yaml", yaml.safe_dump(config.resolved_dict(), sort_keys=False))
    if accelerator.is_main_process:
        with contextlib.suppress(OSError):  # advisory: a disk too full for it fails at the first real write
            mark_running(run_dir, resume)  # status.json: `tuneforge ui` tells a live run from a killed one
    if accelerator.is_main_process and config.train.max_steps != 0:
        warn_if_short_of_memory(config, accelerator.device)
    set_seed(config.train.seed)
    model, tokenizer, strategies, ctx = build_model(config, run_data)
    check_sequence_length(config.model, config.train.max_seq_len,
                          config_location(config, "train.max_seq_len"))
    encode_run_data(run_data, config, tokenizer, tag_tasks=run_data.multi_task or provides_heads(strategies))
    model.to(accelerator.device)
    if config.train.packing:
        attention = check_packing_run(model, tokenizer, run_data, config, strategies, accelerator.device)
        if attention == "documents":
            accelerator.print("tuneforge: packing: each example attends on its own (no L x L row mask)")
    ctx.device = accelerator.device
    ctx.retain_batches = retain_batch_source(run_data, tokenizer, config)
    trackers = open_trackers(config, run_dir, accelerator.is_main_process)
    return Session(config, run_dir, accelerator, model, tokenizer, strategies, ctx, run_data, engine,
                   trackers)


def warn_if_short_of_memory(config: RunConfig, device) -> None:
    """Before any weight loads: warn, with what would fit, when the estimated peak exceeds free memory."""
    from tuneforge.memory import advice, estimate_memory

    try:
        estimate = estimate_memory(config, device=torch.device(device))
    except Exception as exc:  # noqa: BLE001 - an estimate never stops a run; a model it cannot build
        print(f"tuneforge: note: no memory estimate ({type(exc).__name__}: {str(exc)[:120]})")
        return
    if not estimate.fits:
        print(f"tuneforge: warning: this run may need about {estimate.total / 2**30:.1f} GiB on "
              f"{estimate.device}, and {estimate.available / 2**30:.1f} GiB is free (see `tuneforge "
              f"inspect`); to fit, try: {'; '.join(advice(estimate, config))}", file=sys.stderr)


def check_packing_run(model: nn.Module, tokenizer, run_data: RunData, config: RunConfig,
                      strategies: list[Strategy], device) -> str:
    """train.packing needs language-model tasks, and a model and strategies keeping packed examples apart.
    Returns the attention packed rows use ("documents" or "mask", see `check_packing`)."""
    reading = [s.name for s in strategies if s.needs_logits()]
    if reading:  # e.g. a distillation teacher runs the batch itself, with no packed positions
        raise ConfigError(f"train.packing: {reading[0]} reads every position's logits and may run its own "
                          f"forward on the batch, which would let packed examples see each other; "
                          f"set train.packing: false")
    classification = [t.name for t in run_data.tasks if t.task_type == "classification"]
    if classification:
        raise ConfigError(f"train.packing packs language-model examples; task {classification[0]!r} is "
                          f"classification (set train.packing: false)")
    schedule = config.schedule
    if run_data.multi_task and schedule.mode == "mixture" and schedule.sampling != "proportional":
        raise ConfigError(f"train.packing mixes tasks proportionally (every example once per epoch); "
                          f"schedule.sampling: {config.schedule.sampling} is not supported with it")
    return check_packing(model, tokenizer.pad_token_id, device, config.train.max_seq_len)


def provides_heads(strategies: list[Strategy]) -> bool:
    return any(strategy.provides_heads for strategy in strategies)


def config_names(config: RunConfig) -> list[str]:
    return [spec.name for spec in config.strategies]


def evaluate_before(session: Session, resume: bool) -> dict:
    """The base model's metrics (injected modules disabled), computed once and kept for resumes."""
    path = session.run_dir / "evaluation_before.json"
    if resume and path.is_file():
        return json.loads(path.read_text())
    session.accelerator.print("tuneforge: evaluating the base model ...")
    with disabled_adapters(session.model):
        before = session.evaluate(benchmarks=True)
    if session.accelerator.is_main_process:
        write_atomic(path, json.dumps(before, indent=1))
    return before


def train_run(config: RunConfig, resume: bool = False, overwrite: bool = False) -> dict:
    """Run `config` end to end and return its results (also written to results.json and report.md).

    status.json records that it runs and how it ended (`tuneforge.run_status`)."""
    with recorded_end(Path(config.output)):
        session = start_session(config, resume, overwrite)
        try:
            return _train_session(session, config, resume)
        finally:
            session.trackers.close()


def _train_session(session: Session, config: RunConfig, resume: bool) -> dict:
    from tuneforge.train import fit

    params = parameter_report(session.model, session.strategies, session.ctx)
    sizes = [len(t.train_items) for t in session.data.tasks]
    session.accelerator.print(
        f"tuneforge: {sum(sizes)} train / {sum(len(t.eval_items) for t in session.data.tasks)} eval / "
        f"{len(session.data.retain_items)} retain items; trainable {params['trainable_params']:,} of "
        f"{params['total_params']:,} parameters "
        f"({', '.join(config_names(config)) or default_parametrization().name})"
    )
    for note in session.data.notes:
        session.accelerator.print(f"tuneforge: note: {note}")
    before = evaluate_before(session, resume)
    if config.schedule.mode == "sequence" and session.data.multi_task:
        from tuneforge.continual import train_sequence

        return finish(session, params, before, *train_sequence(session, before, resume))

    items = [item for task in session.data.tasks for item in task.train_items]
    for strategy in session.strategies:
        items = strategy.task_items(items, session.ctx)
    items, plan = training_plan(items, config.train, config.schedule, config.train.seed)
    started = time.perf_counter()
    if config.train.max_steps == 0:  # evaluate only: the prompt-engineering baseline
        from tuneforge.train import LoopState

        state = LoopState()
    else:
        state = fit(session.model, session.strategies, session.ctx, items, plan, config.train,
                    session.accelerator, session.run_dir, session.tokenizer.pad_token_id,
                    session.periodic_eval, resume=resume, engine=session.engine,
                    trackers=session.trackers)
    session.model = session.accelerator.unwrap_model(session.model)
    return finish(session, params, before, state, time.perf_counter() - started, {})


def finish(session: Session, params: dict, before: dict, state, wall: float, extra: dict) -> dict:
    """Evaluate the tuned model, save the adapter, and write results.json and report.md.

    A stop requested after training ended (SIGTERM during the last steps) stops here instead; a failed
    write is one line naming the last good checkpoint."""
    reason = reason_of(agreed_stop(current_request().code(), session.accelerator))
    if reason is not None:  # a stop asked for once training ended: its last checkpoint is the resume point
        raise Stopped(state.step, reason, last_checkpoint(session.run_dir))
    with reported_faults(lambda: last_checkpoint(session.run_dir)):
        return _finish(session, params, before, state, wall, extra)


def last_checkpoint(run_dir: Path) -> Path | None:
    """The newest valid checkpoint of a run (of any task of a continual run)."""
    roots = [run_dir / "checkpoints", *sorted((run_dir / "checkpoints").glob("*/"))]
    found = [path for root in roots if (path := latest_checkpoint(root)) is not None]
    return max(found, key=lambda path: path.stat().st_mtime) if found else None


def _finish(session: Session, params: dict, before: dict, state, wall: float, extra: dict) -> dict:
    from tuneforge.export import write_adapter
    from tuneforge.model_card import write_run_card
    from tuneforge.report import write_report

    config, accelerator = session.config, session.accelerator
    accelerator.print("tuneforge: evaluating the fine-tuned model ...")
    after = session.evaluate(benchmarks=True)
    results = {
        "model": config.model, "strategies": [s.as_dict() for s in config.strategies],
        "task_type": session.data.task_type, "tasks": [t.name for t in session.data.tasks],
        **params,
        "before": before, "after": after,
        "forgetting": forgetting(before.get("retain", {}), after.get("retain", {})),
        **benchmark_results(before, after),
        "steps": state.step, "train_seconds": state.elapsed, "wall_seconds": wall,
        "tokens_per_s": state.tokens / max(state.elapsed, 1e-9),
        "peak_memory_mb": peak_memory_mb(accelerator.device),
        "seed": config.train.seed, **extra,
    }
    sharded = session.engine is not None and session.engine.shards
    if sharded or accelerator.num_processes > 1:  # what process 0 held of the state, what each one peaked at
        results["distributed"] = {"engine": session.engine.name if session.engine else "ddp",
                                  "processes": accelerator.num_processes,
                                  "held": getattr(state, "held", None) or {"parameters": 1.0,
                                                                           "optimizer_state": 1.0},
                                  "memory_mb": getattr(state, "memory_mb", None)}
    if session.data.notes:  # what the run left unused, and why
        results["notes"] = list(session.data.notes)
    skipped = [message for task in session.data.tasks for message in task.skipped]
    if skipped:  # data.skip_invalid: how many records were left out, and the first few reasons
        results["skipped"] = {"count": len(skipped), "examples": skipped[:5]}
    adapter_dir = session.run_dir / "adapter"
    results["adapter_bytes"] = 0
    if params["trainable_params"] and state.step:
        engine = session.engine or Engine(accelerator)
        with engine.gathered(session.model) as model:  # whole tensors (every process takes part)
            if accelerator.is_main_process:
                write_adapter(model, session.strategies, adapter_dir,
                              base_name=str(resolve_model_path(config.model)))
                results["adapter_bytes"] = sum(p.stat().st_size for p in adapter_dir.iterdir())
    if accelerator.is_main_process:
        write_atomic(session.run_dir / "results.json", json.dumps(results, indent=1))
        if results["adapter_bytes"]:  # the adapter's model card: what the run did, for a model hub
            write_run_card(adapter_dir, session.run_dir, "adapter")
        write_report(session.run_dir, results)
        session.trackers.log_results(results, session.run_dir)
    return results


def benchmark_results(before: dict, after: dict) -> dict:
    """`benchmark_change`: each benchmark's primary metric after minus before, in points (when configured)."""
    if "benchmarks" not in after:
        return {}
    from tuneforge.benchmarks import benchmark_change

    return {"benchmark_change": benchmark_change(before.get("benchmarks", {}), after["benchmarks"])}


def inspect_config(config: RunConfig) -> dict:
    """Parameter counts of the configured model and strategies, the modules each strategy matched
    (`matched`: {strategy: one line}) and the bytes base weights hold by storage kind (`base_weights`:
    `quantize.base_weight_bytes`), without training."""
    from tuneforge.quantize import base_weight_bytes

    run_data = load_run_data(config)
    model, _, strategies, ctx = build_model(config, run_data)
    matched = {s.name: text for s in strategies if (text := s.describe(model)) is not None}
    return {**parameter_report(model, strategies, ctx), "matched": matched,
            "base_weights": base_weight_bytes(model)}


def validate_run(config: RunConfig) -> dict:
    """Check everything that can be checked before a model loads: the strategy list, data files, every record,
    the model."""
    check_combination([spec.name for spec in config.strategies])
    strategies = build_strategies(config.strategies)
    check_engine(config, strategies, config_location(config, "distributed.engine"))
    check_compile(config, strategies, config_location(config, "train.compile"))
    if config.distributed.engine == "deepspeed":
        from tuneforge.zero import resolve_deepspeed_config

        resolve_deepspeed_config(config)
    check_trackers(config)
    check_benchmarks(config)
    run_data = load_run_data(config)
    check_model_available(config.model)
    check_quantize(config)
    check_sequence_length(config.model, config.train.max_seq_len,
                          config_location(config, "train.max_seq_len"))
    bundled = BUNDLED_MODELS.get(config.model)
    kind = bundled.kind if bundled is not None else model_kind(Path(config.model))
    if any(t.task_type == "causal_lm" for t in run_data.tasks) and kind != "causal_lm":
        raise ConfigError(f"model {config.model!r} is an encoder: it needs classification data (text/label)")
    sequence = config.schedule.mode == "sequence" and run_data.multi_task
    for spec in config.strategies:  # what a strategy refuses at its start, for this kind of run
        reason = REGISTRY[spec.name].cls.refuses_run(run_data.task_type, sequence)
        if reason:
            raise ConfigError(f"strategies: {reason}")
    if config.retain:
        load_examples(config.retain, "text")
    labels = [label for t in run_data.tasks for label in (t.labels or [])]
    return {"train_examples": sum(len(t.train_examples) for t in run_data.tasks),
            "eval_examples": sum(len(t.eval_examples) for t in run_data.tasks),
            "task_type": run_data.task_type, "labels": labels or None,
            "tasks": [t.name for t in run_data.tasks],
            "skipped": [message for task in run_data.tasks for message in task.skipped]}
