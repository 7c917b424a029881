"""Helpers of the architecture matrix (tests/test_architectures.py): tiny model folders of common
architectures, the strategy columns, and one run per cell through the public run path
(`tuneforge.run.train_run`).

A cell is an architecture x a strategy list. Its run records what the checks need: refused (and why), or
trained (step losses), the new classification head's fate, the logits of the trained model against those of
its saved adapter loaded into a fresh base (`tuneforge.load_adapter`) and, for an adapter with an
`adapter_config.json`, against `peft.PeftModel.from_pretrained` on another fresh base.

The columns come from `tuneforge.strategies.REGISTRY`: every parametrization (with the tiny sizes in
`matrix_support.OPTIONS`, other options left at their defaults, as a user would), plus the variants and the
objective hybrid below. A newly registered parametrization joins the matrix the day it is registered.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import shutil
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from tuneforge.errors import ConfigError, ModelError
from tuneforge.strategies import REGISTRY

# ---------------------------------------------------------------------------------------------------
# Architectures: tiny random models built from each family's own config class (transformers' AutoConfig)

_IDS = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}  # the conftest tokenizer's special tokens
_LLAMA_LIKE = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
               "num_key_value_heads": 2, "max_position_embeddings": 128}
_ENCODER = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "max_position_embeddings": 128, "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0}


@dataclass(frozen=True)
class Architecture:
    """One family: its `model_type`, tiny config values (the family's own names for them) and the run kind."""

    name: str  # the row: the model_type, or a variant's own name
    config: dict
    kind: str = "lm"  # "lm": a causal LM on language-model data; "cls": an encoder on classification data
    model_type: str | None = None  # a variant's family (default: `name`)

    def build(self, vocab_size: int, seed: int = 0):
        """A random model as a user's folder holds it: a causal LM, or an encoder body without any head."""
        from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

        config = AutoConfig.for_model(self.model_type or self.name, vocab_size=vocab_size,
                                      initializer_range=0.2, tie_word_embeddings=False, **_IDS, **self.config)
        torch.manual_seed(seed)
        model = (AutoModelForCausalLM if self.kind == "lm" else AutoModel).from_config(config)
        if self.kind == "lm":
            model.generation_config.eos_token_id, model.generation_config.pad_token_id = 2, 0
        return model


ARCHITECTURES = {a.name: a for a in [
    Architecture("llama", _LLAMA_LIKE),
    Architecture("mistral", _LLAMA_LIKE),
    Architecture("qwen2", _LLAMA_LIKE),
    Architecture("qwen3", {**_LLAMA_LIKE, "head_dim": 8}),  # default head_dim 128
    Architecture("gemma", {**_LLAMA_LIKE, "head_dim": 8}),  # default head_dim 256
    Architecture("gemma2", {**_LLAMA_LIKE, "head_dim": 8, "sliding_window": 16}),  # softcapped attn logits
    Architecture("phi3", _LLAMA_LIKE),  # fused qkv_proj and gate_up_proj
    Architecture("gpt2", {"n_embd": 32, "n_inner": 64, "n_layer": 2, "n_head": 4, "n_positions": 128,
                          "resid_pdrop": 0.0, "embd_pdrop": 0.0,
                          "attn_pdrop": 0.0}),  # Conv1D c_attn, learned positions
    Architecture("gpt_neox", {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
                              "num_attention_heads": 4,
                              "max_position_embeddings": 128}),  # fused query_key_value
    Architecture("opt", {"hidden_size": 32, "ffn_dim": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
                         "max_position_embeddings": 128, "word_embed_proj_dim": 32, "dropout": 0.0,
                         "init_std": 0.2}),  # fc1/fc2 on the layer, learned positions
    # FalconLinear, fused query_key_value, multi-query
    Architecture("falcon", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                            "max_position_embeddings": 128}),
    Architecture("stablelm", _LLAMA_LIKE),
    Architecture("olmo2", _LLAMA_LIKE),
    Architecture("granite", _LLAMA_LIKE),
    # attention variants: a sliding window shorter than the sequences (Mistral's default, 4096, is never
    # reached here), and ALiBi instead of rotary positions
    Architecture("mistral-window4", {**_LLAMA_LIKE, "sliding_window": 4}, model_type="mistral"),
    Architecture("falcon-alibi", {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4,
                                  "max_position_embeddings": 128, "alibi": True}, model_type="falcon"),
    Architecture("bert", _ENCODER, kind="cls"),
    Architecture("roberta", {**_ENCODER, "max_position_embeddings": 130},
                 kind="cls"),  # positions start at pad + 1
    Architecture("deberta-v2", _ENCODER, kind="cls"),  # relative attention, query_proj/key_proj/value_proj
]}


