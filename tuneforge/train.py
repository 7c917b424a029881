"""THE training loop. One file, read top to bottom; strategies plug in through their hooks only.

    for each optimizer step the plan draws:           (a step: its micro-batches, gradient accumulation)
        for each micro-batch of the step:
            task loss (summed over label tokens / the step's label-token count)
            + every strategy's named loss terms (each this micro-batch's share of the step's term)
            backward
        clip, optimizer step, scheduler step, zero every gradient
        log; maybe evaluate; maybe checkpoint

The data order of epoch e is seeded by `seed + e` and the plan draws whole steps, so a resumed run skips
exactly the steps already taken, and B x accum 1 and B/2 x accum 2 train on the same data.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import Tensor, nn
from tqdm.auto import tqdm

from tuneforge.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tuneforge.compiling import compiled_blocks, eager
from tuneforge.compose import set_trainable, trainable_in_any_epoch
from tuneforge.config import TrainConfig
from tuneforge.data import collate
from tuneforge.distributed import (
    agreed_stop,
    mean_over_processes,
    processes_memory,
    step_checks,
    step_targets,
)
from tuneforge.document_attention import uses_document_attention
from tuneforge.engines import Engine
from tuneforge.errors import TrainingError
from tuneforge.evaluate import head_skipped, hidden_token_losses, label_head, token_losses
from tuneforge.faults import reported_faults
from tuneforge.forward import is_classification_batch, model_inputs, routes_tasks
from tuneforge.metrics import MetricsLogger, reset_peak_memory
from tuneforge.packing import packed_collate, packed_model_inputs
from tuneforge.stopping import Stopped, current_request, reason_of
from tuneforge.strategies import Strategy, StrategyContext
from tuneforge.tasks import Plan


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    step_in_epoch: int = 0  # optimizer steps of this epoch already taken
    tokens: int = 0  # non-padding input tokens seen
    elapsed: float = 0.0  # seconds spent training (excluding evaluation)
    history: list[dict] = field(default_factory=list)  # periodic eval results
    held: dict[str, float] | None = None  # shares of parameters and optimizer state process 0 holds
    memory_mb: dict[str, list[float]] | None = None  # each process's training peak and held memory

    @classmethod
    def from_checkpoint(cls, loop: dict, grad_accum: int) -> LoopState:
        """A checkpoint's state; older ones counted micro-batches (`micro_in_epoch`), all full steps."""
        loop = dict(loop)
        if "micro_in_epoch" in loop:
            loop["step_in_epoch"] = math.ceil(loop.pop("micro_in_epoch") / grad_accum)
        return cls(**loop)


def plan_length(plan: Plan, cfg: TrainConfig, world: int = 1) -> tuple[int, int]:
    """(optimizer steps of the run, epochs the loop will start): `max_steps` steps, else `epochs` passes.

    With `max_steps` past the end of `epochs` the loop goes on into further epochs; what is trainable in
    them (gradual unfreezing) must be known before the optimizer is built.
    """
    if cfg.max_steps is None:
        return sum(len(plan(epoch, 0, world)) for epoch in range(cfg.epochs)), cfg.epochs
    steps, epochs = 0, 0
    while steps < cfg.max_steps:
        in_epoch = len(plan(epochs, 0, world))
        if in_epoch == 0:
            raise TrainingError("no training batches: the data is smaller than one batch per process")
        steps, epochs = steps + in_epoch, epochs + 1
    return cfg.max_steps, max(epochs, 1)


