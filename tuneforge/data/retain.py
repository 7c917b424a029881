"""Retain data: original-domain text that forgetting is measured on, and a disjoint part regularisers use."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch

from tuneforge.data.encode import collate, encode_text_chunks
from tuneforge.data.formats import Example


def split_retain_documents(documents: list[Example]) -> tuple[list[Example], list[Example]]:
    """Retain documents for measuring forgetting, and disjoint ones that regularisers may train on.

    Objectives such as EWC or the retention loss must not see the text forgetting is measured on, or
    "forgets less" would partly be "memorised the test". Every third document goes to the regulariser pool.
    """
    if len(documents) < 3:
        return documents, documents
    return ([d for i, d in enumerate(documents) if i % 3 != 2],
            [d for i, d in enumerate(documents) if i % 3 == 2])


def retain_stream(pool: list[Example], tokenizer, max_seq_len: int, pool_chunks: int, default_batch_size: int,
                  seed: int) -> Callable[..., Iterator[dict]]:
    """A callable `(batch_size=None, device=None)` giving an endless, seeded stream of padded batches of
    the regulariser pool, cut into at most `pool_chunks` chunks of `max_seq_len` tokens.

    Encoded on first use, so runs whose strategies never ask for retain data pay nothing.
    """
    cache: list[dict] = []

    def stream(batch_size: int | None = None, device=None) -> Iterator[dict]:
        if not cache:
            cache.extend(encode_text_chunks(pool, tokenizer, max_seq_len, pool_chunks))
        size = min(batch_size or default_batch_size, len(cache))  # a small pool must not loop forever
        generator = torch.Generator().manual_seed(seed)
        while True:
            order = torch.randperm(len(cache), generator=generator).tolist()
            for start in range(0, len(order) - size + 1, size):
                batch = collate([cache[i] for i in order[start:start + size]], tokenizer.pad_token_id)
                yield {k: v.to(device) for k, v in batch.items()} if device is not None else batch

    return stream
