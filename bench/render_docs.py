"""Render every table the docs take from committed JSON, between `<!-- begin NAME -->` and
`<!-- end NAME -->` markers in README.md and docs/*.md.

`BLOCKS` maps each marker name to the JSON file it is rendered from and the function that renders it;
`tests/test_docs_numbers.py` checks that every marked block in the docs equals what its function makes
from its JSON, so prose and data cannot drift apart. Which doc section each JSON backs, and which numbers
have no JSON yet: docs/results/README.md.

    python bench/render_docs.py            # rewrite every marked block from its JSON
    python bench/render_docs.py --check    # exit 1, naming the blocks that differ, without writing
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import statistics
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]
MARKER = re.compile(r"<!-- begin (?P<name>\S+) -->\n(?P<body>.*?)\n<!-- end (?P=name) -->", re.DOTALL)


def _module(relative: str) -> ModuleType:
    """A script of the repository (bench/, tests/) as a module, without making its folder a package."""
    path = REPO / relative
    name = f"_render_{path.stem}"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    if str(path.parent) not in sys.path:  # its sibling imports (tests/matrix_support.py), found last
        sys.path.append(str(path.parent))
    spec.loader.exec_module(module)
    return module


def _inner(block: str, name: str) -> str:
    """The text a renderer that writes its own markers puts between them."""
    return block.removeprefix(f"<!-- begin {name} -->").removesuffix(f"<!-- end {name} -->").strip("\n")


# ------------------------------------------------------------------------------------------------ renderers
def load_memory(path: Path) -> str:
    return _inner(_module("bench/load_memory.py").render(json.loads(path.read_text())), "load-memory.json")


def gguf_export(path: Path) -> str:
    return _module("bench/gguf_export.py").render(path, path.relative_to(REPO).as_posix())


def fuzz_campaign(path: Path) -> str:
    return _module("bench/fuzz_campaign.py").render(json.loads(path.read_text()))


def benchmark_forgetting(path: Path) -> str:
    return _module("bench/benchmark_forgetting.py").render(json.loads(path.read_text()))


def forgetting(path: Path) -> str:
    return _module("experiments/forgetting.py").render(json.loads(path.read_text()))


def distillation(path: Path) -> str:
    return _module("experiments/distill_bbc.py").render(json.loads(path.read_text()))


def distillation_pairs(path: Path) -> str:
    return _module("experiments/distill_bbc.py").render_pairs(json.loads(path.read_text()))


def forgetting_curves(path: Path) -> str:
    return _module("experiments/forgetting.py").render_curves(json.loads(path.read_text()))


def quickstart(path: Path) -> str:
    return _module("bench/quickstart.py").render(json.loads(path.read_text()))


def sharding(path: Path) -> str:
    return _module("bench/sharding_memory.py").render(json.loads(path.read_text()))


def memory_estimate(path: Path) -> str:
    report = json.loads(path.read_text())
    return _inner(_module("bench/memory_estimate.py").render(report), "memory_estimate.json")


def quantize_memory(path: Path) -> str:
    return _module("bench/quantize_memory.py").render(path)


def qlora_vs_peft(path: Path) -> str:
    return _module("bench/qlora_vs_peft.py").render(path)


def scaling(path: Path) -> str:
    return _module("bench/scaling_report.py").render(json.loads(path.read_text()))


def document_attention(path: Path) -> str:
    return _module("bench/scaling_report.py").attention_section(json.loads(path.read_text()))


def architectures(path: Path) -> str:
    return _module("tests/architectures_support.py").markdown_table(json.loads(path.read_text())["cells"])


# run name in compare-12-steps.json -> (label, closed form of its trainable parameters on SmolLM2-135M)
TWELVE_STEPS = {
    "full": ("full", "every weight"),
    "layerwise": ("layerwise (top 6, decay 0.9)", "6 x 3,540,096 + final norm 576"),
    "lora": ("LoRA r16 all-linear", "16 x (d_in + d_out) x 7 x 30"),
    "dora": ("DoRA r16 all-linear", "LoRA + one magnitude per output row"),
    "adapter": ("adapter (Pfeiffer, r.f. 16)", "30 x (576 x 36 x 2 + 36 + 576)"),
    "prefix": ("prefix (16)", "2 x 30 x 192 x 16"),
    "ia3": ("IA3 (k, v, down)", "30 x (192 + 192 + 1536)"),
    "prompt-tuning": ("prompt tuning (16)", "16 x 576"),
    "prompt-only": ("prompt only (no training)", "-"),
}


def _mib(size: float) -> str:
    mib = size / 2**20
    return "0" if mib == 0 else f"{mib:.2f}" if mib < 0.1 else f"{mib:.1f}"


def compare_12_steps(path: Path) -> str:
    """docs/strategies.md: every method, 12 steps, one seed (the LoRA + EWC row is read in the prose)."""
    rows = {row["run"]: row for row in json.loads(path.read_text())["rows"]}
    lines = [("| method | trainable params | closed form | steps/s | peak MiB | task loss after | "
              "retain ppl after | adapter MiB |"),
             "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
    for run, (label, closed_form) in TWELVE_STEPS.items():
        row = rows[run]
        speed = f"{row['steps'] / row['train_seconds']:.2f}" if row["train_seconds"] else "-"
        lines.append(f"| {label} | {row['trainable_params']:,} | {closed_form} | {speed} | "
                     f"{row['peak_memory_mb']:.0f} | {row['task']:.3f} | {row['retain_ppl_after']:.2f} | "
                     f"{_mib(row['artifact_bytes'])} |")
    return "\n".join(lines)


COMPARE_LABELS = {"full": "full", "lora": "LoRA", "prompt-only": "untrained"}


def compare_seeds(path: Path) -> str:
    """docs/tasks.md: full vs LoRA vs no training, mean ± standard deviation over the seeds."""
    from tuneforge.formatting import si_count

    lines = [("| run | task loss after | task loss change | forgetting (retain ppl) | trainable params | "
              "peak MiB |"), "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for row in json.loads(path.read_text())["rows"]:
        spread = row["spread"]
        change = (f"{row['task_change']:.3f} ± {spread['task_change']:.3f} ({row['task_change_pct']:+.1f}%)"
                  if row["task_change"] or spread["task_change"] else "0")
        forgetting = f"{row['forgetting_pct']:+.1f}%" if row["forgetting_pct"] else "0"
        label = COMPARE_LABELS.get(row["run"], row["run"])
        lines.append(f"| {label} | {row['task']:.3f} ± {spread['task']:.3f} | "
                     f"{change} | {forgetting} | {si_count(row['trainable_params'])} | "
                     f"{row['peak_memory_mb']:,.0f} |")
    return "\n".join(lines)


# config stem in docs/continual/comparison.json -> the row's label in docs/tasks.md
CONTINUAL_LABELS = {"continual-encoder": "naive", "continual-replay": "replay (200 items, ratio 0.5)",
                    "continual-ewc": "EWC (weight 5000)"}


def _continual_runs(path: Path) -> dict[tuple[str, int], dict]:
    """{(config stem, seed): the run's continual results} from a `tuneforge compare --seeds` comparison."""
    data = json.loads(path.read_text())
    seeds = {run["run"]: run["seed"] for run in data["runs"]}
    return {(name.rsplit("-seed", 1)[0], seeds[name]): result for name, result in data["continual"].items()}


def continual_first_seed(path: Path) -> str:
    """docs/tasks.md: each method's R after the last task, ACC, BWT and FWT for the first seed."""
    runs = _continual_runs(path)
    first = min(seed for _, seed in runs)
    lines = ["| run | R after the last task (task 1, 2, 3) | ACC | BWT | FWT |",
             "| --- | --- | ---: | ---: | ---: |"]
    for stem, label in CONTINUAL_LABELS.items():
        result = runs[(stem, first)]
        final = ", ".join(f"{value:.3f}" for value in result["matrix"][-1])
        lines.append(f"| {label} | {final} | {result['acc']:.3f} | {result['bwt']:+.3f} | "
                     f"{result['fwt']:+.3f} |")
    return "\n".join(lines)


def continual_seeds(path: Path) -> str:
    """docs/tasks.md: BWT and ACC of each method for every seed, and their means."""
    runs = _continual_runs(path)
    seeds = sorted({seed for _, seed in runs})
    stems = list(CONTINUAL_LABELS)
    names = [CONTINUAL_LABELS[stem].split(" (")[0] for stem in stems]
    lines = ["| seed | " + " | ".join([*(f"BWT {n}" for n in names), *(f"ACC {n}" for n in names)]) + " |",
             "| --- |" + " ---: |" * (2 * len(stems))]
    for seed in seeds:
        cells = [f"{runs[(stem, seed)]['bwt']:+.3f}" for stem in stems]
        cells += [f"{runs[(stem, seed)]['acc']:.3f}" for stem in stems]
        lines.append(f"| {seed} | " + " | ".join(cells) + " |")
    means = [f"{statistics.mean(runs[(stem, seed)]['bwt'] for seed in seeds):+.3f}" for stem in stems]
    means += [f"{statistics.mean(runs[(stem, seed)]['acc'] for seed in seeds):.3f}" for stem in stems]
    lines.append("| mean | " + " | ".join(means) + " |")
    return "\n".join(lines)


def _bench_results(path: Path) -> dict[tuple, list[dict]]:
    """A `bench/bench.py --json` file as bench.py's own `--render` reads it: {(suite, method, side): runs}."""
    data = json.loads(path.read_text())
    return {tuple(key.split("/")): runs for key, runs in data.get("results", data).items()}


SYNTHETIC_LABELS = {"full": "full", "lora-qv": "lora-qv", "lora-all": "lora-all", "prefix": "prefix",
                    "prompt": "prompt", "ia3": "ia3", "adapter": "adapter (Pfeiffer, ours only)",
                    "layerwise-top-half": "layerwise top 4 of 8"}


def _ratios(ours: list[dict], reference: list[dict], key: str) -> list[float]:
    """Per-repeat ratios ours / reference: repeat i against repeat i, the same phase of the machine."""
    return [a[key] / b[key] for a, b in zip(ours, reference, strict=False) if a.get(key) and b.get(key)]


def _paired_median(ours: list[dict], reference: list[dict], key: str) -> float:
    return statistics.median(_ratios(ours, reference, key))


def _paired(ours: list[dict], reference: list[dict], key: str) -> str:
    """Median of the per-repeat ratios, with their range; `-` without a reference."""
    ratios = _ratios(ours, reference, key)
    if not ratios:
        return "-"
    middle = f"{statistics.median(ratios):.2f}"
    return middle if len(ratios) == 1 else f"{middle} ({min(ratios):.2f}-{max(ratios):.2f})"


def _with_range(runs: list[dict], key: str, digits: int = 0) -> str:
    """Median over repeats, with the range."""
    values = [run[key] for run in runs if run.get(key) is not None]
    if not values:
        return "-"

    def show(value: float) -> str:
        return f"{value:,.{digits}f}"

    middle = show(statistics.median(values))
    return middle if len(values) == 1 else f"{middle} ({show(min(values))}-{show(max(values))})"


def performance_uniform(path: Path) -> str:
    """docs/performance.md, uniform batches, like-for-like (fused AdamW both sides): medians over repeats with
    their range, ratios paired by repeat."""
    bench = _module("bench/bench.py")
    data = json.loads(path.read_text())
    results, threads = _bench_results(path), data["threads"]
    mm = bench.median(results[("matmul", "synthetic", "torch.mm")], "fp32_gflops_cpu")
    lines = [f"{data['repeats']} repeats, {threads} thread(s) per run; median (range).", "",
             ("| method | step s ours | step s PEFT | ours / PEFT | peak RSS MB ours | peak RSS MB PEFT "
              "| RSS ratio | trainable | GEMM % ours | GEMM % PEFT |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, label in SYNTHETIC_LABELS.items():
        ours, peft = results[("synthetic", method, "ours")], results.get(("synthetic", method, "peft"), [])
        row = [label, _with_range(ours, "step_s", 3), _with_range(peft, "step_s", 3),
               f"**{_paired(ours, peft, 'step_s')}**" if peft else "-",
               _with_range(ours, "peak_rss_mb"), _with_range(peft, "peak_rss_mb"),
               _paired(ours, peft, "peak_rss_mb"), bench.cell(bench.median(ours, "trainable"))]
        for runs in (ours, peft):  # GEMM FLOP rate per thread by CPU time, over torch.mm's
            flops, cpu = bench.median(runs, "gemm_gflops_per_step"), bench.median(runs, "cpu_step_s")
            row.append(bench.cell(100 * flops / (cpu / threads) / mm) if flops and cpu else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def prefix_repeats(path: Path) -> str:
    """docs/performance.md, prefix re-measured: every repeat's step time on both sides (wall and CPU time),
    the per-repeat ratios, and their median and range."""
    data = json.loads(path.read_text())
    results = _bench_results(path)
    ours, peft = results[("synthetic", "prefix", "ours")], results[("synthetic", "prefix", "peft")]
    lines = [f"{data['repeats']} repeats, {data['threads']} thread(s) per run, alternating order.", "",
             ("| repeat | step s ours | step s PEFT | ours / PEFT | CPU s ours | CPU s PEFT "
              "| ours / PEFT, CPU |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for index, (a, b) in enumerate(zip(ours, peft, strict=True)):
        cells = [f"{a[key]:.3f} | {b[key]:.3f} | {a[key] / b[key]:.2f}" for key in ("step_s", "cpu_step_s")]
        lines.append(f"| {index + 1} | {cells[0]} | {cells[1]} |")
    lines.append(f"| median (range) | {_with_range(ours, 'step_s', 3)} | {_with_range(peft, 'step_s', 3)} "
                 f"| **{_paired(ours, peft, 'step_s')}** | {_with_range(ours, 'cpu_step_s', 3)} "
                 f"| {_with_range(peft, 'cpu_step_s', 3)} | **{_paired(ours, peft, 'cpu_step_s')}** |")
    return "\n".join(lines)


def profile_operators(path: Path, rows: int = 14) -> str:
    """Operator by operator, the profiles of one `bench/profile_step.py --json` file side by side: self CPU
    ms and calls of the operators that take the most time on any side."""
    profiles = json.loads(path.read_text())["profiles"]
    tables = [{op["name"]: op for op in profile["operators"]} for profile in profiles]
    names = sorted({name for table in tables for name in table},
                   key=lambda name: -max(table.get(name, {}).get("self_cpu_ms", 0.0) for table in tables))
    header = " | ".join(f"{profile['label']}: ms (calls)" for profile in profiles)
    lines = [f"| operator | {header} |", "| --- |" + " ---: |" * len(profiles)]
    for name in names[:rows]:
        cells = [f"{table[name]['self_cpu_ms']:,.1f} ({table[name]['calls']})" if name in table else "-"
                 for table in tables]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    lines.append("| step, CPU ms (all operators) | "
                 + " | ".join(f"{profile['step_cpu_ms']:,.0f}" for profile in profiles) + " |")
    return "\n".join(lines)


# method -> (label, the Trainer run it is compared with: the same dtype)
CHAT_ROWS = {
    "lora-packed": ("ours, packed, fp32", "trainer-lora"),
    "lora-packed-compile": ("ours, packed, fp32, `train.compile`", "trainer-lora"),
    "trainer-lora": ("Trainer + PEFT, fp32", "trainer-lora"),
    "lora-packed-bf16": ("ours, packed, bf16 autocast", "trainer-lora-bf16"),
    "lora-packed-bf16-compile": ("ours, packed, bf16 autocast, `train.compile`", "trainer-lora-bf16"),
    "trainer-lora-bf16": ("Trainer + PEFT, bf16 autocast", "trainer-lora-bf16"),
}


def performance_chat(path: Path) -> str:
    """docs/performance.md, SmolLM2 LoRA on chat data: each row against the Trainer of the same dtype, ratios
    paired by repeat (both ran in the same repeat, back to back)."""
    data = json.loads(path.read_text())
    results = _bench_results(path)
    lines = [f"{data['repeats']} repeats, {data['threads']} thread(s) per run; median (range).", "",
             ("| run | step s | non-pad tok/s | vs Trainer (same dtype) | peak RSS MB | vs Trainer "
              "| train loss/token | held-out loss/token |"),
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for method, (label, reference_name) in CHAT_ROWS.items():
        side = "trainer" if method.startswith("trainer") else "ours"
        runs = results.get(("smollm2", method, side))
        if not runs:
            continue
        reference = results.get(("smollm2", reference_name, "trainer"), [])
        mine = method != reference_name
        speed, memory = _paired(runs, reference, "tokens_per_s"), _paired(runs, reference, "peak_rss_mb")
        lines.append(f"| {label} | {_with_range(runs, 'step_s', 2)} | {_with_range(runs, 'tokens_per_s')} "
                     f"| {f'**{speed}**' if mine else '1.00'} | {_with_range(runs, 'peak_rss_mb')} "
                     f"| {f'**{memory}**' if mine else '1.00'} | {_with_range(runs, 'loss_per_token', 4)} "
                     f"| {_with_range(runs, 'held_out_loss', 4)} |")
    return "\n".join(lines)


def profile_shares(path: Path) -> str:
    """docs/performance.md, where a step goes: the profiles `bench/profile_step.py --json` collected in one
    file side by side, each operator category's share of the step's self CPU time."""
    profiles = json.loads(path.read_text())["profiles"]
    names = list(dict.fromkeys(name for profile in profiles for name in profile["shares"]))
    header = " | ".join(profile["label"] for profile in profiles)
    lines = [f"| share of a step's CPU time | {header} |", "| --- |" + " ---: |" * len(profiles)]
    for name in sorted(names, key=lambda n: -profiles[0]["shares"].get(n, 0.0)):
        lines.append(f"| {name} | " + " | ".join(f"{100 * p['shares'].get(name, 0.0):.1f}%" for p in profiles)
                     + " |")
    lines.append("| step, CPU ms | " + " | ".join(f"{p['step_cpu_ms']:,.0f}" for p in profiles) + " |")
    return "\n".join(lines)


# uniform-batch rows measured again with more repeats, whose ratio the targets then take: (method -> JSON)
REMEASURED = {"prefix": "bench/results/2026-11-30-prefix.json"}


def performance_targets(path: Path) -> str:
    """docs/performance.md, the targets: each judged from the like-for-like results (this file: the chat
    bench; beside it the uniform-batch bench of the same date)."""
    bench = _module("bench/bench.py")
    chat = _bench_results(path)
    uniform = _bench_results(path.with_name(path.name.replace("-chat", "-uniform")))
    peft_methods = [m for m in SYNTHETIC_LABELS if ("synthetic", m, "peft") in uniform and m != "full"
                    and not m.startswith("layerwise")]
    steps = {m: _paired_median(uniform[("synthetic", m, "ours")], uniform[("synthetic", m, "peft")], "step_s")
             for m in peft_methods}
    rss = {m: _paired_median(uniform[("synthetic", m, "ours")], uniform[("synthetic", m, "peft")],
                             "peak_rss_mb") for m in peft_methods}
    remeasured = []
    for method, source in REMEASURED.items():  # a row measured again with more repeats replaces its ratio
        again = _bench_results(REPO / source)
        runs = again[("synthetic", method, "ours")], again[("synthetic", method, "peft")]
        steps[method] = _paired_median(*runs, "step_s")
        remeasured.append(f"{method}: {len(runs[0])} repeats, `{source}`")

    def verdict(values: dict[str, float], limit: float, note: str = "") -> str:
        worst = max(values, key=values.get)
        spread = f"{min(values.values()):.2f}-{max(values.values()):.2f}{note}"
        if values[worst] <= limit:
            return f"**met**: {spread}"
        return f"**missed**: {spread} ({worst} {values[worst]:.2f})"

    full = uniform[("synthetic", "full", "ours")]
    matmul = uniform[("matmul", "synthetic", "torch.mm")]
    threads = json.loads(path.read_text())["threads"]
    gemm = 100 * bench.median(full, "gemm_gflops_per_step") / (bench.median(full, "cpu_step_s") / threads) \
        / bench.median(matmul, "fp32_gflops_cpu")
    top = _paired_median(uniform[("synthetic", "layerwise-top-half", "ours")], full, "step_s")
    trainer = chat[("smollm2", "trainer-lora", "trainer")]
    ours = {m: chat[("smollm2", m, "ours")] for m in ("lora-packed", "lora-packed-compile")
            if ("smollm2", m, "ours") in chat}
    speed = {m: _paired_median(runs, trainer, "tokens_per_s") for m, runs in ours.items()}
    best = max(speed, key=speed.get)
    losses = (f"loss per token {bench.median(ours[best], 'loss_per_token'):.3f} vs "
              f"{bench.median(trainer, 'loss_per_token'):.3f} in training, "
              f"{bench.median(ours[best], 'held_out_loss'):.3f} vs "
              f"{bench.median(trainer, 'held_out_loss'):.3f} held out")
    memory = _paired_median(ours[best], trainer, "peak_rss_mb")
    rate = {key: bench.median(matmul, f"{key}_gflops") for key in ("fp32", "bf16")}
    inference = _bench_results(REPO / "bench/results/2026-11-26-inference.json")
    inference = inference[("inference", "merged-lora", "ours")]
    merged = (bench.median([run["lora-merged"] for run in inference], "step_s")
              / bench.median([run["base"] for run in inference], "step_s"))
    rows = [
        ("every PEFT method's step time <= 1.0 x PEFT's (uniform batches)",
         verdict(steps, 1.0, f" ({'; '.join(remeasured)})" if remeasured else "")),
        ("peak RSS <= PEFT's", verdict(rss, 1.0)),
        ("full fine-tuning at >= 80% of the measured matmul rate",
         f"**{'met' if gemm >= 80 else 'missed'}**: {gemm:.0f}%"),
        ("SmolLM2 LoRA non-padding tokens/s >= 2.5 x Trainer + PEFT in fp32, equal loss per token",
         f"**{'met' if speed[best] >= 2.5 else 'missed'}**: {speed[best]:.2f} x ({best}; {losses})"),
        ("the same in bf16 against a bf16 Trainer",
         (f"**not measured**: this CPU has no bf16 instructions; `torch.mm` in bf16 ran at "
          f"{rate['bf16']:.1f} GFLOP/s against {rate['fp32']:.1f} in fp32")),
        ("peak RSS of that run <= 0.5 x Trainer + PEFT",
         f"**{'met' if memory <= 0.5 else 'missed'}**: {memory:.2f} x"),
        ("bottom half of the layers frozen: step time <= 0.65 x full fine-tuning",
         f"**{'met' if top <= 0.65 else 'missed'}**: {top:.2f} x (matrix-product work: 0.667 x, below)"),
        ("a merged LoRA model runs inference at the base model's speed",
         f"**{'met' if merged <= 1.02 else 'missed'}**: {merged:.2f} x (2026-11-26, above)"),
    ]
    return "\n".join(["| target | result |", "| --- | --- |"] + [f"| {t} | {r} |" for t, r in rows])


INFERENCE_LABELS = {"base": "base", "lora-merged": "LoRA all-linear, merged",
                    "lora-unmerged": "LoRA all-linear, unmerged"}


def performance_inference(path: Path) -> str:
    runs = _bench_results(path)[("inference", "merged-lora", "ours")]
    base = statistics.median(run["base"]["step_s"] for run in runs)
    lines = ["| model (synthetic, one forward of 4 x 256) | forward s | vs base |", "| --- | ---: | ---: |"]
    for name, label in INFERENCE_LABELS.items():
        step = statistics.median(run[name]["step_s"] for run in runs)
        lines.append(f"| {label} | {step:.3f} | {step / base:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ registry
@dataclass(frozen=True)
class Block:
    """A marked block: the JSON it comes from (relative to the repository) and its renderer."""

    source: str
    render: Callable[[Path], str]

    def text(self) -> str:
        return self.render(REPO / self.source)


BLOCKS: dict[str, Block] = {
    "load-memory.json": Block("docs/results/2026-11-29-load-memory.json", load_memory),
    "memory_estimate.json": Block("docs/results/memory_estimate.json", memory_estimate),
    "gguf-export.json": Block("docs/results/2026-11-29-gguf-export.json", gguf_export),
    "sharding.json": Block("docs/results/2026-11-29-sharding.json", sharding),
    "quickstart.json": Block("docs/results/2026-11-29-quickstart.json", quickstart),
    "forgetting.json": Block("docs/results/forgetting.json", forgetting),
    "forgetting-curves": Block("docs/results/forgetting.json", forgetting_curves),
    "distill-bbc.json": Block("docs/results/distill-bbc.json", distillation),
    "distill-bbc-pairs": Block("docs/results/distill-bbc.json", distillation_pairs),
    "benchmark_forgetting.json": Block("docs/results/benchmark_forgetting.json", benchmark_forgetting),
    "fuzz-campaign.json": Block("docs/results/fuzz-campaign.json", fuzz_campaign),
    "quantize-memory.json": Block("docs/results/2026-11-29-quantize-memory.json", quantize_memory),
    "qlora-vs-peft.json": Block("bench/results/2026-11-29-qlora-vs-peft.json", qlora_vs_peft),
    "architectures.json": Block("docs/results/architectures.json", architectures),
    "compare-12-steps.json": Block("docs/results/compare-12-steps.json", compare_12_steps),
    "compare/comparison.json": Block("docs/compare/comparison.json", compare_seeds),
    "continual/comparison.json": Block("docs/continual/comparison.json", continual_seeds),
    "continual-first-seed": Block("docs/continual/comparison.json", continual_first_seed),
    "2026-11-29-uniform.json": Block("bench/results/2026-11-29-uniform.json", performance_uniform),
    "document-attention": Block("bench/results/2026-11-29-document-attention.json", document_attention),
    "document-attention-512": Block("bench/results/2026-11-30-document-attention-512.json",
                                    document_attention),
    "2026-11-29-chat.json": Block("bench/results/2026-11-29-chat.json", performance_chat),
    "2026-11-29-profile.json": Block("bench/results/2026-11-29-profile.json", profile_shares),
    "2026-11-30-prefix.json": Block("bench/results/2026-11-30-prefix.json", prefix_repeats),
    "prefix-profile": Block("bench/results/2026-11-30-prefix-profile.json", profile_operators),
    "targets": Block("bench/results/2026-11-29-chat.json", performance_targets),
    "2026-11-26-inference.json": Block("bench/results/2026-11-26-inference.json", performance_inference),
}
# docs/scaling.md shows the newest `bench/scaling.py` results, once one is committed: until then the doc has
# a pending note where `bench/scaling.py` puts the markers when it writes its JSON there
SCALING = sorted((REPO / "bench" / "results").glob("*-scaling.json"))
if SCALING:
    BLOCKS["scaling.json"] = Block(SCALING[-1].relative_to(REPO).as_posix(), scaling)


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def marked_blocks(text: str) -> list[tuple[str, str]]:
    """(name, text between the markers without the blank lines around it) for every marked block."""
    return [(match["name"], match["body"].strip("\n")) for match in MARKER.finditer(text)]


def render_document(text: str) -> str:
    """`text` with every marked block rendered again from its JSON."""
    def replace(match: re.Match) -> str:
        name = match["name"]
        return f"<!-- begin {name} -->\n\n{BLOCKS[name].text()}\n\n<!-- end {name} -->"

    return MARKER.sub(replace, text)


def render_all(check: bool = False) -> list[str]:
    """Render every marked block of README.md and docs/*.md from its JSON (unless `check`); returns the
    documents whose blocks differed. What a bench calls after writing its JSON."""
    stale = []
    for doc in documents():
        text = doc.read_text()
        rendered = render_document(text)
        if rendered != text:
            stale.append(str(doc.relative_to(REPO)))
            if not check:
                doc.write_text(rendered)
    return stale


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report blocks that differ from their JSON")
    args = parser.parse_args()
    stale = render_all(args.check)
    verb = "differ from their JSON" if args.check else "rendered again"
    print(f"{verb}: {', '.join(stale)}" if stale else "every marked block matches its JSON")
    return 1 if stale and args.check else 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
