"""The loop end to end on a tiny model: learning, freezing, LR groups, exact resume, NaN stop, the run dir."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from tuneforge.checkpoint import latest_checkpoint, list_checkpoints
from tuneforge.errors import ConfigError, TrainingError
from tuneforge.run import train_run
from tuneforge.tasks import mixture_plan
from tuneforge.train import build_optimizer, build_scheduler


def final_weights(run_dir) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "weights.safetensors"))


def test_lora_run_learns_and_writes_the_run_directory(run_config):
    config = run_config(train={"max_steps": 30, "eval_every": 10, "lr": 3e-2})
    results = train_run(config)
    run_dir = config.output and __import__("pathlib").Path(config.output)
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"] - 0.5
    for name in ("config.yaml", "metrics.jsonl", "results.json", "report.md", "loss.png",
                 "evaluation_before.json"):
        assert (run_dir / name).is_file(), name
    assert ({p.name for p in (run_dir / "adapter").iterdir()}
            >= {"adapter_model.safetensors", "adapter_config.json"})
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if "split" not in r] == list(range(1, 31))
    assert any(r.get("split") == "eval" for r in records)
    assert results["trainable_params"] == results["trainable_by_strategy"]["lora"] > 0
    assert "| task loss |" in (run_dir / "report.md").read_text()


def test_layerwise_frozen_layers_stay_bit_identical(run_config, tiny_model_dir):
    config = run_config(strategies=[{"layerwise": {"train_layers": "top:2", "train_head": False}}])
    train_run(config)
    trained = final_weights(__import__("pathlib").Path(config.output))
    assert trained and all(name.startswith(("model.layers.2.", "model.layers.3.")) for name in trained)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    assert any(not torch.equal(trained[n], base[n]) for n in trained)
    from tuneforge.export import read_adapter

    _, saved = read_adapter(__import__("pathlib").Path(config.output) / "adapter")
    untouched = [n for n in base if n not in saved]
    assert "model.layers.0.self_attn.q_proj.weight" in untouched and "model.embed_tokens.weight" in untouched


def test_frozen_parameters_unchanged_through_real_steps():
    import tuneforge
    from tuneforge.strategies import StrategyContext

    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    tuneforge.prepare(model, [{"layerwise": {"train_layers": [3]}}])
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.1)
    for _ in range(3):
        model(torch.randint(0, 300, (2, 8)), labels=torch.randint(0, 300, (2, 8))).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("model.layers.3.") or n in ("model.norm.weight", "lm_head.weight")
                           for n in changed)
    assert StrategyContext().epoch == 0


def test_layerwise_lr_decay_groups():
    import tuneforge
    from tuneforge.config import TrainConfig
    from tuneforge.strategies import StrategyContext

    model = tuneforge.prepare(tiny_llama(), [{"layerwise": {"lr_decay": 0.5, "train_embeddings": True}}])
    strategies = model.tuneforge_strategies
    optimizer = build_optimizer(model, strategies, StrategyContext(), TrainConfig(lr=1.0))
    lr_of = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    params = dict(model.named_parameters())
    for layer in range(4):
        q_proj = params[f"model.layers.{layer}.self_attn.q_proj.weight"]
        assert lr_of[id(q_proj)] == pytest.approx(0.5 ** (3 - layer))
    assert lr_of[id(params["model.embed_tokens.weight"])] == pytest.approx(0.5**4)
    assert lr_of[id(params["lm_head.weight"])] == 1.0


def test_gradual_unfreezing_adds_one_layer_per_epoch():
    import tuneforge
    from tuneforge.compose import set_trainable
    from tuneforge.strategies import StrategyContext

    model = tuneforge.prepare(tiny_llama(), [{"layerwise": {"train_layers": "1-3", "unfreeze_every_epochs": 1,
                                                           "train_head": False}}])
    for epoch, expected in [(0, {3}), (1, {2, 3}), (2, {1, 2, 3}), (5, {1, 2, 3})]:
        names = set_trainable(model, model.tuneforge_strategies, StrategyContext(epoch=epoch))
        assert {int(n.split(".")[2]) for n in names} == expected


class Killed(Exception):
    pass


def register_crash_strategy():
    """An objective that "kills" the run when the loop reaches a given optimizer step."""
    from tuneforge.strategies import REGISTRY, Options, Strategy, register

    if "crash_at" in REGISTRY:
        return

    class CrashOptions(Options):
        step: int

    @register("crash_at", CrashOptions)
    class CrashAt(Strategy):
        """Test helper: raise at a chosen step."""

        family = "objective"

        def needs_logits(self):
            return False  # as the uninterrupted run: the same (chunked) loss path, bit for bit

        def loss(self, model, batch, outputs, ctx):
            if ctx.step == self.options.step:
                raise Killed
            return {}


def test_resume_continues_exactly(run_config, tmp_path):
    register_crash_strategy()
    lora = {"lora": {"rank": 4, "targets": "all-linear", "dropout": 0.1}}  # dropout: RNG must be restored
    train = {"max_steps": 8, "grad_accum": 2, "batch_size": 4, "schedule": "cosine", "warmup_steps": 2,
             "save_every": 3}
    train_run(run_config(strategies=[lora], train=train, output=str(tmp_path / "a")))

    killed = run_config(strategies=[lora, {"crash_at": {"step": 5}}], train=train, output=str(tmp_path / "b"))
    with pytest.raises(Killed):
        train_run(killed)  # dies inside step 6, after checkpoint 3 and two more logged steps
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "checkpoints")] == ["step-00000003"]
    train_run(run_config(strategies=[lora, {"crash_at": {"step": -1}}], train=train,
                         output=str(tmp_path / "b")), resume=True)

    a, b = final_weights(tmp_path / "a"), final_weights(tmp_path / "b")
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(b[name], a[name], atol=0, rtol=0)
    steps = [json.loads(x)["step"] for x in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
             if '"split"' not in x]
    assert steps == list(range(1, 9))  # records the killed run wrote after its checkpoint were dropped


def test_damaged_or_partial_checkpoints_are_never_used(run_config, tmp_path):
    config = run_config(train={"max_steps": 4, "save_every": 2, "keep_checkpoints": 3})
    train_run(config)
    root = __import__("pathlib").Path(config.output) / "checkpoints"
    assert [p.name for p in list_checkpoints(root)] == ["step-00000002", "step-00000004"]
    (root / "step-00000006.tmp").mkdir()  # a write killed before its rename
    with open(root / "step-00000004" / "weights.safetensors", "r+b") as handle:
        handle.seek(200)
        handle.write(b"\x00\x01garbage")
    assert latest_checkpoint(root).name == "step-00000002"


def test_nan_loss_stops_with_the_step(run_config):
    config = run_config(train={"lr": 1e30, "max_steps": 6, "max_grad_norm": None, "save_every": 1},
                        strategies=[{"full": {}}])
    with pytest.raises(TrainingError, match=r"loss became (nan|inf) at step \d+.*last good checkpoint"):
        train_run(config)


def test_existing_run_is_not_overwritten(run_config):
    config = run_config(train={"max_steps": 1})
    train_run(config)
    with pytest.raises(ConfigError, match="a run already exists"):
        train_run(config)
    train_run(config, overwrite=True)


def test_plan_shards_the_same_permutation():
    from tuneforge.config import ScheduleConfig

    plan = mixture_plan([10], 4, ScheduleConfig(), seed=0)
    single = [micro for step in plan(1, 0, 1) for micro in step]
    assert sorted(i for b in single for i in b) == list(range(10))
    assert plan(1, 0, 1) == plan(1, 0, 1) and plan(2, 0, 1) != plan(1, 0, 1)
    shards = [[m for s in mixture_plan([10], 2, ScheduleConfig(), 0)(1, rank, 2) for m in s]
              for rank in (0, 1)]
    assert len(shards[0]) == len(shards[1])
    assert sorted(i for shard in shards for b in shard for i in b) == list(range(10))


def test_warmup_then_linear_decay():
    from tuneforge.config import TrainConfig

    parameter = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.AdamW([parameter], lr=1.0)
    scheduler = build_scheduler(optimizer, TrainConfig(lr=1.0, warmup_steps=3, schedule="linear"), 13)
    rates = []
    for _ in range(13):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert rates[-1] == pytest.approx(0.1) and all(a >= b for a, b in itertools.pairwise(rates[3:]))


QUIET = {"samples": 0}


def test_task_weight_scales_the_loop_task_loss(run_config, tiny_model_dir):
    # Distillation's alpha reaches the loop through `Strategy.task_weight`. At weight 0 every gradient is
    # exactly 0, so Adam never moves: the final weights are bit-identical to the base.
    from tuneforge.strategies import Options, Strategy, register
    from tuneforge.strategies.distill import Distill, DistillOptions

    @register("task_off", Options)
    class TaskOff(Strategy):
        """Test helper: switch the task loss off."""

        family = "objective"

        def task_weight(self, ctx):
            return 0.0

    config = run_config(strategies=[{"full": {}}, "task_off"], evaluation=QUIET)
    train_run(config)
    base = load_file(str(tiny_model_dir / "model.safetensors"))
    for name, tensor in final_weights(Path(config.output)).items():
        torch.testing.assert_close(tensor, base[name], atol=0, rtol=0)
    assert Distill(DistillOptions(alpha=0.3)).task_weight(None) == 0.3
