"""`train.compile`: the transformer blocks through torch.compile while the loop trains.

- With the real inductor backend, LoRA training gives the eager run's losses and weights, state-dict keys
  are unchanged, padded batches of varying length recompile a bounded number of times, and a compiled run
  resumes from its checkpoint to the uninterrupted run's weights.
- Every strategy the compile accepts trains to the eager run's losses with no graph break and no graph per
  block, under dynamo's cheap `eager` backend (the same tracing and guards, no code generation); the
  strategies and engines it refuses are refused before any model loads, with the reason.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from conftest import make_tokenizer
from matrix_support import Case, build_assets, make_config
from safetensors.torch import load_file
from torch._dynamo.utils import counters

from tuneforge import compiling
from tuneforge.checkpoint import latest_checkpoint
from tuneforge.config import load_config
from tuneforge.errors import ConfigError
from tuneforge.run import train_run, validate_run
from tuneforge.surgery import transformer_layers


def losses(run_dir: Path) -> list[float]:
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "split" not in r]


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "weights.safetensors"))


@pytest.fixture
def compile_counters():
    """Dynamo's counters, from a clean compile cache (compiled code of earlier tests is not reused)."""
    torch._dynamo.reset()
    counters.clear()
    yield counters
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def one_block_dir(tmp_path_factory) -> Path:
    """A tiny Llama with one block: inductor compiles one graph (forward and backward) for it."""
    from conftest import tiny_llama

    tokenizer = make_tokenizer()
    directory = tmp_path_factory.mktemp("one-block")
    tiny_llama(vocab_size=len(tokenizer), layers=1).save_pretrained(directory, safe_serialization=True)
    tokenizer.save_pretrained(directory)
    return directory


def test_inductor_lora_matches_eager(run_config, one_block_dir, tmp_path, compile_counters):
    lora = [{"lora": {"rank": 4, "targets": "all-linear"}}]
    train = {"max_steps": 3, "packing": True, "max_seq_len": 48}  # packed rows: one length, one graph
    eager = run_config(lora, train=train, model=str(one_block_dir), output=str(tmp_path / "eager"))
    train_run(eager)
    compiled = run_config(lora, train={**train, "compile": True}, model=str(one_block_dir),
                          output=str(tmp_path / "compiled"))
    train_run(compiled)
    assert compile_counters["stats"]["unique_graphs"] == 1
    assert not compile_counters["graph_break"]
    # inductor fuses RMSNorm, SwiGLU, RoPE and LoRA's scaling into its own loops: float rounding differs
    torch.testing.assert_close(losses(tmp_path / "compiled"), losses(tmp_path / "eager"),
                               rtol=1e-5, atol=1e-5)
    reference, weights = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert weights.keys() == reference.keys()  # no `_orig_mod.` anywhere
    for name in reference:
        torch.testing.assert_close(weights[name], reference[name], rtol=1e-4, atol=1e-5)


def test_the_blocks_are_plain_again_after_the_loop():
    from conftest import tiny_llama

    model = tiny_llama(layers=2)
    keys = list(model.state_dict())
    with compiling.compiled_blocks(model, True, []):
        assert all(block._compiled_call_impl is not None for _, block in transformer_layers(model))
        assert model.config.use_cache is False  # a KV cache would specialise a graph per block
        assert list(model.state_dict()) == keys
    assert all(block._compiled_call_impl is None for _, block in transformer_layers(model))
    assert model.config.use_cache is True


# ---- every strategy, under dynamo's `eager` backend: the same tracing, guards and graphs, no codegen ----

