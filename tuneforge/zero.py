"""DeepSpeed ZeRO: optimizer state (stage 1), gradients (2) and parameters (3) partitioned over processes.

Rajbhandari et al. 2020, "ZeRO: Memory Optimizations Toward Training Trillion Parameter Models". The loop's
own AdamW is handed to `deepspeed.initialize` (DeepSpeed wraps it); tuneforge keeps its learning-rate
schedule, gradient accumulation (the step's boundary is set explicitly) and loss scaling (the loss is
already the step's token mean: no division by the accumulation count). Checkpoints gather whole fp32
weights and AdamW moments per parameter (`safe_get_full_*`), so they are the same safetensors files an
unsharded run writes; nothing of DeepSpeed's pickled checkpoint format is used.

DeepSpeed is optional: `pip install tuneforge[deepspeed]` (built with `DS_BUILD_OPS=0`, pure Python; on a
machine without GPUs it runs with `DS_ACCELERATOR=cpu`, over gloo).
"""

from __future__ import annotations

import contextlib
import json
import os
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import Tensor, nn

from tuneforge.config import RunConfig, config_location
from tuneforge.engines import Engine
from tuneforge.errors import ConfigError
from tuneforge.process_group import ensure_process_group

# what tuneforge fills in from `train:`; a config may leave these out or set them to "auto"
FILLED = {"train_micro_batch_size_per_gpu": "train.batch_size",
          "gradient_accumulation_steps": "train.grad_accum",
          "gradient_clipping": "train.max_grad_norm",
          "train_batch_size": "train.batch_size x processes x train.grad_accum"}
REFUSED = {"optimizer": "tuneforge builds AdamW from train.lr and train.weight_decay",
           "scheduler": "tuneforge schedules the learning rate from train.schedule and train.warmup_steps",
           "fp16": "use train.precision: bf16"}


def import_deepspeed():
    """deepspeed, imported for this machine (its CPU accelerator without GPUs); one line if absent."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    try:
        import deepspeed
    except ImportError:
        raise ConfigError("distributed.engine: deepspeed needs DeepSpeed: "
                          "DS_BUILD_OPS=0 pip install --no-build-isolation deepspeed==0.19.8") from None
    return deepspeed


def resolve_deepspeed_config(config: RunConfig, world: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config `distributed.deepspeed` names (a JSON file or an inline mapping; ZeRO-2 when
    absent), checked against `train:` and completed from it for `world` processes (None: not known yet,
    as in `validate`). Errors name the file and the key."""
    raw = config.distributed.deepspeed
    where = config_location(config, "distributed.deepspeed")
    if raw is None:
        raw = {"zero_optimization": {"stage": 2}}
    elif isinstance(raw, str):
        path = Path(raw).expanduser()
        if not path.is_absolute():
            path = Path(config._origin[0]).parent / path
        try:
            raw = json.loads(path.read_text())
        except OSError as exc:
            raise ConfigError(f"{where}: {path}: {exc.strerror or exc}") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        where = str(path)
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: a DeepSpeed config is a JSON object")
    ds = json.loads(json.dumps(raw))  # a copy
    for key, reason in REFUSED.items():
        value = ds.get(key)
        enabled = not isinstance(value, dict) or value.get("enabled") is True
        if value is not None and (key != "fp16" or enabled):
            raise ConfigError(f"{where}: {key}: not used with tuneforge ({reason}); remove it")
    bf16 = isinstance(ds.get("bf16"), dict) and ds["bf16"].get("enabled") is True
    if bf16 and config.train.precision != "bf16":
        raise ConfigError(f"{where}: bf16.enabled is true but train.precision is fp32; set both alike")
    zero = ds.setdefault("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage", 0) not in (0, 1, 2, 3):
        raise ConfigError(f"{where}: zero_optimization.stage must be 0, 1, 2 or 3")
    train = config.train
    wanted = {"train_micro_batch_size_per_gpu": train.batch_size,
              "gradient_accumulation_steps": train.grad_accum,
              "gradient_clipping": train.max_grad_norm or 0.0,
              "train_batch_size": train.batch_size * (world or 1) * train.grad_accum}
    for key, value in wanted.items():
        if key == "train_batch_size" and world is None:
            continue
        given = ds.get(key, "auto")
        if given != "auto" and given != value:
            raise ConfigError(f"{where}: {key} is {given!r} but {FILLED[key]} gives {value!r}; "
                              f"set it to \"auto\" or leave it out")
        ds[key] = value
    ds.setdefault("zero_allow_untested_optimizer", True)  # the client optimizer is torch's AdamW
    ds.setdefault("zero_force_ds_cpu_optimizer", False)  # also with optimizer offload
    ds.setdefault("steps_per_print", 10**9)  # tuneforge logs
    return ds


