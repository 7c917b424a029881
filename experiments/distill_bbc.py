"""DistilBERT-style student on BBC News topics: does distillation from the fine-tuned encoder help?

The bundled all-MiniLM-L6-v2 (6 layers) is fine-tuned on BBC News (5 topics) as the teacher. The
student keeps layers 0, 2, 4 (`distill: {student: {every: 2}}`), initialised from the pretrained
encoder, and is trained on the same data for the same steps either on the labels only (`alpha: 1`, the
KD term has weight 0) or with distillation from the teacher (`alpha: 0.5`, T = 2). Both on the full
training set and on a small one (200 articles), where the teacher's soft labels should matter most.

    python experiments/distill_bbc.py all        # teacher first, then the students (skips done runs)
    python experiments/distill_bbc.py table      # the Markdown table for docs/distillation.md
    python experiments/distill_bbc.py record     # the same data -> docs/results/distill-bbc.json
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from variant_cli import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "distill-bbc"
TEACHER_DIR = OUT / "teacher-model"
STUDENT = {"every": 2}
SMALL = 200  # training articles in the low-data setting

# name -> (strategies, train overrides, data overrides)
VARIANTS: dict[str, tuple[list[dict], dict, dict]] = {
    "teacher": ([{"full": {}}], {"epochs": 2}, {}),
    "student": ([{"distill": {"student": STUDENT, "alpha": 1.0}}], {"epochs": 2}, {}),
    "student-kd": ([{"distill": {"teacher": str(TEACHER_DIR), "student": STUDENT, "alpha": 0.5,
                                 "temperature": 2.0}}], {"epochs": 2}, {}),
    "student-small": ([{"distill": {"student": STUDENT, "alpha": 1.0}}], {"epochs": 8},
                      {"max_train_examples": SMALL}),
    "student-kd-small": ([{"distill": {"teacher": str(TEACHER_DIR), "student": STUDENT, "alpha": 0.5,
                                       "temperature": 2.0}}], {"epochs": 8}, {"max_train_examples": SMALL}),
    # mostly the teacher's soft targets, softened further (Hinton et al. 2015 use T up to 20)
    "student-kd-t4-small": ([{"distill": {"teacher": str(TEACHER_DIR), "student": STUDENT, "alpha": 0.1,
                                          "temperature": 4.0}}], {"epochs": 8},
                            {"max_train_examples": SMALL}),
    # DistilBERT's cosine loss on the last hidden states on top of the soft targets (Sanh et al. 2019)
    "student-kd-hidden-small": ([{"distill": {"teacher": str(TEACHER_DIR), "student": STUDENT, "alpha": 0.5,
                                              "temperature": 2.0, "hidden_weight": 1.0}}], {"epochs": 8},
                                {"max_train_examples": SMALL}),
    "student-kd-hidden": ([{"distill": {"teacher": str(TEACHER_DIR), "student": STUDENT, "alpha": 0.5,
                                        "temperature": 2.0, "hidden_weight": 1.0}}], {"epochs": 2}, {}),
}
# the low-data pair again on 100 articles (the eval split stays the same: it depends on the seed only)
for _name in ("student-small", "student-kd-hidden-small"):
    _strategies, _train, _data = VARIANTS[_name]
    VARIANTS[_name.replace("small", "tiny")] = (_strategies, {**_train, "epochs": 16},
                                                {"max_train_examples": 100})


def config_for(name: str):
    from tuneforge.config import validate_config

    strategies, train, data = VARIANTS[name]
    return validate_config({
        "model": "minilm-l6",
        "data": {"train": "builtin:bbc-news", "eval_fraction": 0.2, "max_eval_examples": 445, **data},
        "retain": None,
        "strategies": strategies,
        "train": {"batch_size": 16, "lr": 1.0e-4, "warmup_steps": 10, "max_seq_len": 128, "seed": 0,
                  "log_every": 10, **train},
        "evaluation": {"samples": 0, "batch_size": 64},
        "output": str(OUT / name),
    })


def run_variant(name: str) -> None:
    import torch

    from tuneforge.run import train_run

    torch.set_num_threads(int(os.environ.get("TUNEFORGE_THREADS", "2")))
    config = config_for(name)
    train_run(config, overwrite=True)
    if name == "teacher":
        save_model_folder(config, TEACHER_DIR)


def save_model_folder(config, directory: Path) -> None:
    """The fine-tuned encoder as a plain Hugging Face folder: the students' teacher."""
    from tuneforge import load_adapter
    from tuneforge.models import load_model
    from tuneforge.run import load_run_data

    labels = load_run_data(config).tasks[0].labels
    model, tokenizer, _ = load_model(config.model, "classification", labels)
    model = load_adapter(model, Path(config.output) / "adapter", tokenizer)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)


def run_all(names: list[str]) -> None:
    for name in names:
        if (OUT / name / "results.json").is_file() and (name != "teacher" or TEACHER_DIR.is_dir()):
            print(f"{name}: done already", flush=True)
            continue
        print(f"{name}: running", flush=True)
        subprocess.run([sys.executable, __file__, "run", name], check=False)


def summary(name: str, out: Path = OUT) -> dict | None:
    """What the docs read of one finished run (None where it has not run)."""
    path = out / name / "results.json"
    if not path.is_file():
        return None
    results = json.loads(path.read_text())
    after = results["after"]["eval"]
    return {"layers": 6 if name == "teacher" else 3,
            "train_articles": VARIANTS[name][2].get("max_train_examples", "all"), "steps": results["steps"],
            "seed": results.get("seed"), "eval_accuracy": after["accuracy"],
            "eval_examples": after["examples"], "eval_loss": after["loss"],
            "train_seconds": results["train_seconds"]}


def collect(out: Path = OUT) -> dict:
    return {"runs": {name: summary(name, out) for name in VARIANTS}}


def render(data: dict) -> str:
    """The table of docs/distillation.md from `collect`'s (or the recorded JSON's) data."""
    rows = ["| run | layers | train articles | steps | eval accuracy | eval loss | train time |",
            "|---|---|---|---|---|---|---|"]
    for name, run in data["runs"].items():
        if run is None:
            rows.append(f"| {name} | not run | | | | | |")
            continue
        rows.append(f"| {name} | {run['layers']} | {run['train_articles']} | {run['steps']} | "
                    f"{100 * run['eval_accuracy']:.1f}% ({run['eval_examples']}) | {run['eval_loss']:.3f} | "
                    f"{run['train_seconds']:.0f} s |")
    return "\n".join(rows)


RESULTS = ROOT / "docs" / "results" / "distill-bbc.json"


def record(names: list[str]) -> None:
    """Write the finished runs' summaries to docs/results/distill-bbc.json, with date and command."""
    import datetime

    data = {"date": datetime.date.today().isoformat(),
            "command": "python experiments/distill_bbc.py all && python experiments/distill_bbc.py record",
            **collect()}
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"written to {RESULTS}")


def main() -> None:
    run_cli(__doc__, VARIANTS, {
        "run": lambda names: [run_variant(name) for name in names],
        "all": run_all,
        "table": lambda names: print(render(collect())),
        "record": record,
    })


if __name__ == "__main__":
    main()
