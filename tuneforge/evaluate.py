"""Evaluation: token-weighted loss and perplexity, classification accuracy, greedy samples, forgetting."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.data import IGNORE_INDEX, Example, collate
from tuneforge.forward import model_inputs, routes_tasks


def batches(items: list[dict], batch_size: int, pad_token_id: int, device) -> list[dict]:
    """Fixed-order padded batches on `device`; items are sorted by length so little compute goes to padding."""
    order = sorted(range(len(items)), key=lambda i: len(items[i]["input_ids"]))
    out = []
    for start in range(0, len(order), batch_size):
        batch = collate([items[i] for i in order[start:start + batch_size]], pad_token_id)
        out.append({k: v.to(device) for k, v in batch.items()})
    return out


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Summed next-token cross-entropy over labelled positions, and how many there were.

    logits: (B, T, V); labels: (B, T) with IGNORE_INDEX where no loss is taken.
    """
    shift_logits = logits[:, :-1, :].float()
    shift_labels = labels[:, 1:]
    total = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX, reduction="sum",
    )
    return total, int((shift_labels != IGNORE_INDEX).sum())


@torch.no_grad()
def evaluate_lm(model: nn.Module, items: list[dict], batch_size: int, pad_token_id: int, device) -> dict:
    """Mean loss per labelled token and its perplexity."""
    if not items:
        return {}
    was_training = model.training
    model.eval()
    loss_sum, count = 0.0, 0
    for batch in batches(items, batch_size, pad_token_id, device):
        logits = model(**model_inputs(batch, routes_tasks(model))).logits
        total, n = token_losses(logits, batch["labels"])
        loss_sum += total.item()
        count += n
    model.train(was_training)
    loss = loss_sum / max(count, 1)
    return {"loss": loss, "perplexity": math.exp(min(loss, 50.0)), "tokens": count}


@torch.no_grad()
def evaluate_classification(model: nn.Module, items: list[dict], batch_size: int, pad_token_id: int, device) -> dict:
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
    return {key: after[key] - before[key] for key in ("loss", "perplexity", "accuracy") if key in before and key in after}