# ---------------------------------------------------------------------------------------------------
# Columns: every parametrization, variants, and one objective hybrid


def _tiny(name: str) -> dict:
    """Tiny sizes only (as in the composition matrix), every other option at the strategy's default."""
    from matrix_support import OPTIONS

    return dict(OPTIONS.get(name, {}))


# Variants of a registered parametrization worth a column of their own: {column: strategy list}.
VARIANTS = {
    "lora-defaults": [{"lora": {"rank": 2}}],  # the default targets, as a user who names none gets them
    "dora": [{"lora": {"rank": 2, "targets": "all-linear", "dora": True}}],
}
# One objective hybrid: EWC's Fisher is estimated on the run's retain text (decoders and encoders alike).
HYBRID = ("lora+ewc", [{"lora": {"rank": 2, "targets": "all-linear"}},
                       {"ewc": {"weight": 10.0, "fisher_samples": 2}}])


def parametrizations() -> list[str]:
    """The library's registered parametrizations (strategies other test modules register are left out)."""
    return [name for name, entry in REGISTRY.items()
            if entry.family == "parametrization" and entry.cls.__module__.split(".")[0] == "tuneforge"]


# table order; others follow
ORDER = ("full", "layerwise", "lora", "adapter", "prefix", "prompt", "ia3", "heads")


def columns() -> dict[str, list[dict]]:
    """{column id: strategy list}, in table order."""
    found = {}
    names = parametrizations()
    for name in [n for n in ORDER if n in names] + [n for n in names if n not in ORDER]:
        found[name] = [{name: _tiny(name)}]
        found.update({v: s for v, s in VARIANTS.items() if next(iter(s[0])) == name})
    found[HYBRID[0]] = HYBRID[1]
    return found


def provides_heads(strategies: list[dict]) -> bool:
    return any(REGISTRY[next(iter(s))].cls.provides_heads for s in strategies)


@dataclass(frozen=True)
class Cell:
    arch: str
    column: str
    strategies: tuple  # of single-key dicts (JSON-able)

    @property
    def id(self) -> str:
        return f"{self.arch}-{self.column}"

    @property
    def kind(self) -> str:
        return ARCHITECTURES[self.arch].kind

    @property
    def peft_expressible(self) -> bool:
        """One strategy that declares a PEFT type: its adapter is written in PEFT's layout."""
        if len(self.strategies) != 1:
            return False
        return REGISTRY[next(iter(self.strategies[0]))].cls.peft_type is not None


def cells() -> list[Cell]:
    """Every architecture x every column; task heads only where a run classifies (encoders)."""
    found = []
    for arch in ARCHITECTURES.values():
        for column, strategies in columns().items():
            if provides_heads(strategies) and arch.kind != "cls":
                continue  # a causal-LM run has no classification task to put a head on
            found.append(Cell(arch.name, column, tuple(strategies)))
    return found


# ---------------------------------------------------------------------------------------------------
# Assets: model folders (built once per architecture) and data files


@dataclass
class Assets:
    directory: Path
    tokenizer: object
    lm_data: Path
    cls_data: Path
    retain: Path
    folders: dict[str, Path] = field(default_factory=dict)

    def model_dir(self, arch: str) -> Path:
        """The architecture's model folder (config, safetensors, tokenizer), written at its first use."""
        if arch not in self.folders:
            folder = self.directory / "models" / arch
            ARCHITECTURES[arch].build(len(self.tokenizer)).save_pretrained(folder, safe_serialization=True)
            self.tokenizer.save_pretrained(folder)
            self.folders[arch] = folder
        return self.folders[arch]


