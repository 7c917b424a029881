"""Pure loss math for the objectives: distillation, retention, L2-SP, EWC, the Fisher diagonal,
and the summed next-token cross-entropy (`token_losses`) that evaluation and EWC share.

No wiring here: strategies (`tuneforge/strategies/{distill,retention,l2sp,ewc}.py`) decide what to feed
these functions and when. Every function works on plain tensors, so each is tested against a closed form.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from tuneforge.data.encode import IGNORE_INDEX


def _masked_mean(values: Tensor, mask: Tensor | None) -> Tensor:
    """Mean of `values` (any shape) over the positions where `mask` is true (all positions without one)."""
    if mask is None:
        return values.mean()
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def kd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    temperature: float = 1.0,
    kind: Literal["forward", "reverse"] = "forward",
    mask: Tensor | None = None,
) -> Tensor:
    """Knowledge-distillation loss on softened distributions (Hinton, Vinyals & Dean 2015, arXiv:1503.02531).

        p_t = softmax(z_t / T),  p_s = softmax(z_s / T)
        forward:  T^2 * KL(p_t || p_s) = T^2 * sum_v p_t (log p_t - log p_s)    (mean-seeking, classic KD)
        reverse:  T^2 * KL(p_s || p_t) = T^2 * sum_v p_s (log p_s - log p_t)    (mode-seeking, MiniLLM,
                                                                                 Gu et al. 2023)

    The T^2 factor keeps the gradient scale independent of T (Hinton et al., Sec. 2). Averaged over the
    positions where `mask` is true.

    student_logits, teacher_logits: (..., V); mask: (...) bool or None. Returns a scalar; 0 when the
    logits are equal (up to a constant shift per position).
    """
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(f"kd_loss: student logits {tuple(student_logits.shape)} and teacher logits "
                         f"{tuple(teacher_logits.shape)} differ in shape")
    log_p_student = F.log_softmax(student_logits.float() / temperature, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward":
        per_position = (log_p_teacher.exp() * (log_p_teacher - log_p_student)).sum(-1)  # (...)
    elif kind == "reverse":
        per_position = (log_p_student.exp() * (log_p_student - log_p_teacher)).sum(-1)
    else:
        raise ValueError(f"kd_loss: kind must be 'forward' or 'reverse', got {kind!r}")
    return temperature**2 * _masked_mean(per_position, mask)


def retention_kl(current_logits: Tensor, reference_logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Knowledge-retention loss: KL(p_ref || p_cur) per position, averaged over `mask`.

    The frozen original model's next-token distribution on retain text is the target, as in Learning
    without Forgetting (Li & Hoiem 2016, arXiv:1606.09282), where the old model's responses on new data
    are kept; here they are kept on data of the old domain. Equal to `kd_loss` at T = 1, forward KL.
    """
    return kd_loss(current_logits, reference_logits, temperature=1.0, kind="forward", mask=mask)


