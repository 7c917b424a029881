"""Processes of a data-parallel run: the Accelerator, and the few collectives the loop needs.

Every helper is free on one process (no collective, no host sync beyond what it returns).
"""

from __future__ import annotations

import os

import torch
from accelerate import Accelerator, DistributedDataParallelKwargs

from tuneforge.errors import ConfigError

# what `accelerate launch` sets for sharded training (see docs/distributed.md for why it is refused)
SHARDED_LAUNCHES = {"ACCELERATE_USE_FSDP": "FSDP", "ACCELERATE_USE_DEEPSPEED": "DeepSpeed",
                    "ACCELERATE_USE_MEGATRON_LM": "Megatron-LM"}


def make_accelerator() -> Accelerator:
    """The run's Accelerator, the same under `python`, `torchrun` and `accelerate launch`.

    torchrun on a machine without GPUs: Accelerate only sets up CPU processes (gloo) when told `cpu=True`;
    otherwise every process would think it is rank 0 of one and write the same files, so that is checked.
    `find_unused_parameters`: a step may leave trainable parameters unused (a task's head, layers that
    gradual unfreezing has not reached yet), which plain DDP refuses. Sharding is tuneforge's own
    (`distributed.engine`, `tuneforge.engines`): Accelerate's FSDP and DeepSpeed launches are refused.
    """
    for variable, name in SHARDED_LAUNCHES.items():
        if os.environ.get(variable, "").lower() in ("1", "true"):
            engine = {"FSDP": "fsdp", "DeepSpeed": "deepspeed"}.get(name)
            instead = (f"set `distributed: {{engine: {engine}}}` in the config and launch with torchrun "
                       f"or plain `accelerate launch`" if engine else "launch data parallel instead")
            raise ConfigError(f"accelerate launch with {name}: tuneforge shards through its own engines; "
                              f"{instead} (docs/distributed.md)")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cpu = world > 1 and not torch.accelerator.is_available()
    ddp = DistributedDataParallelKwargs(find_unused_parameters=True)
    accelerator = Accelerator(cpu=cpu, kwargs_handlers=[ddp])
    if accelerator.num_processes != world:
        raise ConfigError(f"launched as {world} processes but the process group has "
                          f"{accelerator.num_processes}: every process would write the same run alone")
    return accelerator


def step_targets(count: int, accelerator: Accelerator) -> float:
    """What this process divides its summed loss by, so that a step's loss is the global token mean.

    DDP averages gradients over the `world` processes, so each divides by (all processes' targets / world):
    the average is then exactly the loss one process would take over the whole global batch.
    """
    if accelerator.num_processes == 1:
        return float(max(1, count))
    total = accelerator.reduce(torch.tensor(float(count), device=accelerator.device), "sum").item()
    return max(1.0, total) / accelerator.num_processes


def step_checks(loss: torch.Tensor, stop: int, accelerator: Accelerator) -> tuple[bool, int]:
    """(is the loss finite on every process, the largest stop code any process holds), in one collective.

    A stop code is 0 (go on) or a positive number naming why to stop (`tuneforge.stopping`); taking the
    maximum makes every process stop at the same step, for the same reason.
    """
    if accelerator.num_processes == 1:
        return bool(torch.isfinite(loss)), stop
    flags = torch.stack([(~torch.isfinite(loss.detach())).float().reshape(()),
                         torch.tensor(float(stop), device=loss.device)])
    bad, code = accelerator.reduce(flags, "max").tolist()
    return bad == 0, int(code)


def agreed_stop(stop: int, accelerator: Accelerator) -> int:
    """The largest stop code any process holds (one collective; none on one process)."""
    if accelerator.num_processes == 1:
        return stop
    return int(accelerator.reduce(torch.tensor(float(stop), device=accelerator.device), "max").item())


def mean_over_processes(values: dict[str, torch.Tensor], accelerator: Accelerator) -> dict[str, float]:
    """Scalar tensors averaged over processes (each holds its part of the global batch), as floats.

    One host sync for all of them: call it when a record is logged, not every step.
    """
    names = sorted(values)
    if not names:
        return {}
    stacked = torch.stack([
        torch.as_tensor(values[name], device=accelerator.device).detach().double().reshape(())
        for name in names])
    if accelerator.num_processes > 1:
        stacked = accelerator.reduce(stacked, "mean")
    return dict(zip(names, stacked.tolist(), strict=True))


def processes_memory(accelerator: Accelerator) -> dict[str, list[float]]:
    """Every process's memory in MiB, in rank order (one collective): `peak` since training started
    (`metrics.reset_peak_memory`) and `resident` now, freed memory handed back (`metrics.resident_memory_mb`;
    on a GPU, what the allocator holds)."""
    from tuneforge.metrics import peak_memory_mb, resident_memory_mb

    device = accelerator.device
    resident = torch.cuda.memory_allocated(device) / 2**20 if device.type == "cuda" else resident_memory_mb()
    peak = peak_memory_mb(device, since_reset=True)
    mine = torch.tensor([peak, resident], dtype=torch.float64, device=device)
    every = mine.reshape(1, 2) if accelerator.num_processes == 1 else accelerator.gather(mine).reshape(-1, 2)
    return {"peak": [round(v, 1) for v in every[:, 0].tolist()],
            "resident": [round(v, 1) for v in every[:, 1].tolist()]}
