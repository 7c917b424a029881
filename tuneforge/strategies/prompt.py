"""Prompt tuning: a learned soft prompt prepended to every input (Lester et al. 2021, arXiv:2104.08691).

    inputs_embeds = [P ; E(input_ids)]          P: (length, hidden), the only trained parameters

The prompt is initialised from random vectors at the scale of the embedding matrix, from the embeddings of
random vocabulary tokens, or from the embeddings of a text (`init_text`, repeated to `length`), as in the
paper. Wiring (forward hooks on the top-level model, so base parameter names never change):
- the first forward of a sequence (no KV cache yet) gets the prompt prepended and the attention mask,
  position ids and any token labels extended by `length` positions;
- later forwards of `generate` (the cache already holds the prompt) only get the mask and positions extended;
- logits (and hidden states) come back aligned with `input_ids`: the virtual positions are stripped, so the
  training loop and evaluation never see them.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext

ENCODER_ATTR = "prompt_encoder"


class PromptEncoder(nn.Module):
    """Holds the soft prompt `embedding` (length, hidden) and prepends it through hooks on the model."""

    def __init__(self, embedding: Tensor):
        super().__init__()
        self.embedding = nn.Parameter(embedding)
        self.injected_disabled = False
        self._stripped: list[tuple[int, int]] = []  # (virtual, real) lengths of forwards in flight

    @property
    def length(self) -> int:
        return self.embedding.shape[0]

    def before_forward(self, model: nn.Module, args: tuple, kwargs: dict):
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
                embeds = model.get_input_embeddings()(input_ids)  # (B, T, H)
            batch, real = embeds.shape[:2]
            prompt = self.embedding.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
            kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)  # (B, length + T, H)
            _prepend(kwargs, "token_type_ids", 0, length)
            labels = kwargs.get("labels")
            if labels is not None and labels.dim() == 2:  # token labels: no loss on virtual positions
                _prepend(kwargs, "labels", -100, length)
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

    def after_forward(self, model: nn.Module, args: tuple, kwargs: dict, output):
        length, real = self._stripped.pop() if self._stripped else (0, 0)
        logits = getattr(output, "logits", None)
        if length and logits is not None and logits.dim() == 3 and logits.shape[1] == length + real:
            output.logits = logits[:, length:]  # aligned with input_ids again
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
    options: PromptOptions

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        if hasattr(model, ENCODER_ATTR):
            raise ModelError("prompt: the model already has a soft prompt (prompt listed twice?)")
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if not isinstance(embeddings, nn.Embedding):
            raise ModelError(f"prompt: {type(model).__name__} has no input embedding layer "
                             f"to prepend a prompt to")
        encoder = PromptEncoder(self._initial_prompt(embeddings.weight.detach(), ctx))
        model.add_module(ENCODER_ATTR, encoder)
        model.register_forward_pre_hook(encoder.before_forward, with_kwargs=True)
        model.register_forward_hook(encoder.after_forward, with_kwargs=True, always_call=True)
        return model

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
