"""Sharded engines (`distributed.engine`): FSDP2 and DeepSpeed ZeRO-2/3 over 2 CPU processes (gloo).

Each engine trains full fine-tuning (batch 4 per process) and LoRA (batch 2, accumulated twice) against one
process with batch 8:
- the loss curves agree (the same global batch and token-mean loss; only float summation order differs);
- process 0 holds about half the sharded state (parameters for FSDP2 and ZeRO-3, AdamW state for all);
- a run stopped after its step-3 checkpoint resumes to the uninterrupted run's weights and AdamW state,
  bit for bit;
- the adapter (LoRA, loaded by PEFT) and the merged export (full, loaded by transformers) give the
  single-process run's logits.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.test_distributed import LOSS_TOLERANCE, losses, worker_env
from tests.test_examples import shrunk
from tuneforge.checkpoint import latest_checkpoint
from tuneforge.cli import main
from tuneforge.config import load_config, validate_config
from tuneforge.errors import ConfigError
from tuneforge.run import train_run, validate_run

REPO = Path(__file__).resolve().parents[1]
STRATEGIES = {"full": [{"full": {}}], "lora": [{"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}]}
ENGINES = {
    "fsdp": {"engine": "fsdp"},
    "zero2": {"engine": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 2}}},
    "zero3": {"engine": "deepspeed", "deepspeed": {"zero_optimization": {"stage": 3}}},
}
# process 0's share of (parameters, AdamW state): whole parameters under ZeRO-2
HELD = {"fsdp": (0.5, 0.5), "zero2": (1.0, 0.5), "zero3": (0.5, 0.5)}
# per process: full fine-tuning takes batch 4 in one micro-batch; LoRA batch 2 twice (gradient accumulation,
# where the engines' own reduction and accumulation boundary meet tuneforge's); both 8 items a step
SHARDED_BATCH = {"full": {"batch_size": 4}, "lora": {"batch_size": 2, "grad_accum": 2}}
# the shipped example each launch also runs (shrunk to a tiny model, like tests/test_examples.py does)
EXAMPLES = {"fsdp": "fsdp.yaml", "zero2": "zero2.yaml", "zero3": "zero3-offload.yaml"}

pytestmark = pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="needs the gloo backend")


def deepspeed_installed() -> bool:
    try:
        import deepspeed  # noqa: F401
    except ImportError:
        return False
    return True


def run_config(model: Path, data: Path, strategy: str, **extra) -> dict:
    return {"model": str(model), "data": {"train": str(data), "max_eval_examples": 6}, "retain": None,
            "strategies": STRATEGIES[strategy],
            "train": {"max_steps": 6, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64, "log_every": 1,
                      "save_every": 3, "eval_every": 3},
            "evaluation": {"samples": 1, "max_new_tokens": 4}, "output": "unused", **extra}


@pytest.fixture(scope="module")
def single(tmp_path_factory, tiny_model_dir, task_file) -> dict[str, Path]:
    """One process, batch 8: the reference runs."""
    root = tmp_path_factory.mktemp("single")
    runs = {}
    for strategy in STRATEGIES:
        path = root / f"{strategy}.yaml"
        path.write_text(yaml.safe_dump(run_config(tiny_model_dir, task_file, strategy)))
        config = load_config(path, ["train.batch_size=8", "train.grad_accum=1"])
        config.output = str(root / strategy)
        train_run(config)
        runs[strategy] = root / strategy
    return runs


def logits_of(model, tokenizer) -> torch.Tensor:
    inputs = tokenizer(["The quick brown fox", "Hello"], return_tensors="pt", padding=True)
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize("engine", list(ENGINES))
def test_sharded_runs_match_one_process_resume_exactly_and_export(engine, tmp_path, tiny_model_dir, task_file,
                                                                  single, tokenizer):
    if engine != "fsdp" and not deepspeed_installed():
        pytest.skip("DeepSpeed is not installed (scripts/setup.sh installs it)")
    runs = []
    for strategy in STRATEGIES:
        path = tmp_path / f"{strategy}.yaml"
        raw = run_config(tiny_model_dir, task_file, strategy, distributed=ENGINES[engine])
        raw["train"].update(SHARDED_BATCH[strategy])
        path.write_text(yaml.safe_dump(raw))
        runs += [str(path), str(tmp_path / strategy), "1"]
    example = REPO / "examples" / "distributed" / EXAMPLES[engine]
    shrunk_example = shrunk(yaml.safe_load(example.read_text()), tiny_model_dir, tiny_model_dir,
                            tmp_path / "ex")
    if engine != "fsdp":  # its DeepSpeed JSON file, named relative to the example
        ds_file = example.parent / shrunk_example["distributed"]["deepspeed"]
        shrunk_example["distributed"] = {**shrunk_example["distributed"], "deepspeed": str(ds_file)}
    (tmp_path / "example.yaml").write_text(yaml.safe_dump(shrunk_example))
    runs += [str(tmp_path / "example.yaml"), str(tmp_path / "example"), "0"]
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "sharded_driver.py"), *runs]
    done = subprocess.run(command, check=False, env=worker_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    for strategy in STRATEGIES:
        run = tmp_path / strategy
        one, two = losses(single[strategy]), losses(run)
        assert one.keys() == two.keys() and len([k for k in one if k[1] == "eval"]) == 1
        assert max(abs(one[key] - two[key]) for key in one) < LOSS_TOLERANCE

        held = json.loads((run / "results.json").read_text())["distributed"]
        assert held["engine"] == ENGINES[engine]["engine"] and held["processes"] == 2
        parameters, optimizer_state = HELD[engine]
        assert held["held"]["parameters"] == pytest.approx(parameters, abs=0.02)
        assert held["held"]["optimizer_state"] == pytest.approx(optimizer_state, abs=0.02)
        memory = held["memory_mb"]
        assert len(memory["peak"]) == len(memory["resident"]) == 2 and min(memory["resident"]) > 0

        for name in ("weights.safetensors", "optimizer.safetensors"):
            uninterrupted = load_file(str(latest_checkpoint(run / "checkpoints") / name))
            resumed_run = tmp_path / f"{strategy}-resumed"
            resumed = load_file(str(latest_checkpoint(resumed_run / "checkpoints") / name))
            assert uninterrupted.keys() == resumed.keys() and uninterrupted
            for key in uninterrupted:
                assert torch.equal(uninterrupted[key], resumed[key]), (name, key)
        assert losses(tmp_path / f"{strategy}-resumed") == two

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def with_adapter(run: Path):
        return PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                                         run / "adapter").eval()

    torch.testing.assert_close(logits_of(with_adapter(tmp_path / "lora"), tokenizer),
                               logits_of(with_adapter(single["lora"]), tokenizer), atol=1e-4, rtol=0)
    for run, out in ((tmp_path / "full", tmp_path / "merged"), (single["full"], tmp_path / "merged-single")):
        assert main(["export", str(run), "--merged", str(out)]) == 0
    merged, reference = (AutoModelForCausalLM.from_pretrained(out).eval()
                         for out in (tmp_path / "merged", tmp_path / "merged-single"))
    torch.testing.assert_close(logits_of(merged, tokenizer), logits_of(reference, tokenizer),
                               atol=1e-4, rtol=0)
    assert json.loads((tmp_path / "example" / "results.json").read_text())["steps"] == 2


def config_of(tmp_path: Path, tiny_model_dir: Path, task_file: Path, strategies: list, distributed: dict,
              **train) -> object:
    raw = run_config(tiny_model_dir, task_file, "lora", distributed=distributed)
    raw["strategies"], raw["output"] = strategies, str(tmp_path / "run")
    raw["train"].update(train)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return load_config(path)


@pytest.mark.parametrize(("strategies", "engine", "says"), [
    ([{"lora": {}}, {"retention": {}}], "fsdp", "retention under distributed.engine: fsdp: it keeps"),
    ([{"lora": {}}, {"ewc": {}}], "deepspeed", "ewc under distributed.engine: deepspeed"),
    ([{"full": {}}, {"l2sp": {}}], "fsdp", "l2sp under distributed.engine: fsdp"),
    ([{"lora": {}}, {"distill": {}}], "fsdp", "distill under distributed.engine: fsdp: it runs a teacher"),
    ([{"lora": {}}, {"heads": {}}], "deepspeed", "heads under distributed.engine: deepspeed"),
    ([{"layerwise": {"train_layers": "2-3", "unfreeze_every_epochs": 1}}], "deepspeed", "gradual unfreezing"),
])
def test_strategies_holding_whole_copies_are_refused_with_a_reason(tmp_path, tiny_model_dir, task_file,
                                                                     strategies, engine, says):
    config = config_of(tmp_path, tiny_model_dir, task_file, strategies, {"engine": engine})
    with pytest.raises(ConfigError) as error:
        validate_run(config)
    message = str(error.value)
    assert says in message and "config.yaml:" in message and "\n" not in message
    assert "use distributed.engine:" in message


def test_layerwise_gradual_unfreezing_is_accepted_by_fsdp(tmp_path, tiny_model_dir, task_file):
    config = config_of(tmp_path, tiny_model_dir, task_file,
                       [{"layerwise": {"train_layers": "2-3", "unfreeze_every_epochs": 1}}],
                       {"engine": "fsdp"})
    assert validate_run(config)["train_examples"] > 0


@pytest.mark.parametrize(("deepspeed", "says"), [
    ({"optimizer": {"type": "AdamW"}}, "optimizer: not used with tuneforge (tuneforge builds AdamW"),
    ({"train_micro_batch_size_per_gpu": 2},
     "train_micro_batch_size_per_gpu is 2 but train.batch_size gives 4"),
    ({"gradient_accumulation_steps": "auto", "zero_optimization": {"stage": 4}},
     "stage must be 0, 1, 2 or 3"),
    ({"bf16": {"enabled": True}}, "bf16.enabled is true but train.precision is fp32"),
])
def test_deepspeed_configs_that_contradict_train_are_refused(tmp_path, tiny_model_dir, task_file, deepspeed,
                                                             says):
    config = config_of(tmp_path, tiny_model_dir, task_file, [{"lora": {}}],
                       {"engine": "deepspeed", "deepspeed": deepspeed})
    with pytest.raises(ConfigError, match="config.yaml:") as error:
        validate_run(config)
    assert says in str(error.value)


def test_a_deepspeed_json_file_is_read_relative_to_the_config_and_a_bad_one_named_by_line(
        tmp_path, tiny_model_dir, task_file):
    from tuneforge.zero import resolve_deepspeed_config

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3},\n "gradient_clipping": "auto"}')
    config = config_of(tmp_path, tiny_model_dir, task_file, [{"lora": {}}],
                       {"engine": "deepspeed", "deepspeed": "ds.json"}, grad_accum=2)
    resolved = resolve_deepspeed_config(config, world=2)
    assert resolved["zero_optimization"]["stage"] == 3 and resolved["gradient_clipping"] == 1.0
    assert resolved["train_batch_size"] == 4 * 2 * 2 and resolved["gradient_accumulation_steps"] == 2

    (tmp_path / "ds.json").write_text('{"zero_optimization": {"stage": 3},\n "gradient_clipping": }')
    with pytest.raises(ConfigError, match=r"ds\.json:2: not valid JSON"):
        resolve_deepspeed_config(config)


def test_unknown_engine_names_its_line(tmp_path, tiny_model_dir, task_file):
    raw = run_config(tiny_model_dir, task_file, "lora", distributed={"engine": "megatron"})
    with pytest.raises(ConfigError, match="distributed.engine"):
        validate_config(raw, "config.yaml")


def test_one_process_runs_a_sharded_engine_as_one_shard(tmp_path, tiny_model_dir, task_file):
    """A single process (one GPU with ZeRO offload, say) gets a process group of one."""
    path = tmp_path / "config.yaml"
    raw = run_config(tiny_model_dir, task_file, "lora", distributed={"engine": "fsdp"})
    raw["train"]["batch_size"] = 8
    path.write_text(yaml.safe_dump(raw))
    command = [sys.executable, "-m", "tuneforge.cli", "train", str(path), "--output", str(tmp_path / "run")]
    done = subprocess.run(command, check=False, env=worker_env(), cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "run" / "results.json").read_text())
    assert result["distributed"]["engine"] == "fsdp" and result["distributed"]["processes"] == 1
    assert result["distributed"]["held"] == {"parameters": 1.0, "optimizer_state": 1.0}
    assert len(result["distributed"]["memory_mb"]["peak"]) == 1


def test_the_documented_sharding_table_is_rendered_from_the_committed_json():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import sharding_memory
    finally:
        sys.path.remove(str(REPO / "bench"))
    report = json.loads((REPO / "docs" / "results" / "2026-11-29-sharding.json").read_text())
    assert sharding_memory.render(report) in (REPO / "docs" / "distributed.md").read_text()
    rows = {row["engine"]: row for row in report["rows"]}
    # what the engines hold is what the arithmetic says; the memory each process saves is measured
    assert rows["zero2"]["held"] == {"parameters": 1.0, "optimizer_state": 0.5}
    assert rows["fsdp"]["held"]["parameters"] == pytest.approx(0.5, abs=0.01)
    assert rows["zero3"]["held"]["parameters"] == pytest.approx(0.5, abs=0.01)
    assert rows["fsdp"]["saved_mb"] > 0 and rows["zero3"]["saved_mb"] > 0
