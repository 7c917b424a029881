"""Standard benchmarks before and after training, through lm-evaluation-harness (Gao et al., EleutherAI).

`evaluation.benchmarks: [{task: mmlu, limit: 200, num_fewshot: 5}, ...]` runs each lm-eval task on the
in-memory model (lm-eval's `HFLM` wraps it; the "before" pass runs with injected modules disabled, like
the retain set). Results are the task's metrics in [0, 1]; forgetting is reported in benchmark points
(100 x after - before). Multiple-choice tasks also report their chance level: the mean of 1 / choices.

No benchmark data ships on PyPI. Standard tasks need their dataset in the local Hugging Face cache
(runs are offline: a missing dataset is a one-line error, not a hub timeout); `path:` names local task
YAML files; and `trivia-mc` is bundled: the chatterbot-corpus trivia questions as 4-way multiple choice,
the other answers as distractors, scored by the answer's log-likelihood.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import random
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tuneforge.errors import ConfigError, DataError

if TYPE_CHECKING:
    from torch import nn

    from tuneforge.config import BenchmarkConfig, RunConfig

LM_EVAL_INSTALL = "pip install lm-eval==0.4.13 (scripts/setup.sh installs it)"
BUNDLED_TRIVIA = "trivia-mc"
TRIVIA_CHOICES = 4
PRIMARY_METRICS = ("acc", "exact_match", "acc_norm", "f1", "mcc")


def trivia_documents(seed: int = 0) -> list[dict]:
    """The bundled benchmark's documents: {question, choices, label}, distractors drawn with `seed`."""
    from tuneforge.data import load_builtin

    pairs, seen = [], set()
    for record in load_builtin("chatterbot"):
        if record.fields.get("category") != "trivia":
            continue
        question, answer = (m["content"] for m in record.fields["messages"][:2])
        if answer.rstrip(".").lower() not in seen:
            seen.add(answer.rstrip(".").lower())
            pairs.append((question, answer.rstrip(".")))
    rng = random.Random(seed)
    answers = [answer for _, answer in pairs]
    documents = []
    for question, answer in pairs:
        choices = [answer, *rng.sample([a for a in answers if a != answer], TRIVIA_CHOICES - 1)]
        rng.shuffle(choices)
        documents.append({"question": question, "choices": choices, "label": choices.index(answer)})
    return documents


