"""`train.compile`: the transformer blocks run compiled by `torch.compile` while the loop trains.

Each block is compiled in place (`nn.Module.compile`, "regional compilation" as torchtune and torchtitan
do it): parameter names and state dicts stay those of the plain model, so checkpoints, resume, adapters and
merges are unchanged, and identical blocks share one compiled graph, so the first block's compile serves the
others. Inductor fuses the element-wise work between the matrix products (RMSNorm, SwiGLU, RoPE, residual
adds, LoRA's scaling) into a few loops; the matrix products and attention stay the library kernels they were.

Shapes: packed rows are one length; padded batches vary. The first step compiles for its shapes, and the
first step of another length recompiles once with that dimension symbolic (dynamo's automatic dynamic
shapes), so no later length recompiles. Each kind of block call (gradients or not, its input requiring
grad or not) is a further graph; `RECOMPILE_LIMIT` bounds them, past it dynamo runs the block eager.

Only the training steps run compiled. Evaluation (`eager`) and everything after the loop (generation with
a KV cache, export, a frozen deep copy) see the plain model: a KV cache specialises a graph per layer, and
a deep copy of a compiled module would call the original's compiled code.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from tuneforge.engines import SHARDED_ENGINES
from tuneforge.errors import ConfigError, TrainingError
from tuneforge.strategies import Strategy
from tuneforge.surgery import transformer_layers

BACKEND = "inductor"  # tests swap in dynamo's cheap "eager": the same tracing and guards, no codegen
# graphs per compiled code: a few kinds of call x (static, dynamic shapes), with room for a frozen bottom
RECOMPILE_LIMIT = 16


def compile_refusal(strategies: list[Strategy], engine: str) -> str | None:
    """Why `train.compile` cannot train these strategies under `engine` (None: it can)."""
    if engine in SHARDED_ENGINES:  # their wrapping and per-block collectives were not verified compiled
        return (f"train.compile under distributed.engine: {engine} is not supported "
                f"(use ddp, or compile: false)")
    for strategy in strategies:
        reason = strategy.refuses_compile()
        if reason:
            return f"train.compile with {strategy.name}: {reason}"
    return None


def check_compile(config, strategies: list[Strategy], where: str) -> None:
    """Refuse a run config's `train.compile` before any model loads (`where`: its file and line)."""
    reason = config.train.compile and compile_refusal(strategies, config.distributed.engine)
    if reason:
        raise ConfigError(f"{where}: {reason}")


@contextlib.contextmanager
def compiled_blocks(model: nn.Module, enabled: bool, strategies: list[Strategy],
                    engine: str = "ddp") -> Iterator[None]:
    """Within: `model`'s transformer blocks run through `torch.compile`; after, they are plain again and
    dynamo's compiled code is dropped (a later run in this process starts with the whole recompile limit).
    A combination `compile_refusal` refuses raises a `TrainingError`.
    """
    if not enabled:
        yield
        return
    reason = compile_refusal(strategies, engine)
    if reason:
        raise TrainingError(reason)
    blocks = [block for _, block in transformer_layers(model)]
    # a KV cache, which a training forward builds by default and never reads, would specialise one graph
    # per block (the cache is indexed by the block's number)
    configs = {id(config): config for module in model.modules()
               if getattr(config := getattr(module, "config", None), "use_cache", None)}
    with torch._dynamo.config.patch(recompile_limit=RECOMPILE_LIMIT):
        for block in blocks:
            block.compile(backend=BACKEND)
        for config in configs.values():
            config.use_cache = False
        try:
            yield
        finally:
            for config in configs.values():
                config.use_cache = True
            for block in blocks:
                block._compiled_call_impl = None  # what `nn.Module.compile` set: back to the eager call
            torch._dynamo.reset()


def eager() -> contextlib.AbstractContextManager:
    """Within: every compiled module runs eager (evaluation inside a compiled run)."""
    return torch.compiler.set_stance("force_eager")
