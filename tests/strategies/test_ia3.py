"""Tests of the ia3 strategy."""

from __future__ import annotations

import pytest
from conftest import tiny_llama

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.strategies.ia3 import ia3_modules


def trainable_count(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def test_ia3_defaults_and_parameter_count():
    model = tuneforge.prepare(tiny_llama(), [{"ia3": {}}])
    wrapped = {name.split(".")[-1]: module.feedforward for name, module in ia3_modules(model)}
    assert wrapped == {"k_proj": False, "v_proj": False, "down_proj": True}
    assert trainable_count(model) == 4 * (16 + 16 + 64)  # d_out of k and v, d_in of down_proj, per layer


def test_ia3_feedforward_must_be_a_target():
    with pytest.raises(ModelError, match="feedforward_targets match .*down_proj.*list it in targets"):
        tuneforge.prepare(tiny_llama(), [{"ia3": {"targets": ["k_proj"], "feedforward_targets": ["down_proj"]}}])