TRIVIA_YAML = """task: trivia-mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def _write_trivia(folder: Path) -> Path:
    data = folder / "trivia-mc.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in trivia_documents()), encoding="utf-8")
    (folder / "trivia-mc.yaml").write_text(TRIVIA_YAML.format(data=json.dumps(str(data))), encoding="utf-8")
    return folder


def check_benchmarks(config: RunConfig) -> None:
    """Before anything loads: lm-eval is installed and every `path:` exists (one line naming its line)."""
    from tuneforge.config import config_location

    if not config.evaluation.benchmarks:
        return
    if importlib.util.find_spec("lm_eval") is None:
        raise ConfigError(f"{config_location(config, 'evaluation.benchmarks')}: evaluation.benchmarks needs "
                          f"lm-eval: {LM_EVAL_INSTALL}")
    for index, benchmark in enumerate(config.evaluation.benchmarks):
        if benchmark.path and not Path(benchmark.path).exists():
            where = config_location(config, f"evaluation.benchmarks.{index}.path")
            raise ConfigError(f"{where}: benchmark {benchmark.task!r}: path {benchmark.path} not found "
                              "(a task YAML file or a folder of them)")


def _lm_eval():
    try:
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError:
        raise ConfigError(f"evaluation.benchmarks needs lm-eval: {LM_EVAL_INSTALL}") from None
    # their per-task lines (and the warning that a loaded model is passed in) would drown the run's log
    logging.getLogger("lm-eval").setLevel(logging.ERROR)
    logging.getLogger("lm_eval").setLevel(logging.ERROR)
    logging.getLogger("datasets").setLevel(logging.WARNING)
    return HFLM, TaskManager


def run_benchmarks(model: nn.Module, tokenizer, config: RunConfig, batch_size: int) -> dict:
    """`{task: {metric, value, stderr, metrics, n, num_fewshot, chance}}` for every configured benchmark."""
    from tuneforge.config import config_location

    benchmarks = config.evaluation.benchmarks
    if not benchmarks:
        return {}
    if not hasattr(model, "config") or not hasattr(model, "device"):
        raise ConfigError(f"{config_location(config, 'evaluation.benchmarks')}: benchmarks run on a Hugging "
                          f"Face causal language model; this run's model is a {type(model).__name__}")
    HFLM, TaskManager = _lm_eval()
    os.environ.setdefault("HF_DATASETS_OFFLINE", os.environ.get("HF_HUB_OFFLINE", "0"))
    results = {}
    with tempfile.TemporaryDirectory(prefix="tuneforge-benchmarks-") as scratch:
        include = [str(Path(b.path).resolve()) for b in benchmarks if b.path]
        if any(b.task == BUNDLED_TRIVIA and not b.path for b in benchmarks):
            include.append(str(_write_trivia(Path(scratch))))
        standard = any(not b.path and b.task != BUNDLED_TRIVIA for b in benchmarks)
        manager = TaskManager(include_path=include or None, include_defaults=standard)
        wrapped = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size,
                       max_length=getattr(model.config, "max_position_embeddings", None))
        for index, benchmark in enumerate(benchmarks):
            line = config_location(config, f"evaluation.benchmarks.{index}")
            where = f"{line}: benchmark {benchmark.task!r}"
            if benchmark.task not in manager.all_tasks:
                hint = ("no task of that name in the YAML files under path:" if benchmark.path
                        else "not among lm-eval's tasks; a local task needs path:")
                raise ConfigError(f"{where} is not a known task ({hint} bundled: {BUNDLED_TRIVIA})")
            results[benchmark.task] = _run_one(wrapped, manager, benchmark, where)
    return results


def _run_one(wrapped, manager, benchmark: BenchmarkConfig, where: str) -> dict:
    """lm-eval's `evaluate` on one task (or group). What `simple_evaluate` adds around it is left out: it
    reseeds the global generators (training's among them) and runs `pip list` for an environment report."""
    from lm_eval.evaluator import evaluate

    was_training = wrapped.model.training
    try:
        loaded = manager.load([benchmark.task])
        for task in loaded["tasks"].values():
            if task.get_config("num_fewshot") != 0:  # a task fixed at 0-shot stays so, as in lm-eval
                task.set_config(key="num_fewshot", value=benchmark.num_fewshot)
            task.set_fewshot_seed(seed=0)
        output = evaluate(lm=wrapped, task_dict=loaded, limit=benchmark.limit, bootstrap_iters=1000,
                          log_samples=True)
    except (ConfigError, DataError):
        raise
    except Exception as exc:  # noqa: BLE001 - datasets/hub errors of every kind become one line
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(f"{where}: could not load or run its data ({type(exc).__name__}: {first}); runs are "
                        "offline: cache the dataset with `datasets` first, or point path: at a local task "
                        "YAML") from None
    finally:
        wrapped.model.train(was_training)
    return summarize(output, benchmark)


def summarize(output: dict, benchmark: BenchmarkConfig) -> dict:
    """The task's metrics from `simple_evaluate`'s output, its primary metric, and its chance level."""
    scores = output["results"][benchmark.task]
    metrics = {key.split(",")[0]: value for key, value in scores.items()
               if "," in key and "_stderr" not in key and isinstance(value, (int, float))}
    primary = next((m for m in PRIMARY_METRICS if m in metrics), next(iter(metrics), None))
    stderr = scores.get(f"{primary}_stderr,none")
    samples = [s for task_samples in output.get("samples", {}).values() for s in task_samples]
    configs = output.get("configs", {})
    multiple_choice = bool(configs) and all(c.get("output_type") == "multiple_choice"
                                            for c in configs.values())
    chance = (sum(1 / len(s["arguments"]) for s in samples) / len(samples)
              if multiple_choice and samples else None)
    counts = output.get("n-samples", {})
    return {"metric": primary, "value": metrics.get(primary), "stderr": stderr if isinstance(stderr, float)
            else None, "metrics": metrics, "n": sum(c.get("effective", 0) for c in counts.values()),
            "num_fewshot": benchmark.num_fewshot, "chance": chance}


def benchmark_change(before: dict, after: dict) -> dict:
    """Per task: the primary metric's change in points (100 x after - before); negative = forgot."""
    return {task: 100 * (after[task]["value"] - before[task]["value"]) for task in after
            if task in before and after[task].get("value") is not None
            and before[task].get("value") is not None}
