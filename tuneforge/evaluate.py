"""Evaluation: token-weighted loss and perplexity, classification accuracy, greedy samples, forgetting."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributed.tensor import DTensor

from tuneforge.data import IGNORE_INDEX, Example, collate
from tuneforge.forward import model_inputs, routes_tasks
from tuneforge.losses import token_losses

if TYPE_CHECKING:
    from tuneforge.config import RunConfig
    from tuneforge.tasks import RunData, TaskData


def batches(items: list[dict], batch_size: int, pad_token_id: int, device) -> list[dict]:
    """Fixed-order padded batches on `device`; items sorted by length so little compute goes to padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    out = []
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start:start + batch_size]], pad_token_id)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


# Config keys of models whose logits are not a plain linear map of the last hidden state (soft-capping,
# scaling): the label-positions-only loss below would be wrong for them, so they keep full logits.
_LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")
# Logits per chunk of the fused cross-entropy (64 MB in fp32), and at least CE_CHUNK_ROWS rows: a GEMM with
# few rows runs far below the matmul rate (SmolLM2's head on 2 CPU cores: 32 rows 35%, 128 rows 75%,
# 256 rows 88% of the 1024-row rate).
CE_CHUNK_ELEMENTS = 2**24
CE_CHUNK_ROWS = 256


def label_head(model: nn.Module) -> nn.Linear | None:
    """The output layer, when the loss may be taken from hidden states at labelled positions only.

    None for models without a plain linear head (classification, encoders) or whose logits are
    transformed after it (`_LOGIT_TRANSFORMS`).
    """
    get_head = getattr(model, "get_output_embeddings", None)
    head = get_head() if callable(get_head) else None
    config = getattr(model, "config", None)
    if not isinstance(head, nn.Linear) or config is None:
        return None
    if is_sharded(head.weight):  # whole only inside the model's own forward (FSDP2, ZeRO-3)
        return None
    if any(getattr(config, key, None) not in (None, 1, 1.0) for key in _LOGIT_TRANSFORMS):
        return None
    return head


def is_sharded(parameter: torch.Tensor) -> bool:
    """True for a parameter FSDP2 (a DTensor) or DeepSpeed ZeRO-3 (`ds_id`) holds in pieces."""
    return isinstance(parameter, DTensor) or hasattr(parameter, "ds_id")


@contextmanager
def head_skipped(head: nn.Linear) -> Iterator[list[torch.Tensor]]:
    """Inside the block, `head` projects nothing: its input (the final hidden states, (B, T, H)) is recorded
    in the yielded list and it is given zero positions, so the model returns logits of shape (B, 0, V)."""
    captured: list[torch.Tensor] = []

    def record_and_skip(module: nn.Module, args: tuple):
        captured.append(args[0])
        return (args[0][..., :0, :], *args[1:])

    handle = head.register_forward_pre_hook(record_and_skip)
    try:
        yield captured
    finally:
        handle.remove()