LORA = {"rank": 2, "targets": "all-linear"}
# (id, strategies, model kind, context, train options, most graphs): each trains eager, then compiled. A
# graph per block (4 here) would exceed the bound: each is a few kinds of call (the first block's input
# needs no grad, a frozen block, the reference's no-grad call) times (static, dynamic) shapes, per run
ACCEPTED = [
    ("layerwise-gradual", [{"layerwise": {"train_layers": "top:3", "unfreeze_every_epochs": 1}}], "lm",
     "single", {"max_steps": 4, "batch_size": 8}, 6),  # 2 steps an epoch: a layer joins at step 3
    ("dora-checkpointing-bf16", [{"lora": {**LORA, "dora": True}}], "lm", "single",
     {"gradient_checkpointing": True, "precision": "bf16"}, 2),
    ("pfeiffer+prompt", [{"adapter": {"placement": "pfeiffer", "bottleneck_size": 4}},
                         {"prompt": {"length": 2}}], "lm", "single", {}, 2),
    ("heads", [{"heads": {"dropout": 0.0}}], "dec_cls", "single", {}, 2),
    ("ia3-encoder", [{"ia3": {"targets": ["key", "value"], "feedforward_targets": []}}], "enc_cls", "single",
     {}, 2),
    ("lora+distill", [{"lora": LORA}, {"distill": {"teacher": "base"}}], "lm", "single", {}, 3),
    ("full+retention", [{"full": {}}, {"retention": {"weight": 1.0}}], "lm", "single", {}, 3),  # frozen copy
    ("lora+ewc+l2sp", [{"lora": LORA}, {"ewc": {"weight": 1.0, "fisher_samples": 2}},
                       {"l2sp": {"weight": 0.1}}], "lm", "single", {}, 4),  # + EWC's Fisher pass at step 1
]


@pytest.fixture(scope="module")
def assets(tmp_path_factory, tiny_model_dir, tokenizer):
    return build_assets(tmp_path_factory.mktemp("compile"), tokenizer, tiny_model_dir)


@pytest.fixture
def cheap_backend(monkeypatch, compile_counters):
    monkeypatch.setattr(compiling, "BACKEND", "eager")
    return compile_counters


def case_config(strategies: list[dict], kind: str, context: str, assets, output: Path, **train):
    names = tuple(next(iter(spec)) for spec in strategies)

    class Listed(Case):  # these exact options, not the matrix's defaults
        @property
        def strategies(self) -> list[dict]:
            return strategies

    return make_config(Listed("+".join(names), names, kind, context), assets, output, **train)


@pytest.mark.parametrize("case", ACCEPTED, ids=[case[0] for case in ACCEPTED])
def test_each_accepted_strategy_trains_the_same_compiled(case, assets, tmp_path, cheap_backend):
    _, strategies, kind, context, train, most_graphs = case
    train_run(case_config(strategies, kind, context, assets, tmp_path / "eager", **train))
    train_run(case_config(strategies, kind, context, assets, tmp_path / "compiled", compile=True, **train))
    assert losses(tmp_path / "compiled") == pytest.approx(losses(tmp_path / "eager"), abs=1e-6)
    graphs = cheap_backend["stats"]["unique_graphs"]
    print(case[0], graphs)
    assert 1 <= graphs <= most_graphs  # the blocks did run compiled, without a graph per block
    assert not cheap_backend["graph_break"]


# ---- refused before any model loads, with the reason ----

def test_prefix_and_sharded_engines_are_refused_before_loading(assets, tmp_path):
    raw = {"model": str(assets.llama), "data": {"train": str(assets.lm_tasks[0])}, "retain": None,
           "strategies": [{"prefix": {"length": 2}}], "train": {"max_steps": 2, "compile": True},
           "output": str(tmp_path / "run")}
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    refused = r"config\.yaml:\d+: train\.compile with prefix: each block's prefix"
    with pytest.raises(ConfigError, match=refused):
        validate_run(load_config(path))
    raw["strategies"] = [{"lora": {"rank": 2}}]
    raw["distributed"] = {"engine": "fsdp"}
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    with pytest.raises(ConfigError, match=r"train\.compile under distributed\.engine: fsdp is not supported"):
        validate_run(load_config(path))


def test_the_loop_itself_refuses_what_compile_cannot_train():
    """`fit` called directly (as bench/bench.py does) meets the same refusal."""
    from conftest import tiny_llama

    from tuneforge.compose import build_strategies
    from tuneforge.errors import TrainingError

    prefix = build_strategies([{"prefix": {"length": 2}}])
    with (pytest.raises(TrainingError, match="train.compile with prefix"),
          compiling.compiled_blocks(tiny_llama(layers=1), True, prefix)):
        pass
    with (pytest.raises(TrainingError, match="distributed.engine: deepspeed"),
          compiling.compiled_blocks(tiny_llama(layers=1), True, [], "deepspeed")):
        pass
