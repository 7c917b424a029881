"""Prompt tuning: a learned soft prompt prepended to every input (Lester et al. 2021, arXiv:2104.08691).

    inputs_embeds = [P ; E(input_ids)]          P: (length, hidden), the only trained parameters

The prompt is initialised from random vectors at the scale of the embedding matrix, from the embeddings of
random vocabulary tokens, or from the embeddings of a text (`init_text`, repeated to `length`), as in the
paper. The prompt `prompt_encoder.embedding` sits on the top-level model (base parameter names never change);
it is prepended inside the model's body (`model.base_model`: the transformer under the LM head or the
classifier), through forward hooks that are bound methods of the encoder, so a deep copy runs its own prompt:
- the body's first forward of a sequence (no KV cache yet) gets the prompt prepended and the attention mask,
  position ids and token type ids extended by `length` positions;
- later forwards of `generate` (the cache already holds the prompt) only get the mask and positions extended;
- the body's hidden states come back stripped of the virtual positions, aligned with `input_ids`.
Everything above the body sees the real tokens only, with its own inputs untouched: the LM head and its
loss, task heads (`heads`, in either list order), and a decoder classifier (`LlamaForSequenceClassification`)
whose pooling picks the last non-pad token of `input_ids`. Prepending at the top would hand that classifier
`inputs_embeds` only, and it would pool position -1, a pad in every shorter row of a right-padded batch;
here a padded row scores as it does alone. An encoder pooling inside the body (BERT's pooler) reads the
first position, the prompt's, as under PEFT's prompt tuning; a classifier reading the first hidden state
above the body (RoBERTa's head) reads the real first token, which has attended to the prompt.
"""

from __future__ import annotations

import inspect
from typing import Any, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.peft_layout import PROMPT_KEY
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, PeftTranslation, Strategy, StrategyContext

ENCODER_ATTR = "prompt_encoder"
WEIGHT_NAME = f"{ENCODER_ATTR}.embedding"  # the one tensor an adapter holds


class PromptEncoder(nn.Module):
    """Holds the soft prompt `embedding` (length, hidden); its hooks on the model's body prepend it."""

    def __init__(self, embedding: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.injected_disabled = False
        self._stripped: list[tuple[int, int]] = []  # (virtual, real) lengths of forwards in flight

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def before_forward(self, body: nn.Module, args: tuple, kwargs: dict):
        if self.injected_disabled:
            self._stripped.append((0, 0))
            return None
        if len(args) > 1:
            raise ModelError("prompt tuning: call the model with keyword arguments "
                             "(input_ids=..., attention_mask=...)")
        kwargs = dict(kwargs)
        if args:
            kwargs["input_ids"] = args[0]
        cache = kwargs.get("cache", kwargs.get("past_key_values"))
        first = cache is None or cache.get_seq_length() == 0
        length = self.length
        if first:
            embeds = kwargs.pop("inputs_embeds", None)
            input_ids = kwargs.pop("input_ids", None)
            if embeds is None:
                embeds = body.get_input_embeddings()(input_ids)  # (B, T, H)
            batch, real = embeds.shape[:2]
            prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, length + T, H)
            _prepend(kwargs, "token_type_ids", 0, length)
            positions = kwargs.get("position_ids")
            if positions is not None:
                virtual = torch.arange(length, device=positions.device).expand(*positions.shape[:-1], length)
                kwargs["position_ids"] = torch.cat([virtual, positions + length], dim=-1)
            self._stripped.append((length, real))
        else:
            if kwargs.get("position_ids") is not None:
                kwargs["position_ids"] = kwargs["position_ids"] + length
            self._stripped.append((0, 0))
        mask = kwargs.get("attention_mask")
        if mask is not None and mask.dim() == 2:
            _prepend(kwargs, "attention_mask", 1, length)
        return (), kwargs

    def after_forward(self, body: nn.Module, args: tuple, kwargs: dict, output):
        length, real = self._stripped.pop() if self._stripped else (0, 0)
        if not length:
            return output
        if isinstance(output, tuple):  # return_dict=False: the last hidden state comes first
            return (output[0][:, length:], *output[1:]) if output[0].shape[1] == length + real else output
        states = getattr(output, "last_hidden_state", None)
        if states is not None and states.dim() == 3 and states.shape[1] == length + real:
            output.last_hidden_state = states[:, length:]  # (B, T, H): aligned with input_ids again
            if getattr(output, "hidden_states", None) is not None:
                output.hidden_states = tuple(h[:, length:] for h in output.hidden_states)
        return output


def _prepend(kwargs: dict, key: str, value: int, length: int) -> None:
    tensor = kwargs.get(key)
    if tensor is not None:
        pad = torch.full((tensor.shape[0], length), value, dtype=tensor.dtype, device=tensor.device)
        kwargs[key] = torch.cat([pad, tensor], dim=1)


