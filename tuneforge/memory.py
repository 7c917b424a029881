"""Estimate a run's peak memory before any weight loads, and say what would make it fit.

The model is built on the meta device from its config (shapes only), the strategies are applied to it,
and the peak is the sum of
- weights (fp32, as tuneforge loads them; plus a bf16 copy of the weights autocast casts when
  `precision: bf16`);
- gradients and AdamW's two moments for every parameter any epoch trains (fp32: 12 bytes a parameter);
  gradients fill as the backward pass frees the saved tensors, so only the larger of the two counts
  (both, with gradient accumulation: earlier micro-batches' gradients stay through later forwards);
- what strategies hold beside the model (`Strategy.held_bytes`: a frozen reference, anchors, a Fisher);
- activations kept for the backward pass of the largest micro-batch (batch_size x its longest sequence,
  or max_seq_len when packing): counted by running the model's forward on the meta device and adding up
  every tensor autograd saves (what Korthikanti et al. 2022, "Reducing Activation Recomputation in Large
  Transformer Models", sec. 4, derive by hand), so any architecture and strategy is counted as it runs;
  plus one layer's worth for the gradients the backward pass holds; with gradient checkpointing, each
  layer's input plus two layers' worth (the layer recomputed, and its gradients);
- the output layer's logits: batch x sequence x vocabulary three times over (logits, log-softmax, their
  gradient) when a strategy reads every position, else one 64 MB chunk of the label-only head; and the
  forwards strategies run themselves (`Strategy.extra_forward_tokens`: retention's retain sequences),
  their saved tensors and full logits (with the frozen reference's);
- the runtime itself (the interpreter and libraries: this process's resident memory now, on a CPU).
`docs/results/memory_estimate.json` holds the check against measured peaks (`bench/memory_estimate.py`).
"""

from __future__ import annotations

import contextlib
import os
import resource
import sys
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tuneforge.config import RunConfig
from tuneforge.evaluate import CE_CHUNK_ELEMENTS, head_skipped, label_head
from tuneforge.surgery import layer_index

# fp32 values a decoder layer saves per token, in hidden sizes, when its forward cannot run on the meta
# device (a Llama layer saves about 16 with its feed-forward at 2.7x the hidden size: counted, see above)
FALLBACK_PER_TOKEN_LAYER = 16
BF16_ACTIVATIONS = 0.75  # share of the fp32 activations left under bf16 autocast (casts keep some fp32)
# bits a quantized base weight takes with its scales (docs/memory.md): nf4/fp4 blocks of 64 with an fp32
# absmax, int8 rows with a scale, GGUF Q4_1 blocks of 32 with fp16 scale and minimum (the bundled model)
BITS_PER_WEIGHT = {"nf4": 4.5, "fp4": 4.5, "int8": 8.05, "gguf": 5.0}


@dataclass
class MemoryEstimate:
    """Estimated peak bytes of a run, by part, against what the device has free."""

    parts: dict[str, int]
    device: str  # "cpu" or "cuda:N"
    available: int | None  # bytes free on the device now (None: unknown)
    notes: list[str] = field(default_factory=list)
    accumulating: bool = False  # grad_accum > 1: gradients and saved tensors add up

    @property
    def total(self) -> int:
        """The peak: everything held, and the larger of the forward's saved tensors (with the logits) and
        the gradients, which fill as the backward pass frees those tensors."""
        parts = self.parts
        if self.accumulating:  # earlier micro-batches' gradients stay through the later forwards
            return sum(parts.values())
        transient = max(parts["activations"] + parts["logits"], parts["gradients"])
        return sum(parts.values()) - parts["activations"] - parts["logits"] - parts["gradients"] + transient

    @property
    def fits(self) -> bool:
        """Whether the peak fits what is free; on a CPU the free memory already leaves out this process's
        own (the runtime part)."""
        if self.available is None:
            return True
        return self.total - self.parts["runtime"] <= self.available

    def as_dict(self) -> dict:
        return {"parts": self.parts, "total": self.total, "device": self.device, "available": self.available,
                "fits": self.fits, "notes": self.notes, "accumulating": self.accumulating}


