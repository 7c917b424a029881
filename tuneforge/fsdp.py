"""FSDP2 (`torch.distributed.fsdp.fully_shard`): parameters, gradients and AdamW state sharded over processes.

Each transformer block is its own FSDP unit, then the root (embeddings, final norm, head, anything a
strategy put outside the blocks). A unit's weights are all-gathered for its forward and backward and
freed afterwards (`reshard_after_forward`), gradients are reduce-scattered, and AdamW steps each process's
shard. Zhao et al. 2023, "PyTorch FSDP: Experiences on Scaling Fully Sharded Data Parallel"; FSDP2 keeps
each parameter a DTensor sharded on dim 0 (per-parameter sharding), so frozen and trainable parameters
share a unit, which LoRA and adapters need.

FSDP1 is not used: gathering a full state dict with `offload_to_cpu=True` crashes on CPU (pytorch#188989).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from accelerate import Accelerator
from torch import Tensor, nn
from torch.distributed.fsdp import CPUOffloadPolicy, FSDPModule, OffloadPolicy, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor

from tuneforge.engines import Engine
from tuneforge.process_group import ensure_process_group
from tuneforge.surgery import transformer_layers


class FsdpEngine(Engine):
    name = "fsdp"
    shards = True

    def __init__(self, accelerator: Accelerator, options):
        super().__init__(accelerator)
        self.options = options

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        """Shard `model` block by block, then point `optimizer` (not stepped yet) at the sharded parameters,
        which replace the originals."""
        ensure_process_group(self.accelerator)
        names = {id(p): n for n, p in model.named_parameters()}
        groups = [[names[id(p)] for p in group["params"]] for group in optimizer.param_groups]
        offload = CPUOffloadPolicy() if self.options.cpu_offload else OffloadPolicy()
        settings = {"reshard_after_forward": self.options.reshard_after_forward, "offload_policy": offload}
        for _, layer in transformer_layers(model):
            fully_shard(layer, **settings)
        fully_shard(model, **settings)
        parameters = dict(model.named_parameters())
        for group, members in zip(optimizer.param_groups, groups, strict=True):
            group["params"] = [parameters[name] for name in members]
        return model, optimizer

    def unwrap(self, model: nn.Module) -> nn.Module:
        return model  # fully_shard changes the modules in place

    def no_sync(self, model: nn.Module, last: bool):
        """Micro-batches before the step's last keep their gradients unsharded and unreduced."""
        if isinstance(model, FSDPModule):
            model.set_requires_gradient_sync(last)
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: Tensor) -> None:
        loss.backward()

    def step(self, model: nn.Module, optimizer, max_grad_norm: float | None) -> Tensor | None:
        grad_norm = None
        if max_grad_norm is not None:  # DTensor gradients: the norm is reduced over every shard
            trainable = [p for p in model.parameters() if p.requires_grad]
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
            grad_norm = grad_norm.full_tensor() if isinstance(grad_norm, DTensor) else grad_norm
        optimizer.step()
        model.zero_grad(set_to_none=True)
        return grad_norm

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        """Every sharded parameter swapped for a whole plain one (tied weights stay one tensor), then back."""
        whole_of: dict[int, nn.Parameter] = {}
        swapped = []
        for module in model.modules():
            for name, parameter in list(module._parameters.items()):
                if isinstance(parameter, DTensor):
                    if id(parameter) not in whole_of:
                        whole_of[id(parameter)] = nn.Parameter(parameter.full_tensor().detach(),
                                                               requires_grad=parameter.requires_grad)
                    module._parameters[name] = whole_of[id(parameter)]
                    swapped.append((module, name, parameter))
        try:
            yield model
        finally:
            for module, name, parameter in swapped:
                module._parameters[name] = parameter

    def held(self, model: nn.Module, optimizer) -> dict[str, float]:
        parameters = list(model.parameters())
        states = [v for state in optimizer.state.values() for v in state.values()
                  if isinstance(v, Tensor) and v.dim()]
        return {"parameters": local_share(parameters), "optimizer_state": local_share(states)}

    def full_state(self, model: nn.Module, optimizer,
                   names: dict[int, str]) -> tuple[dict[str, Tensor], dict]:
        """Whole tensors on process 0 (CPU memory: 12 bytes a trained parameter with AdamW), gathered one
        at a time; the other processes keep nothing."""
        keep = self.accelerator.is_main_process
        params = [p for group in optimizer.param_groups for p in group["params"]]
        weights = {}
        for p in params:
            tensor = whole(p.detach())
            if keep:
                weights[names[id(p)]] = tensor
        state = optimizer.state_dict()  # its per-parameter dicts are the live state: copied, not changed
        packed = {}
        for index, values in state["state"].items():
            packed[index] = {}
            for key, value in values.items():
                gathered = whole(value) if isinstance(value, Tensor) else value  # every process gathers
                packed[index][key] = gathered if keep else None
        return weights, {**state, "state": packed}

    def load_full_state(self, model: nn.Module, optimizer, weights: dict[str, Tensor],
                        optimizer_state: dict | None) -> None:
        parameters = dict(model.named_parameters())
        with torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(shard_like(tensor, parameters[name]))
        if optimizer_state is None:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        state = dict(optimizer_state)
        state["state"] = {index: {key: shard_like(value, params[int(index)])
                                  if isinstance(value, Tensor) and value.dim() else value
                                  for key, value in values.items()}
                          for index, values in optimizer_state["state"].items()}
        optimizer.load_state_dict(state)


def local_share(tensors: list[Tensor]) -> float:
    """Elements this process holds of `tensors`, over their whole size (DTensors hold a shard)."""
    local = sum(t.to_local().numel() if isinstance(t, DTensor) else t.numel() for t in tensors)
    return local / max(1, sum(t.numel() for t in tensors))


def whole(tensor: Tensor) -> Tensor:
    """The whole tensor on the CPU (an all-gather for a DTensor: every process calls)."""
    if isinstance(tensor, DTensor):
        tensor = tensor.full_tensor()
    return tensor.detach().cpu().contiguous()


def shard_like(tensor: Tensor, like: Tensor) -> Tensor:
    """`tensor` (whole, the same on every process) as a DTensor sharded like `like`; no communication."""
    if not isinstance(like, DTensor):
        return tensor.to(like.device)
    return distribute_tensor(tensor.to(like.device, like.dtype), like.device_mesh, like.placements,
                             src_data_rank=None)