class DeepSpeedEngine(Engine):
    name = "deepspeed"
    shards = True

    def __init__(self, accelerator: Accelerator, ds_config: dict[str, Any]):
        super().__init__(accelerator)
        self.ds_config = ds_config
        self.groups: list[list[nn.Parameter]] = []  # the optimizer's parameters, as the model holds them

    @property
    def stage(self) -> int:
        return int(self.ds_config["zero_optimization"].get("stage", 0))

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer):
        deepspeed = import_deepspeed()
        ensure_process_group(self.accelerator)
        self.groups = [list(group["params"]) for group in optimizer.param_groups]
        # DeepSpeed still calls collectives torch has renamed; the warning would repeat at every step
        warnings.filterwarnings("ignore", message=r".*is deprecated. Please use `torch\.distributed\.",
                                category=FutureWarning)
        engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                          config=self.ds_config, dist_init_required=False)
        return engine, ds_optimizer

    def parameters(self, optimizer) -> list[nn.Parameter]:
        return [p for group in self.groups for p in group]

    def unwrap(self, model: nn.Module) -> nn.Module:
        from deepspeed import DeepSpeedEngine as Wrapped

        return model.module if isinstance(model, Wrapped) else model

    def no_sync(self, model: nn.Module, last: bool):
        model.set_gradient_accumulation_boundary(last)  # gradients are reduced at the step's last micro-batch
        return contextlib.nullcontext()

    def backward(self, model: nn.Module, loss: Tensor) -> None:
        model.backward(loss, scale_wrt_gas=False)  # the loss is already this micro-batch's share of the step

    def step(self, model: nn.Module, optimizer, max_grad_norm: float | None) -> Tensor | None:
        model.step()  # clips (gradient_clipping), updates and zeroes the gradients
        norm = model.get_global_grad_norm()
        return None if norm is None or max_grad_norm is None else torch.as_tensor(float(norm))

    @contextlib.contextmanager
    def gathered(self, model: nn.Module) -> Iterator[nn.Module]:
        module = self.unwrap(model)
        if self.stage < 3:
            yield module
            return
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(module.parameters()), modifier_rank=None):
            yield module

    def held(self, model: nn.Module, optimizer) -> dict[str, float]:
        module = self.unwrap(model)
        total = sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in module.parameters())
        local = sum(p.ds_tensor.numel() if hasattr(p, "ds_id") else p.numel() for p in module.parameters())
        trained = sum(p.ds_numel if hasattr(p, "ds_id") else p.numel() for p in self.parameters(optimizer))
        base = optimizer.optimizer
        moments = sum(v.numel() for state in base.state.values() for k, v in state.items()
                      if isinstance(v, Tensor) and k in ("exp_avg", "exp_avg_sq"))
        return {"parameters": local / max(1, total), "optimizer_state": moments / max(1, 2 * trained)}

    def full_state(self, model: nn.Module, optimizer,
                   names: dict[int, str]) -> tuple[dict[str, Tensor], dict]:
        """Whole fp32 weights and AdamW moments on process 0 (CPU memory), gathered one tensor at a time
        (`safe_get_full_*`, a collective); the other processes keep nothing."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        keep = self.accelerator.is_main_process
        params = self.parameters(optimizer)
        weights: dict[str, Tensor] = {}
        for p in params:
            tensor = safe_get_full_fp32_param(p).detach().cpu()
            if keep:
                weights[names[id(p)]] = tensor.contiguous()
        step = self._step(optimizer)
        state: dict[int, dict] = {}
        for index, p in enumerate(params if step is not None else []):
            moments = {key: safe_get_full_optimizer_state(p, key).detach().cpu().contiguous()
                       for key in ("exp_avg", "exp_avg_sq")}
            if keep:
                state[index] = {"step": step.clone(), **moments}
        base = optimizer.optimizer
        index, param_groups = 0, []
        for group, members in zip(base.param_groups, self.groups, strict=True):
            hyper = {k: v for k, v in group.items() if k != "params"}
            param_groups.append({**hyper, "params": list(range(index, index + len(members)))})
            index += len(members)
        return weights, {"state": state, "param_groups": param_groups}

    def load_full_state(self, model: nn.Module, optimizer, weights: dict[str, Tensor],
                        optimizer_state: dict | None) -> None:
        import deepspeed
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        module = self.unwrap(model)
        parameters = dict(module.named_parameters())
        by_name = {id(p): n for n, p in parameters.items()}
        trained = self.parameters(optimizer)
        gather = (deepspeed.zero.GatheredParameters([parameters[n] for n in weights], modifier_rank=0)
                  if self.stage == 3 else contextlib.nullcontext())
        with torch.no_grad(), gather:  # the model's own (working) copy of each weight
            for name, tensor in weights.items():
                parameters[name].data.copy_(tensor.to(parameters[name].dtype))
        for p in trained:  # the fp32 master copy the optimizer steps
            safe_set_full_fp32_param(p, weights[by_name[id(p)]].to(p.device, torch.float32))
        if optimizer_state is None:
            return
        base = optimizer.optimizer
        saved = optimizer_state["state"]
        step = next(iter(saved.values()))["step"] if saved else None
        flats = (optimizer.fp32_partitioned_groups_flat if self.stage == 3
                 else [flat for group in base.param_groups for flat in group["params"]])
        if step is not None and not all("exp_avg" in base.state.get(flat, {}) for flat in flats):
            # AdamW's state before its first step: create it on the flat fp32 partitions, then (ZeRO-1/2)
            # let DeepSpeed link each parameter's fragment of it, which 0.19 does after the first step
            for flat in flats:
                base.state[flat] = {"step": torch.zeros((), dtype=torch.float32, device=flat.device),
                                    "exp_avg": torch.zeros_like(flat), "exp_avg_sq": torch.zeros_like(flat)}
            if self.stage < 3:
                optimizer._lazy_init_hp_params_optimizer_state()
        for index, p in enumerate(trained):
            values = optimizer_state["state"].get(index, optimizer_state["state"].get(str(index)))
            if values is None:
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(p, values[key].to(p.device, torch.float32), key)
        for group, hyper in zip(base.param_groups, optimizer_state["param_groups"], strict=True):
            group.update({k: v for k, v in hyper.items() if k != "params"})
        for state in base.state.values():
            if step is not None and "step" in state:
                state["step"] = step.clone().to(torch.as_tensor(state["step"]).device)

    def _step(self, optimizer) -> Tensor | None:
        """AdamW's step count (one for every partition: they step together); None before the first step."""
        for state in optimizer.optimizer.state.values():
            if "step" in state:
                return torch.as_tensor(state["step"]).detach().cpu().clone()
        return None
