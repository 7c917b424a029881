"""GGUF export: files transformers reloads with the merged model's logits, quantized within stated bounds,
the tokenizer round-tripping, an Ollama Modelfile beside them, and one-line refusals."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch
from conftest import make_tokenizer, randomize, tiny_llama

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.gguf_export import write_gguf

SAMPLES = ["What colour is the cat? The cat is red.", "To be, or not to be"]
# Largest |logit difference| over the largest |logit|, on the tiny models below (std 0.02). Measured:
# F16 <= 0.0012, BF16 <= 0.010, Q8_0 <= 0.020, Q4_1 0.055-0.080 (Gemma2's 0.39: its random norms and
# 256-wide heads amplify the rounding). The bundled SmolLM2's numbers are in docs/export.md.
RELATIVE_TOLERANCE = {"f16": 0.005, "bf16": 0.03, "q8_0": 0.05, "q4_1": 0.15}
GEMMA2_Q4_1_TOLERANCE = 0.5


def tiny(family: str, vocab_size: int = 300):
    """A random causal LM of `family`, std 0.02, norms perturbed so that every weight matters."""
    import transformers as tf

    shape = {"vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
             "num_attention_heads": 4, "num_key_value_heads": 2, "initializer_range": 0.02,
             "max_position_embeddings": 128, "pad_token_id": 0}
    if family == "llama":
        model = tiny_llama(vocab_size, layers=2, initializer_range=0.02)
    elif family == "qwen2":  # biased q/k/v, tied embeddings
        torch.manual_seed(0)
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**shape, tie_word_embeddings=True))
    elif family == "mistral":
        torch.manual_seed(0)
        model = tf.MistralForCausalLM(tf.MistralConfig(**shape, sliding_window=None))
    else:  # transformers reads no query_pre_attn_scalar from GGUF (it assumes 256): head_dim 256 matches it
        torch.manual_seed(0)
        heads = {"num_attention_heads": 2, "num_key_value_heads": 1}
        model = tf.Gemma2ForCausalLM(tf.Gemma2Config(**{**shape, **heads}, head_dim=256,
                                                     query_pre_attn_scalar=256, sliding_window=16))
    randomize(model, "model", scale=0.02, seed=3)  # biases and norms away from their zero/one init
    return model.eval()


def reloaded(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def logits(model, inputs):
    with torch.no_grad():
        return model(**inputs).logits[inputs["attention_mask"].bool()]  # (real tokens, vocab)


@pytest.fixture(scope="module")
def smollm2_tokenizer():
    from transformers import AutoTokenizer

    from tuneforge.models import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m"), local_files_only=True)


def test_merged_lora_model_reloads_with_equal_logits(tmp_path, tokenizer):
    """F32: transformers reloads logits equal to the LoRA model's, merged for export; q/k permuted right."""
    from tuneforge.export import merge_in_place

    model = tuneforge.prepare(tiny_llama(len(tokenizer), layers=2), [{"lora": {"targets": "all-linear"}}])
    randomize(model.eval(), "lora_", scale=0.2)
    inputs = tokenizer(SAMPLES, return_tensors="pt", padding=True)
    expected = logits(model, inputs)  # the unmerged adapter model
    merge_in_place(model, dict(inputs))
    report = write_gguf(model, tokenizer, tmp_path / "model.gguf", "f32")
    assert report["tensor_types"] == {"F32": 2 * 9 + 3} and report["architecture"] == "llama"
    torch.testing.assert_close(logits(reloaded(tmp_path / "model.gguf"), inputs), expected, atol=1e-4, rtol=0)


def test_the_smollm2_tokenizer_round_trips(smollm2_tokenizer, tmp_path):
    """transformers rebuilds the tokenizer from the file alone: same ids, specials and chat template."""
    from transformers import AutoTokenizer

    tokenizer = smollm2_tokenizer
    chat = tokenizer.apply_chat_template([{"role": "user", "content": "Hi, 2 + 2?"}], tokenize=False,
                                         add_generation_prompt=True)
    texts = [*SAMPLES, chat, "naïve café — 123,456 😀\n\ttabs  and  spaces", " leading space, <|endoftext|>"]
    report = write_gguf(tiny("llama", len(tokenizer)), tokenizer, tmp_path / "model.gguf", "q8_0")
    assert report["tokenizer_pre"] == "gpt-2" and not report["notes"]
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="model.gguf")
    for text in texts:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    assert len(back) == len(tokenizer)
    assert (back.eos_token, back.bos_token, back.chat_template) == \
        (tokenizer.eos_token, tokenizer.bos_token, tokenizer.chat_template)