def build_assets(directory: Path, tokenizer) -> Assets:
    from conftest import classification_records, task_records
    from matrix_support import write_jsonl

    directory.mkdir(parents=True, exist_ok=True)
    documents = [{"text": " ".join(r["prompt"] + r["completion"] for r in task_records(8)[i:] * 2)}
                 for i in range(6)]
    return Assets(directory, tokenizer, write_jsonl(directory / "lm.jsonl", task_records(16)),
                  write_jsonl(directory / "cls.jsonl", classification_records("animal", 16)),
                  write_jsonl(directory / "retain.jsonl", documents))


def make_config(cell: Cell, assets: Assets, output: Path):
    from tuneforge.config import validate_config

    objective = any(REGISTRY[next(iter(s))].family == "objective" for s in cell.strategies)
    data = assets.lm_data if cell.kind == "lm" else assets.cls_data
    return validate_config({
        "model": str(assets.model_dir(cell.arch)),
        "data": {"train": str(data), "max_train_examples": 8, "max_eval_examples": 2},
        "retain": str(assets.retain) if objective else None,  # the hybrid's EWC needs retain text
        "strategies": [json.loads(json.dumps(s)) for s in cell.strategies],
        "train": {"max_steps": 2, "batch_size": 4, "lr": 1e-2, "max_seq_len": 32, "log_every": 1, "seed": 0},
        "evaluation": {"samples": 0, "retain_examples": 1},
        "output": str(output),
    })


# ---------------------------------------------------------------------------------------------------
# One cell: train_run, then reload and PEFT loading


@dataclass
class CellResult:
    refused: str = ""  # the one-line reason of a ModelError/ConfigError
    crash: str = ""  # any other exception: "Type: first line"
    losses: list[float] = field(default_factory=list)  # the logged loss of each optimizer step
    new_params: list[str] = field(default_factory=list)  # params the base load draws at random (a new head)
    untrained_new: list[str] = field(default_factory=list)  # ... of them, those training left unchanged
    reload: float | None = None  # max |trained - reloaded| logits
    reload_error: str = ""
    peft: float | None = None  # max |trained - PEFT-loaded| logits (None: not checked)
    peft_error: str = ""
    peft_config: bool = False  # whether the adapter has an adapter_config.json
    peft_key_warnings: list[str] = field(default_factory=list)  # PEFT's "missing/unexpected adapter keys"
    seconds: float = 0.0

    @property
    def trains(self) -> bool:
        return not self.refused and not self.crash


def one_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0][:300] if text else type(exc).__name__


@contextlib.contextmanager
def captured_session():
    """Keep the Session `train_run` hands to `finish` (the trained model), as `captured["session"]`.

    The report's loss plot is left out: matplotlib takes about 0.9 s per run, half of a cell's time, and the
    plot is no part of what the matrix checks (report.md is still written).
    """
    import tuneforge.report
    import tuneforge.run

    captured: dict = {}
    original, plot = tuneforge.run.finish, tuneforge.report.write_loss_plot

    def finish(session, *args, **kwargs):
        captured["session"] = session
        return original(session, *args, **kwargs)

    tuneforge.run.finish, tuneforge.report.write_loss_plot = finish, lambda run_dir: None
    try:
        yield captured
    finally:
        tuneforge.run.finish, tuneforge.report.write_loss_plot = original, plot


_BASES: dict[tuple, tuple] = {}


def fresh_base(config, run_data, names: list[str], seed: int):
    """The base model as the run loads it, any new head drawn from `seed` (not the run's: an unsaved head
    shows).

    Loaded once per (model folder, shape the run needs, seed); every caller gets its own deep copy.
    """
    import copy

    from accelerate.utils import set_seed

    from tuneforge.run import load_base_model

    heads = any(REGISTRY[name].cls.provides_heads for name in names)
    key = (config.model, heads, tuple((t.task_type, tuple(t.labels or ())) for t in run_data.tasks), seed)
    if key not in _BASES:
        set_seed(seed)
        model, tokenizer, _ = load_base_model(config, run_data, names)
        _BASES[key] = (model.eval(), tokenizer)
    model, tokenizer = _BASES[key]
    return copy.deepcopy(model), tokenizer