def hidden_token_losses(hidden: torch.Tensor, labels: torch.Tensor,
                        head: nn.Linear) -> tuple[torch.Tensor, int]:
    """`token_losses(head(hidden), labels)` without the head at positions that carry no loss.

    hidden: (B, T', H) final hidden states; when T' > T (a soft prompt was prepended) the last T align with
    labels (B, T). The labelled positions are gathered first, (N, H), and `linear_cross_entropy` never
    holds more than one chunk of their (N, V) logits.
    """
    targets = labels[:, 1:]
    labelled = targets != IGNORE_INDEX  # (B, T - 1)
    selected = hidden[:, hidden.shape[1] - labels.shape[1]:-1][labelled]  # (N, H)
    total = linear_cross_entropy(selected, head.weight, head.bias, targets[labelled])
    return total, int(labelled.sum())


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """sum_i CE(softmax(W h_i + b), y_i) over hidden's rows (N, H), W: (V, H); chunked, see `_LinearCE`."""
    chunk = max(CE_CHUNK_ROWS, CE_CHUNK_ELEMENTS // weight.shape[0])
    return _LinearCrossEntropy.apply(hidden, weight, bias, targets, chunk, torch.is_grad_enabled())


class _LinearCrossEntropy(torch.autograd.Function):
    """Fused linear layer + summed cross-entropy, `chunk` rows at a time (as in "Cut Your Losses in
    Large-Vocabulary Language Models", Wijmans et al. 2024, arXiv:2411.09009, and Liger Kernel's fused
    linear cross-entropy, Hsu et al. 2024, arXiv:2410.10989).

    The gradient of a summed CE with respect to the logits is softmax - onehot, known as soon as a chunk's
    logits are: so forward turns each chunk into its share of dL/dh (rows) and dL/dW, dL/db (sums) right
    away and drops the chunk. No (N, V) tensor ever exists; backward only scales by the incoming gradient.
    Under autocast the matrix products run in the autocast dtype, the softmax in fp32.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk, grad_enabled):
        device = hidden.device.type
        dtype = torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype
        need_hidden, need_weight, need_bias = (grad_enabled and need for need in ctx.needs_input_grad[:3])
        with torch.autocast(device, enabled=False):
            w = weight.to(dtype)
            b = bias.to(dtype) if bias is not None else None
            grad_hidden = torch.empty_like(hidden) if need_hidden else None
            grad_weight = grad_bias = None  # fp32 sums over chunks
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for start in range(0, hidden.shape[0], chunk):
                h = hidden[start:start + chunk].to(dtype)  # (C, H)
                y = targets[start:start + chunk]
                logits = F.linear(h, w, b).float()  # (C, V)
                target_logits = logits.gather(1, y[:, None]).squeeze(1)  # (C,)
                peak = logits.amax(dim=-1, keepdim=True)  # (C, 1)
                exp = logits.sub_(peak).exp_()  # in place: one (C, V) buffer per chunk
                norm = exp.sum(dim=-1)  # (C,)
                # log-sum-exp minus target logit
                total += (norm.log() + peak.squeeze(1) - target_logits).sum()
                if not (need_hidden or need_weight or need_bias):
                    continue
                grad_logits = exp.mul_(norm.reciprocal()[:, None])  # softmax
                grad_logits[torch.arange(len(y), device=y.device), y] -= 1.0
                grad_logits = grad_logits.to(dtype)
                if need_hidden:
                    grad_hidden[start:start + chunk] = grad_logits @ w
                if need_weight:
                    part = (grad_logits.t() @ h).float()  # (V, H)
                    grad_weight = part if grad_weight is None else grad_weight.add_(part)
                if need_bias:
                    part = grad_logits.sum(0).float()  # (V,)
                    grad_bias = part if grad_bias is None else grad_bias.add_(part)
        ctx.grads = (grad_hidden, grad_weight, grad_bias)
        ctx.dtypes = (weight.dtype, bias.dtype if bias is not None else None)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_hidden, grad_weight, grad_bias = ctx.grads
        ctx.grads = None
        if grad_hidden is not None:
            grad_hidden = grad_hidden.mul_(grad_total.to(grad_hidden.dtype))
        if grad_weight is not None:  # None too when there were no rows: autograd then adds nothing
            grad_weight = grad_weight.mul_(grad_total).to(ctx.dtypes[0])
        if grad_bias is not None:
            grad_bias = grad_bias.mul_(grad_total).to(ctx.dtypes[1])
        return grad_hidden, grad_weight, grad_bias, None, None, None


@torch.no_grad()
def evaluate_lm(model: nn.Module, items: list[dict], batch_size: int, pad_token_id: int, device) -> dict:
    """Mean loss per labelled token and its perplexity."""
    if not items:
        return {}
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    head = label_head(model)  # no full logits needed: the head runs on labelled positions only
    for batch in batches(items, batch_size, pad_token_id, device):
        inputs = model_inputs(batch, routes_tasks(model))
        if head is None:
            total, n = token_losses(model(**inputs).logits, batch["labels"])
        else:
            with head_skipped(head) as hidden:
                logits = model(**inputs).logits
            total, n = hidden_token_losses(hidden[-1], batch["labels"], head) if hidden else \
                token_losses(logits, batch["labels"])  # a model that never called its head
        loss_sum += total.item()
        count += n
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def evaluate_classification(model: nn.Module, items: list[dict], batch_size: int, pad_token_id: int,
                            device) -> dict:
    """Mean cross-entropy and accuracy of a sequence-classification model."""
    if not items:
        return {}
    was_training = model.training
    model.eval()
    loss_sum, correct = 0.0, 0
    for batch in batches(items, batch_size, pad_token_id, device):
        logits = model(**model_inputs(batch, routes_tasks(model))).logits
        loss_sum += F.cross_entropy(logits.float(), batch["labels"], reduction="sum").item()
        correct += int((logits.argmax(-1) == batch["labels"]).sum())
    model.train(was_training)
    return {"loss": loss_sum / len(items), "accuracy": correct / len(items), "examples": len(items)}


def prompt_text(example: Example, tokenizer) -> tuple[str, str]:
    """The text a model is asked to continue, and the reference continuation."""
    if example.kind == "chat":
        messages = example.messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        prompt = tokenizer.apply_chat_template(messages[:last], tokenize=False, add_generation_prompt=True)
        return prompt, messages[last]["content"]
    return example.prompt or example.text or "", example.completion or ""


@torch.no_grad()
def generate_samples(
    model: nn.Module, tokenizer, examples: list[Example], max_new_tokens: int, device
) -> list[dict[str, str]]:
    """Greedy generations for a few examples: prompt, reference and the model's output."""
    was_training = model.training
    model.eval()
    samples = []
    for example in examples:
        prompt, reference = prompt_text(example, tokenizer)
        encoded = tokenizer(prompt, return_tensors="pt", add_special_tokens=example.kind != "chat").to(device)
        output = model.generate(
            **encoded, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
        )
        text = tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True)
        samples.append({"prompt": _user_part(example), "reference": reference, "output": text.strip()})
    model.train(was_training)
    return samples