@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral", "gemma2"])
def test_every_family_and_type_reloads_within_its_tolerance(family, tmp_path, tokenizer):
    """F32 equal; F16/BF16/Q8_0/Q4_1 equal to the model rounded the same way, and within the stated bounds."""
    from gguf import GGMLQuantizationType, GGUFReader
    from gguf.quants import dequantize, quantize

    model = tiny(family, len(tokenizer))
    inputs = tokenizer(SAMPLES, return_tensors="pt", padding=True)
    expected = logits(model, inputs)
    scale = expected.abs().max().item()
    for quant in ("f32", "f16", "bf16", "q8_0", "q4_1"):
        path = tmp_path / f"{quant}.gguf"
        write_gguf(model, tokenizer, path, quant)
        got = logits(reloaded(path), inputs)
        if quant == "f32":
            torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
            continue
        # every matrix rounded as the file stores it (the type per tensor read back from the file)
        stored = {t.name: GGMLQuantizationType(t.tensor_type) for t in GGUFReader(str(path)).tensors}
        rounded = tiny(family, len(tokenizer))
        with torch.no_grad():
            for name, parameter in rounded.named_parameters():
                if parameter.dim() == 2 and not (name == "lm_head.weight" and "output.weight" not in stored):
                    gguf_name = _gguf_name(name, stored)
                    array = parameter.numpy()
                    parameter.copy_(torch.from_numpy(dequantize(quantize(array, stored[gguf_name]),
                                                                stored[gguf_name]).reshape(array.shape)))
        torch.testing.assert_close(got, logits(rounded, inputs), atol=2e-4, rtol=0)
        bound = GEMMA2_Q4_1_TOLERANCE if (family, quant) == ("gemma2", "q4_1") else RELATIVE_TOLERANCE[quant]
        assert (got - expected).abs().max().item() <= bound * scale, quant


def _gguf_name(hf_name: str, stored: dict) -> str:
    table = {"embed_tokens": "token_embd", "lm_head": "output", "q_proj": "attn_q", "k_proj": "attn_k",
             "v_proj": "attn_v", "o_proj": "attn_output", "gate_proj": "ffn_gate", "up_proj": "ffn_up",
             "down_proj": "ffn_down"}
    parts = hf_name.split(".")
    leaf = table[parts[-2]]
    name = f"blk.{parts[2]}.{leaf}.weight" if parts[1] == "layers" else f"{leaf}.weight"
    assert name in stored, name
    return name


def test_quantized_files_shrink_and_keep_norms_in_f32(tmp_path, tokenizer):
    from gguf import GGUFReader

    model = tiny("llama", len(tokenizer))
    sizes = {}
    for quant in ("f32", "f16", "q8_0", "q4_1"):
        report = write_gguf(model, tokenizer, tmp_path / f"{quant}.gguf", quant)
        sizes[quant] = report["bytes"]
    assert sizes["f32"] > sizes["f16"] > sizes["q8_0"] > sizes["q4_1"]
    kinds = {t.name: t.tensor_type.name for t in GGUFReader(str(tmp_path / "q4_1.gguf")).tensors}
    assert kinds["blk.0.attn_norm.weight"] == "F32" and kinds["blk.1.ffn_down.weight"] == "Q4_1"
    assert kinds["token_embd.weight"] == kinds["output.weight"] == "Q8_0"  # the sensitive ends


