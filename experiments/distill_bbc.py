"""DistilBERT-style student on BBC News topics: does distillation from the fine-tuned encoder help?

The bundled all-MiniLM-L6-v2 (6 layers) is fine-tuned on BBC News (5 topics) as the teacher. The
student keeps layers 0, 2, 4 (`distill: {student: {every: 2}}`), initialised from the pretrained
encoder, and is trained on the same data for the same steps either on the labels only (`alpha: 1`, the
KD term has weight 0) or with distillation from the teacher (`alpha: 0.5`, T = 2). Both on the full
training set and on a small one (200 articles), where the teacher's soft labels should matter most.

    python experiments/distill_bbc.py all --seeds 1 2 3       # every variant, seed by seed (skips done runs)
    python experiments/distill_bbc.py all teacher student-small student-kd-hidden-small --seeds 1
    python experiments/distill_bbc.py table                   # the Markdown tables for docs/distillation.md
    python experiments/distill_bbc.py record                  # the same data -> docs/results/distill-bbc.json

The seed sets the held-out split (and the data order and the head's initialisation), so every seed has
its own teacher, trained on that seed's training articles only. Seed 0's split is the one the variants
were chosen on (2026-11-26); `CONFIRM` names the comparisons fixed before seeds 1-3 were run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from seeded_runs import collect_by_seed, seed_dir, spread
from variant_cli import run_cli

os.environ.setdefault("HF_HUB_OFFLINE", "1")

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "runs" / "distill-bbc"
TEACHER = "teacher-model"  # in a `distill.teacher` option: the seed's fine-tuned teacher folder
STUDENT = {"every": 2}
SMALL = 200  # training articles in the low-data setting

# name -> (strategies, train overrides, data overrides)
VARIANTS: dict[str, tuple[list[dict], dict, dict]] = {
    "teacher": ([{"full": {}}], {"epochs": 2}, {}),
    "student": ([{"distill": {"student": STUDENT, "alpha": 1.0}}], {"epochs": 2}, {}),
    "student-kd": ([{"distill": {"teacher": TEACHER, "student": STUDENT, "alpha": 0.5,
                                 "temperature": 2.0}}], {"epochs": 2}, {}),
    "student-small": ([{"distill": {"student": STUDENT, "alpha": 1.0}}], {"epochs": 8},
                      {"max_train_examples": SMALL}),
    "student-kd-small": ([{"distill": {"teacher": TEACHER, "student": STUDENT, "alpha": 0.5,
                                       "temperature": 2.0}}], {"epochs": 8}, {"max_train_examples": SMALL}),
    # mostly the teacher's soft targets, softened further (Hinton et al. 2015 use T up to 20)
    "student-kd-t4-small": ([{"distill": {"teacher": TEACHER, "student": STUDENT, "alpha": 0.1,
                                          "temperature": 4.0}}], {"epochs": 8},
                            {"max_train_examples": SMALL}),
    # DistilBERT's cosine loss on the last hidden states on top of the soft targets (Sanh et al. 2019)
    "student-kd-hidden-small": ([{"distill": {"teacher": TEACHER, "student": STUDENT, "alpha": 0.5,
                                              "temperature": 2.0, "hidden_weight": 1.0}}], {"epochs": 8},
                                {"max_train_examples": SMALL}),
    "student-kd-hidden": ([{"distill": {"teacher": TEACHER, "student": STUDENT, "alpha": 0.5,
                                        "temperature": 2.0, "hidden_weight": 1.0}}], {"epochs": 2}, {}),
}
# the low-data pair again on 100 articles (the eval split stays the same: it depends on the seed only)
for _name in ("student-small", "student-kd-hidden-small"):
    _strategies, _train, _data = VARIANTS[_name]
    VARIANTS[_name.replace("small", "tiny")] = (_strategies, {**_train, "epochs": 16},
                                                {"max_train_examples": 100})


# the pairs (without, with distillation) judged on the fresh splits, fixed from seed 0's exploration
CONFIRM: list[tuple[str, str]] = [("student-small", "student-kd-hidden-small"),
                                  ("student-tiny", "student-kd-hidden-tiny"),
                                  ("student", "student-kd-hidden")]


def config_for(name: str, seed: int = 0):
    from tuneforge.config import validate_config

    strategies, train, data = VARIANTS[name]
    teacher = str(seed_dir(OUT, seed) / TEACHER)
    strategies = [{kind: {**options, "teacher": teacher} if options.get("teacher") == TEACHER else options}
                  for spec in strategies for kind, options in spec.items()]
    return validate_config({
        "model": "minilm-l6",
        "data": {"train": "builtin:bbc-news", "eval_fraction": 0.2, "max_eval_examples": 445, **data},
        "retain": None,
        "strategies": strategies,
        "train": {"batch_size": 16, "lr": 1.0e-4, "warmup_steps": 10, "max_seq_len": 128, "seed": seed,
                  "log_every": 10, "keep_checkpoints": 1, **train},
        "evaluation": {"samples": 0, "batch_size": 64},
        "output": str(seed_dir(OUT, seed) / name),
    })


def run_variant(name: str, seed: int) -> None:
    import torch

    from tuneforge.run import train_run

    torch.set_num_threads(int(os.environ.get("TUNEFORGE_THREADS", "2")))
    config = config_for(name, seed)
    train_run(config, overwrite=True)
    if name == "teacher":
        save_model_folder(config, seed_dir(OUT, seed) / TEACHER)


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


def run_all(names: list[str], seeds: list[int]) -> None:
    """One subprocess per variant and seed, seed by seed; a student with distillation first needs its
    seed's teacher (trained first when missing)."""
    for seed in seeds:
        needs_teacher = any(VARIANTS[name][0][0]["distill"].get("teacher") == TEACHER
                            for name in names if "distill" in VARIANTS[name][0][0])
        teacher = ["teacher"] if needs_teacher or "teacher" in names else []
        order = teacher + [n for n in names if n != "teacher"]
        for name in order:
            done = (seed_dir(OUT, seed) / name / "results.json").is_file()
            if done and (name != "teacher" or (seed_dir(OUT, seed) / TEACHER).is_dir()):
                print(f"seed {seed} {name}: done already", flush=True)
                continue
            print(f"seed {seed} {name}: running", flush=True)
            subprocess.run([sys.executable, __file__, "run", name, "--seeds", str(seed)], check=False)


