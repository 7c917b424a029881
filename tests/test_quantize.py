"""Quantized frozen bases (`quantize:`): bitsandbytes nf4/fp4/int8 and packed GGUF blocks, under LoRA (QLoRA),
IA3, prompt tuning and the retention objective; refusals; PEFT interoperability; merged export."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

import tuneforge
from tuneforge.errors import ConfigError
from tuneforge.gguf_blocks import GGUFWeight, decode_blocks, gguf_linear, read_gguf_linears, unpermute_rows
from tuneforge.models import load_model
from tuneforge.quantize import QuantizedLinear, base_weight_bytes, dequantize_model, dequantize_weight
from tuneforge.surgery import disabled_adapters

pytest.importorskip("bitsandbytes")

MODES = ("nf4", "fp4", "int8", "gguf")
# GGUF block types the tiny GGUF base uses, by module: all three decoders run in every GGUF test
GGUF_TYPES = {"q_proj": "Q8_0", "k_proj": "Q4_0", "v_proj": "Q4_1", "o_proj": "Q4_1",
              "gate_proj": "Q4_0", "up_proj": "Q4_1", "down_proj": "Q8_0"}
GGUF_NAMES = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
              "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
              "mlp.down_proj": "ffn_down"}


def llama_cpp_permute(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's row permutation of q/k weights (convert_hf_to_gguf.py `permute`)."""
    return (weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def write_tiny_gguf(model, path: Path) -> None:
    """The block linears of a tiny Llama as a GGUF file, quantized and permuted as llama.cpp does."""
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(model.config.num_hidden_layers)
    heads = {"q_proj": model.config.num_attention_heads, "k_proj": model.config.num_key_value_heads}
    for index, layer in enumerate(model.model.layers):
        for hf_name, gguf_name in GGUF_NAMES.items():
            leaf = hf_name.rsplit(".", 1)[-1]
            weight = layer.get_submodule(hf_name).weight.detach().numpy()
            if leaf in heads:
                weight = llama_cpp_permute(weight, heads[leaf])
            block_type = gguf.GGMLQuantizationType[GGUF_TYPES[leaf]]
            writer.add_tensor(f"blk.{index}.{gguf_name}.weight", gguf.quants.quantize(weight, block_type),
                              raw_dtype=block_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="module")
def tiny_gguf_dir(tiny_model_dir, tmp_path_factory) -> Path:
    """The tiny Llama's folder plus a GGUF file of its block linears (a GGUF-packed base)."""
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("tiny-gguf")
    for item in tiny_model_dir.iterdir():
        shutil.copy(item, directory / item.name)
    write_tiny_gguf(AutoModelForCausalLM.from_pretrained(tiny_model_dir), directory / "model.gguf")
    return directory


@pytest.mark.parametrize("block_type", ["Q4_0", "Q4_1", "Q8_0"])
def test_block_decoder_equals_gguf_reference(block_type):
    generator = np.random.default_rng(0)
    weight = (generator.standard_normal((6, 128)) * 0.3).astype(np.float32)
    kind = gguf.GGMLQuantizationType[block_type]
    packed = gguf.quants.quantize(weight, kind)
    ours = decode_blocks(torch.from_numpy(packed), block_type, 128).numpy()
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(packed, kind))  # exact, bit for bit
    assert np.abs(ours - weight).max() < 0.2  # and it is the weight, quantized


def test_packed_weights_read_from_a_gguf_file_are_the_model_weights(tiny_gguf_dir, tiny_model_dir):
    """Names map through gguf's table, q/k rows are un-permuted on the packed rows, types are kept."""
    from transformers import AutoModelForCausalLM

    dense = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    names = [f"model.layers.1.{name}" for name in GGUF_NAMES]
    packed = read_gguf_linears(tiny_gguf_dir / "model.gguf", names, dense.config)
    assert set(packed) == set(names)
    for name, weight in packed.items():
        leaf = name.rsplit(".", 1)[-1]
        assert weight.block_type == GGUF_TYPES[leaf]
        reference = dense.get_submodule(name).weight.detach()
        quantized = gguf.quants.quantize(reference.numpy(), gguf.GGMLQuantizationType[weight.block_type])
        expected = gguf.quants.dequantize(quantized, gguf.GGMLQuantizationType[weight.block_type])
        # the un-permuted blocks decode to what quantizing the unpermuted weight gives
        np.testing.assert_allclose(weight.dequantize().numpy(), expected, atol=1e-6)
    rows = torch.arange(24.0).reshape(8, 3)
    assert torch.equal(unpermute_rows(torch.from_numpy(llama_cpp_permute(rows.numpy(), 2)), 2), rows)