def test_other_architectures_and_options_are_refused_in_one_line(tmp_path, tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tuneforge.gguf_vocab import vocab_fields

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=300, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ModelError, match=r"families llama, mistral, qwen2, gemma2; this model is gpt2"):
        write_gguf(gpt2, tokenizer, tmp_path / "x.gguf")
    scaled = tiny_llama(300, layers=1, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(ModelError, match="rope scaling 'linear'"):
        write_gguf(scaled, tokenizer, tmp_path / "x.gguf")
    with pytest.raises(ModelError, match="expected one of f32, f16, bf16, q8_0, q4_1"):
        write_gguf(tiny("llama"), tokenizer, tmp_path / "x.gguf", "q4_k")
    with pytest.raises(ModelError, match="300 tokens but the model only 200"):
        vocab_fields(tokenizer, 200)
    assert not list(tmp_path.iterdir())


def test_a_sentencepiece_style_tokenizer_round_trips(tmp_path):
    """Llama 2 / Mistral 7B vocabularies: `▁` words, `<0xNN>` byte fallback, merges ranked by score."""
    from transformers import AutoTokenizer, LlamaTokenizer

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"<0x{i:02X}>": 3 + i for i in range(256)}}
    pieces = ["▁", "a", "b", "c", "h", "e", "l", "o", "▁a", "ab", "▁ab", "▁h", "he", "ll", "▁he", "llo",
              "▁hello"]
    vocab.update({piece: len(vocab) + i for i, piece in enumerate(pieces)})
    merges = [("▁", "a"), ("a", "b"), ("▁a", "b"), ("▁", "h"), ("h", "e"), ("l", "l"), ("▁h", "e"),
              ("ll", "o"), ("▁he", "llo")]
    tokenizer = LlamaTokenizer(vocab=vocab, merges=merges)
    model = tiny_llama(len(tokenizer), layers=1)
    report = write_gguf(model, tokenizer, tmp_path / "spm.gguf", "f32")
    assert report["tokenizer_pre"] == "default" and not report["notes"]
    back = AutoTokenizer.from_pretrained(tmp_path, gguf_file="spm.gguf")
    for text in ["hello ab abc", "hello  héllo ☃ ab", " cab"]:
        assert back(text)["input_ids"] == tokenizer(text)["input_ids"], text
    inputs = tokenizer(["hello ab abc"], return_tensors="pt")
    torch.testing.assert_close(logits(reloaded(tmp_path / "spm.gguf"), inputs), logits(model.eval(), inputs),
                               atol=1e-5, rtol=0)


def test_tokenizer_kinds_without_a_gguf_form_are_refused_or_noted():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from tuneforge.gguf_vocab import vocab_fields

    sentencepiece_like = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE(
        vocab={"<unk>": 0, "a": 1}, merges=[], byte_fallback=True, unk_token="<unk>")))
    with pytest.raises(ModelError, match="tokenizer of kind BPE with byte fallback does not export to GGUF"):
        vocab_fields(sentencepiece_like, 2)
    tokenizer = make_tokenizer()
    tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Whitespace(), pre_tokenizers.ByteLevel(use_regex=False)])
    fields = vocab_fields(tokenizer, len(tokenizer) + 4)
    assert fields.pre == "default" and "Whitespace+ByteLevel has no llama.cpp name" in fields.notes[0]
    assert fields.tokens[-4:] == [f"[PAD{i}]" for i in range(len(tokenizer), len(tokenizer) + 4)]
    assert fields.token_types[:3] == [3, 3, 3] and fields.token_types[-1] == 5  # control; unused pads
    assert fields.special_ids == {"eos": 2, "pad": 0} and not fields.add_bos


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path, tokenizer, monkeypatch):
    import gguf

    path = tmp_path / "model.gguf"
    path.write_bytes(b"old")

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(gguf.GGUFWriter, "write_tensors_to_file", full_disk)
    with pytest.raises(OSError, match="No space left") as failure:
        write_gguf(tiny("llama"), tokenizer, path, "q8_0")
    assert failure.value.filename.endswith("model.gguf.tmp")
    assert path.read_bytes() == b"old" and sorted(p.name for p in tmp_path.iterdir()) == ["model.gguf"]


def test_modelfile_translates_the_smollm2_chat_template(smollm2_tokenizer):
    from tuneforge.ollama import chat_shape, modelfile_text

    text, reason = modelfile_text("model.gguf", smollm2_tokenizer)
    assert reason is None
    assert text.startswith("FROM ./model.gguf\n")
    assert '{{ .Content }}<|im_end|>\n{{ if and $last (ne .Role "assistant") }}' in text
    assert '<|im_start|>{{ .Role }}\n' in text
    assert 'SYSTEM """You are a helpful AI assistant named SmolLM, trained by Hugging Face"""' in text
    assert text.rstrip().endswith('PARAMETER stop "<|im_end|>"')
    shape, _ = chat_shape(smollm2_tokenizer)
    chat = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
            {"role": "user", "content": "c\nd"}]
    assert shape.render(chat) == smollm2_tokenizer.apply_chat_template(chat, tokenize=False,
                                                                       add_generation_prompt=True)


