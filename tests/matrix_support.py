"""Helpers of the composition matrix (tests/test_composition_matrix.py): the cases, their run configs, and one
short trial per case that records what the cheap invariants need.

Everything here is generated from `tuneforge.strategies.REGISTRY`: a newly registered strategy joins every
pair the day it is registered. Only its tiny default options below (`OPTIONS`) may need an entry; without
one it runs with its own defaults.
"""

from __future__ import annotations

import itertools
import json
import math
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from tuneforge.compose import build_strategies
from tuneforge.errors import ConfigError, ModelError
from tuneforge.strategies import REGISTRY, refusal

# tiny Llama causal LM; LlamaForSequenceClassification; tiny BERT classifier
KINDS = ("lm", "dec_cls", "enc_cls")

# Tiny options per strategy (dropout 0 everywhere: invariant 4 compares two runs bit for bit up to rounding).
OPTIONS: dict[str, dict] = {
    "full": {},
    "layerwise": {"train_layers": "top:1", "lr_decay": 0.9},
    "lora": {"rank": 2, "targets": "all-linear"},
    "adapter": {"placement": "houlsby", "bottleneck_size": 4},
    "prefix": {"length": 2},
    "prompt": {"length": 2},
    "ia3": {},
    "heads": {"dropout": 0.0},
    "distill": {"teacher": "base", "temperature": 2.0, "alpha": 0.5},
    "l2sp": {"weight": 1.0},
    "ewc": {"weight": 10.0, "fisher_samples": 2},
    "retention": {"weight": 1.0},
    "dropout": {"attention": 0.0},
    "replay": {"buffer_size": 8, "ratio": 0.5},
}
# Options a model kind needs (BERT has no k_proj/v_proj/down_proj for IA3's defaults).
KIND_OPTIONS: dict[tuple[str, str], dict] = {
    ("ia3", "enc_cls"): {"targets": ["key", "value"], "feedforward_targets": []},
}


# Options a strategy needs next to another: LoRA on all-linear would wrap IA3's layers again (refused at
# setup: "already wrapped ... give the two strategies different targets"), so with IA3 it takes the other
# layers.
WITH_OPTIONS: dict[tuple[str, str, str], dict] = {
    ("lora", "ia3", "lm"): {"targets": ["q_proj", "o_proj", "gate_proj", "up_proj"]},
    ("lora", "ia3", "dec_cls"): {"targets": ["q_proj", "o_proj", "gate_proj", "up_proj"]},
    ("lora", "ia3", "enc_cls"): {"targets": ["query", "dense"]},
}


def options(name: str, kind: str, names: tuple[str, ...] = ()) -> dict:
    found = {**OPTIONS.get(name, {}), **KIND_OPTIONS.get((name, kind), {})}
    for other in names:
        found.update(WITH_OPTIONS.get((name, other, kind), {}))
    return found


@dataclass(frozen=True)
class Hybrid:
    """A named hybrid from the README/examples, and the context it needs."""

    id: str
    names: tuple[str, ...]
    context: str | None = None  # None: derived like a pair's; "mixture": two tasks sampled together
    kinds: tuple[str, ...] = KINDS
    why_not: str = ""  # why the other kinds are left out


_MIXED = ("EWC/retention on a mixture need retain text, which only a causal-LM run has: one language-model "
          "and one classification task on the decoder")
HYBRIDS = [
    Hybrid("adapter+distill", ("adapter", "distill")),
    Hybrid("layerwise+prefix", ("layerwise", "prefix")),
    Hybrid("lora+ewc+distill", ("lora", "ewc", "distill")),
    Hybrid("replay+lora", ("lora", "replay")),
    Hybrid("multitask-lora+ewc", ("lora", "ewc"), context="mixture", kinds=("lm",),
           why_not="examples/hybrids/multitask-ewc.yaml: a mixture of two chat tasks with retain text"),
    Hybrid("multitask-heads+ewc", ("heads", "ewc"), context="mixture", kinds=("lm",), why_not=_MIXED),
    Hybrid("multitask-lora+heads+ewc", ("lora", "heads", "ewc"), context="mixture", kinds=("lm",),
           why_not=_MIXED),
    Hybrid("multitask-full+heads+retention", ("full", "heads", "retention"), context="mixture", kinds=("lm",),
           why_not=_MIXED),
]


