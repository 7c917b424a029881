"""Packing: whole examples share rows of `max_seq_len` tokens, so no compute goes to padding.

    row           [ a0 a1 a2 a3 | b0 b1 b2 | c0 c1 | pad pad ]
    position_ids  [ 0  1  2  3  | 0  1  2  | 0  1  | 2   3   ]    restart at every example
    labels        [ -  a1 a2 a3 | -  b1 b2 | -  c1 | -   -   ]    an example's first token is never a target

Attention stays inside each example. The model gets `position_ids` and *no* 2-D attention mask (and no KV
cache); transformers' mask builder (`masking_utils.find_packed_sequence_indices`) then reads the restarts
and builds a block-diagonal causal mask (sdpa / eager: a 4-D mask; flash-attention: its variable-length
kernel), so nothing here depends on the attention implementation or the device. Padding at the end of a
row needs no mask: causal attention never lets earlier tokens see it, and it carries no label. The
summed loss of a packed row is therefore exactly the sum of its examples' separate losses;
`check_packing` verifies that for the actual model and strategies before a run trains on packed rows.

With packing, `train.batch_size` counts rows of `max_seq_len` tokens (as in TRL/HF packing): a
micro-batch holds as many whole examples as first-fit places into that many rows. The batch's
`attention_mask` marks real tokens (for token counts); it is not passed to the model.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import torch
from torch import nn

from tuneforge import document_attention
from tuneforge.data import IGNORE_INDEX
from tuneforge.errors import ConfigError
from tuneforge.forward import model_inputs

if TYPE_CHECKING:
    from tuneforge.tasks import Plan

LOOKAHEAD = 64  # examples a micro-batch may look ahead to fill its rows (later ones wait for the next)


def first_fit_rows(lengths: list[int], capacity: int,
                   max_rows: int | None = None) -> tuple[list[list[int]], list[int]]:
    """Place items (by index into `lengths`) in order, each into the first row with room for it.

    Returns the rows and the items that did not fit once `max_rows` rows were open. Deterministic: the
    collate re-runs it on a micro-batch's items, in the plan's order, and gets the plan's rows back.
    """
    rows: list[list[int]] = []
    room: list[int] = []
    left_out: list[int] = []
    for index, length in enumerate(lengths):
        if length > capacity:
            raise ConfigError(f"packing: an example of {length} tokens does not fit a row of {capacity}")
        row = next((r for r, free in enumerate(room) if free >= length), None)
        if row is None:
            if max_rows is not None and len(rows) >= max_rows:
                left_out.append(index)
                continue
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(index)
        room[row] -= length
    return rows, left_out


def packing_plan(lengths: list[int], sizes: list[int], rows: int, capacity: int, seed: int,
                 grad_accum: int = 1) -> Plan:
    """A plan of optimizer steps of `grad_accum` micro-batches that each fill at most `rows` rows.

    `lengths` are the items' token counts; `sizes` split them into consecutive tasks (one task per
    micro-batch, as in `mixture_plan`). Every example is used once per epoch, in an order seeded by
    `seed + epoch`; tasks' micro-batches are interleaved at random (proportional sampling). Each process
    takes every `world`-th micro-batch (the last ones that do not make a full round are left out, so every
    process runs the same number of steps) and groups its micro-batches into steps; an epoch's last step
    may have fewer.
    """
    if sum(sizes) != len(lengths):
        raise ValueError(f"packing_plan: task sizes {sizes} do not add up to {len(lengths)} items")
    offsets = [sum(sizes[:task]) for task in range(len(sizes))]

    def plan(epoch: int, rank: int, world: int) -> list[list[list[int]]]:
        generator = torch.Generator().manual_seed(seed + epoch)
        batches = []
        for task, size in enumerate(sizes):
            order = [offsets[task] + i for i in torch.randperm(size, generator=generator).tolist()]
            batches += _fill(order, lengths, rows, capacity)
        if len(sizes) > 1:
            batches = [batches[i] for i in torch.randperm(len(batches), generator=generator).tolist()]
        usable = len(batches) // world * world
        mine = batches[rank:usable:world]
        return [mine[start:start + grad_accum] for start in range(0, len(mine), grad_accum)]

    return plan


def _fill(order: list[int], lengths: list[int], rows: int, capacity: int) -> list[list[int]]:
    """Cut `order` into micro-batches; an example that does not fit waits for the next micro-batch."""
    queue, batches = deque(order), []
    while queue:
        window = [queue.popleft() for _ in range(min(LOOKAHEAD, len(queue)))]
        _, left_out = first_fit_rows([lengths[i] for i in window], capacity, rows)
        # kept in window order: first-fit over just these, as the collate runs it, rebuilds the same rows
        # (the left-out items never changed a row's room)
        waiting = set(left_out)
        batches.append([index for position, index in enumerate(window) if position not in waiting])
        queue.extendleft(window[i] for i in reversed(left_out))
    return batches


def packed_collate(items: list[dict], pad_token_id: int, capacity: int) -> dict[str, torch.Tensor]:
    """Lay a micro-batch's items into first-fit rows of at most `capacity` tokens (see the module doc).

    Returns input_ids, labels, position_ids and attention_mask (1 on real tokens; for counting only),
    each (rows, width) with width the longest row; plus `task_id` (rows,) when items carry one.
    """
    lengths = [len(item["input_ids"]) for item in items]
    rows, _ = first_fit_rows(lengths, capacity)
    width = max(sum(lengths[i] for i in row) for row in rows)
    shape = (len(rows), width)
    input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
    labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros(shape, dtype=torch.long)
    real = torch.zeros(shape, dtype=torch.long)
    for r, row in enumerate(rows):
        start = 0
        for i in row:
            end = start + lengths[i]
            input_ids[r, start:end] = torch.tensor(items[i]["input_ids"])
            labels[r, start + 1:end] = torch.tensor(items[i]["labels"][1:])  # nothing predicts a first token
            positions[r, start:end] = torch.arange(lengths[i])
            real[r, start:end] = 1
            start = end
        # padding continues the last example's positions: a row holding one example stays "unpacked"
        positions[r, start:] = torch.arange(lengths[row[-1]], lengths[row[-1]] + width - start)
    batch = {"input_ids": input_ids, "labels": labels, "position_ids": positions, "attention_mask": real}
    if "task_id" in items[0]:
        batch["task_id"] = torch.full((len(rows),), items[0]["task_id"], dtype=torch.long)
    return batch


def packed_model_inputs(inputs: dict, batch: dict, documents: bool = False) -> dict:
    """Model inputs for a packed batch: positions that restart per example, no 2-D mask, no KV cache; with
    `documents` (a model using tuneforge.document_attention) also the examples' boundaries."""
    packed = {**inputs, "position_ids": batch["position_ids"], "attention_mask": None, "use_cache": False}
    if documents:
        packed.update(document_attention.boundaries(batch["position_ids"]))
    return packed