def _user_part(example: Example) -> str:
    if example.kind == "chat":
        users = [m["content"] for m in example.messages if m["role"] == "user"]
        return users[-1] if users else ""
    return example.prompt or example.text or ""


def forgetting(before: dict, after: dict) -> dict:
    """Retain-set change: after minus before, for every metric both have (positive loss = forgot)."""
    return {key: after[key] - before[key] for key in ("loss", "perplexity", "accuracy")
            if key in before and key in after}


def evaluate_task(model: nn.Module, task: TaskData, batch_size: int, pad: int, device) -> dict:
    """A task's eval metrics: accuracy for classification, loss and perplexity for language modelling."""
    if task.task_type == "classification":
        return evaluate_classification(model, task.eval_items, batch_size, pad, device)
    return evaluate_lm(model, task.eval_items, batch_size, pad, device)


def evaluate_all(model: nn.Module, tokenizer, run_data: RunData, config: RunConfig, device,
                 samples: bool = True, benchmarks: bool = False) -> dict:
    """Per-task metrics on the eval sets (`eval` is their mean), retain metrics, a few greedy samples, and
    with `benchmarks` the configured lm-eval benchmarks (`tuneforge.benchmarks`)."""
    batch_size = config.evaluation.batch_size or config.train.batch_size
    pad = tokenizer.pad_token_id
    per_task = {task.name: evaluate_task(model, task, batch_size, pad, device) for task in run_data.tasks}
    result = {"eval": mean_metrics(list(per_task.values()))}
    if run_data.multi_task:
        result["tasks"] = per_task
    if run_data.retain_items:
        result["retain"] = evaluate_lm(model, run_data.retain_items, batch_size, pad, device)
    if benchmarks and config.evaluation.benchmarks:
        from tuneforge.benchmarks import run_benchmarks

        if run_data.task_type != "causal_lm":
            from tuneforge.config import config_location
            from tuneforge.errors import ConfigError

            where = config_location(config, "evaluation.benchmarks")
            raise ConfigError(f"{where}: lm-eval benchmarks score a language model's next tokens; this run "
                              "trains a classifier")

        result["benchmarks"] = run_benchmarks(model, tokenizer, config, batch_size)
    lm_task = next((t for t in run_data.tasks if t.task_type == "causal_lm"), None)
    if samples and config.evaluation.samples and lm_task is not None:
        chosen = lm_task.eval_examples[:config.evaluation.samples]
        result["samples"] = generate_samples(model, tokenizer, chosen, config.evaluation.max_new_tokens,
                                             device)
    return result


def mean_metrics(results: list[dict]) -> dict:
    """Metric-wise mean over tasks, for the metrics every task has."""
    if len(results) == 1:
        return results[0]
    shared = set.intersection(*(set(r) for r in results)) if results else set()
    return {key: sum(r[key] for r in results) / len(results) for key in sorted(shared)}
