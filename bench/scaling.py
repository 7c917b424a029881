"""Cost as the work grows: tokens/s and peak RSS against sequence length, model size, LoRA rank and targets,
and full fine-tuning vs LoRA vs QLoRA; tuneforge side by side with Hugging Face Trainer + PEFT.

    taskset -c 0 python bench/scaling.py --json bench/results/DATE-scaling.json   # every curve, 1 thread
    python bench/scaling.py --curves length size --json ...          # some curves
    python bench/scaling.py --dry-run                                # the points, and a time guess
    python bench/scaling.py --smoke --json /tmp/scaling-smoke.json   # tiny models: checks the code
    python bench/scaling.py --render bench/results/DATE-scaling.json # plots and docs/scaling.md again

Curves (Llama shapes with random weights, sdpa attention, fp32; the defaults, which `--set` changes):
- length: SmolLM2-135M's shape, LoRA r 8 on q,v, L = 256 ... 4096. Documents of U[L/4, L] random tokens
  (fixed seed), the loss on the second half of each (an answer after its prompt), about 1024 non-padding
  tokens a step (at least one row or document). Ours packed (first-fit rows of L,
  `tuneforge.packing.packing_plan`) and padded (batches padded to their longest), Trainer + PEFT padded
  (DataCollatorForSeq2Seq); gradient checkpointing on too, at L 256, 1024 and 4096, for ours packed and
  for the Trainer.
- size: the shapes of SmolLM2-135M, SmolLM2-360M and TinyLlama-1.1B, the length curve's documents at L 512,
  about 512 tokens a step, LoRA q,v: ours packed vs Trainer + PEFT padded; plus `tuneforge inspect`'s memory
  estimate (`tuneforge.memory.estimate_memory`) of full, LoRA and QLoRA at those shapes and at Llama 3B
  and 7B shapes (estimates, not measurements).
- lora: rank 8, 64, 256 x targets q,v / all-linear on the 135M shape, uniform batches of 1 x 512 tokens
  (every token labelled): ours vs PEFT in the plain PyTorch loop (`bench.run_plain`).
- methods: full vs LoRA (r 8, all-linear) vs QLoRA (`quantize: nf4` + the same LoRA) at the 135M and 360M
  shapes, ours only, the size curve's documents and batches.
Each shape's random weights are saved once (a safetensors folder with SmolLM2's tokenizer), and every point
loads them with `tuneforge.models.load_model`, as `tuneforge train` does (QLoRA: its streaming quantized
load), so peak RSS includes loading as in a run and no point spends its time on random initialisation.

Method: as bench/bench.py (whose workers this reuses): each point is a fresh process with `--threads`
threads; one warm-up step, then 2 timed steps (1 where a step holds 2x the nominal tokens or more: the long
rows); tokens/s counts non-padding tokens; peak RSS is the process's high-water mark at its last step. The
sides of one x value run back to back, in reverse order on every other x value (and repeat), so a busy
phase of a shared machine hits each side. Our loop's final checkpoint is skipped (it comes after the last
timed step). The tables, fits and plots: bench/scaling_report.py.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:  # bench.py, the sibling whose workers these points reuse
    sys.path.insert(0, str(HERE))
import bench

REPO = HERE.parent

# Llama shapes (transformers.LlamaConfig keys). Measured: 135M, 360M, 1B; estimated only: 3B, 7B.
SHAPE_KEYS = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "num_key_value_heads", "vocab_size", "tie_word_embeddings")
SHAPES = {name: dict(zip(SHAPE_KEYS, values, strict=True)) for name, values in {
    "135M": (576, 1536, 30, 9, 3, 49152, True),  # SmolLM2-135M
    "360M": (960, 2560, 32, 15, 5, 49152, True),  # SmolLM2-360M
    "1B": (2048, 5632, 22, 32, 4, 32000, False),  # TinyLlama-1.1B
    "3B": (3072, 8192, 28, 24, 8, 128256, True),  # Llama-3.2-3B
    "7B": (4096, 11008, 32, 32, 32, 32000, False),  # Llama-2-7B
    "tiny": (64, 128, 2, 4, 2, 512, True),  # --smoke: seconds a point
    "tiny2": (128, 256, 2, 4, 2, 512, True),
}.items()}
LORA_TARGETS = {"qv": ["q_proj", "v_proj"], "all": "all-linear"}
# length-curve sides: name -> (side, gradient checkpointing)
LENGTH_SIDES = {"ours-packed": ("ours-packed", False), "ours-packed-ckpt": ("ours-packed", True),
                "ours-padded": ("ours-padded", False), "trainer": ("trainer", False),
                "trainer-ckpt": ("trainer", True),
                "ours-packed-mask": ("ours-packed", False),  # the block-diagonal mask, not per document
                # per document also below tuneforge's MIN_ROW_LENGTH: the trial that threshold rests on
                "ours-packed-documents": ("ours-packed", False)}
MASKED = {"ours-packed-mask"}
FORCED = {"ours-packed-documents"}
LORA_ALL = {"lora": {"rank": 8, "alpha": 16, "targets": "all-linear"}}
METHODS = {"full": ([], "none"), "lora": ([LORA_ALL], "none"), "qlora": ([LORA_ALL], "nf4")}
CURVES = ("length", "size", "lora", "methods")
# The default plan: about 50 min at 1 thread by `--dry-run`'s guess (calibrated on this machine). The 4096
# row dominates (a packed row of 4096 runs the whole 4096 x 4096 masked attention). `--set` restores more,
# e.g. length_tokens=2048 checkpointing_lengths=[256,512,1024,2048,4096] size_tokens=1024 lora_rows=2
# (about 90 min).
FULL = {"lengths": [256, 512, 1024, 2048, 4096], "length_tokens": 1024, "length_shape": "135M",
        "checkpointing_lengths": [256, 1024, 4096],
        "sizes": ["135M", "360M", "1B"], "size_length": 512, "size_tokens": 512,
        "estimate_sizes": ["135M", "360M", "1B", "3B", "7B"],
        "ranks": [8, 64, 256], "lora_shape": "135M", "lora_length": 512, "lora_rows": 1,
        "method_sizes": ["135M", "360M"], "timed_steps": 2,
        "length_sides": ["ours-packed", "ours-packed-ckpt", "ours-padded", "trainer", "trainer-ckpt"]}
SMOKE = {"lengths": [32, 64], "length_tokens": 64, "length_shape": "tiny", "checkpointing_lengths": [32, 64],
         "sizes": ["tiny", "tiny2"], "size_length": 32, "size_tokens": 64,
         "estimate_sizes": ["tiny", "tiny2"],
         "ranks": [4, 8], "lora_shape": "tiny", "lora_length": 32, "lora_rows": 2,
         "method_sizes": ["tiny", "tiny2"], "timed_steps": 2, "length_sides": FULL["length_sides"]}


# ----------------------------------------------------------------------------------------------- workers
def llama_config(shape: str):
    from transformers import LlamaConfig

    return LlamaConfig(**SHAPES[shape], max_position_embeddings=8192, attn_implementation="sdpa",
                       bos_token_id=1, eos_token_id=2, pad_token_id=2)


def random_model(shape: str):
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(llama_config(shape))


def pad_tokenizer():
    """The tokenizer the Trainer pads with (SmolLM2's: pad id 2, below every shape's vocabulary)."""
    from tuneforge.models import load_tokenizer, resolve_model_path

    return load_tokenizer(resolve_model_path("smollm2-135m"))


def documents(count: int, length: int, vocab: int, seed: int = 0) -> list[dict]:
    """`count` documents of U[length/4, length] random tokens (ids from 3: no special token), labelled on
    their second half."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    sizes = torch.randint(length // 4, length + 1, (count,), generator=generator).tolist()
    items = []
    for size in sizes:
        ids = torch.randint(3, vocab, (size,), generator=generator).tolist()
        items.append({"input_ids": ids, "labels": [-100] * (size // 2) + ids[size // 2:]})
    return items


def per_step(length: int, tokens: int, side: str) -> int:
    """Rows of `length` a packed step fills, or documents a padded batch holds (mean length 5/8 L), for
    about `tokens` tokens a step: at least one."""
    if side == "ours-packed":
        return max(1, tokens // length)
    return max(1, round(tokens / (5 * length / 8)))


def saved_model(spec: dict, quantize: str = "none"):
    """The shape's saved random model, loaded as `tuneforge train` loads a model."""
    from tuneforge.models import load_model

    return load_model(spec["folder"], quantize=quantize)[0]


def expected_tokens(length: int, tokens: int, side: str) -> float:
    """Non-padding tokens a step holds on average: full rows, or documents of 5/8 L on average."""
    size = per_step(length, tokens, side)
    return size * length if side == "ours-packed" else size * 5 * length / 8


def documents_point(spec: dict, quantize: str = "none") -> dict:
    """One side on documents of up to L tokens: ours packed or padded (`bench.run_ours`), or Trainer + PEFT
    padded (`bench.run_trainer`); LoRA as `spec["strategies"]`, our side only."""
    length, side, steps = spec["length"], spec["side"], spec["steps"]
    vocab = SHAPES[spec["shape"]]["vocab_size"]
    size = per_step(length, spec["tokens"], side)
    items = documents(math.ceil(steps * size * (2 if side == "ours-packed" else 1)) + 8, length, vocab)
    model = saved_model(spec, quantize)
    if spec.get("attention") == "documents":  # per document whatever the row length (this process only)
        import tuneforge.document_attention

        tuneforge.document_attention.MIN_ROW_LENGTH = 0
    options = {"lr": 1e-4, "checkpointing": spec.get("checkpointing", False), "max_seq_len": length,
               "packing": side == "ours-packed", "attention": spec.get("attention", "auto")}
    if side == "trainer":
        train = items[:steps * size]
        marks, model, step_batches = bench.run_trainer(model, pad_tokenizer(), train,
                                                       {**options, "batch_size": size})
    else:
        if side == "ours-packed":
            from tuneforge.packing import packing_plan

            plan = packing_plan([len(i["input_ids"]) for i in items], [len(items)], size, length, seed=0)
        else:
            fixed = [[list(range(s * size, (s + 1) * size))] for s in range(steps)]
            plan = lambda epoch, rank, world: fixed  # the same batches every epoch
        step_batches = [[items[i] for i in batch] for step in plan(0, 0, 1)[:steps] for batch in step]
        marks, model = bench.run_ours(model, spec["strategies"], items, plan, steps, options, pad=2)
    return finish(spec, marks, model, step_batches, size)


def finish(spec: dict, marks: list, model, step_batches: list[list[dict]], size: int) -> dict:
    """bench.summarise's numbers, with the tokens each timed step held and the batch shape."""
    tokens = [sum(len(i["input_ids"]) for i in batch) for batch in step_batches]
    labelled = [sum(bench.labelled_count(i) for i in batch) for batch in step_batches]
    result = bench.summarise(marks, tokens, labelled, 1, 0.0)
    result.pop("gemm_gflops_per_step")
    result["tokens_per_step"] = sum(tokens[1:len(marks)]) / max(1, len(marks) - 1)
    result["batch"] = size
    result["steps"] = len(marks)
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["parameters"] = sum(p.numel() for p in model.parameters())
    if spec.get("side") == "ours-packed":
        from tuneforge.document_attention import uses_document_attention

        result["attention"] = "documents" if uses_document_attention(model) else "mask"
    return result


def lora_point(spec: dict) -> dict:
    """LoRA of `rank` on `targets`, uniform batches, every token labelled: ours (`bench.run_ours`) or PEFT in
    the plain loop (`bench.run_plain`)."""
    import torch

    rows, length, steps = spec["rows"], spec["length"], spec["steps"]
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(3, SHAPES[spec["shape"]]["vocab_size"], (steps * rows, length), generator=generator)
    items = [{"input_ids": row, "labels": list(row)} for row in ids.tolist()]
    targets, rank = LORA_TARGETS[spec["targets"]], spec["rank"]
    fixed = [[list(range(s * rows, (s + 1) * rows))] for s in range(steps)]
    model = saved_model(spec)
    if spec["side"] == "ours":
        lora = {"lora": {"rank": rank, "alpha": 2 * rank, "targets": targets}}
        marks, model = bench.run_ours(model, [lora], items, lambda epoch, rank, world: fixed, steps,
                                      {"max_seq_len": length}, pad=2)
    else:
        batches = [{"input_ids": ids[s * rows:(s + 1) * rows], "labels": ids[s * rows:(s + 1) * rows],
                    "attention_mask": torch.ones(rows, length, dtype=torch.long)} for s in range(steps)]
        lora = {"r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0, "target_modules": targets}
        marks, model = bench.run_plain(model, ("lora", lora), batches, {})
    return finish(spec, marks, model, [[items[i] for i in step[0]] for step in fixed], rows)


def method_point(spec: dict) -> dict:
    """Full, LoRA or QLoRA (ours) on packed documents."""
    strategies, quantize = METHODS[spec["method"]]
    return documents_point({**spec, "side": "ours-packed", "strategies": strategies}, quantize)


def save_shape(spec: dict) -> dict:
    """A model folder of `shape` with random weights and the SmolLM2 tokenizer."""
    folder = Path(spec["folder"])
    random_model(spec["shape"]).save_pretrained(folder, safe_serialization=True)
    pad_tokenizer().save_pretrained(folder)
    return {"folder": str(folder)}


def estimates(spec: dict) -> dict:
    """`tuneforge inspect`'s memory estimate (no weights built) for full, LoRA and QLoRA at each shape."""
    import torch

    from tuneforge.config import validate_config
    from tuneforge.memory import estimate_memory

    rows = []
    with tempfile.TemporaryDirectory() as work:
        for shape in spec["shapes"]:
            folder = Path(work) / shape
            llama_config(shape).save_pretrained(folder)  # config.json only: the estimate reads no weights
            pad_tokenizer().save_pretrained(folder)
            with torch.device("meta"):
                from transformers import LlamaForCausalLM

                parameters = sum(p.numel() for p in LlamaForCausalLM(llama_config(shape)).parameters())
            for method, (strategies, quantize) in METHODS.items():
                config = validate_config({
                    "model": str(folder), "data": {"train": "builtin:chatterbot"}, "retain": None,
                    "strategies": strategies, "quantize": quantize,
                    "train": {"batch_size": spec["rows"], "max_seq_len": spec["length"], "packing": True}})
                estimate = estimate_memory(config, device=torch.device("cpu"))
                rows.append({"shape": shape, "method": method, "parameters": parameters,
                             "total_bytes": estimate.total, "parts": estimate.parts, "notes": estimate.notes})
    return {"estimates": rows}


def worker(spec: dict) -> dict:
    import torch

    import tuneforge.train as loop

    torch.set_num_threads(spec["threads"])
    loop.save_state = lambda *args, **kwargs: None  # the final checkpoint: after the last timed step
    point = {"length": documents_point, "size": documents_point, "lora": lora_point, "methods": method_point,
             "save": save_shape, "estimate": estimates}[spec["curve"]]
    return point(spec)


# ------------------------------------------------------------------------------------------ orchestrator
def steps(settings: dict, tokens: int | None = None, nominal: int | None = None) -> int:
    """1 warm-up step, then `timed_steps`; fewer (at least 1) when a step holds more than the `nominal`
    tokens (the length curve's rows longer than its tokens a step), so each point times about as many."""
    timed = settings["timed_steps"]
    return 1 + (max(1, round(timed * nominal / tokens)) if tokens and nominal else timed)


def plan_points(curves: list[str], settings: dict, folders: Path) -> list[list[dict]]:
    """Groups of specs: first the saved models, then the sides of one x value each, to run back to back."""
    groups: list[list[dict]] = []
    qv = [{"lora": {"rank": 8, "alpha": 16, "targets": LORA_TARGETS["qv"]}}]

    def at(shape: str) -> dict:
        return {"shape": shape, "folder": str(folders / shape)}

    if "length" in curves:
        tokens = settings["length_tokens"]
        for length in settings["lengths"]:
            sides = {name: LENGTH_SIDES[name] for name in settings["length_sides"]
                     if not LENGTH_SIDES[name][1] or length in settings["checkpointing_lengths"]}
            groups.append([{"curve": "length", "method": name, "side": side, "checkpointing": ckpt,
                            "attention": ("mask" if name in MASKED else "documents" if name in FORCED
                                          else "auto"),
                            "x": length, "length": length, "tokens": tokens, **at(settings["length_shape"]),
                            "steps": steps(settings, expected_tokens(length, tokens, side), tokens),
                            "strategies": qv} for name, (side, ckpt) in sides.items()])
    if "size" in curves:
        length, tokens = settings["size_length"], settings["size_tokens"]
        for shape in settings["sizes"]:
            groups.append([{"curve": "size", "method": side, "side": side, "x": shape, **at(shape),
                            "length": length, "tokens": tokens, "steps": steps(settings), "strategies": qv}
                           for side in ("ours-packed", "trainer")])
        groups.append([{"curve": "estimate", "method": "estimate", "side": "tuneforge.memory", "x": "all",
                        "shapes": settings["estimate_sizes"], "length": length,
                        "rows": per_step(length, tokens, "ours-packed")}])
    if "lora" in curves:
        rows, length = settings["lora_rows"], settings["lora_length"]
        for targets in LORA_TARGETS:
            for rank in settings["ranks"]:
                groups.append([{"curve": "lora", "method": f"r{rank}-{targets}", "side": side,
                                "x": rank, "rank": rank, "targets": targets, **at(settings["lora_shape"]),
                                "rows": rows, "length": length,
                                "steps": steps(settings)} for side in ("ours", "peft")])
    if "methods" in curves:
        length, tokens = settings["size_length"], settings["size_tokens"]
        for shape in settings["method_sizes"]:
            groups.append([{"curve": "methods", "method": method, "side": "ours", "x": shape, **at(shape),
                            "length": length, "tokens": tokens, "steps": steps(settings)}
                           for method in METHODS])
    shapes = dict.fromkeys(spec["shape"] for group in groups for spec in group if "folder" in spec)
    return [[{"curve": "save", "method": "save", "side": "folder", "x": shape, **at(shape)}]
            for shape in shapes] + groups


def shape_parameters(shape: str) -> tuple[int, int, int]:
    """(block linear weights, output head weights, all weights) of a Llama shape."""
    config = SHAPES[shape]
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
    linear = layers * (2 * hidden * hidden + 2 * hidden * kv + 3 * hidden * config["intermediate_size"])
    head = hidden * config["vocab_size"]
    return linear, head, linear + head * (1 if config["tie_word_embeddings"] else 2)


def guess_seconds(spec: dict, gflops: float, overhead: float = 12.0) -> float:
    """A rough time for one point: its steps' FLOPs at `gflops` (linear layers 2 FLOPs a weight a token
    forward, 2 backward, 2 more when trained; attention 4 x context x hidden forward and 10 backward a layer;
    checkpointing repeats the forward), plus `overhead` seconds to start a process and load the model."""
    if spec["curve"] == "estimate":
        return 60.0
    linear, head, total = shape_parameters(spec["shape"])
    if spec["curve"] == "save":  # random initialisation (~30 M weights/s) and writing
        return overhead + total / 30e6
    hidden, layers = SHAPES[spec["shape"]]["hidden_size"], SHAPES[spec["shape"]]["num_hidden_layers"]
    full, side = spec["curve"] == "methods" and spec["method"] == "full", spec["side"]
    if spec["curve"] == "lora":
        tokens, context, labelled = spec["rows"] * spec["length"], spec["length"], 1.0
    else:
        length, size = spec["length"], per_step(spec["length"], spec["tokens"], side)
        longest = length / 4 + 3 / 4 * length * size / (size + 1)  # expected longest of `size` documents
        tokens, context = (size * length, length) if side == "ours-packed" else (size * longest, longest)
        context /= 2 if size == 1 and side != "ours-packed" else 1  # no padding: causal attention skips half
        labelled = 1.0 if side == "trainer" else 0.5  # our head runs on the labelled positions only
    forward = 2 * (linear + labelled * head) + 4 * context * hidden * layers
    backward = 2 * (linear + labelled * head) + 10 * context * hidden * layers + (2 * total if full else 0)
    per_token = forward + backward + (forward if spec.get("checkpointing") else 0)
    if spec["curve"] == "lora":  # the adapters' own products: 6 FLOPs a weight a token
        config = SHAPES[spec["shape"]]
        kv = hidden // config["num_attention_heads"] * config["num_key_value_heads"]
        inner = config["intermediate_size"]
        sides = [2 * hidden, hidden + kv] + ([hidden + kv, 2 * hidden, 3 * (hidden + inner)]
                                              if spec["targets"] == "all" else [])
        per_token += 6 * spec["rank"] * sum(sides) * layers
    slower = 1.3 if spec.get("method") == "qlora" else 1.0  # dequantizing the frozen weights: a guess
    return overhead + slower * spec["steps"] * tokens * per_token / (gflops * 1e9)


def dry_run(groups: list[list[dict]], gflops: float, repeats: int) -> str:
    """The points, and a guess of the time each curve takes."""
    lines, totals = [], {}
    for group in groups:
        for spec in group:
            once = spec["curve"] in ("save", "estimate")
            seconds = guess_seconds(spec, gflops) * (1 if once else repeats)
            totals[spec["curve"]] = totals.get(spec["curve"], 0.0) + seconds
            lines.append(f"{spec['curve']:>8} {spec['x']!s:>6} {spec['method']:<18} ~{seconds:5.0f} s")
    lines += [f"{curve}: ~{seconds / 60:.1f} min" for curve, seconds in totals.items()]
    lines.append(f"{len(lines) - len(totals)} processes, about {sum(totals.values()) / 60:.0f} min at "
                 f"{gflops:g} GFLOP/s and 12 s a process (a guess from FLOP counts)")
    return "\n".join(lines)


def machine(threads: int) -> dict:
    import peft
    import torch
    import transformers

    cpu = platform.processor()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {"cpu": cpu, "cores_allowed": len(os.sched_getaffinity(0)), "threads": threads,
            "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__,
            "python": platform.python_version()}


def write_json(path: Path, report: dict) -> None:
    from tuneforge.checkpoint import write_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(report, indent=1) + "\n")


def run_order(groups: list[list[dict]], repeats: int):
    """(repeat, spec) in the order they run: a group's sides back to back, reversed on every other group
    and repeat (A B C, C B A, ...); saving models and the estimates once."""
    for repeat in range(repeats):
        for index, group in enumerate(groups):
            if repeat and group[0]["curve"] in ("save", "estimate"):
                continue
            for spec in group if (index + repeat) % 2 == 0 else group[::-1]:
                yield repeat, spec


def measure(args, settings: dict) -> dict:
    cpus = sorted(os.sched_getaffinity(0))
    pinned = f"taskset -c {','.join(map(str, cpus))} " if len(cpus) < (os.cpu_count() or 0) else ""
    report = {"date": datetime.date.today().isoformat(),
              "command": f"{pinned}python bench/scaling.py " + shlex.join(sys.argv[1:]),
              "machine": machine(args.threads), "settings": settings, "repeats": args.repeats, "points": []}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="scaling-") as work:
        for repeat, spec in run_order(plan_points(args.curves, settings, Path(work)), args.repeats):
            load = bench.wait_for_quiet(args.max_load, args.patience)
            result = bench.run_process({**spec, "suite": "scaling", "threads": args.threads},
                                       script=__file__, threads=args.threads)
            label = "/".join(dict.fromkeys(str(spec[k]) for k in ("curve", "x", "method", "side")))
            shown = {k: v for k, v in (result or {}).items() if isinstance(v, int | float)}
            print(f"[{time.time() - started:6.0f}s load {load:4.1f}] {label}: "
                  + (json.dumps(shown) if result else "failed"), flush=True)
            if result is None or spec["curve"] == "save":
                continue
            kept = {k: v for k, v in spec.items() if k not in ("folder", "strategies")}
            if spec["curve"] == "estimate":
                report["points"] += [{"curve": "estimate", "x": row["shape"], **row}
                                     for row in result["estimates"]]
            else:
                report["points"].append({**kept, "repeat": repeat, "load_before": load, **result})
            if args.json:  # after every point: an interrupted run keeps what it measured
                write_json(args.json, {**report, "wall_seconds": time.time() - started})
    report["wall_seconds"] = time.time() - started
    return report


def render_outputs(path: Path, plots: Path | None) -> str:
    """The report's text; its plots written; docs/scaling.md rendered when `path` is the JSON it shows."""
    import render_docs
    import scaling_report

    report = json.loads(path.read_text())
    block = render_docs.BLOCKS.get(scaling_report.NAME)
    in_docs = block is not None and (REPO / block.source).resolve() == path.resolve()
    folder = plots or (scaling_report.PLOTS if in_docs else path.with_name(path.stem + "-plots"))
    scaling_report.write_plots(report, folder)
    if in_docs:
        scaling_report.install_doc()
        render_docs.render_all()
    return scaling_report.render(report)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--curves", nargs="+", choices=CURVES, default=list(CURVES))
    parser.add_argument("--threads", type=int, default=1, help="threads a point (default 1)")
    parser.add_argument("--repeats", type=int, default=1, help="runs a point, alternating the order")
    parser.add_argument("--smoke", action="store_true", help="tiny models, 2 points a curve: checks the code")
    parser.add_argument("--json", type=Path, help="write the results here (after every point)")
    parser.add_argument("--render", type=Path, help="only render a saved --json file (text, plots, docs)")
    parser.add_argument("--plots", type=Path, help="where the PNGs go (default docs/scaling for the JSON the "
                        "docs show, else next to the JSON)")
    parser.add_argument("--dry-run", action="store_true", help="list the points and a time guess, run none")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=JSON",
                        help="change a setting of the plan, e.g. length_tokens=2048 timed_steps=3")
    # the rate by CPU time of a 135M packed LoRA step at 1 thread on this machine (2026-11-29): 1,882 tokens
    # of ~0.54 GFLOP each in 17 s
    parser.add_argument("--gflops", type=float, default=60.0, help="the rate --dry-run guesses with")
    parser.add_argument("--max-load", type=float, help="wait (up to --patience s) for a lower load average")
    parser.add_argument("--patience", type=float, default=120.0)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(bench.RESULT + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.render:
        print(render_outputs(args.render, args.plots))
        return
    settings = dict(SMOKE if args.smoke else FULL)
    for assignment in args.set:
        key, _, text = assignment.partition("=")
        if key not in settings:
            parser.error(f"--set {assignment}: unknown setting {key!r} (one of: {', '.join(settings)})")
        settings[key] = json.loads(text)
    if args.dry_run:
        print(dry_run(plan_points(args.curves, settings, Path("<tmp>")), args.gflops, args.repeats))
        return
    report = measure(args, settings)
    if args.json:
        write_json(args.json, report)
        print(render_outputs(args.json, args.plots))


if __name__ == "__main__":
    main()