@dataclass(frozen=True)
class Case:
    combo: str  # e.g. "lora+ewc"
    names: tuple[str, ...]
    kind: str
    context: str  # "single", "sequence" (two tasks one after another) or "mixture" (two tasks together)
    skip: str = ""  # why this combination does not apply to this model kind

    @property
    def id(self) -> str:
        return f"{self.combo}-{self.kind}"

    @property
    def strategies(self) -> list[dict]:
        return [{name: options(name, self.kind, self.names)} for name in self.names]

    @property
    def declared_identity(self) -> bool:
        return all(REGISTRY[name].cls.identity_start for name in self.names)

    @property
    def keeps_reference(self) -> bool:
        """Whether some strategy holds a frozen reference or teacher (an attribute `teacher`/`reference`)."""
        return any(hasattr(s, "teacher") or hasattr(s, "reference")
                   for s in build_strategies(self.strategies))


def combos() -> list[tuple[str, tuple[str, ...], Hybrid | None]]:
    """Every single strategy, every pair, and the named hybrids: (id, names in list order, hybrid)."""
    names = list(REGISTRY)
    found = [(name, (name,), None) for name in names]
    found += [(f"{a}+{b}", (a, b), None) for a, b in itertools.combinations(names, 2)]
    pairs = {frozenset(names) for _, names, _ in found}
    # a hybrid that is just a pair in a single-task context is that pair's case already
    found += [(h.id, h.names, h) for h in HYBRIDS if h.context is not None or frozenset(h.names) not in pairs]
    return [c for c in found if all(n in REGISTRY for n in c[1])]


def _is_test_helper(name: str) -> bool:
    """Strategies other test modules register at run time (crash_at, task_off ...) are not the library's."""
    return REGISTRY[name].cls.__module__.split(".")[0] != "tuneforge"


def refused_combos() -> list[tuple[str, tuple[str, ...], str]]:
    """(id, names, reason) of the combinations `check_combination` refuses before any model loads."""
    return [(combo, names, reason) for combo, names, _ in combos()
            if not any(map(_is_test_helper, names)) and (reason := refusal(list(names)))]


def needs_two_tasks(names: tuple[str, ...]) -> bool:
    """A schedule (replay) needs a task sequence to act; EWC needs retain text or a sequence."""
    return any(REGISTRY[n].family == "schedule" or n == "ewc" for n in names)


def cases() -> list[Case]:
    """Every accepted combination on every model kind, with the context it needs or a reason to skip."""
    found = []
    for combo, names, hybrid in combos():
        if any(map(_is_test_helper, names)) or refusal(list(names)):
            continue
        for kind in KINDS:
            context = (hybrid.context if hybrid and hybrid.context else
                       "sequence" if needs_two_tasks(names) else "single")
            skip = ""
            heads = any(REGISTRY[n].cls.provides_heads for n in names)
            if hybrid is not None and kind not in hybrid.kinds:
                skip = f"hybrid defined on {', '.join(hybrid.kinds)} only: {hybrid.why_not}"
            elif heads and kind == "lm" and context != "mixture":
                skip = "heads needs a classification task; the lm kind has only a language-model task"
            elif "retention" in names and kind != "lm":
                skip = "retention needs a causal LM with retain text; classifiers have neither"
            elif context == "sequence" and kind != "lm" and not heads:
                skip = ("replay/ewc need a task sequence, and two classification tasks need heads "
                        "(several classification tasks without heads are refused); covered with heads")
            found.append(Case(combo, names, kind, context, skip))
    return found


