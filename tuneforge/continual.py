"""Continual learning: train tasks one after another and measure what each new task does to the old ones.

After task i (of T) every task j is evaluated, giving the matrix R[i][j]; b[j] is task j's metric before
any training. With a metric where higher is better (accuracy; for language-model tasks we use the
negative loss so the same formulas hold), following Lopez-Paz & Ranzato 2017 (GEM) as Avalanche
reports them:

    ACC = 1/T  sum_j R[T-1][j]                          average metric after the last task
    BWT = 1/(T-1) sum_{j<T-1} (R[T-1][j] - R[j][j])      backward transfer (negative = forgetting)
    FWT = 1/(T-1) sum_{j>0} (R[j-1][j] - b[j])           forward transfer (zero-shot gain on task j)

Deviation: Lopez-Paz & Ranzato's b_i is the score of a randomly initialised model on task i; ours is the
base (pretrained) model's score before any training. FWT here is the gain that training on the earlier
tasks gives over the pretrained model, not over chance (which would mostly credit pretraining).
"""

from __future__ import annotations

import json
import time

from tuneforge.checkpoint import latest_checkpoint, load_weights_and_strategies, write_atomic
from tuneforge.tasks import grouped_by_task  # noqa: F401  (public here before it moved)


def continual_metrics(matrix: list[list[float]], baseline: list[float]) -> dict[str, float]:
    """ACC, BWT and FWT of a T x T result matrix (higher is better) and the pre-training baseline."""
    tasks = len(matrix)
    final = matrix[-1]
    result = {"acc": sum(final) / tasks}
    if tasks > 1:
        result["bwt"] = sum(final[j] - matrix[j][j] for j in range(tasks - 1)) / (tasks - 1)
        result["fwt"] = sum(matrix[j - 1][j] - baseline[j] for j in range(1, tasks)) / (tasks - 1)
    return result


def task_score(metrics: dict) -> float:
    """The higher-is-better number R holds for a task: accuracy, else the negative eval loss."""
    return metrics["accuracy"] if "accuracy" in metrics else -metrics["loss"]


def train_sequence(session, before: dict, resume: bool) -> tuple:
    """Train every task in order; after each, evaluate all tasks.

    Returns (state, wall seconds, extra results).

    Progress is kept in `continual.json`; each task checkpoints under `checkpoints/<task>/`, so a resumed
    run skips finished tasks (restoring the weights and strategy state they ended with) and resumes the
    current one exactly.
    """
    from tuneforge.tasks import training_plan
    from tuneforge.train import LoopState, fit

    config, accelerator, ctx = session.config, session.accelerator, session.ctx
    progress_path = session.run_dir / "continual.json"
    tasks = session.data.tasks
    baseline = [task_score(before["tasks"][t.name]) for t in tasks]
    progress = (json.loads(progress_path.read_text()) if resume and progress_path.is_file()
                else {"rows": [], "evals": []})
    total = LoopState()
    started = time.perf_counter()
    for index, task in enumerate(tasks):
        checkpoints = session.run_dir / "checkpoints" / task.name
        if index < len(progress["rows"]):  # finished before the interruption
            if index == len(progress["rows"]) - 1:
                load_weights_and_strategies(latest_checkpoint(checkpoints), session.model, session.strategies)
            continue
        ctx.current_task = task.name
        items = task.train_items
        for strategy in session.strategies:
            items = strategy.task_items(items, ctx)
        # the mixture path's plan (packing included); replayed items keep their own task per micro-batch
        items, plan = training_plan(items, config.train, config.schedule, config.train.seed + index)
        accelerator.print(f"tuneforge: task {index + 1}/{len(tasks)}: {task.name} ({len(items)} items)")
        resuming = resume and latest_checkpoint(checkpoints) is not None
        state = fit(session.model, session.strategies, ctx, items, plan, config.train, accelerator,
                    session.run_dir, session.tokenizer.pad_token_id, session.periodic_eval, resume=resuming,
                    checkpoints=checkpoints, log_extra={"task": task.name}, trackers=session.trackers)
        model = accelerator.unwrap_model(session.model)
        for strategy in session.strategies:
            strategy.on_task_end(model, task.name, ctx)
        if session.strategies:  # on_task_end changed strategy state (EWC Fisher, replay buffer): keep it
            from tuneforge.checkpoint import save_strategy_state

            if accelerator.is_main_process:  # one writer; the others wait so none reads it half written
                save_strategy_state(latest_checkpoint(checkpoints), session.strategies)
            accelerator.wait_for_everyone()
        evaluation = session.evaluate(model, samples=False)
        progress["rows"].append([task_score(evaluation["tasks"][t.name]) for t in tasks])
        progress["evals"].append(evaluation["tasks"])
        if accelerator.is_main_process:
            write_atomic(progress_path, json.dumps(progress, indent=1))
        total.step += state.step
        total.tokens += state.tokens
        total.elapsed += state.elapsed
    session.model = accelerator.unwrap_model(session.model)
    metrics = continual_metrics(progress["rows"], baseline)
    extra = {"continual": {"tasks": [t.name for t in tasks], "matrix": progress["rows"], "baseline": baseline,
                           "metric": _metric_name(tasks),
                           **metrics}}
    return total, time.perf_counter() - started, extra


def _metric_name(tasks) -> str:
    kinds = {t.task_type for t in tasks}
    if kinds == {"classification"}:
        return "accuracy"
    if kinds == {"causal_lm"}:
        return "negative eval loss"
    return "accuracy (classification) or negative eval loss"
