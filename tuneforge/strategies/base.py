"""The one strategy interface, and what every strategy declares about itself.

Three families compose freely in one `strategies:` list:
- parametrizations decide what is trained or injected (full, layerwise, lora, ...);
- objectives add named loss terms (distillation, EWC, L2-SP, ...);
- schedules decide what data the loop sees (replay).
The training loop calls these hooks and never knows which strategies exist. Every fact about a strategy
lives on its class (the declarations below), so central modules (config, compose, run, export,
peft_layout, surgery, compare) read declarations and never name a strategy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

Family = Literal["parametrization", "objective", "schedule"]


class Options(BaseModel):
    """Base of every strategy's options: unknown options are errors."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class TaskInfo:
    """One task of the run, as strategies see it (task id = its index in `StrategyContext.tasks`)."""

    name: str
    task_type: str  # "causal_lm" or "classification"
    labels: tuple[str, ...] | None = None


@dataclass
class StrategyContext:
    """What a strategy may read about the run. The loop updates `epoch`, `step` and the micro-batch fields."""

    tokenizer: Any = None
    task_type: str = "causal_lm"  # or "classification"
    tasks: tuple[TaskInfo, ...] = ()  # every task of the run, in task-id order
    current_task: str | None = None  # the task being trained in a continual sequence (None: a mixture)
    epoch: int = 0
    step: int = 0  # optimizer steps done
    total_steps: int = 0
    num_epochs: int = 1  # epochs the loop will start (more than train.epochs when max_steps runs past them)
    base_lr: float = 0.0
    device: Any = None
    retain_batches: Any = None  # callable (batch_size, device) -> endless iterator of retain batches
    micro_index: int = 0  # which micro-batch of the optimizer step `loss` is called for
    micro_count: int = 1  # micro-batches in this optimizer step (grad_accum, or fewer at an epoch's end)
    step_rows: int = 0  # rows in the whole optimizer step on this process
    step_targets: float = 0.0  # the task loss's divisor: the step's loss targets (label tokens or rows)
    step_tokens: int = 0  # non-padding input tokens in the whole optimizer step on this process


@dataclass(frozen=True)
class PeftTranslation:
    """A strategy's PEFT form: `adapter_config.json` fields and tensor renames {our name: PEFT key}."""

    config: dict[str, Any]
    renames: dict[str, str] = field(default_factory=dict)


