"""Tiny random models (hidden 32, 2 layers) of the architectures issue 18 lists, built offline."""

from __future__ import annotations

import torch
from torch import nn

VOCAB = 300
_SHAPE = {"vocab_size": VOCAB, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
          "num_attention_heads": 4, "max_position_embeddings": 128, "pad_token_id": 0, "bos_token_id": 1,
          "eos_token_id": 2}
# Decoders with Llama's module names (q_proj ... down_proj)
LLAMA_LIKE = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "stablelm", "olmo2", "granite")
ARCHITECTURES = (*LLAMA_LIKE, "phi3", "gpt2", "gpt_neox", "opt", "falcon", "bert")


def tiny_model(kind: str, seed: int = 0) -> nn.Module:
    """A random causal LM of `kind` (`config.model_type`), or a 3-label sequence classifier for `bert`."""
    import transformers as T

    torch.manual_seed(seed)
    if kind == "bert":
        return T.BertForSequenceClassification(T.BertConfig(**_SHAPE, num_labels=3))
    if kind == "gpt2":
        config = T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=128,
                              bos_token_id=1, eos_token_id=2)
    elif kind == "opt":
        config = T.OPTConfig(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                             num_attention_heads=4, word_embed_proj_dim=32, max_position_embeddings=128,
                             pad_token_id=0, bos_token_id=1, eos_token_id=2)
    elif kind == "falcon":
        config = T.FalconConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                bos_token_id=1, eos_token_id=2)
    elif kind == "gpt_neox":
        config = T.GPTNeoXConfig(**_SHAPE)
    else:
        extra = {} if kind == "phi3" else {"head_dim": 8}
        config = T.AutoConfig.for_model(kind, **_SHAPE, num_key_value_heads=2, **extra)
    return T.AutoModelForCausalLM.from_config(config)
