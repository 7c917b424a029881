"""The loop's invariants: every epoch it starts trains what it should, and how a step is split into
micro-batches (batch_size x grad_accum) changes neither the data nor the gradient."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import tiny_llama
from safetensors.torch import load_file

from tuneforge.checkpoint import latest_checkpoint
from tuneforge.errors import TrainingError
from tuneforge.run import train_run


def final_weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(latest_checkpoint(run_dir / "checkpoints") / "weights.safetensors"))


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [record for record in map(json.loads, lines) if "split" not in record]


def test_layers_unfrozen_after_train_epochs_still_train(run_config, tiny_model_dir):
    # 16 examples / batch 4 = 4 steps an epoch; max_steps 12 runs 3 epochs though train.epochs is 1
    layerwise = {"layerwise": {"train_layers": "1-3", "unfreeze_every_epochs": 1, "train_head": False}}
    config = run_config(strategies=[layerwise], data={"max_train_examples": 16},
                        train={"epochs": 1, "max_steps": 12, "batch_size": 4, "lr": 1e-2})
    train_run(config)
    records = train_records(Path(config.output))
    assert [r["epoch"] for r in records] == [0] * 4 + [1] * 4 + [2] * 4
    trained, base = final_weights(Path(config.output)), load_file(str(tiny_model_dir / "model.safetensors"))
    for layer in (1, 2, 3):  # layers 2 and 1 join in epochs 1 and 2: past train.epochs, they must train too
        name = f"model.layers.{layer}.self_attn.q_proj.weight"
        assert name in trained and not torch.equal(trained[name], base[name]), name
    first = "model.layers.0.self_attn.q_proj.weight"
    assert torch.equal(trained.get(first, base[first]), base[first])


def test_a_trainable_parameter_outside_the_optimizer_is_an_error():
    from tuneforge.train import check_optimized

    model = tiny_llama()
    optimized = {id(p) for name, p in model.named_parameters() if name != "model.norm.weight"}
    with pytest.raises(TrainingError, match=r"model\.norm\.weight is trainable now but not in the optimizer"):
        check_optimized(model, optimized)
    model.model.norm.weight.requires_grad_(False)
    check_optimized(model, optimized)


@pytest.fixture
def retain_file(tmp_path) -> Path:
    path = tmp_path / "retain.txt"
    words = "the quick brown fox jumps over the lazy dog while seven wizards quietly judge boxing matches"
    path.write_text("\n\n".join(" ".join(words.split()[i:] + words.split()[:i]) * 3 for i in range(12)))
    return path


LORA = {"lora": {"rank": 4, "targets": "all-linear", "dropout": 0.0}}
SPLIT_CASES = {
    "lora": [LORA],
    "distill": [LORA, {"distill": {"teacher": "base", "alpha": 0.5}}],
    "retention": [LORA, {"retention": {"weight": 1.0}}],
    "l2sp": [LORA, {"l2sp": {"weight": 10.0}}],
}


@pytest.mark.parametrize("case", sorted(SPLIT_CASES))
def test_splitting_a_step_into_micro_batches_changes_nothing(case, run_config, retain_file, tmp_path):
    runs = {}
    for batch_size, grad_accum in ((4, 1), (2, 2)):
        output = tmp_path / f"b{batch_size}x{grad_accum}"
        config = run_config(strategies=SPLIT_CASES[case], output=str(output), retain=str(retain_file),
                            train={"max_steps": 3, "batch_size": batch_size, "grad_accum": grad_accum,
                                   "lr": 1e-2, "warmup_steps": 0})
        train_run(config)
        runs[grad_accum] = (final_weights(output), train_records(output))
    (whole, whole_log), (split, split_log) = runs[1], runs[2]
    assert whole_log[0]["loss"] == pytest.approx(split_log[0]["loss"], abs=1e-6)  # the same step-1 loss
    for key in whole_log[0]:
        if key not in ("tokens_per_s", "grad_norm"):
            assert whole_log[0][key] == pytest.approx(split_log[0][key], abs=1e-5), key
    assert whole.keys() == split.keys()
    gap = max(float((whole[name] - split[name]).abs().max()) for name in whole)
    assert gap < 1e-5, f"{case}: weights differ by {gap:.3g} between B=4 x 1 and B=2 x 2"


def test_a_sequence_run_packs_like_a_mixture_run(tmp_path, tiny_model_dir):
    from test_continual import sequence_config

    lora = [{"lora": {"rank": 4, "targets": "all-linear"}}]
    steps = {}
    for packing in (False, True):
        config = sequence_config(tmp_path, tiny_model_dir, lora, name=f"packing-{packing}", max_steps=None,
                                 epochs=1, batch_size=2, max_seq_len=64, packing=packing)
        steps[packing] = train_run(config)["steps"]
        lines = (tmp_path / f"packing-{packing}" / "metrics.jsonl").read_text().splitlines()
        assert {json.loads(line)["task"] for line in lines} == {"t0", "t1", "t2"}
    # every task: 24 examples a pass; unpacked 12 steps of 2, packed a few rows of 64 tokens hold them
    assert steps[False] == 3 * 12 and steps[True] < steps[False] / 2


def test_retention_weights_each_micro_batch_by_its_retain_tokens():
    import tuneforge
    from tuneforge.strategies import StrategyContext

    model = tuneforge.prepare(tiny_llama(), [{"lora": {"rank": 4, "targets": "all-linear"}}])
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:  # away from the reference, so the KL is not zero
                parameter.normal_(0.0, 0.5, generator=torch.Generator().manual_seed(0))
    lengths = [3, 9, 5, 12]  # unequal retain sequences: a row-weighted split would differ

    def retain_batches(batch_size=None, device=None):
        for step in range(1000):
            length = lengths[step % 4]
            ids = torch.randint(3, 300, (1, length), generator=torch.Generator().manual_seed(step))
            yield {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def step_term(micro_rows: list[int]) -> torch.Tensor:
        from tuneforge.strategies.retention import Retention, RetentionOptions

        retention = Retention(RetentionOptions(weight=1.0))
        ctx = StrategyContext(retain_batches=retain_batches, step_rows=sum(micro_rows),
                              micro_count=len(micro_rows))
        retention.on_train_start(model, ctx)
        total = torch.zeros(())
        for index, rows in enumerate(micro_rows):
            ctx.micro_index = index
            total = total + retention.loss(model, {"input_ids": torch.zeros(rows, 2)}, None, ctx)["retention"]
        return total.detach()

    whole, split = step_term([4]), step_term([2, 2])
    assert float(whole) > 0 and float(split) == pytest.approx(float(whole), rel=1e-5)
    assert float(step_term([1, 3])) == pytest.approx(float(whole), rel=1e-5)


def test_old_checkpoints_resume_at_the_step_their_micro_batch_count_meant():
    from tuneforge.train import LoopState

    old = {"step": 7, "epoch": 1, "micro_in_epoch": 6, "tokens": 10, "elapsed": 1.0, "history": []}
    state = LoopState.from_checkpoint(old, grad_accum=2)
    assert state.step_in_epoch == 3 and state.step == 7
    assert LoopState.from_checkpoint(state.__dict__, grad_accum=2) == state