# ---------------------------------------------------------------------------------------------------
# Run configs


@dataclass
class Assets:
    """Model folders and data files the cases share (written once per session)."""

    llama: Path
    bert: Path
    lm_tasks: list[Path]
    cls_tasks: list[Path]
    retain: Path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def build_assets(directory: Path, tokenizer, llama: Path | None = None) -> Assets:
    """Tiny model folders (a BERT with dropout 0; the conftest Llama unless given) and the tasks' data."""
    from conftest import classification_records, task_records, tiny_llama
    from transformers import BertConfig, BertForSequenceClassification

    if llama is None:
        llama = directory / "llama"
        tiny_llama(vocab_size=len(tokenizer)).save_pretrained(llama, safe_serialization=True)
        tokenizer.save_pretrained(llama)
    bert = directory / "bert"
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, pad_token_id=tokenizer.pad_token_id,
                        hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)
    BertForSequenceClassification(config).bert.save_pretrained(bert, safe_serialization=True)
    tokenizer.save_pretrained(bert)
    second = [{**r, "completion": r["completion"].replace("is", "was")} for r in task_records(16)]
    lm = [write_jsonl(directory / "lm0.jsonl", task_records(16)),
          write_jsonl(directory / "lm1.jsonl", second)]
    cls = [write_jsonl(directory / "cls0.jsonl", classification_records("animal", 16)),
           write_jsonl(directory / "cls1.jsonl", classification_records("colour", 16))]
    documents = [{"text": " ".join(r["prompt"] + r["completion"] for r in task_records(8)[i:] * 2)}
                 for i in range(6)]
    return Assets(llama, bert, lm, cls, write_jsonl(directory / "retain.jsonl", documents))


def refused_at_setup(selected: list[Case], assets: Assets, workdir: Path) -> list[tuple[Case, str]]:
    """(case, reason) for every case whose strategies a model kind refuses when the run sets them up."""
    from tuneforge.run import start_session

    found = []
    for case in selected:
        try:
            start_session(make_config(case, assets, workdir / case.id), resume=False, overwrite=True)
        except (ModelError, ConfigError) as exc:
            found.append((case, str(exc)))
    return found


def make_config(case: Case, assets: Assets, output: Path, **train):
    from tuneforge.config import validate_config

    model = assets.bert if case.kind == "enc_cls" else assets.llama
    files = assets.lm_tasks if case.kind == "lm" else assets.cls_tasks
    if case.context == "mixture":  # one language-model and one classification task when heads are listed
        heads = any(REGISTRY[n].cls.provides_heads for n in case.names)
        files = [assets.lm_tasks[0], assets.cls_tasks[1]] if heads else assets.lm_tasks
    data = [{"train": str(f), "max_train_examples": 16, "max_eval_examples": 4} for f in files]
    raw = {
        "model": str(model),
        "retain": str(assets.retain) if case.kind == "lm" else None,
        "strategies": case.strategies,
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "max_seq_len": 32, "log_every": 1, "seed": 0,
                  "keep_checkpoints": 10, **train},
        "evaluation": {"samples": 0, "retain_examples": 2},
        "output": str(output),
    }
    if case.context == "single":
        raw["data"] = data[0]
    else:
        raw["tasks"] = [{"name": f"t{i}", "data": d} for i, d in enumerate(data)]
        raw["schedule"] = {"mode": "sequence"} if case.context == "sequence" else {"mode": "mixture",
                                                                                  "sampling": "round_robin"}
    return validate_config(raw)


# ---------------------------------------------------------------------------------------------------
# One trial per case: set up through the run path, then a few steps of the loop's own arithmetic


