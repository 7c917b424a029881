"""THE training loop. One file, read top to bottom; strategies plug in through their hooks only.

    for each optimizer step:
        for each micro-batch of the step:            (gradient accumulation)
            task loss (summed over label tokens / the step's label-token count)
            + every strategy's named loss terms
            backward
        clip, optimizer step, scheduler step
        log; maybe evaluate; maybe checkpoint

The data order of epoch e is a permutation seeded by `seed + e`, so a resumed run skips exactly the
micro-batches already consumed and sees the same data as an uninterrupted one.
"""

from __future__ import annotations

import contextlib
import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn
from tqdm.auto import tqdm

from tuneforge.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from tuneforge.compose import set_trainable, trainable_in_any_epoch
from tuneforge.config import TrainConfig
from tuneforge.data import collate
from tuneforge.errors import TrainingError
from tuneforge.evaluate import head_skipped, hidden_token_losses, label_head, token_losses
from tuneforge.forward import is_classification_batch, model_inputs, routes_tasks
from tuneforge.metrics import MetricsLogger
from tuneforge.packing import packed_collate, packed_model_inputs
from tuneforge.strategies import Strategy, StrategyContext
from tuneforge.tasks import Plan


@dataclass
class LoopState:
    """Where the loop is; saved in every checkpoint."""

    step: int = 0  # optimizer steps done
    epoch: int = 0
    micro_in_epoch: int = 0  # micro-batches of this epoch already consumed
    tokens: int = 0  # non-padding input tokens seen
    elapsed: float = 0.0  # seconds spent training (excluding evaluation)
    history: list[dict] = field(default_factory=list)  # periodic eval results