def summary(name: str, run_dir: Path) -> dict | None:
    """What the docs read of one finished run (None where it has not run)."""
    path = run_dir / "results.json"
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
    """Every finished run, by variant and seed, as `record` writes it."""
    return collect_by_seed(out, VARIANTS, summary)


def render(data: dict) -> str:
    """Per variant, mean (min .. max) over its seeds, from `collect`'s (or the recorded JSON's) data; a
    variant outside the fixed comparisons is left out until it has run."""
    rows = ["| run | layers | train articles | steps | seeds | eval accuracy | eval loss | train time |",
            "|---|---|---|---|---|---|---|---|"]
    listed = {"teacher", *(name for pair in CONFIRM for name in pair)}  # shown even before they ran
    for name, runs in data["variants"].items():
        if not runs:
            if name in listed:
                rows.append(f"| {name} | not run | | | | | | |")
            continue
        seeds = sorted(runs, key=int)
        first = runs[seeds[0]]
        rows.append(f"| {name} | {first['layers']} | {first['train_articles']} | {first['steps']} "
                    f"| {', '.join(seeds)} "
                    f"| {spread([runs[s]['eval_accuracy'] for s in seeds], 100, 1, '', '%')} "
                    f"| {spread([runs[s]['eval_loss'] for s in seeds], 1, 3)} "
                    f"| {spread([runs[s]['train_seconds'] for s in seeds], 1, 0, '', ' s')} |")
    return "\n".join(rows)


def render_pairs(data: dict, seeds: list[str] | None = None) -> str:
    """The fixed comparisons (`CONFIRM`), seed by seed: the distilled student's accuracy gain in held-out
    articles and its eval loss change, and on how many seeds it did better on both."""
    rows = [("| without -> with distillation | seeds | accuracy gain, articles (per seed) "
             "| eval loss change (per seed) | better on both |"), "|---|---|---|---|---|"]
    variants = data["variants"]
    for plain, distilled in CONFIRM:
        common = sorted(set(variants[plain]) & set(variants[distilled]), key=int)
        common = [s for s in common if seeds is None or s in seeds]
        if not common:
            rows.append(f"| {plain} -> {distilled} | not run | | | |")
            continue
        gains = [round((variants[distilled][s]["eval_accuracy"] - variants[plain][s]["eval_accuracy"])
                       * variants[plain][s]["eval_examples"]) for s in common]
        losses = [variants[distilled][s]["eval_loss"] - variants[plain][s]["eval_loss"] for s in common]
        better = sum(g > 0 and d < 0 for g, d in zip(gains, losses))
        rows.append(f"| {plain} -> {distilled} | {', '.join(common)} | {', '.join(f'{g:+d}' for g in gains)} "
                    f"| {', '.join(f'{d:+.3f}' for d in losses)} | {better} of {len(common)} |")
    return "\n".join(rows)


RESULTS = ROOT / "docs" / "results" / "distill-bbc.json"


def record(names: list[str]) -> None:
    """Write the finished runs' summaries to docs/results/distill-bbc.json, with date and command."""
    import datetime

    collected = collect()
    by_variants: dict[tuple, list[str]] = {}  # the variants each seed ran -> those seeds
    seeds = sorted({seed for runs in collected["variants"].values() for seed in runs}, key=int)
    for seed in seeds:
        ran = tuple(name for name, runs in collected["variants"].items() if seed in runs)
        by_variants.setdefault(ran, []).append(seed)
    commands = [f"python experiments/distill_bbc.py all {' '.join(ran)} --seeds {' '.join(group)}"
                for ran, group in by_variants.items()]
    data = {"date": datetime.date.today().isoformat(),
            "command": " && ".join([*commands, "python experiments/distill_bbc.py record"]),
            **collected}
    RESULTS.write_text(json.dumps(data, indent=1) + "\n")
    print(f"written to {RESULTS}")


def main() -> None:
    run_cli(__doc__, VARIANTS, {
        "run": lambda names, seeds: [run_variant(name, seed) for seed in seeds for name in names],
        "all": run_all,
        "table": lambda names, seeds: print(render(collect()) + "\n\n" + render_pairs(collect())),
        "record": lambda names, seeds: record(names),
    }, seeds=True)


if __name__ == "__main__":
    main()