class Strategy:
    """No-op base class. Subclass it directly; never subclass a concrete strategy."""

    # ---- declarations: what the strategy is (read by compose, config, run, export, peft_layout) ----
    name: ClassVar[str] = ""  # set by `register`
    family: ClassVar[Family] = "parametrization"
    param_prefix: ClassVar[str | None] = None  # injected parameters carry this prefix, e.g. "lora_"
    trains_base_weights: ClassVar[bool] = False  # full, layerwise: the trained base weights are the result
    parameter_efficient: ClassVar[bool] = False  # trains a few injected parameters; the base stays frozen
    provides_heads: ClassVar[bool] = False  # owns the output heads: the model loads as a headless body
    is_default: ClassVar[bool] = False  # the parametrization implied when a list names none (one strategy)
    # options naming a file or folder (resolved like data paths), each with its keywords that are not paths
    path_options: ClassVar[dict[str, tuple[str, ...]]] = {}
    peft_type: ClassVar[str | None] = None  # PEFT's `peft_type` this strategy reads and writes
    # with default options, the prepared model's outputs at step 0 equal the base model's (zero-init or
    # identity-init injections, or nothing injected); the composition matrix checks it for every such list
    identity_start: ClassVar[bool] = False
    # `loss` returns a weight penalty, the whole step's value at every call (L2-SP, EWC): the loop counts it
    # once per step by weighting each micro-batch's call with its share of the step's rows
    step_penalty: ClassVar[bool] = False

    @classmethod
    def refuses(cls, other: type[Strategy]) -> str | None:
        """Why this strategy cannot share a list with `other` (None: it can). Checked both ways, before
        any model loads; say what to change."""
        return None

    @classmethod
    def refuses_run(cls, task_type: str, sequence: bool) -> str | None:
        """Why this strategy cannot train a run of `task_type` (`classification` when every task is, else
        `causal_lm`), trained as a task `sequence` or not (None: it can). Checked by `validate` before any
        model loads and by the strategy when training starts; say what to change."""
        return None

    def refuses_engine(self, engine: str) -> str | None:
        """Why this strategy, with its options, cannot train under the sharding `engine` (`fsdp`,
        `deepspeed`; None: it can). Checked before any model loads; say what to change."""
        return None

    def refuses_compile(self) -> str | None:
        """Why this strategy, with its options, cannot train with `train.compile` (None: it can). Checked
        before any model loads; say what to change."""
        return None

    @classmethod
    def label(cls, options: dict[str, Any]) -> str:
        """How reports name this strategy with these options (e.g. `lora (dora)`)."""
        return cls.name

    def __init__(self, options: Options):
        self.options = options

    # ---- surgery and trainable parameters ----
    def setup(self, model: nn.Module, ctx: StrategyContext) -> nn.Module:
        """Surgery: inject modules or wrap the model. Returns the (possibly new) model."""
        return model

    def trainable(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        """Names of parameters this strategy wants trained at `ctx.epoch` (may change by epoch)."""
        if self.param_prefix is None:
            return set()
        return {name for name, _ in model.named_parameters() if has_prefix(name, self.param_prefix)}

    def unused_parameters(self, model: nn.Module, ctx: StrategyContext) -> set[str]:
        """Base parameters no forward reaches once this strategy is applied (e.g. an output layer its routing
        bypasses). They stay frozen whatever other strategies ask: trained, they would get no gradient."""
        return set()

    def describe(self, model: nn.Module) -> str | None:
        """After `setup`: which modules this strategy matched, in one line for `tuneforge inspect` (e.g.
        `8 modules: model.layers.*.self_attn.{q_proj,v_proj}`); None when it matches none."""
        return None

    def held_bytes(self, model: nn.Module, trainable: set[str], ctx: StrategyContext) -> int:
        """Bytes this strategy holds beside the model while it trains (a frozen reference copy, anchors, a
        Fisher), for the memory estimate (`tuneforge.memory`); `trainable`: the names any epoch trains.
        Called after `setup`, possibly on a model on the meta device."""
        return 0

    def extra_forward_tokens(self, batch_size: int, max_seq_len: int) -> int:
        """Tokens of the forward passes with gradients this strategy's `loss` runs per micro-batch beyond the
        task batch (retention's retain sequences), with full logits; for the memory estimate."""
        return 0

    def param_groups(self, model: nn.Module, base_lr: float) -> dict[str, float]:
        """Optional per-parameter learning rates, `{name: lr}`; parameters not listed use `base_lr`."""
        return {}

    # ---- training ----
    def on_train_start(self, model: nn.Module, ctx: StrategyContext) -> None:
        """Called once before the first step (anchors for regularisers, teacher set-up)."""

    def loss(self, model: nn.Module, batch: dict, outputs: Any, ctx: StrategyContext) -> dict[str, Tensor]:
        """Extra loss terms of one micro-batch, already weighted, by name. The loop adds the task loss.

        Each term is this micro-batch's share of the optimizer step's term: a token-level term sums over
        the micro-batch and divides by the step's count (`ctx.step_targets` loss targets, `ctx.step_tokens`
        input tokens or `ctx.step_rows` rows), so B x accum 1 and B/2 x accum 2 give the same gradient.
        Weight penalties declare `step_penalty` and return the whole value instead.
        """
        return {}

    def needs_logits(self) -> bool:
        """Whether `loss` reads `outputs.logits` (or hidden states) at every position.

        When no strategy does, the loop takes a language model's task loss from the labelled positions only,
        with a chunked cross-entropy that never holds full-vocabulary logits, and `outputs.logits` is empty.
        Default: True exactly when the strategy overrides `loss`.
        """
        return type(self).loss is not Strategy.loss

    def task_weight(self, ctx: StrategyContext) -> float:
        """Factor on the loop's task loss (1.0 by default; distillation's alpha)."""
        return 1.0

    def task_items(self, items: list[dict], ctx: StrategyContext) -> list[dict]:
        """Schedules: the training items of the task about to start (replay mixes in stored ones)."""
        return items

    def on_task_end(self, model: nn.Module, task: str, ctx: StrategyContext) -> None:
        """Called after each task of a sequence (EWC Fisher, replay buffer)."""

    # ---- saving, merging, PEFT ----
    def adapter_state(self, model: nn.Module) -> dict[str, Tensor]:
        """The tensors `save_adapter` writes for this strategy (its injected parameters by default)."""
        if self.param_prefix is None:
            return {}
        return {name: t for name, t in model.state_dict().items() if has_prefix(name, self.param_prefix)}

    def adapter_options(self) -> dict[str, Any]:
        """The options `save_adapter` records to rebuild the modules `adapter_state` fits."""
        return self.options.model_dump(mode="json")

    def merged_modules(self, model: nn.Module) -> list[tuple[str, nn.Module]] | None:
        """The wrapped layers `unload` folds into base weights; None when the strategy cannot merge."""
        return None

    def unload(self, model: nn.Module) -> None:
        """Fold this strategy's injected update into the base weights and remove its modules."""

    def to_peft(self, model: nn.Module) -> PeftTranslation | None:
        """This strategy's adapter in PEFT's format (None when PEFT cannot express it)."""
        return None

    @classmethod
    def from_peft(cls, config: dict[str, Any]) -> tuple[dict[str, Any], dict[str, str]]:
        """Options rebuilding a PEFT adapter of `peft_type`, and renames {PEFT key: our name}."""
        raise NotImplementedError

    # ---- exact resume ----
    def state_dict(self) -> dict[str, Any]:
        """Strategy state a checkpoint needs for exact resume (tensors and JSON-able values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def has_prefix(name: str, prefix: str) -> bool:
    """Whether a dotted parameter or module name has a part starting with `prefix`."""
    return any(part.startswith(prefix) for part in name.split("."))
