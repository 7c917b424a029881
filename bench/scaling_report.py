"""docs/scaling.md from a `bench/scaling.py` results file: tables, fitted growth, plots.

Growth is fitted, not read off by eye: the log-log slope of time per non-padding token against sequence
length (a sequence of L tokens then costs L^(1 + slope): 1 is linear, 2 quadratic), a straight line
time/token = a + b L (a: the weights' work, linear in L; b L: attention's, quadratic), and the slope against
the parameter count. Where 24 GiB runs out is an extrapolation of a fitted peak-RSS curve (quadratic in L,
linear in parameters) beyond the measured points, and says so; `tuneforge inspect`'s estimates are labelled
as estimates.

    python bench/scaling.py --render bench/results/DATE-scaling.json    # plots, docs/scaling.md
"""

from __future__ import annotations

import math
import re
import statistics
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))
import bench

REPO = HERE.parent
DOC = REPO / "docs" / "scaling.md"
# Speeds are non-padding tokens per second of the process's CPU time: with one thread that is its compute
# time, which another process on the same core does not inflate (wall time is in the JSON as well)
SPEED = "cpu_tokens_per_s"
PLOTS = REPO / "docs" / "scaling"
NAME = "scaling.json"  # the marker of docs/scaling.md's block
PENDING = re.compile(r"<!-- pending scaling\.json -->\n.*?<!-- /pending -->", re.DOTALL)
BUDGET = 24 * 2**30  # bytes: the memory the docs ask about
LENGTH_LABELS = {"ours-packed": "ours packed", "ours-packed-mask": "ours packed, mask",
                 "ours-packed-ckpt": "ours packed, checkpointing",
                 "ours-padded": "ours padded", "trainer": "Trainer + PEFT",
                 "trainer-ckpt": "Trainer + PEFT, checkpointing"}
SIZE_LABELS = {"ours-packed": "ours packed", "trainer": "Trainer + PEFT"}
METHOD_LABELS = {"full": "full fine-tuning", "lora": "LoRA r 8 all-linear",
                 "qlora": "QLoRA (nf4) r 8 all-linear"}


def install_doc(doc: Path = DOC) -> bool:
    """Put the block's markers where docs/scaling.md waits for its first results; True if it did."""
    text = doc.read_text()
    marked = f"<!-- begin {NAME} -->\n\n<!-- end {NAME} -->"
    new = PENDING.sub(lambda match: marked, text)
    if new != text:
        doc.write_text(new)
    return new != text