def hidden_cosine_loss(student_hidden: Tensor, teacher_hidden: Tensor, mask: Tensor | None = None) -> Tensor:
    """1 - cos(h_s, h_t), averaged over positions: aligns the directions of hidden states (DistilBERT's
    cosine embedding loss, Sanh et al. 2019, arXiv:1910.01108).

    student_hidden, teacher_hidden: (..., H); mask: (...) bool or None.
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(f"hidden_cosine_loss: student hidden {tuple(student_hidden.shape)} and teacher "
                         f"hidden {tuple(teacher_hidden.shape)} differ in shape")
    cosine = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1)  # (...)
    return _masked_mean(1.0 - cosine, mask)


def l2sp_penalty(
    params: Mapping[str, Tensor],
    anchors: Mapping[str, Tensor],
    weight: float,
    new: Iterable[str] = (),
    new_weight: float | None = None,
) -> Tensor:
    """L2-SP: pull weights toward the starting point (Li, Grandvalet & Davoine 2018, arXiv:1802.01483).

        Omega(w) = alpha / 2 * ||w_S - w0_S||^2 + beta / 2 * ||w_new||^2

    w_S: the parameters named in `anchors`, which the source (pretrained) model had, pulled toward their
    starting values w0_S with alpha = `weight`; w_new: the parameters named in `new`, which it did not have
    (classification heads, LoRA, adapters), pulled toward zero with beta = `new_weight` (None: `weight`).
    """
    new = sorted(new)  # a fixed order: the same float sum however the names were gathered (resume)
    to_start = _zero_like(params, anchors or dict.fromkeys(new))
    for name in sorted(anchors):
        to_start = to_start + (params[name] - anchors[name]).pow(2).sum()
    total = 0.5 * weight * to_start
    if new:
        to_zero = sum(params[name].pow(2).sum() for name in new)
        total = total + 0.5 * (weight if new_weight is None else new_weight) * to_zero
    return total


def ewc_penalty(
    params: Mapping[str, Tensor], anchors: Mapping[str, Tensor], fisher: Mapping[str, Tensor], weight: float
) -> Tensor:
    """Elastic weight consolidation (Kirkpatrick et al. 2017, PNAS, arXiv:1612.00796), Eq. 3:

        Omega(theta) = weight / 2 * sum_i F_i (theta_i - theta*_i)^2

    a diagonal Laplace approximation of the posterior of the old task(s) around theta*, with F the
    Fisher information diagonal (see `fisher_diagonal`). Over the parameters named in `anchors`.
    """
    total = _zero_like(params, anchors)
    for name in sorted(anchors):
        total = total + (fisher[name] * (params[name] - anchors[name]).pow(2)).sum()
    return 0.5 * weight * total


def fisher_diagonal(
    params: Mapping[str, Tensor], batches: Iterable[Any], loss_fn: Callable[[Any], Tensor]
) -> dict[str, Tensor]:
    """Diagonal Fisher estimate from per-batch gradients: F_i = mean over batches of (d loss_b / d theta_i)^2.

    Which Fisher this is depends on `loss_fn`:
    - the negative log-likelihood of the *observed* labels gives the **empirical Fisher**
      E_(x,y)~data [g g^T] (what EWC implementations for language models use: the retain text's own
      next tokens are real data);
    - the NLL of labels *sampled from the model* (`sampled_label_nll`) gives a Monte-Carlo estimate of
      the **true Fisher** E_x E_(y~p_theta) [g g^T] of Kirkpatrick et al.
    With one example per batch, this is the per-example Fisher; larger batches estimate the Fisher of
    the batch-mean loss instead (about F / B), so EWC feeds single sequences.

    Gradients come from `torch.autograd.grad`, so no `.grad` field is touched.
    Returns fp32 tensors shaped like `params`, on their devices.
    """
    names = [name for name, p in params.items() if p.requires_grad]
    tensors = [params[name] for name in names]
    fisher = {name: torch.zeros_like(params[name], dtype=torch.float32) for name in names}
    count = 0
    for batch in batches:
        loss = loss_fn(batch)
        count += 1
        if not loss.requires_grad:  # no parameter reaches this loss (task heads on retain text): F = 0 there
            continue
        grads = torch.autograd.grad(loss, tensors, allow_unused=True)
        for name, grad in zip(names, grads, strict=True):
            if grad is not None:
                fisher[name].add_(grad.detach().float().pow(2))
    if count == 0:
        raise ValueError("fisher_diagonal: no batches given")
    return {name: value / count for name, value in fisher.items()}


def sampled_label_nll(logits: Tensor, mask: Tensor | None = None) -> Tensor:
    """Summed NLL of labels drawn from the model's own predictive distribution (for the true Fisher).

    logits: (..., V); mask: (...) bool. The labels are sampled without gradient; the gradient flows
    through log p(y_sampled) only.
    """
    log_probs = F.log_softmax(logits.float(), dim=-1)
    with torch.no_grad():
        sampled = torch.distributions.Categorical(logits=log_probs).sample()  # (...)
    nll = -log_probs.gather(-1, sampled.unsqueeze(-1)).squeeze(-1)
    return nll.sum() if mask is None else (nll * mask.to(nll.dtype)).sum()


def _zero_like(params: Mapping[str, Tensor], anchors: Mapping[str, Tensor]) -> Tensor:
    first = next(iter(anchors), None)
    device = params[first].device if first is not None else None
    return torch.zeros((), device=device)


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