def total_steps(plan: Plan, cfg: TrainConfig, world: int = 1) -> int:
    """Optimizer steps of the run: `max_steps`, or `epochs` passes over the plan."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return cfg.epochs * math.ceil(len(plan(0, 0, world)) / cfg.grad_accum)


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
    fused = all(p.device.type in ("cpu", "cuda") and p.is_floating_point() for g in param_groups for p in g["params"])
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
        inputs = packed_model_inputs(inputs, batch)
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
    if is_classification_batch(batch):
        return batch["labels"].numel()
    return int((batch["labels"][:, 1:] != -100).sum())


def step_targets(count: int, accelerator: Accelerator) -> float:
    """What this process divides its summed loss by, so that a step's loss is the global token mean.

    DDP averages gradients over the `world` processes, so each divides by (all processes' targets / world):
    the average is then exactly the loss one process would take over the whole global batch.
    """
    if accelerator.num_processes == 1:
        return max(1, count)
    total = accelerator.reduce(torch.tensor(float(count), device=accelerator.device), "sum").item()
    return max(1.0, total) / accelerator.num_processes


def finite_everywhere(loss: torch.Tensor, accelerator: Accelerator) -> bool:
    """Whether the loss is finite on every process (one process stopping alone would hang the others)."""
    if accelerator.num_processes == 1:
        return bool(torch.isfinite(loss))
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    return accelerator.reduce(bad, "sum").item() == 0


def mean_over_processes(loss: float, terms: dict[str, float], accelerator: Accelerator) -> tuple[float, dict]:
    """The step's loss and named terms averaged over processes (each holds its part of the global batch)."""
    if accelerator.num_processes == 1:
        return loss, terms
    names = sorted(terms)
    values = torch.tensor([loss, *(terms[n] for n in names)], dtype=torch.float64, device=accelerator.device)
    values = accelerator.reduce(values, "mean").tolist()
    return values[0], dict(zip(names, values[1:], strict=True))


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
) -> LoopState:
    """Train `model` on `train_items` in the micro-batches `plan` draws; returns the final loop state.

    Checkpoints go to `checkpoints` (default `run_dir/checkpoints`); `log_extra` (e.g. the task of a
    continual run) is added to every metrics record.
    """
    rank, world = accelerator.process_index, accelerator.num_processes
    num_steps = total_steps(plan, cfg, world)
    ctx.total_steps, ctx.base_lr = num_steps, cfg.lr
    optimizer = build_optimizer(model, strategies, ctx, cfg)
    scheduler = build_scheduler(optimizer, cfg, num_steps)
    if world > 1:  # DDP syncs only what requires grad when it wraps the model: wrap with everything any
        # epoch trains (gradual unfreezing); set_trainable narrows it per epoch, find_unused_parameters copes
        for group in optimizer.param_groups:
            for parameter in group["params"]:
                parameter.requires_grad_(True)
    model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)
    logger = MetricsLogger(run_dir, enabled=accelerator.is_main_process, extra=log_extra)
    checkpoints = checkpoints or run_dir / "checkpoints"
    with_task = routes_tasks(raw_model)
    head = None if any(strategy.needs_logits() for strategy in strategies) else label_head(raw_model)
    make_batch = functools.partial(packed_collate, capacity=cfg.max_seq_len) if cfg.packing else collate

    for strategy in strategies:
        strategy.on_train_start(raw_model, ctx)
    state = LoopState()
    if resume:
        latest = latest_checkpoint(checkpoints)
        if latest is None:
            raise TrainingError(f"--resume: no valid checkpoint in {checkpoints}")
        state = LoopState(**load_checkpoint(latest, raw_model, optimizer, scheduler, strategies))
        logger.truncate_after(state.step)
        accelerator.print(f"tuneforge: resumed from {latest.name} (step {state.step} of {num_steps})")

    def checkpoint() -> None:
        if accelerator.is_main_process:
            save_checkpoint(checkpoints, state.step, raw_model, optimizer, scheduler, strategies,
                            state.__dict__, keep=cfg.keep_checkpoints)
        accelerator.wait_for_everyone()

    model.train()
    progress = tqdm(total=num_steps, initial=state.step, desc="train", unit="step",
                    disable=not accelerator.is_main_process, dynamic_ncols=True)
    window_start, window_tokens = time.perf_counter(), 0
    while state.step < num_steps:
        ctx.epoch, ctx.step = state.epoch, state.step
        set_trainable(raw_model, strategies, ctx)  # the trainable set may change by epoch
        batches = plan(state.epoch, rank, world)
        if not batches:
            raise TrainingError("no training batches: the data is smaller than one batch per process")
        for start in range(state.micro_in_epoch, len(batches), cfg.grad_accum):
            step_start = time.perf_counter()
            group = [make_batch([train_items[i] for i in indices], pad_token_id) for indices in batches[start:start + cfg.grad_accum]]
            group = [{k: v.to(accelerator.device) for k, v in b.items()} for b in group]
            targets = step_targets(sum(loss_targets(b) for b in group), accelerator)
            task_weight = math.prod(strategy.task_weight(ctx) for strategy in strategies)  # distill's alpha
            step_loss, step_terms = 0.0, {}
            for index, batch in enumerate(group):
                last = index == len(group) - 1
                with contextlib.nullcontext() if last else accelerator.no_sync(model):
                    with torch.autocast(accelerator.device.type, dtype=torch.bfloat16, enabled=cfg.precision == "bf16"):
                        loss_sum, _, outputs = task_loss(model, batch, with_task, head)
                        loss = loss_sum / targets  # token-weighted mean over the whole step
                        terms = {}
                        for strategy in strategies:
                            terms.update(strategy.loss(raw_model, batch, outputs, ctx))
                        total = task_weight * loss + sum(term / len(group) for term in terms.values())
                    if not finite_everywhere(total, accelerator):  # every process stops at the same step
                        last_good = latest_checkpoint(checkpoints)
                        kept = f"; last good checkpoint: {last_good}" if last_good else ""
                        value = total.item() if not math.isfinite(total.item()) else "nan or inf on another process"
                        progress.close()  # the error goes on a line of its own
                        raise TrainingError(
                            f"loss became {value} at step {state.step + 1} "
                            f"(try a lower train.lr or precision: fp32){kept}"
                        )
                    accelerator.backward(total)
                step_loss += loss.item()
                for name, term in terms.items():
                    step_terms[name] = step_terms.get(name, 0.0) + term.item() / len(group)
                state.tokens += int(batch["attention_mask"].sum()) * world
                window_tokens += int(batch["attention_mask"].sum()) * world
            grad_norm = None
            if cfg.max_grad_norm is not None:
                grad_norm = float(accelerator.clip_grad_norm_(
                    [p for p in model.parameters() if p.requires_grad], cfg.max_grad_norm))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.micro_in_epoch = start + len(group)
            state.elapsed += time.perf_counter() - step_start
            ctx.step = state.step

            if state.step % cfg.log_every == 0 or state.step == num_steps:
                step_loss, step_terms = mean_over_processes(step_loss, step_terms, accelerator)
                seconds = time.perf_counter() - window_start
                record = {"step": state.step, "epoch": state.epoch, "loss": step_loss,
                          "lr": scheduler.get_last_lr()[-1], "tokens_per_s": window_tokens / max(seconds, 1e-9),
                          **({"grad_norm": grad_norm} if grad_norm is not None else {}), **step_terms}
                logger.log(record)
                window_start, window_tokens = time.perf_counter(), 0
            progress.set_postfix(loss=f"{step_loss:.3f}", tok_s=f"{state.tokens / max(state.elapsed, 1e-9):.0f}")
            progress.update(1)

            if cfg.eval_every and state.step % cfg.eval_every == 0 and state.step < num_steps:
                result = evaluate(raw_model)
                state.history.append({"step": state.step, **result})
                logger.log({"step": state.step, "split": "eval", **result})
                model.train()
            if cfg.save_every and state.step % cfg.save_every == 0 and state.step < num_steps:
                checkpoint()
            if state.step >= num_steps:
                break
        else:
            state.epoch, state.micro_in_epoch = state.epoch + 1, 0
    progress.close()
    checkpoint()
    logger.close()
    return state
