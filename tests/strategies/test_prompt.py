"""Soft prompts on sequence classifiers: padding invariance (decoder last-token pooling), deep copies."""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import tiny_llama

import tuneforge
from tuneforge.errors import ModelError
from tuneforge.evaluate import evaluate_classification

TOKENS = torch.randint(3, 300, (3, 9), generator=torch.Generator().manual_seed(0))
LENGTHS = [9, 6, 4]
PAIR = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))


def decoder_classifier(seed: int = 0):
    """A tiny LlamaForSequenceClassification: it pools the last non-pad token of input_ids."""
    from transformers import LlamaForSequenceClassification

    config = tiny_llama(seed=seed).config  # pad_token_id 0
    config.num_labels = 3
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(config)


def prompted_classifier():
    torch.manual_seed(0)
    return tuneforge.prepare(decoder_classifier(), [{"prompt": {"length": 4, "init": "random"}}])


def padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    mask = torch.zeros_like(TOKENS)
    for row, length in enumerate(LENGTHS):
        mask[row, :length] = 1
    return TOKENS.masked_fill(mask == 0, 0), mask  # right padding with pad id 0


def test_decoder_classifier_with_a_prompt_scores_a_padded_row_as_it_does_alone():
    model = prompted_classifier()
    input_ids, mask = padded_batch()
    for training in (False, True):  # the tiny Llama has no dropout: training mode is deterministic
        model.train(training)
        padded = model(input_ids=input_ids, attention_mask=mask).logits
        for row, length in enumerate(LENGTHS):
            alone = model(input_ids=input_ids[row:row + 1, :length]).logits[0]
            torch.testing.assert_close(padded[row], alone, atol=1e-5, rtol=1e-5)


def test_decoder_classifier_with_a_prompt_evaluates_the_same_in_any_batch():
    model = prompted_classifier()
    items = [{"input_ids": TOKENS[row, :length].tolist(), "labels": row % 3}
             for row, length in enumerate(LENGTHS)]
    together = evaluate_classification(model, items, batch_size=3, pad_token_id=0, device="cpu")
    singles = [evaluate_classification(model, [item], batch_size=1, pad_token_id=0, device="cpu")
               for item in items]
    assert abs(together["loss"] - sum(s["loss"] for s in singles) / len(singles)) < 1e-5


def test_deepcopy_of_a_prompted_model_is_independent():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    duplicate = copy.deepcopy(model)
    with torch.no_grad():
        before = duplicate(input_ids=TOKENS).logits.clone()
        model.prompt_encoder.embedding.add_(1.0)
        assert not torch.allclose(model(input_ids=TOKENS).logits, before)
        torch.testing.assert_close(duplicate(input_ids=TOKENS).logits, before, atol=0, rtol=0)
        duplicate.prompt_encoder.embedding.add_(1.0)  # the copy's hooks read the copy's prompt
        torch.testing.assert_close(duplicate(input_ids=TOKENS).logits, model(input_ids=TOKENS).logits)


def test_prompt_equals_prepending_the_embeddings_by_hand():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    base = tiny_llama().eval()
    embeds = torch.cat([model.prompt_encoder.embedding[None].expand(2, -1, -1),
                        base.model.embed_tokens(PAIR)], 1)
    expected = base(inputs_embeds=embeds).logits[:, 3:]
    torch.testing.assert_close(model(input_ids=PAIR).logits, expected, atol=1e-5, rtol=1e-5)


def test_prompt_extends_token_labels_for_the_models_own_loss():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    labels = PAIR.clone()
    labels[:, :4] = -100
    output = model(input_ids=PAIR, labels=labels)
    from tuneforge.evaluate import token_losses

    total, count = token_losses(output.logits, labels)
    torch.testing.assert_close(output.loss, total / count)


def test_prompt_right_padding_leaves_real_positions_unchanged():
    model = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 3}}]).eval()
    mask = torch.ones_like(PAIR)
    mask[1, 6:] = 0
    padded = model(input_ids=PAIR, attention_mask=mask).logits
    torch.testing.assert_close(padded[1, :6], model(input_ids=PAIR[1:, :6]).logits[0], atol=1e-5, rtol=1e-5)


def test_prompt_initialisations(tokenizer):
    from conftest import tiny_llama as build

    model = tuneforge.prepare(build(vocab_size=len(tokenizer)),
                              [{"prompt": {"length": 5, "init": "text", "init_text": "the cat"}}],
                              tokenizer=tokenizer)
    ids = tokenizer("the cat", add_special_tokens=False)["input_ids"]
    expected = model.model.embed_tokens.weight[torch.tensor((ids * 5)[:5])]
    torch.testing.assert_close(model.prompt_encoder.embedding, expected)
    vocab = tuneforge.prepare(tiny_llama(), [{"prompt": {"length": 4, "init": "vocab"}}])
    table = vocab.model.embed_tokens.weight
    assert all((table == row).all(-1).any() for row in vocab.prompt_encoder.embedding)
    with pytest.raises(ModelError, match="needs the tokenizer"):
        tuneforge.prepare(tiny_llama(), [{"prompt": {"init": "text", "init_text": "hi"}}])
    with pytest.raises(Exception, match="init: text needs init_text"):
        tuneforge.prepare(tiny_llama(), [{"prompt": {"init": "text"}}])