def test_packed_linear_gradients_equal_the_dense_reference():
    generator = np.random.default_rng(1)
    weight = (generator.standard_normal((16, 64)) * 0.2).astype(np.float32)
    packed = GGUFWeight(torch.from_numpy(gguf.quants.quantize(weight, gguf.GGMLQuantizationType.Q4_1)),
                        "Q4_1", (16, 64))
    dense = packed.dequantize()
    x = torch.randn(3, 5, 64, requires_grad=True)
    bias = torch.randn(16, requires_grad=True)
    x_ref, bias_ref = x.detach().clone().requires_grad_(), bias.detach().clone().requires_grad_()
    target = torch.randn(3, 5, 16)
    (gguf_linear(x, packed, bias) * target).sum().backward()
    (F.linear(x_ref, dense, bias_ref) * target).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5)
    assert torch.allclose(bias.grad, bias_ref.grad, atol=1e-5)
    assert packed.grad is None and packed.nbytes == 16 * 64 * 5 // 8  # 5 bits a weight


def _load(mode: str, tiny_model_dir: Path, tiny_gguf_dir: Path):
    directory = tiny_gguf_dir if mode == "gguf" else tiny_model_dir
    model, _, _ = load_model(str(directory), quantize=mode)
    return model, directory


def _train(model, steps: int = 12) -> list[float]:
    ids = torch.randint(3, model.config.vocab_size, (4, 12), generator=torch.Generator().manual_seed(0))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    losses = []
    for _ in range(steps):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("mode", MODES)
def test_qlora_trains_frozen_quantized_base_and_loads_in_peft(mode, tiny_model_dir, tiny_gguf_dir,
                                                              tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model, directory = _load(mode, tiny_model_dir, tiny_gguf_dir)
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLinear)]
    assert len(quantized) == 4 * 7  # every block linear of the tiny Llama
    held = base_weight_bytes(model)["by_kind"]
    packed = [entry for kind, entry in held.items() if kind != "float32"]
    ratio = sum(e["bytes"] for e in packed) / sum(4 * e["weights"] for e in packed)
    # 4-bit: 4.5 bits a weight, plus a 16-entry codebook per layer (large next to a tiny layer's weights);
    # int8: 8 bits plus a row scale; this GGUF base holds Q8_0 (8.5 bits) as well as Q4_0/Q4_1
    assert ratio < (0.3 if mode in ("int8", "gguf") else 0.17)
    model = tuneforge.prepare(model, [{"lora": {"rank": 4, "targets": "all-linear"}}])
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model)
    assert losses[-1] < 0.7 * losses[0]
    for name, parameter in model.named_parameters():
        if name in frozen:
            assert torch.equal(parameter.detach(), frozen[name]), name  # packed bytes never change
    tuneforge.save_adapter(model, tmp_path / "adapter")
    ids = torch.randint(3, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(1))
    model.eval()
    with torch.no_grad():
        ours = model(input_ids=ids).logits
        # PEFT over the dequantized base computes what the quantized run computes (tolerance 1e-4) ...
        decoded, _ = _load(mode, tiny_model_dir, tiny_gguf_dir)
        dequantize_model(decoded)
        peft_decoded = PeftModel.from_pretrained(decoded, tmp_path / "adapter").eval()(input_ids=ids).logits
        assert (peft_decoded - ours).abs().max() < 1e-4
        # ... and over the unquantized base it is off by the base's own quantization error: within 1.5x the
        # gap between the dense and the quantized base models (the adapter adds no mismatch of its own)
        with disabled_adapters(model):
            quantized_base = model(input_ids=ids).logits
        base = AutoModelForCausalLM.from_pretrained(directory).eval()
        base_gap = (base(input_ids=ids).logits - quantized_base).abs().mean()
        peft_dense = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=ids).logits
        assert (peft_dense - ours).abs().mean() < 1.5 * base_gap + 1e-4
        assert (quantized_base - ours).abs().mean() > base_gap  # while training moved them by more


@pytest.mark.parametrize("strategies", [
    [{"ia3": {"targets": "all-linear"}}],
    [{"prompt": {"length": 4}}],
    [{"lora": {"rank": 4, "dora": True, "targets": ["q_proj", "v_proj"]}}],
    [{"adapter": {"bottleneck_size": 8}}],
], ids=["ia3", "prompt", "dora", "adapter"])
def test_other_frozen_base_parametrizations_train_on_a_quantized_base(strategies, tiny_model_dir, tokenizer):
    model, _, _ = load_model(str(tiny_model_dir), quantize="nf4")
    model = tuneforge.prepare(model, strategies, tokenizer)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    losses = _train(model, 10)
    assert losses[-1] < losses[0]
    assert all(torch.equal(p.detach(), frozen[n]) for n, p in model.named_parameters() if n in frozen)