@dataclass
class Trial:
    refused: str = ""
    errors: dict[str, BaseException] = field(default_factory=dict)  # stage -> what it raised
    identity: float | None = None  # max |prepared - base| at step 0
    trainable: set[str] = field(default_factory=set)
    in_optimizer: set[str] = field(default_factory=set)
    zero_grad: list[str] = field(default_factory=list)
    moved_frozen: list[str] = field(default_factory=list)
    frozen_count: int = 0
    references: list[dict] = field(default_factory=list)
    padding: float | None = None
    reload: float | None = None


_BASES: dict[tuple, tuple] = {}


def fresh_base(config, run_data, names):
    """The base model as the run loads it (same seed: a new classification head gets the same weights).

    Loaded once per (model, shape the tasks need); every caller gets its own deep copy.
    """
    import copy

    from accelerate.utils import set_seed

    from tuneforge.run import load_base_model

    heads = any(REGISTRY[n].cls.provides_heads for n in names)
    tasks = tuple((t.task_type, tuple(t.labels or ())) for t in run_data.tasks)
    key = (config.model, heads, tasks, config.train.seed)
    if key not in _BASES:
        set_seed(config.train.seed)
        model, tokenizer, _ = load_base_model(config, run_data, list(names))
        _BASES[key] = (model.eval(), tokenizer)
    model, tokenizer = _BASES[key]
    return copy.deepcopy(model), tokenizer


