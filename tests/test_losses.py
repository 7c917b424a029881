"""The objectives' math against closed forms: KD, retention KL, hidden cosine, L2-SP, EWC, the Fisher."""

from __future__ import annotations

import math

import pytest
import torch

from tuneforge.losses import (
    ewc_penalty,
    fisher_diagonal,
    hidden_cosine_loss,
    kd_loss,
    l2sp_penalty,
    retention_kl,
    sampled_label_nll,
)


@pytest.mark.parametrize("kind", ["forward", "reverse"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 5.0])
def test_kd_loss_is_zero_when_teacher_equals_student(kind, temperature):
    logits = torch.randn(3, 7, 50, generator=torch.Generator().manual_seed(0))
    mask = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) > 0.3
    assert kd_loss(logits, logits.clone(), temperature, kind, mask).item() == pytest.approx(0.0, abs=1e-6)
    # A constant shift per position leaves the softmax, hence the loss, unchanged.
    assert kd_loss(logits, logits + 3.0, temperature, kind).item() == pytest.approx(0.0, abs=1e-5)


def test_kd_loss_matches_a_hand_computed_kl_with_the_t_squared_factor():
    student, teacher = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    temperature = 2.0
    p_s = [math.exp(z / temperature) for z in (1.0, 0.0, -1.0)]
    p_t = [math.exp(z / temperature) for z in (0.0, 2.0, 0.0)]
    p_s = [p / sum(p_s) for p in p_s]
    p_t = [p / sum(p_t) for p in p_t]
    forward = sum(t * math.log(t / s) for s, t in zip(p_s, p_t, strict=True))
    reverse = sum(s * math.log(s / t) for s, t in zip(p_s, p_t, strict=True))
    assert kd_loss(student, teacher, temperature, "forward").item() == pytest.approx(4 * forward, rel=1e-5)
    assert kd_loss(student, teacher, temperature, "reverse").item() == pytest.approx(4 * reverse, rel=1e-5)
    assert forward != pytest.approx(reverse, rel=1e-3)  # the two directions really differ


def test_kd_loss_averages_over_masked_positions_only():
    teacher = torch.zeros(1, 3, 4)
    student = torch.zeros(1, 3, 4)
    student[0, 2] = torch.tensor([5.0, 0.0, 0.0, 0.0])  # only position 2 disagrees
    unmasked = kd_loss(student, teacher, 1.0, mask=torch.tensor([[True, True, False]]))
    assert unmasked.item() == pytest.approx(0.0, abs=1e-7)
    one = kd_loss(student[:, 2:], teacher[:, 2:], 1.0)
    assert kd_loss(student, teacher, 1.0, mask=torch.tensor([[False, True, True]])).item() == pytest.approx(
        one.item() / 2, rel=1e-6)


def test_kd_loss_gradient_moves_the_student_toward_the_teacher():
    teacher = torch.randn(4, 10, generator=torch.Generator().manual_seed(2))
    student = torch.zeros(4, 10, requires_grad=True)
    optimizer = torch.optim.SGD([student], lr=10.0)
    first = kd_loss(student, teacher, 2.0).item()
    for _ in range(40):
        optimizer.zero_grad()
        kd_loss(student, teacher, 2.0).backward()
        optimizer.step()
    assert kd_loss(student, teacher, 2.0).item() < 0.01 * first


def test_retention_kl_is_forward_kl_at_temperature_one():
    current, reference = torch.randn(2, 5, 9), torch.randn(2, 5, 9)
    assert retention_kl(current, reference).item() == pytest.approx(kd_loss(current, reference, 1.0).item())
    assert retention_kl(reference, reference).item() == pytest.approx(0.0, abs=1e-6)


def test_hidden_cosine_loss_is_one_minus_cosine():
    a = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    b = torch.tensor([[[3.0, 0.0], [0.0, 1.0]]])  # same direction, then 45 degrees apart
    assert hidden_cosine_loss(a, b).item() == pytest.approx((0.0 + (1 - math.sqrt(0.5))) / 2, rel=1e-6)
    assert hidden_cosine_loss(a, 2 * a).item() == pytest.approx(0.0, abs=1e-6)


def _params_and_anchors():
    anchors = {"w": torch.tensor([[1.0, -2.0], [0.5, 0.0]]), "b": torch.tensor([3.0])}
    params = {"w": torch.tensor([[1.5, -2.0], [0.0, 1.0]]), "b": torch.tensor([1.0])}
    return params, anchors