def probe_batch(session) -> dict:
    """Two encoded items of different lengths, the shorter one padded (row 1)."""
    from tuneforge.data import collate

    task = session.data.tasks[0]
    items = sorted(task.eval_items + task.train_items, key=lambda item: len(item["input_ids"]))
    return collate([items[-1], items[0]], session.tokenizer.pad_token_id)


def outputs(model, batch: dict) -> torch.Tensor:
    """Logits at the real positions: (B, C) for a classifier, (real tokens, V) for a language model."""
    from tuneforge.forward import model_inputs, routes_tasks

    with torch.no_grad():
        logits = model(**model_inputs(batch, routes_tasks(model))).logits
    if logits.dim() == 2:
        return logits
    mask = batch["attention_mask"].bool()
    return logits[:, logits.shape[1] - mask.shape[1]:][mask]  # PEFT's prompt tuning adds virtual positions


def difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max()) if a.shape == b.shape else math.inf


def run_cell(cell: Cell, assets: Assets, workdir: Path) -> CellResult:
    """Train 2 steps through `train_run`, then compare the trained model with its reloaded adapter (and
    PEFT's)."""
    from tuneforge import load_adapter
    from tuneforge.run import train_run

    result = CellResult()
    started = time.perf_counter()
    config = make_config(cell, assets, workdir / "run")
    names = [next(iter(s)) for s in cell.strategies]
    quiet = io.StringIO()
    try:
        with captured_session() as captured, contextlib.redirect_stdout(quiet), \
                contextlib.redirect_stderr(quiet):
            train_run(config, overwrite=True)
    except (ModelError, ConfigError) as exc:
        result.refused = str(exc)
    except Exception as exc:  # noqa: BLE001 - a crash is a result of its own, asserted by the tests
        result.crash = f"{type(exc).__name__}: {one_line(exc)}"
    if not result.trains:
        result.seconds = time.perf_counter() - started
        return result

    session = captured["session"]
    run_dir = workdir / "run"
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    result.losses = [r["loss"] for r in records if r.get("split") != "eval" and "loss" in r]
    model = session.model.eval()
    batch = probe_batch(session)
    expected = outputs(model, batch)

    # a head the base load creates at random (differs between two loads): trained, saved with the adapter
    start, _ = fresh_base(config, session.data, names, config.train.seed)  # as the run started
    fresh, tokenizer = fresh_base(config, session.data, names, config.train.seed + 1)
    initial, other = dict(start.named_parameters()), dict(fresh.named_parameters())
    result.new_params = [n for n, p in initial.items() if not torch.equal(p, other[n])]
    trained = dict(model.named_parameters())
    result.untrained_new = [n for n in result.new_params
                            if n in trained and torch.equal(trained[n].detach(), initial[n])]

    adapter = run_dir / "adapter"
    try:
        loaded = load_adapter(fresh, adapter, tokenizer=tokenizer).eval()
        result.reload = difference(expected, outputs(loaded, batch))
    except Exception as exc:  # noqa: BLE001
        result.reload_error = f"{type(exc).__name__}: {one_line(exc)}"

    result.peft_config = (adapter / "adapter_config.json").is_file()
    if result.peft_config:
        try:
            import peft

            fresh, _ = fresh_base(config, session.data, names, config.train.seed + 1)
            with contextlib.redirect_stdout(quiet), contextlib.redirect_stderr(quiet), \
                    warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                theirs = peft.PeftModel.from_pretrained(fresh, adapter).eval()
            result.peft_key_warnings = [one_line(w.message) for w in caught if "keys" in str(w.message)]
            result.peft = difference(expected, outputs(theirs, batch))
        except Exception as exc:  # noqa: BLE001
            result.peft_error = f"{type(exc).__name__}: {one_line(exc)}"
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    result.seconds = time.perf_counter() - started
    return result