def estimate_memory(config: RunConfig, run_data=None, device: torch.device | None = None) -> MemoryEstimate:
    """The peak memory `tuneforge train` would need for `config` (no weights are read)."""
    from tuneforge.compose import apply_strategies, build_strategies, trainable_in_any_epoch
    from tuneforge.models import load_tokenizer, meta_model, resolve_model_path
    from tuneforge.run import load_base_model
    from tuneforge.strategies import StrategyContext, TaskInfo
    from tuneforge.tasks import encode_run_data, load_run_data

    device = device or (torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu"))
    runtime = resident_bytes() if device.type == "cpu" else 0  # before anything below allocates
    run_data = run_data or load_run_data(config)
    strategies = build_strategies(config.strategies)
    tokenizer = load_tokenizer(resolve_model_path(config.model), config.trust_remote_code)

    def on_meta(name, task_type="causal_lm", labels=None, trust_remote_code=False, quantize="none"):
        return meta_model(name, task_type, labels, trust_remote_code), tokenizer, None

    model, _, _ = load_base_model(config, run_data, [s.name for s in strategies], loader=on_meta)
    tasks = tuple(TaskInfo(t.name, t.task_type, tuple(t.labels) if t.labels else None)
                  for t in run_data.tasks)
    sequence = config.schedule.mode == "sequence" and run_data.multi_task
    ctx = StrategyContext(tokenizer=tokenizer, task_type=run_data.task_type, tasks=tasks,
                          num_epochs=config.train.epochs, current_task=tasks[0].name if sequence else None)
    quantized = 0  # weights of the linear layers a quantized base stores packed
    if config.quantize != "none":
        from tuneforge.quantize import quantizable_linears

        quantized = sum(layer.weight.numel() for _, layer in quantizable_linears(model))
    with torch.device("meta"):
        model = apply_strategies(model, strategies, ctx)
    trainable = trainable_in_any_epoch(model, ctx, strategies)
    encode_run_data(run_data, config, tokenizer, tag_tasks=run_data.multi_task)
    lengths = [len(item["input_ids"]) for task in run_data.tasks for item in task.train_items]
    sequence_length = config.train.max_seq_len if config.train.packing else min(
        max(lengths, default=config.train.max_seq_len), config.train.max_seq_len)

    sizes = dict(model.named_parameters())
    trained = sum(sizes[name].numel() for name in trainable if name in sizes)
    notes = [f"largest micro-batch: {config.train.batch_size} x {sequence_length} tokens"]
    # strategies' own forwards with gradients (retention's retain text): activations grow with their tokens,
    # and their logits (with the reference's) are full
    extra_tokens = sum(s.extra_forward_tokens(config.train.batch_size, config.train.max_seq_len)
                       for s in strategies)
    extra = 1 + extra_tokens / (config.train.batch_size * sequence_length)
    if extra_tokens:
        notes.append(f"{extra_tokens} more tokens a micro-batch in strategies' own forwards")
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    if config.quantize != "none":  # the block linears stored quantized (tuneforge.quantize)
        weights -= int(quantized * (4 - BITS_PER_WEIGHT[config.quantize] / 8))
        notes.append(f"base linear layers stored {config.quantize} (~{BITS_PER_WEIGHT[config.quantize]} bits "
                     f"a weight)")
    bf16 = config.train.precision == "bf16"
    parts = {
        "weights": weights + (weights // 2 if bf16 else 0),
        "gradients": 4 * trained,
        "optimizer": 8 * trained,
        "strategies": sum(s.held_bytes(model, trainable, ctx) for s in strategies),
        "activations": int(activation_bytes(model, trainable, config.train.batch_size, sequence_length,
                                            config.train.gradient_checkpointing, bf16, notes) * extra),
        "logits": (logit_bytes(model, strategies, config.train.batch_size, sequence_length)
                   + 4 * 4 * extra_tokens * (getattr(model.config, "vocab_size", 0) or 0)
                   if any(t.task_type == "causal_lm" for t in run_data.tasks) else 0),
        "runtime": runtime,
    }
    return MemoryEstimate(parts, str(device), available_bytes(device), notes, config.train.grad_accum > 1)


def activation_bytes(model: nn.Module, trainable: set[str], batch: int, length: int, checkpointing: bool,
                     bf16: bool, notes: list[str]) -> int:
    """Bytes the backward pass of one micro-batch of `batch` x `length` tokens needs: what autograd saves
    (`saved_tensor_bytes`), plus the gradients of about one layer's saved tensors at a time; with
    checkpointing, each layer's input plus the layer being recomputed and its gradients."""
    try:
        total = saved_tensor_bytes(model, trainable, batch, length)
    except Exception as exc:  # noqa: BLE001 - a forward that needs real values: the rule of thumb instead
        notes.append(f"activations approximated ({type(exc).__name__} on the meta device)")
        total = FALLBACK_PER_TOKEN_LAYER * 4 * batch * length * _hidden_size(model) * _num_layers(model)
    layers = _num_layers(model)
    one_layer = total / max(layers, 1)
    if checkpointing and layers:  # what the checkpoints keep: each layer's input (counted so on a CPU)
        total, one_layer = 4 * batch * length * _hidden_size(model) * layers, 2 * one_layer
    scale = BF16_ACTIVATIONS if bf16 else 1.0
    return int(scale * (total + one_layer))


def _num_layers(model: nn.Module) -> int:
    indices = [i for name, _ in model.named_modules() if (i := layer_index(name)) is not None]
    return 1 + max(indices, default=-1)


def _hidden_size(model: nn.Module) -> int:
    return getattr(model.config, "hidden_size", None) or getattr(model.config, "n_embd", None) or 0


def saved_tensor_bytes(model: nn.Module, trainable: set[str], batch: int, length: int) -> int:
    """Bytes autograd saves in the forward of a `batch` x `length` micro-batch, each storage once.

    Counted, not modelled: the model (on the meta device, strategies applied, `trainable` requiring grad)
    runs its forward on a meta batch, and every tensor autograd saves is added up, except the weights it
    saves (they are counted once, as weights). With gradient checkpointing enabled on the model, what the
    checkpoints keep is what is counted.
    """
    saved: dict[int, int] = {}
    held = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}  # counted as weights

    def count(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in held:
            saved[storage._cdata] = max(saved.get(storage._cdata, 0), storage.nbytes())
        return tensor

    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    inputs = {"input_ids": torch.zeros(batch, length, dtype=torch.long, device="meta")}
    head = label_head(model)
    try:
        with torch.autograd.graph.saved_tensors_hooks(count, lambda tensor: tensor), fused_attention(), (
                head_skipped(head) if head is not None else contextlib.nullcontext()):
            model(**inputs)
    finally:
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(flags[name])
    return sum(saved.values())


class _FusedAttention(torch.autograd.Function):
    """What a fused attention kernel keeps for the backward pass (flash attention, Dao et al. 2022; PyTorch's
    CPU and CUDA kernels alike): query, key, value, the output and the log-sum-exp per query, no s x s
    matrix. Forward returns an empty output of the right shape (meta tensors carry no values anyway)."""

    @staticmethod
    def forward(ctx, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        output = query.new_empty(*query.shape[:-1], value.shape[-1])
        ctx.save_for_backward(query, key, value, output, query.new_empty(query.shape[:-1]))
        return output

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # never run: the estimate has no backward pass
        raise NotImplementedError


@contextlib.contextmanager
def fused_attention():
    """Count `scaled_dot_product_attention` as the fused kernel a real run dispatches to: the meta device
    only has the math fallback, which keeps the attention matrix. With dropout on attention probabilities
    PyTorch falls back to that math path too, and so does this count."""
    original = F.scaled_dot_product_attention

    def counted(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        if dropout_p > 0:
            return original(query, key, value, attn_mask, dropout_p, is_causal, **kwargs)
        return _FusedAttention.apply(query, key, value)

    F.scaled_dot_product_attention = counted
    try:
        yield
    finally:
        F.scaled_dot_product_attention = original


def logit_bytes(model: nn.Module, strategies, batch: int, length: int) -> int:
    """Bytes of a language model's logits: full (and their log-softmax and gradient) or one chunk."""
    vocab = getattr(model.config, "vocab_size", 0) or 0
    if label_head(model) is not None and not any(s.needs_logits() for s in strategies):
        return 2 * 4 * min(CE_CHUNK_ELEMENTS, batch * length * vocab)  # a chunk and its softmax gradient
    return 3 * 4 * batch * length * vocab


def resident_bytes() -> int:
    """This process's resident memory now (Linux), else its peak so far."""
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: the GPU's free memory, or the machine's available memory (cgroup limit
    included) on a CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    free = None
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
    except OSError:
        return None
    try:  # a container's limit, when lower than the machine's memory
        with open("/sys/fs/cgroup/memory.max") as handle:
            limit = handle.read().strip()
        with open("/sys/fs/cgroup/memory.current") as handle:
            used = int(handle.read().strip())
        if limit != "max" and free is not None:
            free = min(free, int(limit) - used)
    except (OSError, ValueError):
        pass
    return free


def format_estimate(estimate: MemoryEstimate) -> str:
    """The estimate as a few aligned lines, with the device's free memory."""
    head = (f"estimated peak memory: {_gib(estimate.total)} on {estimate.device} "
            f"({'; '.join(estimate.notes)})")
    lines = [head]
    lines += [f"  {name + ':':<13}{_gib(value):>10}" for name, value in estimate.parts.items() if value]
    if estimate.available is not None:
        verdict = "fits" if estimate.fits else "does NOT fit"
        lines.append(f"free on {estimate.device}: {_gib(estimate.available)} ({verdict})")
    return "\n".join(lines)


def _gib(size: int) -> str:
    return f"{size / 2**30:.2f} GiB" if size >= 2**30 else f"{size / 2**20:.0f} MiB"


def advice(estimate: MemoryEstimate, config: RunConfig) -> list[str]:
    """What would bring the estimate down: each change that applies, the one on the largest part first."""
    train, parts, tips = config.train, estimate.parts, []
    if train.batch_size > 1:
        smaller = (f"train.batch_size: {max(1, train.batch_size // 2)} with train.grad_accum: "
                   f"{train.grad_accum * 2} (the same optimizer steps)")
        tips.append((parts["activations"] / 2, smaller))
    if not train.gradient_checkpointing:
        tips.append((parts["activations"] * 0.7, "train.gradient_checkpointing: true"))
    if parts["optimizer"] > parts["weights"] / 10:  # most weights train
        efficient = "a parameter-efficient strategy (lora) instead of training every weight"
        tips.append((parts["optimizer"] + parts["gradients"], efficient))
    if config.quantize == "none" and parts["optimizer"] <= parts["weights"] / 10:  # a frozen base
        tips.append((parts["weights"] * 0.8, "quantize: nf4 (the frozen base in 4 bits, QLoRA)"))
    if train.precision == "fp32" and estimate.device.startswith("cuda"):
        tips.append((parts["activations"] / 4, "train.precision: bf16"))
    tips.append((parts["activations"] / 4, f"a shorter train.max_seq_len (now {train.max_seq_len})"))
    return [text for _, text in sorted(tips, key=lambda tip: -tip[0])]