def test_l2sp_is_zero_at_the_anchor_and_matches_a_hand_computation():
    params, anchors = _params_and_anchors()
    assert l2sp_penalty({k: v.clone() for k, v in anchors.items()}, anchors, 10.0).item() == 0.0
    # ||dw||^2 = 0.25 + 0 + 0.25 + 1 = 1.5; ||db||^2 = 4 -> 0.1 / 2 * 5.5
    assert l2sp_penalty(params, anchors, 0.1).item() == pytest.approx(0.275)


def test_ewc_is_zero_at_the_anchor_and_matches_a_hand_computation():
    params, anchors = _params_and_anchors()
    fisher = {"w": torch.tensor([[2.0, 7.0], [4.0, 0.5]]), "b": torch.tensor([0.25])}
    assert ewc_penalty({k: v.clone() for k, v in anchors.items()}, anchors, fisher, 100.0).item() == 0.0
    # sum F d^2 = 2*0.25 + 7*0 + 4*0.25 + 0.5*1 + 0.25*4 = 3.0 -> 3 / 2 * 3
    assert ewc_penalty(params, anchors, fisher, 3.0).item() == pytest.approx(4.5)


def test_penalty_gradients_are_weight_times_displacement():
    anchors = {"w": torch.tensor([1.0, 2.0])}
    theta = torch.tensor([2.0, 0.0], requires_grad=True)
    l2sp_penalty({"w": theta}, anchors, 3.0).backward()
    torch.testing.assert_close(theta.grad, 3.0 * torch.tensor([1.0, -2.0]))
    theta.grad = None
    ewc_penalty({"w": theta}, anchors, {"w": torch.tensor([0.5, 2.0])}, 3.0).backward()
    torch.testing.assert_close(theta.grad, 3.0 * torch.tensor([0.5 * 1.0, 2.0 * -2.0]))


def _softmax_regression(seed: int = 0, n: int = 12, d: int = 3, k: int = 4):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=generator)
    y = torch.randint(0, k, (n,), generator=generator)
    weight = (0.5 * torch.randn(k, d, generator=generator)).requires_grad_(True)
    return x, y, weight


def test_empirical_fisher_of_softmax_regression_matches_the_closed_form():
    # Linear softmax model p = softmax(W x): d(-log p_y)/dW_kj = (p_k - [k = y]) x_j, so the per-example
    # empirical Fisher diagonal is mean_i (p_ik - [k = y_i])^2 x_ij^2.
    x, y, weight = _softmax_regression()
    fisher = fisher_diagonal({"W": weight}, range(len(x)),
                             lambda i: torch.nn.functional.cross_entropy((x[i] @ weight.T)[None], y[i][None]))
    with torch.no_grad():
        residual = torch.softmax(x @ weight.T, -1) - torch.nn.functional.one_hot(y, weight.shape[0])  # (n, k)
        expected = (residual[:, :, None] ** 2 * x[:, None, :] ** 2).mean(0)  # (k, d)
    torch.testing.assert_close(fisher["W"], expected, rtol=1e-5, atol=1e-7)
    assert weight.grad is None  # no .grad field touched


def test_true_fisher_of_logistic_regression_matches_the_closed_form():
    # Logistic regression p = sigmoid(w x): the true Fisher diagonal is mean_i p_i (1 - p_i) x_ij^2.
    # As a 2-class softmax with logits (0, w x), labels sampled from the model give a Monte-Carlo estimate.
    torch.manual_seed(0)
    x = torch.tensor([[1.0, -2.0], [0.5, 1.0], [-1.5, 0.3], [2.0, 0.7]])
    w = torch.tensor([0.8, -0.4], requires_grad=True)
    repeats = 500

    def nll(i: int):
        row = x[i % len(x)]
        logits = torch.stack([torch.zeros(()), row @ w])[None]  # (1, 2)
        return sampled_label_nll(logits)

    fisher = fisher_diagonal({"w": w}, range(len(x) * repeats), nll)
    with torch.no_grad():
        p = torch.sigmoid(x @ w)
        expected = (p * (1 - p))[:, None].mul(x**2).mean(0)
    torch.testing.assert_close(fisher["w"], expected, rtol=0.12, atol=0.0)