def scores(model, batch: dict, with_task: bool) -> torch.Tensor:
    """The model's outputs: logits, or the last hidden states of a headless body."""
    from tuneforge.forward import model_inputs

    out = model(**model_inputs(batch, with_task))
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def per_token_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy at every labelled position of a (1, T) row: (n,)."""
    shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
    keep = shift_labels != -100
    return F.cross_entropy(shift_logits[keep], shift_labels[keep], reduction="none")


def row_scores(model, batch: dict, row: int, with_task: bool, length: int) -> torch.Tensor:
    """What invariant 5 compares for `row` of `batch`: its per-token losses (LM) or logits (classifier)."""
    out = scores(model, batch, with_task)
    if batch["labels"].dim() == 1:
        return out[row]
    return per_token_losses(out[row:row + 1, :length], batch["labels"][row:row + 1, :length])


def alone(batch: dict, row: int, length: int) -> dict:
    return {k: (v[row:row + 1, :length] if v.dim() == 2 else v[row:row + 1]) for k, v in batch.items()}


def reference_modules(strategies) -> list[tuple[str, object]]:
    """(strategy name, its frozen reference or teacher) for each strategy holding one after on_train_start."""
    found = []
    for strategy in strategies:
        for attribute in ("teacher", "reference"):
            value = getattr(strategy, attribute, None)
            if value is not None:
                found.append((f"{strategy.name}.{attribute}", value))
    return found


def reference_copy(reference) -> torch.nn.Module | None:
    """The frozen copy a reference keeps (None: it runs the live model with injected modules disabled)."""
    if isinstance(reference, torch.nn.Module):
        return reference
    return getattr(reference, "copy", None)


def run_trial(case: Case, assets: Assets, workdir: Path) -> Trial:
    """Set the case up through the run path, take a few optimizer steps, and measure invariants 1-3, 5, 6."""
    from tuneforge import load_adapter, save_adapter
    from tuneforge.compose import set_trainable
    from tuneforge.data import collate
    from tuneforge.forward import routes_tasks
    from tuneforge.run import start_session
    from tuneforge.train import build_optimizer, loss_targets, task_loss

    trial = Trial()
    config = make_config(case, assets, workdir / "trial")
    try:
        session = start_session(config, resume=False, overwrite=True)
    except (ModelError, ConfigError) as exc:
        trial.refused = str(exc)
        return trial
    model, strategies, ctx = session.model, session.strategies, session.ctx
    pad = session.tokenizer.pad_token_id
    with_task = routes_tasks(model)
    tasks = session.data.tasks
    first = tasks[0].train_items
    probe_items = sorted(first, key=lambda item: len(item["input_ids"]))
    probe = collate([probe_items[-1], probe_items[0]], pad)  # row 1 is the shorter one: padded
    short = len(probe_items[0]["input_ids"])
    base, tokenizer = fresh_base(config, session.data, case.names)

    # 1. identity start
    try:
        model.eval()
        with torch.no_grad():
            prepared, original = scores(model, probe, with_task), scores(base, probe, False)
        if prepared.shape == original.shape:
            trial.identity = float((prepared - original).abs().max())
        else:
            trial.identity = math.inf
    except Exception as exc:  # noqa: BLE001 - recorded, re-raised by the invariant's own test
        trial.errors["identity"] = exc

    # 2, 3: a few steps as the loop takes them (task loss / step targets + strategy terms; set_trainable
    # per step)
    try:
        ctx.num_epochs, ctx.total_steps, ctx.base_lr = 1, 3, config.train.lr
        frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        trial.frozen_count = len(frozen_before)
        trial.trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        grads_seen: set[str] = set()
        references: list = []
        snapshots: dict[str, dict] = {}

        def start_task(name: str | None, items: list[dict]):
            if case.context == "sequence":
                ctx.current_task = name
            for strategy in strategies:
                items = strategy.task_items(items, ctx)
            try:
                for strategy in strategies:
                    strategy.on_train_start(model, ctx)
            except (ModelError, ConfigError) as exc:
                raise Refused(str(exc)) from exc
            for label, reference in reference_modules(strategies):
                copy = reference_copy(reference)
                if label not in snapshots:
                    references.append((label, reference))
                    snapshots[label] = ({} if copy is None
                                        else {k: v.clone() for k, v in copy.state_dict().items()})
            return items, build_optimizer(model, strategies, ctx, config.train)

        def step(optimizer, items: list[dict]):
            set_trainable(model, strategies, ctx)
            model.train()
            batch = collate(items, pad)
            loss_sum, _, outputs = task_loss(model, batch, with_task)
            terms = {}
            for strategy in strategies:
                terms.update(strategy.loss(model, batch, outputs, ctx))
            weight = math.prod(s.task_weight(ctx) for s in strategies)
            (weight * loss_sum / max(1, loss_targets(batch)) + sum(terms.values())).backward()
            names = {id(p): n for n, p in model.named_parameters()}
            trial.in_optimizer |= {names[id(p)] for g in optimizer.param_groups for p in g["params"]}
            grads_seen.update(n for n, p in model.named_parameters()
                              if p.requires_grad and p.grad is not None and bool(p.grad.abs().sum() > 0))
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            ctx.step += 1

        size = config.train.batch_size
        if case.context == "mixture":  # alternate the two tasks, one task per micro-batch
            items, optimizer = start_task(None, first)
            second = tasks[1].train_items
            for index, chunk in enumerate([first[:size], second[:size], first[size:2 * size]]):
                step(optimizer, chunk)
        else:
            items, optimizer = start_task(tasks[0].name, first)
            for index in range(3 if len(tasks) == 1 else 2):
                step(optimizer, items[index * size:(index + 1) * size])
            if len(tasks) > 1:  # the second task of a sequence: its own items, then replayed ones if any
                for strategy in strategies:
                    strategy.on_task_end(model, tasks[0].name, ctx)
                items, optimizer = start_task(tasks[1].name, tasks[1].train_items)
                own = [i for i in items if i.get("task_id", 1) == tasks[1].task_id][:size]
                replayed = [i for i in items if i.get("task_id", 1) != tasks[1].task_id][:size]
                for chunk in (own, replayed or own):
                    step(optimizer, chunk)
        trial.zero_grad = sorted(trial.trainable - grads_seen)
        trial.moved_frozen = sorted(n for n, p in model.named_parameters()
                                    if n in frozen_before and not torch.equal(p.detach(), frozen_before[n]))

        # 3. references: bit-unchanged copies whose outputs now differ from the trained model's; and every
        # reference still computes what the untouched base computes
        model.eval()
        with torch.no_grad():
            trained = scores(model, probe, with_task)
            for label, reference in references:
                copy = reference_copy(reference)
                entry = {"label": label, "copy": copy is not None}
                ref_out = reference(input_ids=probe["input_ids"], attention_mask=probe["attention_mask"])
                ref_out = (ref_out.logits if getattr(ref_out, "logits", None) is not None
                           else ref_out.last_hidden_state)
                if copy is not None:
                    now = copy.state_dict()
                    entry["changed"] = sorted(k for k, v in snapshots[label].items()
                                              if not torch.equal(now[k], v))
                    entry["differs"] = (float((ref_out - trained).abs().max())
                                        if ref_out.shape == trained.shape else math.inf)
                base_out = scores(base, probe, False)
                entry["vs_base"] = (float((ref_out - base_out).abs().max()) if ref_out.shape == base_out.shape
                                    else math.inf)
                trial.references.append(entry)
    except Refused as exc:
        trial.refused = str(exc)
        return trial
    except Exception as exc:  # noqa: BLE001
        for stage in ("train", "references", "padding", "reload"):
            trial.errors[stage] = exc
        return trial

    # 5. a padded row scores as it does alone (eval mode, trained weights)
    try:
        with torch.no_grad():
            padded = row_scores(model, probe, 1, with_task, short)
            single = row_scores(model, alone(probe, 1, short), 0, with_task, short)
        trial.padding = float((padded - single).abs().max()) if padded.shape == single.shape else math.inf
    except Exception as exc:  # noqa: BLE001
        trial.errors["padding"] = exc

    # 6. save, load into a fresh base, equal outputs
    try:
        directory = workdir / "adapter"
        shutil.rmtree(directory, ignore_errors=True)
        save_adapter(model, directory)
        fresh, _ = fresh_base(config, session.data, case.names)
        loaded = load_adapter(fresh, directory, tokenizer=tokenizer).eval()
        with torch.no_grad():
            expected, got = scores(model, probe, with_task), scores(loaded, probe, routes_tasks(loaded))
        trial.reload = float((expected - got).abs().max()) if expected.shape == got.shape else math.inf
    except Exception as exc:  # noqa: BLE001
        trial.errors["reload"] = exc
    return trial


class Refused(Exception):
    """A strategy refused the run's context at its start (before any step), with a reason."""


