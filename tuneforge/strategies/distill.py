"""Knowledge distillation from a teacher model (Hinton, Vinyals & Dean 2015, arXiv:1503.02531).

    loss = alpha * task + (1 - alpha) * T^2 * KL(teacher_T || student_T) + hidden_weight * (1 - cos(h_s, h_t))

The loop computes the task loss; this strategy scales it by `alpha` (`task_weight`) and returns the KD
term, averaged over the positions the task loss uses (answer tokens of a causal LM, or one per sequence
for classification). `kl: reverse` uses KL(student || teacher) instead (mode-seeking, MiniLLM). The
optional hidden term aligns the directions of the last hidden states (DistilBERT's cosine loss, Sanh et
al. 2019, arXiv:1910.01108) and needs equal hidden sizes.

Teachers:
- `base`: the frozen original model: the same model with injected modules disabled when only adapters
  train (no second copy in memory); a frozen copy when base weights train (full, layer-wise) or when a
  student is cut from the model;
- a path to a Hugging Face model folder with the student's vocabulary (token-level KD compares
  distributions token by token, so a different tokenizer is refused), or the same labels for
  classification.

DistilBERT-style students: `student: {keep_layers: [0, 2, 4]}` or `{every: 2}` keeps that subset of the
run model's transformer layers, initialised from them (Sanh et al. 2019, Sec. 3: "taking one layer out
of two"), renumbered 0..k-1 with the config updated, so `save_pretrained` (or `tuneforge export`)
writes a normal model folder of the smaller model. Deviation: `every: 2` keeps layers 0, 2, 4, ..., so on
a 12-layer teacher it drops the top layer (11); the released DistilBERT was initialised from teacher layers
[0, 2, 4, 7, 9, 11]. `keep_layers: [0, 2, 4, 7, 9, 11]` reproduces DistilBERT's choice exactly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor, nn

from tuneforge.errors import ModelError
from tuneforge.losses import hidden_cosine_loss, kd_loss
from tuneforge.reference import FrozenReference, KeptReference, frozen_copy, reference_bytes, tensor_bytes
from tuneforge.strategies import register
from tuneforge.strategies.base import Options, Strategy, StrategyContext
from tuneforge.surgery import layer_index, num_layers, replace_module

_LAYER_LISTS = ("layers", "layer", "h", "blocks", "block")


class StudentOptions(Options):
    keep_layers: list[int] | None = None  # teacher layer indices the student keeps, in order
    every: int | None = Field(None, ge=2)  # keep layers 0, every, 2*every, ...

    @model_validator(mode="after")
    def _one_rule(self) -> StudentOptions:
        if (self.keep_layers is None) == (self.every is None):
            raise ValueError("student: give exactly one of keep_layers (e.g. [0, 2, 4]) or every (e.g. 2)")
        return self


class DistillOptions(Options):
    teacher: str = "base"  # `base` (the frozen original) or a model folder
    temperature: float = Field(2.0, gt=0)
    alpha: float = Field(0.5, ge=0, le=1)  # weight of the task loss; 1 - alpha goes to the KD term
    kl: Literal["forward", "reverse"] = "forward"
    hidden_weight: float = Field(0.0, ge=0)
    student: StudentOptions | None = None


@register("distill", DistillOptions)
class Distill(Strategy):
    """Distil a teacher (frozen base or a model folder) into the trained model; optional smaller student."""

    identity_start = True  # an objective: the model is untouched (a student option drops layers)

    family = "objective"
    path_options: ClassVar[dict[str, tuple[str, ...]]] = {"teacher": ("base",)}  # a folder, or `base`
    options: DistillOptions

    def refuses_engine(self, engine: str) -> str | None:
        return ("it runs a teacher model beside the student; under sharding "
                "that copy would be whole on every process, and its weight reads would see one "
                "process's shards (use distributed.engine: ddp)")

    @classmethod
    def refuses(cls, other: type[Strategy]) -> str | None:
        if other.provides_heads:
            return (f"{other.name} gives every task a new head that no teacher has, so there is nothing to "
                    f"distil into it; distil one task at a time without {other.name}")
        return None

    def __init__(self, options: DistillOptions):
        super().__init__(options)
        self.teacher: nn.Module | FrozenReference | None = None
        self.teacher_path: Path | None = None
        self.kept = KeptReference()  # teacher `base`: the model before the first task, also after a resume

    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        opts = self.options
        if opts.teacher != "base":
            self.teacher_path = check_teacher(Path(opts.teacher), model, ctx)
        if opts.student is not None:
            total = num_layers(model)
            keep = opts.student.keep_layers or list(range(0, total, opts.student.every))
            if opts.teacher == "base":
                self.teacher = frozen_copy(model)  # the whole original, before layers are dropped
            keep_layers(model, keep)
        if opts.hidden_weight > 0:
            model.config.output_hidden_states = True  # the loop's forward then returns them
        return model

    def held_bytes(self, model: nn.Module, trainable: set[str], ctx: StrategyContext) -> int:
        if self.teacher_path is not None:  # a teacher folder, loaded in fp32 like the student
            return teacher_bytes(self.teacher_path)
        if isinstance(self.teacher, nn.Module):  # the whole original of a smaller student
            return tensor_bytes(self.teacher)
        return reference_bytes(model, trainable)

    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        if self.teacher_path is not None and self.teacher is None:
            self.teacher = load_teacher(self.teacher_path, ctx.task_type).to(ctx.device)
        elif self.teacher is None or isinstance(self.teacher, FrozenReference):
            self.teacher = self.kept.take(model)  # before the first update: still the original
        elif isinstance(self.teacher, nn.Module):
            self.teacher.to(ctx.device)
        if self.options.hidden_weight > 0:
            teacher_size = _config_of(self.teacher).hidden_size
            if teacher_size != model.config.hidden_size:
                raise ModelError(f"distill: hidden_weight needs equal hidden sizes (teacher {teacher_size}, "
                                 f"student {model.config.hidden_size}); set hidden_weight: 0")

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        self.kept.task_ended = True

    def state_dict(self) -> dict[str, Any]:
        return self.kept.state_dict("teacher.")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.kept.load_state_dict(state, "teacher.")

    def task_weight(self, ctx: StrategyContext) -> float:
        return self.options.alpha

    def loss(self, model: nn.Module, batch: dict, outputs, ctx: StrategyContext) -> dict[str, Tensor]:
        opts = self.options
        inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
        with torch.no_grad():
            teacher_out = self.teacher(**inputs, output_hidden_states=opts.hidden_weight > 0)
        if ctx.task_type == "classification":
            student_logits, teacher_logits, mask = outputs.logits, teacher_out.logits, None  # (B, C)
        else:  # position t predicts token t + 1: the task loss's positions are labels[:, 1:] != -100
            student_logits, teacher_logits = outputs.logits[:, :-1], teacher_out.logits[:, :-1]
            mask = batch["labels"][:, 1:] != -100
        if student_logits.shape[-1] != teacher_logits.shape[-1]:
            raise ModelError(f"distill: teacher gives {teacher_logits.shape[-1]} logits, the student "
                             f"{student_logits.shape[-1]}; "
                             "the teacher must share the student's vocabulary/labels")
        # token-weighted over the optimizer step, as the task loss: this micro-batch's summed KD over the
        # step's target count (outside the loop, with no step counts set: the micro-batch's own mean)
        targets = mask.sum() if mask is not None else student_logits.shape[0]
        kd = kd_loss(student_logits, teacher_logits, opts.temperature, opts.kl, mask) * targets
        terms = {"distill_kd": (1.0 - opts.alpha) * kd / (ctx.step_targets or max(1, targets))}
        if opts.hidden_weight > 0:
            real = batch["attention_mask"].bool()
            cosine = (hidden_cosine_loss(outputs.hidden_states[-1], teacher_out.hidden_states[-1], real)
                      * real.sum())
            denominator = ctx.step_tokens or real.sum().clamp(min=1)
            terms["distill_hidden"] = opts.hidden_weight * cosine / denominator
        return terms


def keep_layers(model: nn.Module, keep: list[int]) -> nn.Module:
    """Drop every transformer layer not in `keep` (in place); the kept ones are renumbered 0..k-1."""
    total = num_layers(model)
    bad = [i for i in keep if not 0 <= i < total]
    if bad or not keep or len(set(keep)) != len(keep):
        raise ModelError(f"distill: student keep_layers {keep} must be distinct indices 0-{total - 1}")
    name, layers = _layer_list(model, total)
    replace_module(model, name, nn.ModuleList([layers[i] for i in keep]))
    for new_index, layer in enumerate(model.get_submodule(name)):
        for module in layer.modules():
            if isinstance(getattr(module, "layer_idx", None), int):  # KV-cache slot of an attention layer
                module.layer_idx = new_index
    config = model.config
    config.num_hidden_layers = len(keep)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = [config.layer_types[i] for i in keep]
    return model


def _layer_list(model: nn.Module, total: int) -> tuple[str, nn.ModuleList]:
    for name, module in model.named_modules():
        listed = isinstance(module, nn.ModuleList) and name.rpartition(".")[2] in _LAYER_LISTS
        if listed and len(module) == total and all(layer_index(f"{name}.{i}") == i for i in range(total)):
            return name, module
    raise ModelError(f"distill: cannot find the list of transformer layers in {type(model).__name__}")


def check_teacher(path: Path, model: nn.Module, ctx: StrategyContext) -> Path:
    """Refuse a teacher the student cannot be distilled from token by token (or label by label)."""
    from tuneforge.models import load_tokenizer, resolve_model_path

    try:
        path = resolve_model_path(str(path))
    except ModelError as exc:
        raise ModelError(f"distill: teacher {path}: {exc} "
                         "(fine-tune the teacher first, or use teacher: base)") from None
    teacher_config = _read_config(path)
    if ctx.task_type == "classification":
        student = getattr(model.config, "id2label", None) or {}
        teacher = teacher_config.get("id2label") or {}
        student_labels = [student[i] for i in sorted(student)]
        teacher_labels = [teacher[k] for k in sorted(teacher, key=int)]
        if student_labels and teacher_labels and student_labels != teacher_labels:
            raise ModelError(f"distill: teacher {path} predicts labels {teacher_labels}, the student "
                             f"{student_labels}; use a teacher fine-tuned on this task's labels")
        return path
    student_vocab = ctx.tokenizer.get_vocab() if ctx.tokenizer is not None else None
    teacher_vocab = None
    if (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file():
        teacher_vocab = load_tokenizer(path).get_vocab()
    if student_vocab is not None and teacher_vocab is not None and student_vocab != teacher_vocab:
        raise ModelError(f"distill: teacher {path} uses a different vocabulary ({len(teacher_vocab)} tokens) "
                         f"from the student ({len(student_vocab)}); "
                         "token-level distillation needs the same tokenizer")
    teacher_size, student_size = teacher_config.get("vocab_size"), model.config.vocab_size
    if teacher_size is not None and teacher_size != student_size:
        raise ModelError(f"distill: teacher {path} has {teacher_size} output tokens, "
                         f"the student {student_size}; "
                         f"token-level distillation needs the same vocabulary")
    return path


def load_teacher(path: Path, task_type: str) -> nn.Module:
    """The teacher in eval mode with no parameter requiring grad."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    if task_type == "classification":
        teacher = AutoModelForSequenceClassification.from_pretrained(path, dtype=torch.float32,
                                                                     local_files_only=True)
    else:
        teacher = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, local_files_only=True)
    teacher.eval()
    teacher.requires_grad_(False)
    return teacher


def _read_config(path: Path) -> dict[str, Any]:
    import json

    return json.loads((path / "config.json").read_text())


def teacher_bytes(path: Path) -> int:
    """fp32 bytes of a teacher folder's weights, from its safetensors headers (no tensor is read)."""
    from safetensors import safe_open

    total = 0
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 - safe_open has no __iter__
                shape = handle.get_slice(key).get_shape()
                total += 4 * int(torch.Size(shape).numel())
    return total


def _config_of(teacher: nn.Module | FrozenReference) -> Any:
    return teacher.model.config if isinstance(teacher, FrozenReference) else teacher.config