# ---------------------------------------------------------------------------------------------------
# The README table and its JSON

TOLERANCE = 1e-5  # reloaded and PEFT-loaded logits agree with the trained model's within this


def verdict(cell: Cell, result: CellResult) -> tuple[str, str]:
    """(mark, footnote): ✓ trains and reloads, ✓P PEFT loads it too, ✗ refused, ! fails (footnote: how)."""
    if result.refused:
        return "✗", f"refused: {result.refused}"
    if result.crash:
        return "!", f"crashes: {result.crash}"
    problems = []
    if not result.losses or not all(math.isfinite(v) for v in result.losses):
        problems.append(f"loss not finite ({result.losses})")
    if result.untrained_new:
        problems.append(f"the new head ({', '.join(result.untrained_new)}) is never trained")
    if result.reload_error:
        problems.append(f"reload fails ({result.reload_error})")
    elif result.reload is None or result.reload > TOLERANCE:
        problems.append("the reloaded adapter gives other logits")
    if result.peft_error:
        problems.append(f"PEFT cannot load it ({result.peft_error})")
    elif result.peft is not None and result.peft > TOLERANCE:
        problems.append("PEFT-loaded logits differ")
    if result.peft_key_warnings:
        problems.append("PEFT warns of missing adapter keys (it adapts more modules than were trained)")
    if problems:
        return "!", "trains, but " + "; ".join(problems)
    return ("✓P", "") if result.peft is not None else ("✓", "")


def markdown_table(entries: dict[str, dict]) -> str:
    """Architectures x columns from per-cell entries ({cell id: {arch, column, verdict, note}}, as in the
    JSON): a mark per cell, one numbered footnote per distinct reason."""
    archs = list(dict.fromkeys(e["arch"] for e in entries.values()))
    present = list(dict.fromkeys(e["column"] for e in entries.values()))
    cols = [c for c in columns() if c in present] + [c for c in present if c not in columns()]
    by_place = {(e["arch"], e["column"]): e for e in entries.values()}
    rows = ["| architecture | " + " | ".join(f"`{c}`" for c in cols) + " |", "|---" * (len(cols) + 1) + "|"]
    notes: dict[str, int] = {}
    for arch in archs:
        marks = []
        for column in cols:
            entry = by_place.get((arch, column))
            if entry is None:
                marks.append("–")
                continue
            mark = entry["verdict"]
            if entry["note"]:
                mark = f"{mark} [{notes.setdefault(entry['note'], len(notes) + 1)}]"
            marks.append(mark)
        rows.append(f"| {arch} | " + " | ".join(marks) + " |")
    legend = ("✓ trains 2 steps, and the saved adapter reloaded into a fresh base gives the same logits; "
              "✓P PEFT loads it with the same logits too; ✗ refused with the reason below; ! fails as below; "
              "– does not apply (task heads need a classification run).")
    footnotes = [f"[{n}] {note.replace('|', '/')}" for note, n in notes.items()]
    return "\n".join(rows + ["", legend, ""] + footnotes)


def entries(all_cells: list[Cell], results: dict[str, CellResult]) -> dict[str, dict]:
    """{cell id: arch, column, verdict, note and the raw result}: what the JSON and the table hold."""
    found = {}
    for cell in all_cells:
        mark, note = verdict(cell, results[cell.id])
        found[cell.id] = _finite({"arch": cell.arch, "column": cell.column, "verdict": mark, "note": note,
                                  **asdict(results[cell.id])})
    return found


def results_json(all_cells: list[Cell], results: dict[str, CellResult], command: str) -> dict:
    import datetime

    import peft
    import transformers

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": command,
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "peft": peft.__version__},
        "tolerance": TOLERANCE,
        "architectures": {a.name: {"model_type": a.model_type or a.name, "kind": a.kind, "config": a.config}
                          for a in ARCHITECTURES.values()},
        "columns": columns(),
        "cells": entries(all_cells, results),
    }


def _finite(value):
    """JSON has no infinity: a difference between outputs of different shapes is written as "inf"."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_finite(v) for v in value]
    return value