def test_low_memory_load_equals_quantizing_a_loaded_model(tiny_model_dir):
    """The streaming loader (uninitialised storage, tensors read one at a time) builds the same model as
    quantizing a normally loaded one: same parameters, same buffers, same logits."""
    from transformers import AutoModelForCausalLM

    from tuneforge.quantize import quantize_model

    streamed, _, _ = load_model(str(tiny_model_dir), quantize="int8")
    loaded = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    quantize_model(loaded, "int8")
    ids = torch.randint(3, 100, (2, 9), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(streamed.eval()(input_ids=ids).logits, loaded.eval()(input_ids=ids).logits)
    for (name, a), (_, b) in zip(streamed.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


def test_qlora_run_with_retention_reference_inspect_and_merged_export(run_config, tmp_path, capsys):
    """A whole run: nf4 + LoRA + the retention objective (its reference is the quantized base with adapters
    off, no copy); inspect shows the base's bytes by kind; export --merged folds into the decoded base."""
    from transformers import AutoModelForCausalLM

    from tuneforge.cli import main
    from tuneforge.run import train_run

    retain = tmp_path / "retain.txt"
    retain.write_text("To be, or not to be, that is the question. " * 40)
    config = run_config(strategies=[{"lora": {"rank": 4, "targets": "all-linear"}},
                                    {"retention": {"weight": 0.5}}],
                        quantize="nf4", retain=str(retain), train={"max_steps": 8})
    results = train_run(config)
    assert results["after"]["eval"]["loss"] < results["before"]["eval"]["loss"]
    records = [json.loads(line) for line in (Path(config.output) / "metrics.jsonl").read_text().splitlines()]
    assert any("retention" in r for r in records)
    assert main(["inspect", str(Path(config.output) / "config.yaml")]) == 0
    shown = capsys.readouterr().out
    assert "base weights:" in shown and "nf4" in shown
    merged = tmp_path / "merged"
    assert main(["export", config.output, "--merged", str(merged)]) == 0
    weight = AutoModelForCausalLM.from_pretrained(merged).model.layers[0].mlp.up_proj.weight
    original = AutoModelForCausalLM.from_pretrained(config.model).model.layers[0].mlp.up_proj.weight
    assert 0 < (weight - original).abs().max() < 0.5  # the decoded nf4 base plus the update


@pytest.mark.parametrize("strategies, expected", [
    ([{"full": {}}], "full trains them"),
    ([{"layerwise": {"train_layers": "top:1"}}], "layerwise trains them"),
    ([], "full trains them"),  # no parametrization: full fine-tuning implied
])
def test_strategies_training_base_weights_are_refused(strategies, expected, run_config):
    from tuneforge.run import validate_run

    config = run_config(strategies=strategies, quantize="nf4")
    with pytest.raises(ConfigError) as error:
        validate_run(config)
    message = str(error.value)
    assert expected in message and "quantize: nf4" in message and "\n" not in message


def test_gguf_needs_a_gguf_base_and_bad_values_name_the_line(run_config, tmp_path):
    from tuneforge.config import load_config
    from tuneforge.run import validate_run

    with pytest.raises(ConfigError, match=r"quantize: gguf needs a GGUF base"):
        validate_run(run_config(quantize="gguf"))
    path = tmp_path / "run.yaml"
    config = run_config().resolved_dict()
    config["quantize"] = "nf5"
    path.write_text(json.dumps(config))  # JSON is YAML: one key a line is not needed for the line number
    with pytest.raises(ConfigError, match=r"quantize") as error:
        load_config(path)
    assert "\n" not in str(error.value) and str(path) in str(error.value)


def test_a_model_without_plain_linear_layers_is_refused(tmp_path, tokenizer, run_config):
    """GPT-2 computes with Conv1D: nothing to quantize, said in one line naming the config field."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuneforge.run import inspect_config

    directory = tmp_path / "gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4,
                               n_positions=128)).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    with pytest.raises(ConfigError, match=r"quantize: nf4: GPT2LMHeadModel has no plain linear layer"):
        inspect_config(run_config(model=str(directory), quantize="nf4",
                                  strategies=[{"lora": {"targets": ["c_attn"]}}]))


def test_dequantized_weights_are_close_to_the_originals(tiny_model_dir):
    from transformers import AutoModelForCausalLM

    original = AutoModelForCausalLM.from_pretrained(tiny_model_dir).model.layers[0].mlp.down_proj.weight
    for mode, tolerance in (("int8", 0.01), ("nf4", 0.15), ("fp4", 0.25)):
        model, _, _ = load_model(str(tiny_model_dir), quantize=mode)
        decoded = dequantize_weight(model.model.layers[0].mlp.down_proj.weight)
        error = (decoded - original).abs().max().item()
        assert 0 < error < tolerance * original.abs().max().item(), mode
