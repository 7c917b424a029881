"""How the loop's model and optimizer are spread over processes: `distributed.engine` in the config.

- `ddp` (the default): every process holds the whole model; Accelerate wraps it in DDP when there are
  several processes (`Engine`, this module).
- `fsdp`: FSDP2 shards parameters, gradients and AdamW state per decoder layer (`tuneforge.fsdp`).
- `deepspeed`: DeepSpeed ZeRO stage 1, 2 or 3 (`tuneforge.zero`).

The loop talks to an engine through a handful of calls (prepare, no_sync, backward, step, gathered) and
checkpoints through `full_state` / `load_full_state`, which exchange the same whole tensors an unsharded
run holds. So a sharded run writes the checkpoint, adapter and merged export an unsharded run writes, and
a checkpoint resumes on any number of processes.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from tuneforge.errors import ConfigError

SHARDED_ENGINES = ("fsdp", "deepspeed")


class Engine:
    """Whole copies on every process: plain training on one, Accelerate's DDP on several."""

    name = "ddp"
    shards = False

    def __init__(self, accelerator: Accelerator):
        self.accelerator = accelerator

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """(model, optimizer) ready to train. Every parameter of `optimizer` requires grad on entry."""
        return self.accelerator.prepare(model, optimizer)

    def parameters(self, optimizer) -> list[nn.Parameter]:
        """The model's parameters `optimizer` trains, in its group order (an index in a state dict)."""
        return [p for group in optimizer.param_groups for p in group["params"]]

    def unwrap(self, model: nn.Module) -> nn.Module:
        """The module strategies see (their hooks, parameters by name)."""
        return self.accelerator.unwrap_model(model)

    def no_sync(self, model: nn.Module, last: bool):
        """Around a micro-batch's forward and backward: gradients are exchanged only at the step's last."""
        return contextlib.nullcontext() if last else self.accelerator.no_sync(model)

    def backward(self, model: nn.Module, loss: Tensor) -> None:
        self.accelerator.backward(loss)

    def step(self, model: nn.Module, optimizer, max_grad_norm: float | None) -> Tensor | None:
        """Clip to `max_grad_norm`, update, zero every gradient; returns the norm before clipping."""
        grad_norm = None
        if max_grad_norm is not None:
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = self.accelerator.clip_grad_norm_(trainable, max_grad_norm)
        optimizer.step()
        model.zero_grad(set_to_none=True)  # every parameter's, not only the optimizer's
        return grad_norm

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """Within: the unwrapped model's parameters are whole tensors on every process (writing an adapter
        or a merged model). Every process must enter."""
        yield self.unwrap(model)

    def held(self, model: nn.Module, optimizer) -> dict[str, float]:
        """The share of the model's parameters, and of the optimizer's state, this process holds (1.0: whole
        copies). Call after an optimizer step (the state exists then)."""
        return {"parameters": 1.0, "optimizer_state": 1.0}

    # ---- checkpoints: whole tensors in, whole tensors out (every process calls; collectives inside) ----
    def full_state(self, model: nn.Module, optimizer,
                   names: dict[int, str]) -> tuple[dict[str, Tensor], dict]:
        """(trained weights by name, optimizer state dict in torch's AdamW layout), whole and on the CPU."""
        weights = {names[id(p)]: p.detach().cpu().contiguous() for p in self.parameters(optimizer)}
        return weights, optimizer.state_dict()

    def load_full_state(self, model: nn.Module, optimizer, weights: dict[str, Tensor],
                        optimizer_state: dict | None) -> None:
        """Put whole weights (and, when given, a whole optimizer state) back into the trained model."""
        parameters = dict(self.unwrap(model).named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(tensor)
        if optimizer_state is not None:
            optimizer.load_state_dict(optimizer_state)



def make_engine(config, accelerator: Accelerator) -> Engine:
    """The engine `config.distributed` names; a sharded one on a single process runs as one shard."""
    engine = config.distributed.engine
    if engine == "fsdp":
        from tuneforge.fsdp import FsdpEngine

        return FsdpEngine(accelerator, config.distributed.fsdp)
    if engine == "deepspeed":
        from tuneforge.zero import DeepSpeedEngine, resolve_deepspeed_config

        return DeepSpeedEngine(accelerator, resolve_deepspeed_config(config, accelerator.num_processes))
    return Engine(accelerator)


def engine_refusal(config, strategies) -> str | None:
    """Why `config`'s strategies or schedule cannot train under its sharded engine (None: they can)."""
    engine = config.distributed.engine
    if engine not in SHARDED_ENGINES:
        return None
    if config.schedule.mode == "sequence" and config.tasks and len(config.tasks) > 1:
        return (f"distributed.engine: {engine} trains one mixture; a continual sequence rebuilds the "
                f"optimizer per task (use engine: ddp)")
    if config.evaluation.benchmarks:
        return (f"distributed.engine: {engine} with evaluation.benchmarks is not supported: lm-eval runs "
                f"the model outside tuneforge's lock-step evaluation (use ddp)")
    if config.quantize != "none":
        return f"distributed.engine: {engine} with quantize: {config.quantize} is not supported (use ddp)"
    for strategy in strategies:
        reason = strategy.refuses_engine(engine)
        if reason:
            return f"{strategy.name} under distributed.engine: {engine}: {reason}"
    return None


def check_engine(config, strategies, where: str) -> None:
    reason = engine_refusal(config, strategies)
    if reason:
        raise ConfigError(f"{where}: {reason}")
