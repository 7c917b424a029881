"""The torch.distributed process group the sharded engines need, on one process as on several."""

from __future__ import annotations

import torch
import torch.distributed as dist
from accelerate import Accelerator


def ensure_process_group(accelerator: Accelerator) -> None:
    """Several processes: Accelerate has initialised the group (gloo on CPUs, NCCL on GPUs). One process:
    a group of one, in memory, so FSDP2 and DeepSpeed run unchanged (as one shard)."""
    if dist.is_initialized():
        return
    backend = "nccl" if accelerator.device.type == "cuda" else "gloo"
    dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1,
                            device_id=accelerator.device if accelerator.device.type == "cuda" else None)
    if accelerator.device.type == "cuda":
        torch.cuda.set_device(accelerator.device)