class PromptOptions(Options):
    length: int = Field(20, ge=1)  # number of virtual tokens
    init: Literal["random", "vocab", "text"] = "vocab"
    init_text: str | None = None

    @model_validator(mode="after")
    def _text_given(self) -> PromptOptions:
        if (self.init == "text") != (self.init_text is not None):
            raise ValueError("init: text needs init_text, and init_text needs init: text")
        return self


@register("prompt", PromptOptions)
class PromptTuning(Strategy):
    """A learned soft prompt prepended to every input (Lester et al.); works with generate; PEFT layout."""

    identity_start = False  # the soft prompt is prepended from step 0

    param_prefix = "prompt_"
    parameter_efficient = True
    peft_type = "PROMPT_TUNING"
    options: PromptOptions

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        if hasattr(model, ENCODER_ATTR):
            raise ModelError("prompt: the model already has a soft prompt (prompt listed twice?)")
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embeddings, nn.Embedding):
            raise ModelError(f"prompt: {type(model).__name__} has no input embedding layer "
                             f"to prepend a prompt to")
        body = embedding_body(model, embeddings)
        if not hasattr(body, "get_input_embeddings"):
            raise ModelError(f"prompt: the body of {type(model).__name__} has no input embedding layer")
        encoder = PromptEncoder(self._initial_prompt(embeddings.weight.detach(), ctx))
        model.add_module(ENCODER_ATTR, encoder)
        body.register_forward_pre_hook(encoder.before_forward, with_kwargs=True)
        body.register_forward_hook(encoder.after_forward, with_kwargs=True, always_call=True)
        return model

    def to_peft(self, model: nn.Module) -> PeftTranslation | None:
        """PEFT's layout, unless PEFT would compute something else: an encoder classifier whose head reads
        the first position of the body's output (RoBERTa, DeBERTa: no pooler inside the body) reads a
        virtual token in PEFT and the first real token here, so such an adapter gets no
        `adapter_config.json` rather than one that claims equality. BERT's pooler sits inside the body
        and reads the same position in both; decoder classifiers pool the last token."""
        body = embedding_body(model, model.get_input_embeddings())
        reads_first = heads_outside_body(model) and getattr(body, "pooler", None) is None
        if reads_first and not hasattr(model, "score"):
            return None
        return self._peft_translation(model)

    def _initial_prompt(self, table: Tensor, ctx: StrategyContext) -> Tensor:  # table: (vocab, hidden)
        opts, length = self.options, self.options.length
        if opts.init == "random":
            return torch.randn(length, table.shape[1], dtype=table.dtype, device=table.device) * table.std()
        if opts.init == "vocab":
            return table[torch.randint(0, table.shape[0], (length,))].clone()
        if ctx.tokenizer is None:
            raise ModelError("prompt: init: text needs the tokenizer "
                             "(tuneforge.prepare(model, strategies, tokenizer=...))")
        ids = ctx.tokenizer(opts.init_text, add_special_tokens=False)["input_ids"]
        if not ids:
            raise ModelError(f"prompt: init_text {opts.init_text!r} has no tokens")
        repeated = (ids * (length // len(ids) + 1))[:length]
        return table[torch.tensor(repeated)].clone()

    def adapter_options(self) -> dict:
        # The saved prompt replaces any initialisation, so a reload needs no tokenizer.
        return {"length": self.options.length, "init": "random", "init_text": None}

    def _peft_translation(self, model: nn.Module) -> PeftTranslation:
        config = model.config.get_text_config()
        return PeftTranslation({
            "peft_type": self.peft_type, "num_virtual_tokens": getattr(model, ENCODER_ATTR).length,
            "token_dim": config.hidden_size, "num_transformer_submodules": 1,
            "num_attention_heads": config.num_attention_heads, "num_layers": config.num_hidden_layers,
            "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        }, {WEIGHT_NAME: PROMPT_KEY})

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        return {"length": config["num_virtual_tokens"], "init": "random"}, {PROMPT_KEY: WEIGHT_NAME}


def embedding_body(model: nn.Module, embeddings: nn.Module) -> nn.Module:
    """The innermost module that embeds the tokens and takes `inputs_embeds` with an `attention_mask`: the
    prompt is prepended there. Usually `model.base_model`; OPT's LM calls `model.decoder` directly."""
    body = getattr(model, "base_model", model)
    while True:
        inner = next((child for child in body.children() if _takes_embeddings(child, embeddings)), None)
        if inner is None:
            return body
        body = inner


def _takes_embeddings(module: nn.Module, embeddings: nn.Module) -> bool:
    parameters = inspect.signature(module.forward).parameters
    holds = any(child is embeddings for child in module.modules())
    return holds and "inputs_embeds" in parameters and "attention_mask" in parameters


def heads_outside_body(model: nn.Module) -> list[nn.Module]:
    """Modules outside the body (`base_model`) of a sequence classifier: its classification head."""
    body = getattr(model, "base_model", None)
    if body is None or body is model or not type(model).__name__.endswith("ForSequenceClassification"):
        return []
    return [child for child in model.children() if child is not body]