@torch.no_grad()
def check_packing(model: nn.Module, pad_token_id: int, device, row_length: int | None = None) -> str:
    """Refuse packing when packed examples would not give the outputs they give alone.

    Runs two short random examples separately and packed into one row (in eval mode, so dropout is off)
    and compares their logits. Fails e.g. for models whose attention ignores `position_ids`, or prompt
    tuning (one soft prompt would open the row, not each example). Given the rows' `row_length`, an sdpa
    model is first switched to per-document attention (tuneforge.document_attention), kept only when it
    passes the same comparison. Returns the attention packed rows will use: "documents" or "mask".
    """
    if row_length is not None and document_attention.enable(model, row_length, device):
        try:
            gap, tolerance = _packing_gap(model, pad_token_id, device)
        except Exception:  # noqa: BLE001 - whatever failed there, the mask path below is checked instead
            gap, tolerance = float("inf"), 0.0
        if gap <= tolerance:
            return "documents"
        document_attention.disable(model)
    gap, tolerance = _packing_gap(model, pad_token_id, device)
    if not gap <= tolerance:
        raise ConfigError(
            f"train.packing: examples packed into one row do not give the outputs they give alone (largest "
            f"logit difference {gap:.3g}); this model or a strategy (e.g. prompt tuning, "
            f"whose soft prompt would open only the row) does not keep packed examples apart; "
            f"set train.packing: false"
        )
    return "mask"


def _packing_gap(model: nn.Module, pad_token_id: int, device) -> tuple[float, float]:
    """The largest logit difference between two examples run alone and packed, and the tolerance."""
    was_training = model.training
    model.eval()
    try:
        vocab = model.get_input_embeddings().weight.shape[0]
        generator = torch.Generator().manual_seed(0)
        items = [{"input_ids": torch.randint(0, vocab, (n,), generator=generator).tolist()} for n in (5, 7)]
        for item in items:
            item["labels"] = list(item["input_ids"])
        alone = []
        for item in items:
            ids = torch.tensor([item["input_ids"]], device=device)
            alone.append(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float())
        packed = {k: v.to(device) for k, v in packed_collate(items, pad_token_id, 12).items()}
        inputs = packed_model_inputs(model_inputs(packed), packed,
                                     document_attention.uses_document_attention(model))
        logits = model(**inputs).logits[0].float()
        together = [logits[:5], logits[5:12]]
        gap = max(float((a - b).abs().max()) for a, b in zip(alone, together, strict=True))
        tolerance = 1e-4 if model.get_input_embeddings().weight.dtype == torch.float32 else 3e-2
    finally:
        model.train(was_training)
    return gap, tolerance * max(1.0, float(alone[0].abs().max()))
