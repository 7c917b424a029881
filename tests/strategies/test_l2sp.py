"""L2-SP (Li, Grandvalet & Davoine 2018): pretrained weights toward their start, new parameters toward 0."""

from __future__ import annotations

import pytest
import torch
from conftest import colour_sequence_tasks, tiny_llama

import tuneforge
from tuneforge.losses import l2sp_penalty
from tuneforge.strategies import StrategyContext

ALPHA, BETA = 0.3, 5.0


def test_penalty_pulls_base_weights_to_the_start_and_new_ones_to_zero():
    anchors = {"w": torch.tensor([1.0, -2.0])}
    params = {"w": torch.tensor([1.5, -2.0]), "head": torch.tensor([3.0, 4.0])}
    assert l2sp_penalty({"w": anchors["w"].clone(), "head": params["head"]}, anchors, ALPHA).item() == 0.0
    at_anchor = {"w": anchors["w"].clone(), "head": params["head"]}  # zero for w; head toward 0, beta = alpha
    assert l2sp_penalty(at_anchor, anchors, ALPHA, ["head"]).item() == pytest.approx(ALPHA / 2 * 25)
    assert l2sp_penalty(params, anchors, ALPHA, ["head"], BETA).item() \
        == pytest.approx(ALPHA / 2 * 0.25 + BETA / 2 * 25)
    head = params["head"].clone().requires_grad_(True)
    l2sp_penalty({"w": anchors["w"], "head": head}, anchors, ALPHA, ["head"], BETA).backward()
    torch.testing.assert_close(head.grad, BETA * torch.tensor([3.0, 4.0]))  # toward zero, not toward its init


def penalty(model) -> float:
    strategy = next(s for s in model.tuneforge_strategies if s.name == "l2sp")
    return strategy.loss(model, {}, None, StrategyContext())["l2sp"].item()


def squared_norm(tensors) -> float:
    return sum(t.detach().double().pow(2).sum().item() for t in tensors)


def test_lora_is_new_its_penalty_is_its_norm_not_its_distance_to_init():
    model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 2}},
                                             {"l2sp": {"weight": ALPHA, "new_weight": BETA}}])
    strategy = model.tuneforge_strategies[-1]
    strategy.on_train_start(model, StrategyContext())
    lora = {name: p for name, p in model.named_parameters() if ".lora_" in name}
    assert strategy.anchors == {} and set(strategy.new_names) == set(lora)
    # at the start LoRA A is its random init and B is zero: the penalty is beta/2 ||A||^2, not 0
    assert penalty(model) == pytest.approx(BETA / 2 * squared_norm(lora.values()), rel=1e-5)
    assert penalty(model) > 0


def test_classification_head_is_new_and_the_body_is_anchored(tiny_model_dir):
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)  # a causal-LM folder loaded as a classifier: the head is new, the body pretrained
    base = AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3)
    model = tuneforge.prepare(base, [{"full": {}}, {"l2sp": {"weight": ALPHA, "new_weight": BETA}}])
    strategy = model.tuneforge_strategies[-1]
    strategy.on_train_start(model, StrategyContext())
    assert strategy.new_names == ["score.weight"] and "score.weight" not in strategy.anchors
    head = model.score.weight
    assert penalty(model) == pytest.approx(BETA / 2 * squared_norm([head]), rel=1e-5)  # body at its anchor: 0
    body = model.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        body.add_(0.1)
    expected = ALPHA / 2 * 0.01 * body.numel() + BETA / 2 * squared_norm([head])
    assert penalty(model) == pytest.approx(expected, rel=1e-5)


def test_new_weight_defaults_to_weight():
    model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 2}}, {"l2sp": {"weight": ALPHA}}])
    model.tuneforge_strategies[-1].on_train_start(model, StrategyContext())
    lora = [p for name, p in model.named_parameters() if ".lora_" in name]
    assert penalty(model) == pytest.approx(ALPHA / 2 * squared_norm(lora), rel=1e-5)


def sequence_config(tmp_path, model_dir, strategies, name):


    from tuneforge.config import validate_config

    tasks = colour_sequence_tasks(tmp_path)
    return validate_config({
        "model": str(model_dir), "retain": None, "tasks": tasks, "schedule": {"mode": "sequence"},
        "strategies": strategies, "evaluation": {"samples": 0}, "output": str(tmp_path / name),
        "train": {"max_steps": 8, "batch_size": 4, "lr": 1e-2, "max_seq_len": 32, "save_every": 4},
    })


def register_crash():
    from tuneforge.strategies import REGISTRY, Options, Strategy, register

    if "l2sp_test_crash" in REGISTRY:
        return

    class CrashOptions(Options):
        task: str
        step: int

    @register("l2sp_test_crash", CrashOptions)
    class Crash(Strategy):
        """Test helper: raise inside a chosen task at a chosen step."""

        family = "objective"

        def needs_logits(self):
            return False  # the same (chunked) loss path as the uninterrupted run

        def loss(self, model, batch, outputs, ctx):
            if ctx.current_task == self.options.task and ctx.step == self.options.step:
                raise KeyboardInterrupt
            return {}


def test_sequence_resumed_in_a_later_task_keeps_the_first_tasks_anchors(tmp_path, tiny_model_dir):
    # A resumed process restores the weights after t0 before t1 starts: the anchors must come from the
    # checkpoint, not from those weights.
    from safetensors.torch import load_file

    from tuneforge.checkpoint import latest_checkpoint
    from tuneforge.run import train_run

    register_crash()
    strategies = [{"full": {}}, {"l2sp": {"weight": 10.0}}]
    train_run(sequence_config(tmp_path, tiny_model_dir, strategies, "a"))
    with pytest.raises(KeyboardInterrupt):
        crash = {"l2sp_test_crash": {"task": "t1", "step": 6}}
        train_run(sequence_config(tmp_path, tiny_model_dir, strategies + [crash], "b"))
    no_crash = {"l2sp_test_crash": {"task": "-", "step": 0}}
    train_run(sequence_config(tmp_path, tiny_model_dir, strategies + [no_crash], "b"), resume=True)
    wa = load_file(str(latest_checkpoint(tmp_path / "a" / "checkpoints" / "t1") / "weights.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "b" / "checkpoints" / "t1") / "weights.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_trained_classification_head_is_anchored_not_new(tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    AutoModelForSequenceClassification.from_pretrained(tiny_model_dir, num_labels=3).save_pretrained(tmp_path)
    model = tuneforge.prepare(AutoModelForSequenceClassification.from_pretrained(tmp_path),
                              [{"full": {}}, {"l2sp": {"weight": ALPHA}}])
    strategy = model.tuneforge_strategies[-1]
    strategy.on_train_start(model, StrategyContext())
    assert strategy.new_names == [] and "score.weight" in strategy.anchors