# ------------------------------------------------------------------------------------------------ fitting
def loglog_slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of log y against log x: y ~ x^slope."""
    return line([math.log(x) for x in xs], [math.log(y) for y in ys])[1]


def line(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """(a, b) of the least-squares line y = a + b x."""
    mean_x, mean_y = statistics.fmean(xs), statistics.fmean(ys)
    spread = sum((x - mean_x) ** 2 for x in xs)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys, strict=True)) / spread
    return mean_y - slope * mean_x, slope


def quadratic(xs: list[float], ys: list[float]) -> tuple[float, float, float]:
    """(a, b, c) of the least-squares y = a + b x + c x^2; a line (c = 0) when the curvature comes out
    negative or there are fewer than 4 points (3 would only interpolate)."""
    if len(xs) >= 4:
        import numpy

        c, b, a = (float(v) for v in numpy.polyfit(xs, ys, 2))
        if c > 0:
            return a, b, c
    a, b = line(xs, ys)
    return a, b, 0.0


def reach(coefficients: tuple[float, ...], level: float) -> float | None:
    """The smallest x > 0 where a + b x (+ c x^2) reaches `level`; None if it never does."""
    a, b, c = (*coefficients, 0.0)[:3]
    if c > 0:
        return (-b + math.sqrt(b * b - 4 * c * (a - level))) / (2 * c)
    if b > 0:
        return (level - a) / b
    return None


def growth(exponent: float) -> str:
    """Words for a fitted exponent: 1 is linear, 2 quadratic."""
    if exponent < 0.8:
        return "less than linear"
    if exponent < 1.2:
        return "close to linear"
    if exponent > 1.8:
        return "close to quadratic"
    return "between linear and quadratic"


# ------------------------------------------------------------------------------------------------ reading
def curve(report: dict, name: str) -> dict[tuple, list[dict]]:
    """{(x, method): runs} of one curve."""
    runs: dict[tuple, list[dict]] = {}
    for point in report["points"]:
        if point["curve"] == name:
            runs.setdefault((point["x"], point["method"]), []).append(point)
    return runs


def value(runs: dict, x, method: str, key: str) -> float | None:
    return bench.median(runs.get((x, method), []), key)


def xs_of(runs: dict) -> list:
    return list(dict.fromkeys(x for x, _ in runs))


def fitted(runs: dict, method: str, key: str, x_of=lambda x: x) -> tuple[list[float], list[float]]:
    pairs = [(x_of(x), value(runs, x, method, key)) for x in xs_of(runs)]
    pairs = [(x, y) for x, y in pairs if y]
    return [x for x, _ in pairs], [y for _, y in pairs]


def rate(number: float | None) -> str:
    return "-" if number is None else f"{number:,.0f}" if number >= 100 else f"{number:.1f}"


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header),
            *("| " + " | ".join(row) + " |" for row in rows)]


def count(parameters: float) -> str:
    if parameters >= 1e9:
        return f"{parameters / 1e9:.2f} B"
    return f"{parameters / 1e6:,.0f} M" if parameters >= 1e6 else f"{parameters:,.0f}"


def gib(size: float) -> str:
    return f"{size / 2**30:.1f}"


# ------------------------------------------------------------------------------------------------ sections
def header(report: dict) -> list[str]:
    machine = report["machine"]
    runs = report.get("repeats", 1)
    threads = machine["threads"]
    cores = machine["cores_allowed"]
    return [(f"Measured {report['date']} on {machine['cpu']}, {threads} thread{'s' * (threads > 1)} "
             f"({cores} core{'s' * (cores > 1)} allowed), torch {machine['torch']}, transformers "
             f"{machine['transformers']}, peft {machine['peft']}: {runs} run{'s' * (runs > 1)} a point, "
             f"each a fresh process, {report['wall_seconds'] / 60:.0f} min in all, with "
             f"`{report['command']}`. Speeds are tokens per second of each process's CPU time (one "
             "thread: its compute time), since another job shared the core for part of the run; wall-clock "
             "speeds are in the JSON too."), ""]


def length_section(report: dict) -> list[str]:
    runs = curve(report, "length")
    if not runs:
        return []
    settings = report["settings"]
    methods = [m for m in LENGTH_LABELS if any(method == m for _, method in runs)]
    lines = [f"### Sequence length ({settings['length_shape']} shape, LoRA r 8 on q,v)", "",
             (f"Documents of U[L/4, L] random tokens, loss on the second half of each, about "
              f"{settings['length_tokens']} non-padding tokens a step (at least one row of L tokens, or one "
              "document). Non-padding tokens per second of CPU time (below):"), ""]
    rows = []
    for x in xs_of(runs):
        ratio = bench.ratio(value(runs, x, "ours-packed", SPEED),
                            value(runs, x, "trainer", SPEED))
        rows.append([str(x), rate(value(runs, x, "ours-packed", "tokens_per_step")),
                     *(rate(value(runs, x, m, SPEED)) for m in methods), ratio])
    lines += table(["L", "tokens a step (packed)", *(LENGTH_LABELS[m] for m in methods),
                    "ours packed / Trainer"], rows)
    lines += ["", "Peak RSS (MB):", ""]
    rows = [[str(x), *(bench.cell(value(runs, x, m, "peak_rss_mb")) for m in methods),
             bench.ratio(value(runs, x, "ours-packed", "peak_rss_mb"),
                         value(runs, x, "trainer", "peak_rss_mb"))]
            for x in xs_of(runs)]
    lines += table(["L", *(LENGTH_LABELS[m] for m in methods), "ours packed / Trainer"], rows)
    lines += ["", ("Growth, fitted over the measured L: time per token ~ L^s, so a sequence of L tokens "
                   "costs L^(1+s); and time per token = a + b L, the weights' work (a, linear in L) and "
                   "attention's (b L, quadratic), equal at L = a/b:"), ""]
    for method in methods:
        xs, speeds = fitted(runs, method, SPEED)
        if len(xs) < 2:
            continue
        per_token = [1 / speed for speed in speeds]
        exponent = 1 + loglog_slope(xs, per_token)
        a, b = line(xs, per_token)
        share = f", attention's share of the time at L = {xs[-1]}: {100 * b * xs[-1] / (a + b * xs[-1]):.0f}%"
        even = f"a/b = {a / b:,.0f}{share}" if b > 0 and a > 0 else "no attention term fitted"
        lines.append(f"- {LENGTH_LABELS[method]}: L^{exponent:.2f}, {growth(exponent)}; {even}.")
    lines += ["", (f"Where 24 GiB runs out, by extrapolation (a least-squares quadratic in L of the peak RSS "
                   f"over L = {xs_of(runs)[0]}-{xs_of(runs)[-1]}, beyond which it was not measured):"), ""]
    for method in methods:
        xs, peaks = fitted(runs, method, "peak_rss_mb")
        if len(xs) < 2:
            continue
        limit = reach(quadratic(xs, peaks), BUDGET / 2**20)
        where = (f"about L = {limit:,.0f}" if limit else "not within the fitted curve's reach")
        lines.append(f"- {LENGTH_LABELS[method]}: {where} (extrapolated).")
    return [*lines, "", "![tokens/s and peak RSS against sequence length](scaling/length.png)", ""]


def size_section(report: dict) -> list[str]:
    runs = curve(report, "size")
    estimated = curve(report, "estimate")
    if not runs and not estimated:
        return []
    settings = report["settings"]
    lines = [(f"### Model size (L {settings['size_length']}, about {settings['size_tokens']} tokens a step, "
              "LoRA r 8 on q,v)"), ""]
    if runs:
        rows = []
        for x in xs_of(runs):
            speeds = [value(runs, x, m, SPEED) for m in SIZE_LABELS]
            peaks = [value(runs, x, m, "peak_rss_mb") for m in SIZE_LABELS]
            rows.append([x, count(value(runs, x, "ours-packed", "parameters")), *map(rate, speeds),
                         bench.ratio(*speeds), *map(bench.cell, peaks), bench.ratio(*peaks)])
        lines += table(["shape", "parameters", "ours packed tok/s", "Trainer + PEFT tok/s", "ratio",
                        "ours peak RSS MB", "Trainer peak RSS MB", "RSS ratio"], rows)
        lines += [""]
        for method, label in SIZE_LABELS.items():
            def parameters(x, method: str = method) -> float:
                return value(runs, x, method, "parameters")

            xs, speeds = fitted(runs, method, SPEED, parameters)
            xs_rss, peaks = fitted(runs, method, "peak_rss_mb", parameters)
            if len(xs) < 2:
                continue
            slope = loglog_slope(xs, [1 / s for s in speeds])
            limit = reach(line(xs_rss, peaks), BUDGET / 2**20)
            where = f"about {limit / 1e9:.1f} B parameters" if limit else "not within the fitted line's reach"
            lines.append(f"- {label}: time per token ~ parameters^{slope:.2f} ({growth(slope)} in the "
                         f"parameter count); peak RSS, a least-squares line in parameters, reaches 24 GiB at "
                         f"{where} (extrapolated).")
        lines += ["", "![tokens/s and peak RSS against model size](scaling/size.png)", ""]
    if estimated:
        lines += estimate_lines(report, estimated)
    return lines


def estimate_lines(report: dict, estimated: dict) -> list[str]:
    settings = report["settings"]
    shapes = xs_of(estimated)
    rows = [[x, count(value(estimated, x, "full", "parameters")),
             *(gib(value(estimated, x, m, "total_bytes")) for m in METHOD_LABELS)] for x in shapes]
    lines = [(f"`tuneforge inspect`'s memory estimate (estimated, not measured; GiB, packed rows of "
              f"{settings['size_length']}, about {settings['size_tokens']} tokens a micro-batch, fp32, "
              "AdamW; it includes the estimating process's own resident memory):"), ""]
    lines += table(["shape", "parameters", *METHOD_LABELS.values()], rows)
    lines.append("")
    for method, label in METHOD_LABELS.items():
        over = [x for x in shapes if value(estimated, x, method, "total_bytes") > BUDGET]
        if not over:
            lines.append(f"- {label}: estimated within 24 GiB at every shape up to {shapes[-1]}.")
            continue
        before = shapes[shapes.index(over[0]) - 1] if shapes.index(over[0]) else None
        fits = (f" ({before}: {gib(value(estimated, before, method, 'total_bytes'))} GiB)" if before else "")
        lines.append(f"- {label}: estimated over 24 GiB from the {over[0]} shape on "
                     f"({gib(value(estimated, over[0], method, 'total_bytes'))} GiB){fits}.")
    return [*lines, ""]


LORA_LABELS = {"ours-qv": "ours, q,v", "peft-qv": "PEFT, q,v", "ours-all": "ours, all-linear",
               "peft-all": "PEFT, all-linear"}


def lora_runs(report: dict) -> dict[tuple, list[dict]]:
    """{(rank, "SIDE-TARGETS"): runs} of the LoRA curve."""
    runs: dict[tuple, list[dict]] = {}
    for point in report["points"]:
        if point["curve"] == "lora":
            runs.setdefault((point["rank"], f"{point['side']}-{point['targets']}"), []).append(point)
    return runs


def lora_section(report: dict) -> list[str]:
    runs = lora_runs(report)
    if not runs:
        return []
    settings = report["settings"]
    lines = [(f"### LoRA rank and targets ({settings['lora_shape']} shape, uniform batches of "
              f"{settings['lora_rows']} x {settings['lora_length']} tokens, every token labelled; PEFT in a "
              "plain PyTorch loop)"), ""]
    rows = []
    for targets, label in (("qv", "q,v"), ("all", "all-linear")):
        for rank in xs_of(runs):
            if (rank, f"ours-{targets}") not in runs:
                continue
            speeds = [value(runs, rank, f"{side}-{targets}", SPEED) for side in ("ours", "peft")]
            peaks = [value(runs, rank, f"{side}-{targets}", "peak_rss_mb") for side in ("ours", "peft")]
            rows.append([str(rank), label, *map(rate, speeds), bench.ratio(*speeds), *map(bench.cell, peaks),
                         bench.cell(value(runs, rank, f"ours-{targets}", "trainable"))])
    lines += table(["rank", "targets", "ours tok/s", "PEFT tok/s", "ratio", "ours peak RSS MB",
                    "PEFT peak RSS MB", "trainable"], rows)
    lines.append("")
    for method, label in LORA_LABELS.items():
        ranks, speeds = fitted(runs, method, SPEED)
        if len(ranks) < 2:
            continue
        slope = loglog_slope(ranks, [1 / speed for speed in speeds])
        lines.append(f"- {label}: time per token ~ rank^{slope:.2f}; rank {ranks[-1]} takes "
                     f"{speeds[0] / speeds[-1]:.2f}x the time of rank {ranks[0]}.")
    return [*lines, "", "![tokens/s and peak RSS against LoRA rank](scaling/lora.png)", ""]


def methods_section(report: dict) -> list[str]:
    runs = curve(report, "methods")
    if not runs:
        return []
    estimated = curve(report, "estimate")
    settings = report["settings"]
    lines = [(f"### Full fine-tuning, LoRA and QLoRA (ours, packed rows of {settings['size_length']}, about "
              f"{settings['size_tokens']} tokens a step, each model loaded from a saved folder)"), ""]
    rows = []
    for x in xs_of(runs):
        for method, label in METHOD_LABELS.items():
            estimate = value(estimated, x, method, "total_bytes")
            rows.append([x, label, rate(value(runs, x, method, SPEED)),
                         bench.cell(value(runs, x, method, "peak_rss_mb")),
                         bench.cell(estimate / 2**20) if estimate else "-",
                         bench.cell(value(runs, x, method, "trainable"))])
    lines += table(["shape", "method", "tok/s", "peak RSS MB", "estimated MB (inspect)", "trainable"], rows)
    lines.append("")
    for x in xs_of(runs):
        full, qlora, lora = (value(runs, x, m, "peak_rss_mb") for m in ("full", "qlora", "lora"))
        speeds = [value(runs, x, m, SPEED) for m in ("full", "lora", "qlora")]
        lines.append(f"- {x}: peak RSS QLoRA / LoRA {bench.ratio(qlora, lora)}, LoRA / full "
                     f"{bench.ratio(lora, full)}; tok/s LoRA / full {bench.ratio(speeds[1], speeds[0])}, "
                     f"QLoRA / LoRA {bench.ratio(speeds[2], speeds[1])}.")
    return [*lines, "", "![tokens/s and peak RSS: full, LoRA, QLoRA](scaling/methods.png)", ""]


def render(report: dict) -> str:
    """The block of docs/scaling.md between the `scaling.json` markers."""
    lines = header(report)
    for section in (length_section, size_section, lora_section, methods_section):
        lines += section(report)
    return "\n".join(lines).strip("\n")


def attention_section(report: dict) -> str:
    """docs/scaling.md's `document-attention` block: packed rows attended per document
    (tuneforge.document_attention) against the block-diagonal mask, with Trainer + PEFT padded beside."""
    runs = curve(report, "length")
    lines = header(report)
    lines += [("Ours packed, attention per document (`tuneforge.document_attention`, what `tuneforge train` "
               "now uses for rows of 1024 tokens and more) and with the block-diagonal mask (what it used "
               "before), on the same documents as the length curve; Trainer + PEFT padded beside. "
               "Non-padding tokens per second of CPU time, and peak RSS:"), ""]
    rows = []
    for x in xs_of(runs):
        # per document: what `tuneforge train` uses, or forced below its threshold where that was measured
        per_document = "ours-packed-documents" if (x, "ours-packed-documents") in runs else "ours-packed"
        sides = (per_document, "ours-packed-mask", "trainer")
        documents, mask, trainer = (value(runs, x, m, SPEED) for m in sides)
        memory = [value(runs, x, m, "peak_rss_mb") for m in sides]
        used = {run.get("attention") for run in runs.get((x, per_document), [])}
        rows.append([str(x), "/".join(sorted(a for a in used if a)) or "-", rate(documents), rate(mask),
                     bench.ratio(documents, mask), rate(trainer), bench.ratio(documents, trainer),
                     *(bench.cell(m) for m in memory), bench.ratio(memory[0], memory[2])])
    lines += table(["L", "attention used", "per document", "mask", "per document / mask", "Trainer + PEFT",
                    "per document / Trainer", "peak RSS MB: per document", "mask", "Trainer",
                    "RSS per document / Trainer"], rows)
    return "\n".join(lines).strip("\n")


# ------------------------------------------------------------------------------------------------ plots
def write_plots(report: dict, folder: Path) -> list[Path]:
    """One PNG a measured curve (tokens/s and peak RSS side by side), from the report alone."""
    from tuneforge.plotting import LINESTYLES, MARKERS, colour, pyplot, save

    plt = pyplot()
    folder.mkdir(parents=True, exist_ok=True)
    written = []

    def lines_figure(name: str, runs: dict, labels: dict, x_of, xlabel: str, logx: bool) -> None:
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        for index, (method, label) in enumerate(labels.items()):
            for axis, key in zip(axes, (SPEED, "peak_rss_mb"), strict=True):
                xs, ys = fitted(runs, method, key, x_of)
                if xs:
                    axis.plot(xs, ys, label=label, color=colour(index), marker=MARKERS[index % len(MARKERS)],
                              linestyle=LINESTYLES[index % len(LINESTYLES)])
        for axis, ylabel in zip(axes, ("non-padding tokens/s", "peak RSS (MB)"), strict=True):
            axis.set_xlabel(xlabel)
            axis.set_ylabel(ylabel)
            if logx:  # ticks at the measured x values, written out
                axis.set_xscale("log")
                axis.minorticks_off()
                ticks = [x_of(x) for x in xs_of(runs)]
                axis.set_xticks(ticks, [f"{t:,.0f}" for t in ticks])
        axes[0].legend(fontsize=8)
        written.append(save(figure, folder / f"{name}.png"))

    if runs := curve(report, "length"):
        lines_figure("length", runs, LENGTH_LABELS, lambda x: x, "sequence length L", True)
    if runs := curve(report, "size"):
        lines_figure("size", runs, SIZE_LABELS, lambda x: value(runs, x, "ours-packed", "parameters") / 1e6,
                     "parameters (M)", True)
    if runs := lora_runs(report):
        lines_figure("lora", runs, LORA_LABELS, lambda x: x, "LoRA rank", True)
    if runs := curve(report, "methods"):
        figure, axes = plt.subplots(1, 2, figsize=(10, 3.6))
        shapes = xs_of(runs)
        width = 0.8 / len(METHOD_LABELS)
        for index, (method, label) in enumerate(METHOD_LABELS.items()):
            for axis, key in zip(axes, (SPEED, "peak_rss_mb"), strict=True):
                axis.bar([s + index * width for s in range(len(shapes))],
                         [value(runs, x, method, key) or 0 for x in shapes], width, label=label,
                         color=colour(index))
        for axis, ylabel in zip(axes, ("non-padding tokens/s", "peak RSS (MB)"), strict=True):
            axis.set_xticks([s + width for s in range(len(shapes))], shapes)
            axis.set_ylabel(ylabel)
        axes[0].legend(fontsize=8)
        written.append(save(figure, folder / "methods.png"))
    return written