def test_modelfile_translates_a_llama3_style_template():
    from tuneforge.ollama import modelfile_text

    tokenizer = make_tokenizer()
    tokenizer.bos_token = "<|pad|>"  # stands in for <|begin_of_text|>: the template writes it first
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}{{ '<|im_start|>' + m['role'] + '<|pad|>\\n\\n' "
        "+ m['content'] + '<|im_end|>' }}{% endfor %}{% if add_generation_prompt %}"
        "{{ '<|im_start|>assistant<|pad|>\\n\\n' }}{% endif %}")
    text, reason = modelfile_text("m.gguf", tokenizer)
    assert reason is None and "SYSTEM" not in text
    assert ('TEMPLATE """{{ range $i, $_ := .Messages }}{{ $last := eq (len (slice $.Messages $i)) 1 }}'
            '<|im_start|>{{ .Role }}<|pad|>\n\n{{ .Content }}<|im_end|>'
            '{{ if and $last (ne .Role "assistant") }}<|im_start|>assistant<|pad|>\n\n'
            '{{ end }}{{ end }}"""') in text


def test_modelfile_leaves_out_a_template_it_cannot_translate():
    from tuneforge.ollama import modelfile_text

    tokenizer = make_tokenizer()
    tokenizer.chat_template = ("{% for m in messages %}{{ m.content }}{% if not loop.last %} | {% endif %}"
                               "{% endfor %}")
    text, reason = modelfile_text("m.gguf", tokenizer)
    assert "TEMPLATE" not in text and 'PARAMETER stop "<|im_end|>"' in text
    assert reason == "the chat template does not write each message as prefix + content + suffix"


def test_cli_exports_a_lora_run_to_gguf_with_modelfile_and_card(run_config, tmp_path, capsys):
    import yaml

    from tuneforge.cli import main
    from tuneforge.models import load_model
    from tuneforge.run import train_run

    config = run_config(train={"max_steps": 2})
    train_run(config)
    out = tmp_path / "export" / "tuned.gguf"
    out.parent.mkdir()
    assert main(["export", config.output, "--gguf", str(out), "--quant", "f16"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["Modelfile", "README.md", "tuned.gguf"]
    printed = capsys.readouterr().out
    report = json.loads(printed[printed.index("{"):])
    assert report["quant"] == "f16" and report["max_weight_change"] > 0 and report["merged_layers"] == 4 * 7
    base, tokenizer, _ = load_model(config.model)
    unmerged = tuneforge.load_adapter(base, f"{config.output}/adapter").eval()
    inputs = tokenizer(["What colour is the cat?"], return_tensors="pt")
    expected = logits(unmerged, {**inputs})
    got = logits(reloaded(out), {**inputs})
    assert (got - expected).abs().max().item() <= RELATIVE_TOLERANCE["f16"] * expected.abs().max().item()
    front = yaml.safe_load((out.parent / "README.md").read_text().split("---")[1])
    assert front["library_name"] == "gguf" and "gguf" in front["tags"]
    assert (out.parent / "Modelfile").read_text().startswith("FROM ./tuned.gguf")


def test_cli_refuses_bad_export_arguments_in_one_line(run_config, tmp_path, capsys):
    from tuneforge.cli import main

    run = tmp_path / "run"
    (run / "adapter").mkdir(parents=True)
    (run / "config.yaml").write_text("model: x\n")
    cases = [([], "give --merged OUT (a Hugging Face folder) or --gguf OUT.gguf"),
             (["--gguf", str(tmp_path / "m.gguf"), "--quant", "q4_k"], "--quant 'q4_k': expected one of"),
             (["--gguf", str(tmp_path / "m.bin")], "the file name must end in .gguf"),
             (["--gguf", str(tmp_path / "no" / "m.gguf")], "does not exist")]
    for extra, message in cases:
        assert main(["export", str(run), *extra]) == 2
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


@pytest.mark.skipif(importlib.util.find_spec("llama_cpp") is None, reason="llama-cpp-python not installed")
def test_llama_cpp_agrees_with_transformers_on_the_same_file(smollm2_tokenizer, tmp_path):
    """Optional: llama.cpp itself loads the export and its logits match transformers' on the same file."""
    import llama_cpp

    model = tiny_llama(len(smollm2_tokenizer), layers=2, initializer_range=0.02).eval()
    path = tmp_path / "model.gguf"
    write_gguf(model, smollm2_tokenizer, path, "f32")
    ids = smollm2_tokenizer(SAMPLES[0])["input_ids"]
    runner = llama_cpp.Llama(str(path), logits_all=True, verbose=False, n_ctx=64)
    assert runner.tokenize(SAMPLES[0].encode(), add_bos=False) == ids
    runner.eval(ids)
    theirs = np.asarray(runner.scores[:len(ids)])
    inputs = {"input_ids": torch.tensor([ids]), "attention_mask": torch.ones(1, len(ids))}
    ours = logits(reloaded(path), inputs)
    assert np.abs(theirs - ours.numpy()).max() < 0.02