def total_steps(plan: Plan, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` passes over the plan."""
    return plan_length(plan, cfg, world)[0]


def build_optimizer(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext, cfg: TrainConfig):
    """AdamW over every parameter that is trainable in any epoch, grouped by learning rate.

    Parameters frozen now but unfrozen later (gradual unfreezing) get no gradient until then, and
    AdamW skips parameters without a gradient, so they stay bit-identical while frozen.
    """
    candidates = trainable_in_any_epoch(model, ctx, strategies)
    rates: dict[str, float] = {}
    for strategy in strategies:
        rates.update(strategy.param_groups(model, cfg.lr))
    groups: dict[tuple[float, float], list] = {}
    for name, parameter in model.named_parameters():
        if name not in candidates:
            continue
        decay = cfg.weight_decay if parameter.dim() >= 2 else 0.0  # no decay on biases and norms
        groups.setdefault((rates.get(name, cfg.lr), decay), []).append(parameter)
    param_groups = [{"params": ps, "lr": lr, "weight_decay": wd} for (lr, wd), ps in sorted(groups.items())]
    # The fused kernel updates a parameter in one pass over its memory; on a CPU the default per-tensor loop
    # makes about ten, which measured ~3x slower (a tenth of a full fine-tuning step on 2 cores).
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point()
                for g in param_groups for p in g["params"])
    return torch.optim.AdamW(param_groups, lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8, fused=fused or None)


def build_scheduler(optimizer, cfg: TrainConfig, num_steps: int):
    """Linear warmup, then linear decay to 0, cosine decay to 0, or constant."""

    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - cfg.warmup_steps) / max(1, num_steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
        return max(0.0, 1.0 - progress)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def task_loss(model: nn.Module, batch: dict, with_task: bool = False, head: nn.Linear | None = None):
    """(summed loss, number of loss targets, model outputs) for one micro-batch.

    Classification batches (one label per sequence) take cross-entropy over classes; language-model
    batches next-token cross-entropy over labelled tokens. Given the model's output layer `head` (when no
    strategy needs full logits), the head runs on labelled positions only, in chunks, and
    `outputs.logits` is empty. Packed batches (train.packing) carry `position_ids`.
    """
    inputs = model_inputs(batch, with_task)
    if "position_ids" in batch:  # packed rows: attention stays inside each example (tuneforge.packing)
        inputs = packed_model_inputs(inputs, batch, uses_document_attention(model))
    if is_classification_batch(batch):
        outputs = model(**inputs)
        loss_sum = F.cross_entropy(outputs.logits.float(), batch["labels"], reduction="sum")
        return loss_sum, batch["labels"].numel(), outputs
    if head is None:
        outputs = model(**inputs)
    else:
        with head_skipped(head) as hidden:
            outputs = model(**inputs)
        if hidden:  # else the model never called its output layer, and its logits are complete
            return (*hidden_token_losses(hidden[-1], batch["labels"], head), outputs)
    loss_sum, count = token_losses(outputs.logits, batch["labels"])
    return loss_sum, count, outputs


def loss_targets(batch: dict) -> int:
    """The task loss's target count of a batch: labels (classification) or labelled next tokens."""
    if is_classification_batch(batch):
        return batch["labels"].numel()
    return int((batch["labels"][:, 1:] != -100).sum())


def check_optimized(model: nn.Module, optimized: set[int]) -> None:
    """Every parameter that requires grad must be in the optimizer: one outside it would keep a gradient
    nobody steps or zeroes, and its growing norm would shrink every clipped update."""
    for name, parameter in model.named_parameters():
        if parameter.requires_grad and id(parameter) not in optimized:
            raise TrainingError(f"parameter {name} is trainable now but not in the optimizer (built for the "
                                f"parameters trainable in the epochs the loop starts)")


@dataclass
class StepResult:
    """One optimizer step's numbers, still on the device (read at logging time: no host sync per step)."""

    loss: Tensor  # the task loss (token mean over the step)
    terms: dict[str, Tensor]  # each strategy term, summed over the micro-batches: the step's term
    total: Tensor  # what was backpropagated, summed over the micro-batches
    tokens: int  # non-padding input tokens of the step on this process


def train_step(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext, batches: list[dict],
               accelerator: Accelerator, cfg: TrainConfig, with_task: bool,
               head: nn.Linear | None, engine: Engine | None = None) -> StepResult:
    """Forward and backward over the micro-batches (on the CPU) of one optimizer step; no optimizer update.

    The task loss is summed over each micro-batch and divided by the whole step's target count; strategy
    terms are already the micro-batch's share (see `Strategy.loss`), except weight penalties
    (`step_penalty`), which get the share of the step's rows here. So the gradient does not depend on how
    the step is split.
    """
    engine = engine or Engine(accelerator)
    raw_model = engine.unwrap(model)
    ctx.micro_count = len(batches)
    ctx.step_rows = sum(len(batch["input_ids"]) for batch in batches)
    ctx.step_tokens = sum(int(batch["attention_mask"].sum()) for batch in batches)
    ctx.step_targets = step_targets(sum(loss_targets(batch) for batch in batches), accelerator)
    task_weight = math.prod(strategy.task_weight(ctx) for strategy in strategies)  # distill's alpha
    result = StepResult(torch.zeros((), device=accelerator.device), {},
                        torch.zeros((), device=accelerator.device), ctx.step_tokens)
    for index, batch in enumerate(batches):
        ctx.micro_index = index
        rows_share = len(batch["input_ids"]) / ctx.step_rows
        batch = {key: value.to(accelerator.device) for key, value in batch.items()}
        last = index == len(batches) - 1
        with engine.no_sync(model, last):  # gradients are exchanged once per step
            bf16 = cfg.precision == "bf16"
            with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=bf16):
                loss_sum, _, outputs = task_loss(model, batch, with_task, head)
                loss = loss_sum / ctx.step_targets  # this micro-batch's share of the step's token mean
                terms = {}
                for strategy in strategies:
                    share = rows_share if strategy.step_penalty else 1.0
                    strategy_terms = strategy.loss(raw_model, batch, outputs, ctx)
                    terms.update({name: term * share for name, term in strategy_terms.items()})
                total = task_weight * loss + sum(terms.values())
            engine.backward(model, total)
        result.loss += loss.detach()
        result.total += total.detach()
        for name, term in terms.items():
            result.terms[name] = result.terms.get(name, 0.0) + term.detach()
    return result


def fit(
    model: nn.Module,
    strategies: list[Strategy],
    ctx: StrategyContext,
    train_items: list[dict],
    plan: Plan,
    cfg: TrainConfig,
    accelerator: Accelerator,
    run_dir: Path,
    pad_token_id: int,
    evaluate: Callable[[nn.Module], dict],
    resume: bool = False,
    checkpoints: Path | None = None,
    log_extra: dict | None = None,
    engine: Engine | None = None,
    trackers=None,
) -> LoopState:
    """Train `model` on `train_items` in the optimizer steps `plan` draws; returns the final loop state.

    Checkpoints go to `checkpoints` (default `run_dir/checkpoints`); `log_extra` (e.g. the task of a
    continual run) is added to every metrics record, which also goes to `trackers` (`report_to`). `engine`
    spreads the model over processes (DDP by default; FSDP2 or DeepSpeed ZeRO shard it, `tuneforge.engines`).
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    # set before anything reads what is trainable in any epoch (optimizer, L2-SP and EWC anchors)
    num_steps, ctx.num_epochs = plan_length(plan, cfg, world)
    ctx.total_steps, ctx.base_lr = num_steps, cfg.lr
    engine = engine or Engine(accelerator)
    model, optimizer, scheduler = prepare_training(model, strategies, ctx, cfg, accelerator, num_steps,
                                                   engine)
    raw_model = engine.unwrap(model)
    optimized = {id(parameter) for parameter in engine.parameters(optimizer)}
    if world > 1 or engine.shards:  # each process's training peak is reported, without the loading before
        reset_peak_memory(accelerator.device)
    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, extra=log_extra,
                           trackers=trackers)
    checkpoints = checkpoints or run_dir / "checkpoints"
    with_task = routes_tasks(raw_model)
    head = None if any(strategy.needs_logits() for strategy in strategies) else label_head(raw_model)
    make_batch = functools.partial(packed_collate, capacity=cfg.max_seq_len) if cfg.packing else collate
    for strategy in strategies:
        strategy.on_train_start(raw_model, ctx)
    state = LoopState()
    if resume:
        state, latest = resumed_state(checkpoints, raw_model, optimizer, scheduler, strategies, cfg, engine,
                                      model)
        logger.truncate_after(state.step)
        accelerator.print(f"tuneforge: resumed from {latest.name} (step {state.step} of {num_steps})")
    pace = Pace(checkpoint=checkpoint_guess(optimizer))  # how far ahead train.max_time looks
    saved_at = state.step if resume else None

    def checkpoint() -> None:  # once per step: a stop right after a periodic checkpoint reuses it
        nonlocal saved_at
        if saved_at != state.step:
            started = time.perf_counter()
            save_state(checkpoints, raw_model, optimizer, scheduler, strategies, state, cfg, accelerator,
                       engine, model)
            pace.checkpoint, saved_at = time.perf_counter() - started, state.step

    stop = current_request()  # SIGTERM, SIGINT or train.max_time (see tuneforge.stopping)
    model.train()
    progress = tqdm(total=num_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    # a full disk or out of memory: one line naming the last good checkpoint, under a closed progress bar
    with reported_faults(lambda: latest_checkpoint(checkpoints)), progress, \
            compiled_blocks(raw_model, cfg.compile, strategies, engine.name):  # the training steps only
        reason = reason_of(agreed_stop(stop.code(), accelerator))  # a signal before the first step
        while state.step < num_steps and reason is None:
            ctx.epoch, ctx.step = state.epoch, state.step
            set_trainable(raw_model, strategies, ctx)  # the trainable set may change by epoch
            steps = plan(state.epoch, rank, world)
            if not steps:
                raise TrainingError("no training batches: the data is smaller than one batch per process")
            for step_indices in steps[state.step_in_epoch:]:
                step_start = time.perf_counter()
                check_optimized(raw_model, optimized)
                batches = [make_batch([train_items[i] for i in indices], pad_token_id)
                           for indices in step_indices]
                result = train_step(model, strategies, ctx, batches, accelerator, cfg, with_task, head,
                                    engine)
                # one collective: every process stops at the same step, for a bad loss or a stop request
                finite, stop_code = step_checks(result.total, stop.code(pace.ahead()), accelerator)
                if not finite:
                    raise non_finite_error(result.total, state.step + 1, checkpoints)
                grad_norm = optimizer_step(model, optimizer, scheduler, cfg, accelerator, engine)
                if engine.shards and state.held is None:
                    state.held = engine.held(model, optimizer)
                state.step, state.step_in_epoch = state.step + 1, state.step_in_epoch + 1
                state.tokens, window_tokens = (state.tokens + result.tokens * world,
                                               window_tokens + result.tokens * world)
                pace.step = time.perf_counter() - step_start
                state.elapsed += pace.step
                ctx.step = state.step

                if state.step % cfg.log_every == 0 or state.step == num_steps:
                    seconds = time.perf_counter() - window_start
                    record = step_record(state, result, grad_norm, scheduler.get_last_lr()[-1],
                                         window_tokens / max(seconds, 1e-9), accelerator)
                    logger.log(record)
                    progress.set_postfix(loss=f"{record['loss']:.3f}",
                                         tok_s=f"{state.tokens / max(state.elapsed, 1e-9):.0f}")
                    window_start, window_tokens = time.perf_counter(), 0
                progress.update(1)
                paused = False  # evaluation or a checkpoint took time: a signal may have come meanwhile
                if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < num_steps:
                    eval_start = time.perf_counter()
                    with eager():  # evaluation's shapes and KV cache would recompile (tuneforge.compiling)
                        metrics = evaluate(raw_model)
                    state.history.append({"step": state.step, **metrics})
                    logger.log({"step": state.step, "split": "eval", **metrics})
                    model.train()
                    pace.evaluation, paused = time.perf_counter() - eval_start, True
                if cfg.save_every and state.step % cfg.save_every == 0 and state.step < num_steps:
                    checkpoint()
                    paused = True
                if not stop_code and (paused or world == 1):  # free on one process; else only after a pause
                    stop_code = agreed_stop(stop.code(pace.ahead()), accelerator)
                reason = reason_of(stop_code) if state.step < num_steps else None
                if state.step >= num_steps or reason is not None:
                    break
            else:
                state.epoch, state.step_in_epoch = state.epoch + 1, 0
        progress.close()  # before the final checkpoint: a stop's message goes on a line of its own
        if world > 1 or engine.shards:  # each process's memory (before a checkpoint gathers anything)
            state.memory_mb = processes_memory(accelerator)
        checkpoint()
        logger.close()
    if reason is not None:
        raise Stopped(state.step, reason, latest_checkpoint(checkpoints))
    return state


@dataclass
class Pace:
    """Seconds the last step, evaluation and checkpoint took: `train.max_time` stops when the next of each
    would run past it, so the stop's own checkpoint is written in time."""

    step: float = 0.0
    evaluation: float = 0.0
    checkpoint: float = 0.0

    def ahead(self) -> float:
        return self.step + self.evaluation + self.checkpoint


def checkpoint_guess(optimizer) -> float:
    """Seconds a first checkpoint may take before one was timed: the trained weights and AdamW's two
    moments (12 bytes a parameter) at a conservative 100 MB/s, plus a second."""
    parameters = sum(p.numel() for group in optimizer.param_groups for p in group["params"])
    return 1.0 + 12 * parameters / 100e6


def prepare_training(model: nn.Module, strategies: list[Strategy], ctx: StrategyContext, cfg: TrainConfig,
                     accelerator: Accelerator, num_steps: int, engine: Engine | None = None):
    """(model, optimizer, scheduler) prepared by the engine; the optimizer holds what any epoch trains."""
    engine = engine or Engine(accelerator)
    optimizer = build_optimizer(model, strategies, ctx, cfg)
    if accelerator.num_processes > 1 or engine.shards:  # DDP syncs (and ZeRO partitions) only what requires
        # grad when it wraps the model: wrap with everything any epoch trains (gradual unfreezing);
        # set_trainable narrows it per epoch, find_unused_parameters copes
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.requires_grad_(True)
    model, optimizer = engine.prepare(model, optimizer)
    # on the optimizer that updates (FSDP2 rebuilds it over sharded parameters; ZeRO steps the one it wraps)
    scheduler = build_scheduler(getattr(optimizer, "optimizer", optimizer), cfg, num_steps)
    return model, optimizer, scheduler


def resumed_state(checkpoints: Path, model: nn.Module, optimizer, scheduler, strategies: list[Strategy],
                  cfg: TrainConfig, engine: Engine | None = None,
                  wrapped: nn.Module | None = None) -> tuple[LoopState, Path]:
    """Load the latest valid checkpoint into model, optimizer, scheduler and strategies (through a sharding
    `engine`, which holds `wrapped`, when there is one).

    Returns (its loop state, it)."""
    latest = latest_checkpoint(checkpoints)
    if latest is None:
        raise TrainingError(f"--resume: no valid checkpoint in {checkpoints}")
    place = None
    if engine is not None and engine.shards:
        def place(weights, optimizer_state):
            engine.load_full_state(wrapped, optimizer, weights, optimizer_state)
    loop = load_checkpoint(latest, model, optimizer, scheduler, strategies, place)
    return LoopState.from_checkpoint(loop, cfg.grad_accum), latest


def save_state(checkpoints: Path, model: nn.Module, optimizer, scheduler, strategies: list[Strategy],
               state: LoopState, cfg: TrainConfig, accelerator: Accelerator, engine: Engine | None = None,
               wrapped: nn.Module | None = None) -> None:
    """Checkpoint from the main process; every process waits until it is written.

    A sharding engine first gathers whole weights and optimizer state (every process takes part)."""
    gathered = None
    if engine is not None and engine.shards:
        names = {id(p): n for n, p in model.named_parameters()}
        gathered = engine.full_state(wrapped, optimizer, names)
    if accelerator.is_main_process:
        save_checkpoint(checkpoints, state.step, model, optimizer, scheduler, strategies, state.__dict__,
                        keep=cfg.keep_checkpoints, gathered=gathered)
    accelerator.wait_for_everyone()


def optimizer_step(model: nn.Module, optimizer, scheduler, cfg: TrainConfig,
                   accelerator: Accelerator, engine: Engine | None = None) -> Tensor | None:
    """Clip, step, schedule, and zero every parameter's gradient; returns the gradient norm (a tensor)."""
    grad_norm = (engine or Engine(accelerator)).step(model, optimizer, cfg.max_grad_norm)
    scheduler.step()
    return grad_norm


def step_record(state: LoopState, result: StepResult, grad_norm: Tensor | None, lr: float,
                tokens_per_s: float, accelerator: Accelerator) -> dict:
    """The metrics record of a logged step: its loss and terms (averaged over processes), lr, throughput."""
    values = {"loss": result.loss, **result.terms,
              **({"grad_norm": grad_norm} if grad_norm is not None else {})}
    values = mean_over_processes(values, accelerator)  # the one host sync of a logged step
    return {"step": state.step, "epoch": state.epoch, "loss": values.pop("loss"), "lr": lr,
            "tokens_per_s": tokens_per_s, **values}


def non_finite_error(total: Tensor, step: int, checkpoints: Path) -> TrainingError:
    """The error for a step whose loss is nan or inf (here or on another process)."""
    last_good = latest_checkpoint(checkpoints)
    kept = f"; last good checkpoint: {last_good}" if last_good else ""
    value = total.item() if not math.isfinite(total.item()) else "nan or inf on another process"
    return TrainingError(f"loss became {value} at step {step} "
                         f"(try a lower train.lr or precision: fp32){kept}")