# ---------------------------------------------------------------------------------------------------
# Public run path: grad-accum equivalence and kill/resume


def final_weights(run_dir: Path, task: str | None = None) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    from tuneforge.checkpoint import latest_checkpoint

    root = run_dir / "checkpoints"
    if task is not None:
        root = root / task
    return load_file(str(latest_checkpoint(root) / "weights.safetensors"))


def last_task(case: Case) -> str | None:
    return "t1" if case.context == "sequence" else None


def copy_killed_run(source: Path, target: Path, case: Case, step: int) -> None:
    """Leave in `target` what a run killed right after checkpoint `step` of its last task has on disk."""
    target.mkdir(parents=True)
    for name in ("config.yaml", "evaluation_before.json"):
        shutil.copy(source / name, target / name)
    checkpoints = source / "checkpoints"
    task = last_task(case)
    if task is not None:  # finished tasks stay; the last one has only its first checkpoints
        for done in sorted(p for p in checkpoints.iterdir() if p.name != task):
            shutil.copytree(done, target / "checkpoints" / done.name)
        progress = json.loads((source / "continual.json").read_text())
        progress = {key: rows[:-1] for key, rows in progress.items()}
        (target / "continual.json").write_text(json.dumps(progress))
        checkpoints, destination = checkpoints / task, target / "checkpoints" / task
    else:
        destination = target / "checkpoints"
    name = f"step-{step:08d}"
    shutil.copytree(checkpoints / name, destination / name)
