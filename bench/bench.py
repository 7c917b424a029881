"""tuneforge vs Hugging Face PEFT on identical work; every configuration in its own process.

    python bench/bench.py                                   # all suites, 3 repeats (~1.5 h on 2 cores)
    python bench/bench.py --suite synthetic --repeats 5
    python bench/bench.py --suite smollm2 --methods lora-packed trainer-lora
    python bench/bench.py --json bench/results.json         # also keep the raw numbers
    python bench/bench.py --render bench/results.json       # the tables again, from saved numbers

Suites
- synthetic: a 39.7M-parameter Llama-shaped random model (hidden 512, 8 layers, 8 heads / 4 KV heads,
  SwiGLU 2048, tied 16k vocabulary), uniform batches of 4 x 256 random tokens, every token labelled.
  Ours: `tuneforge.prepare` + the real loop (`tuneforge.train.fit`). PEFT: `peft.get_peft_model` + a plain
  PyTorch loop (model(..., labels=...), backward, clip to 1.0, AdamW). Full fine-tuning (and layer-wise,
  which PEFT lacks) compare with that plain loop on the bare model; bottleneck adapters: ours alone.
- smollm2: the bundled SmolLM2-135M on builtin:chatterbot (its natural length spread, loss on the
  answers only), the same 512 examples once, LoRA r=8 on q,v. Reference: Hugging Face Trainer + PEFT
  LoRA with its default padding (DataCollatorForSeq2Seq: pad to the longest in each batch of 8). Ours:
  packing into rows of 256 tokens, 2 rows per step (about the same tokens per step), the same in bf16
  autocast, and the ablations padded (batch 8) with and without the label-only head. Equal work is checked
  by the loss per token: mean training loss, and the loss of the tuned models on 128 held-out examples.
- inference: base model vs LoRA (all-linear) merged vs unmerged, forward passes of 4 x 256 (one process,
  interleaved).
- matmul: torch.mm at each suite's GEMM shapes, forward and backward: the machine's measured rate.

Method: each (method, side) is a fresh process with 2 threads; the pairs run A B, then B A on the next
repeat, so a busy phase of a shared machine hits both sides; the table shows medians over repeats. Step
time is the median over the timed steps of a run (after warm-up); tokens/s counts non-padding tokens;
peak RSS is the process's high-water mark at the end of its last training step; GEMM % is the measured
FLOPs of a step's matrix products (linear layers and head; attention excluded) over step time, as a
share of the measured matmul rate.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

THREADS = 2  # default; `--threads` sets it for a run, and the JSON records it
RESULT = "BENCH_RESULT "

SYNTHETIC_MODEL = {"vocab_size": 16000, "hidden_size": 512, "intermediate_size": 2048, "num_hidden_layers": 8,
                       "num_attention_heads": 8, "num_key_value_heads": 4, "max_position_embeddings": 512,
                       "tie_word_embeddings": True}
LORA_QV = {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}
PEFT_LORA_QV = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}

# name: (our strategies or None, PEFT (kind, config) / "plain" for the bare model / None, options)
SYNTHETIC = {
    "full": ([], "plain", {}),
    "lora-qv": ([{"lora": LORA_QV}], ("lora", PEFT_LORA_QV), {}),
    "lora-all": ([{"lora": {**LORA_QV, "targets": "all-linear"}}],
                 ("lora", {**PEFT_LORA_QV, "target_modules": "all-linear"}), {}),
    "prefix": ([{"prefix": {"length": 20}}], ("prefix", {"num_virtual_tokens": 20}), {}),
    "prompt": ([{"prompt": {"length": 20, "init": "random"}}], ("prompt", {"num_virtual_tokens": 20}), {}),
    "ia3": ([{"ia3": {}}], ("ia3", {"target_modules": ["k_proj", "v_proj", "down_proj"],
                                    "feedforward_modules": ["down_proj"]}), {}),
    "adapter": ([{"adapter": {"placement": "pfeiffer", "reduction_factor": 16}}], None, {}),
    "layerwise-top-half": ([{"layerwise": {"train_layers": "top:4"}}], "plain-top-half", {}),
    "lora-qv-bf16": ([{"lora": LORA_QV}], ("lora", PEFT_LORA_QV), {"precision": "bf16"}),
    "full-bf16": ([], "plain", {"precision": "bf16"}),
    "lora-qv-checkpointing": ([{"lora": LORA_QV}], ("lora", PEFT_LORA_QV), {"checkpointing": True}),
}
SMOLLM2 = {  # name: (side, options)
    "lora-packed": ("ours", {"packing": True}),
    "lora-packed-bf16": ("ours", {"packing": True, "precision": "bf16"}),
    "lora-padded": ("ours", {"packing": False}),
    "lora-padded-full-logits": ("ours", {"packing": False, "full_logits": True}),
    "lora-packed-compile": ("ours", {"packing": True, "compile": True}),
    "lora-packed-bf16-compile": ("ours", {"packing": True, "precision": "bf16", "compile": True}),
    "trainer-lora": ("trainer", {}),
    "trainer-lora-bf16": ("trainer", {"precision": "bf16"}),
}
SMOLLM2_TRAIN, SMOLLM2_EVAL, SMOLLM2_LEN = 512, 128, 256


# ----------------------------------------------------------------------------------------------- workers
def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def synthetic_model():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**SYNTHETIC_MODEL, attn_implementation="sdpa"))


def synthetic_items(count: int, length: int = 256, seed: int = 0) -> list[dict]:
    import torch

    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SYNTHETIC_MODEL["vocab_size"], (count, length), generator=generator).tolist()
    return [{"input_ids": row, "labels": list(row)} for row in ids]


def gemm_flops(step) -> float:
    """FLOPs of the matrix products one call of `step` runs (forward and backward)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        step()
    return float(counter.get_total_flops())


def run_ours(model, strategies: list, items: list[dict], plan, steps: int, options: dict, pad: int,
             tokenizer=None) -> tuple[list[tuple], object]:
    """Train through `tuneforge.train.fit`; returns (end time, loss, peak RSS) per step, and the model."""
    from accelerate import Accelerator

    import tuneforge
    import tuneforge.train as loop
    from tuneforge.compose import applied_strategies
    from tuneforge.config import TrainConfig
    from tuneforge.metrics import MetricsLogger
    from tuneforge.strategies import StrategyContext

    model = tuneforge.prepare(model, strategies, tokenizer=tokenizer)
    if options.get("checkpointing"):  # as tuneforge.run.build_model does for train.gradient_checkpointing
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.disable_input_require_grads()
    if options.get("packing"):  # as tuneforge.run does: per-document attention where it computes the same
        from tuneforge.packing import check_packing

        row = None if options.get("attention") == "mask" else options.get("max_seq_len", 256)
        check_packing(model, pad, "cpu", row)
    if options.get("full_logits"):  # ablation: the head on every position, as without the fast path
        loop.label_head = lambda model: None
    marks: list[tuple[float, float, float]] = []

    class StepClock(MetricsLogger):
        def log(self, record: dict) -> None:
            super().log(record)
            marks.append((time.perf_counter(), record["loss"], peak_rss_mb(), time.process_time()))

    loop.MetricsLogger = StepClock
    compiled = {"compile": True} if options.get("compile") else {}
    cfg = TrainConfig(max_steps=steps, lr=options.get("lr", 1e-4), schedule="constant", log_every=1,
                      precision=options.get("precision", "fp32"), packing=options.get("packing", False),
                      max_seq_len=options.get("max_seq_len", 256), **compiled)
    with tempfile.TemporaryDirectory() as run_dir:
        loop.fit(model, applied_strategies(model), StrategyContext(tokenizer=tokenizer), items, plan, cfg,
                 Accelerator(cpu=True), Path(run_dir), pad, evaluate=lambda m: {})
    return marks, model


def run_plain(model, peft_spec, batches: list[dict], options: dict) -> tuple[list, object]:
    """PEFT (or the bare model) in a plain PyTorch loop: forward with labels, backward, clip, AdamW (the fused
    implementation, as tuneforge's loop uses)."""
    import torch

    if peft_spec == "plain-top-half":  # freeze embeddings and the bottom half of the layers
        for name, parameter in model.named_parameters():
            index = int(name.split(".")[2]) if ".layers." in name else None
            parameter.requires_grad_(index is not None and index >= SYNTHETIC_MODEL["num_hidden_layers"] // 2
                                     or name == "model.norm.weight")
    elif peft_spec != "plain":
        import peft

        kind, settings = peft_spec
        config_class = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig,
                        "prompt": peft.PromptTuningConfig, "ia3": peft.IA3Config}[kind]
        if options.get("checkpointing"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model = peft.get_peft_model(model, config_class(task_type="CAUSAL_LM", **settings))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=options.get("lr", 1e-4), betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=0.0, fused=True)
    model.train()
    marks = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.get("precision") == "bf16"):
            loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        marks.append((time.perf_counter(), loss.item(), peak_rss_mb(), time.process_time()))
    return marks, model


def summarise(marks: list, tokens: list[int], labelled: list[int], warmup: int, flops: float) -> dict:
    times = [b[0] - a[0] for a, b in itertools.pairwise(marks)]  # step i + 1 took times[i]
    cpu_times = [b[3] - a[3] for a, b in itertools.pairwise(marks)]  # CPU seconds of all threads
    timed = times[warmup - 1:] if warmup >= 1 else times
    timed_cpu = cpu_times[warmup - 1:] if warmup >= 1 else cpu_times
    timed_tokens = tokens[warmup:warmup + len(timed)] if warmup >= 1 else tokens[1:]
    losses = [m[1] for m in marks]
    return {
        "step_s": statistics.median(timed), "step_times": timed,
        "cpu_step_s": statistics.median(timed_cpu), "cpu_tokens_per_s": sum(timed_tokens) / sum(timed_cpu),
        "tokens_per_s": sum(timed_tokens) / sum(timed),
        "peak_rss_mb": marks[-1][2],
        "loss_first": losses[0], "loss_last": losses[-1],
        "loss_per_token": (sum(x * n for x, n in zip(losses, labelled, strict=False))
                           / sum(labelled[:len(losses)])),
        "gemm_gflops_per_step": flops / 1e9,
    }


def worker_synthetic(spec: dict) -> dict:
    import torch

    ours, peft_spec, options = SYNTHETIC[spec["method"]]
    steps, warmup, batch_size = spec["steps"], spec["warmup"], 4
    items = synthetic_items(steps * batch_size)
    plan_batches = [list(range(i * batch_size, (i + 1) * batch_size)) for i in range(steps)]
    tokens = [batch_size * 256] * steps
    labelled = [batch_size * 255] * steps
    model = synthetic_model()
    if spec["side"] == "ours":
        marks, model = run_ours(model, ours, items, lambda epoch, rank, world: [[b] for b in plan_batches],
                                steps, options, pad=0)
        from tuneforge.data import collate
        from tuneforge.evaluate import label_head
        from tuneforge.train import task_loss

        batch = collate(items[:batch_size], 0)
        needs_logits = any(s.needs_logits() for s in getattr(model, "tuneforge_strategies", []))
        head = label_head(model) if not needs_logits else None

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.get("precision") == "bf16"):
                loss = task_loss(model, batch, head=head)[0]
            loss.backward()
    else:
        batches = [{"input_ids": torch.tensor([items[i]["input_ids"] for i in b]),
                    "attention_mask": torch.ones(batch_size, 256, dtype=torch.long),
                    "labels": torch.tensor([items[i]["labels"] for i in b])} for b in plan_batches]
        marks, model = run_plain(model, peft_spec, batches, options)

        def step():
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=options.get("precision") == "bf16"):
                loss = model(**batches[0]).loss
            loss.backward()
    result = summarise(marks, tokens, labelled, warmup, gemm_flops(step))
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return result


def smollm2_data(count: int):
    import torch

    from tuneforge.data import encode_dataset, load_examples
    from tuneforge.models import load_model

    model, tokenizer, _ = load_model("smollm2-135m")
    items, _ = encode_dataset(load_examples("builtin:chatterbot"), tokenizer, SMOLLM2_LEN)
    order = torch.randperm(len(items), generator=torch.Generator().manual_seed(0)).tolist()
    train = [items[i] for i in order[:count]]
    held_out = [items[i] for i in order[-SMOLLM2_EVAL:]]
    return model, tokenizer, train, held_out


def held_out_loss(model, items: list[dict], pad: int) -> float:
    """Mean loss per answer token with full logits (the same neutral code for every side)."""
    import torch

    from tuneforge.data import collate
    from tuneforge.evaluate import token_losses

    model.eval()
    total, count = 0.0, 0
    ordered = sorted(items, key=lambda item: len(item["input_ids"]))
    with torch.no_grad():
        for start in range(0, len(ordered), 8):
            batch = collate(ordered[start:start + 8], pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            loss_sum, n = token_losses(logits, batch["labels"])
            total, count = total + float(loss_sum), count + n
    return total / count


def labelled_count(item: dict) -> int:
    return sum(label != -100 for label in item["labels"][1:])


def worker_smollm2(spec: dict) -> dict:
    side, options = SMOLLM2[spec["method"]]
    options = {**options, "lr": 2e-4}
    model, tokenizer, train, held_out = smollm2_data(spec["examples"])
    pad = tokenizer.pad_token_id
    if side == "trainer":
        marks, model, step_batches = run_trainer(model, tokenizer, train, options)
    else:
        from tuneforge.config import ScheduleConfig
        from tuneforge.packing import packing_plan
        from tuneforge.tasks import mixture_plan

        if options["packing"]:
            plan = packing_plan([len(i["input_ids"]) for i in train], [len(train)], 2, SMOLLM2_LEN, seed=0)
        else:
            plan = mixture_plan([len(train)], 8, ScheduleConfig(), seed=0)
        step_batches = [[train[i] for i in batch] for step in plan(0, 0, 1) for batch in step]  # accum 1
        marks, model = run_ours(model, [{"lora": LORA_QV}], train, plan, len(step_batches), options, pad,
                                tokenizer=tokenizer)
    tokens = [sum(len(i["input_ids"]) for i in batch) for batch in step_batches]
    labelled = [sum(labelled_count(i) for i in batch) for batch in step_batches]
    result = summarise(marks, tokens, labelled, spec["warmup"], 0.0)
    result["trainable"] = sum(p.numel() for p in model.parameters() if p.requires_grad)
    result["steps"] = len(marks)
    result["held_out_loss"] = held_out_loss(model, held_out, pad)
    return result


def run_trainer(model, tokenizer, train: list[dict], options: dict):
    """Hugging Face Trainer + PEFT LoRA, default padding; per-step times from a callback. Like-for-like with
    ours: fused AdamW (`adamw_torch_fused`), and bf16 autocast (`bf16=True`) when ours runs in bf16."""
    import peft
    from transformers import DataCollatorForSeq2Seq, Trainer, TrainerCallback, TrainingArguments

    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **PEFT_LORA_QV))
    marks, step_batches, losses = [], [], []
    pad_collator = DataCollatorForSeq2Seq(tokenizer, padding=True)  # its defaults: pad to the longest

    def collate(features):
        step_batches.append([{"input_ids": f["input_ids"], "labels": f["labels"]} for f in features])
        return pad_collator(features)

    class StepClock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append([time.perf_counter(), None, peak_rss_mb(), time.process_time()])

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                losses.append(logs["loss"])

    with tempfile.TemporaryDirectory() as output:
        args = TrainingArguments(
            output_dir=output, per_device_train_batch_size=options.get("batch_size", 8), num_train_epochs=1,
            learning_rate=options["lr"],
            lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=1.0, logging_steps=1,
            save_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True, seed=0,
            dataloader_pin_memory=False, optim="adamw_torch_fused", bf16=options.get("precision") == "bf16",
            activation_checkpointing=options.get("checkpointing", False),
            activation_checkpointing_kwargs={"use_reentrant": False},
        )
        trainer = Trainer(model=model, args=args, train_dataset=[dict(i) for i in train],
                          data_collator=collate, callbacks=[StepClock()])
        trainer.train()
    for mark, loss in zip(marks, losses, strict=False):
        mark[1] = loss
    return [tuple(m) for m in marks], model, step_batches


def worker_inference(spec: dict) -> dict:
    """Forward passes of the base model, LoRA unmerged and LoRA merged, interleaved in one process."""
    import torch

    import tuneforge
    from tuneforge.strategies.lora import merge_lora

    items = synthetic_items(4)
    ids = torch.tensor([i["input_ids"] for i in items])
    models = {"base": synthetic_model()}
    models["lora-unmerged"] = tuneforge.prepare(synthetic_model(),
                                                [{"lora": {**LORA_QV, "targets": "all-linear"}}])
    models["lora-merged"] = tuneforge.prepare(synthetic_model(),
                                              [{"lora": {**LORA_QV, "targets": "all-linear"}}])
    merge_lora(models["lora-merged"])
    times: dict[str, list[float]] = {name: [] for name in models}
    with torch.inference_mode():
        for model in models.values():
            model.eval()
            model(input_ids=ids)
        for _ in range(spec["steps"]):
            for name, model in models.items():
                start = time.perf_counter()
                model(input_ids=ids)
                times[name].append(time.perf_counter() - start)
    return {name: {"step_s": statistics.median(t), "tokens_per_s": ids.numel() / statistics.median(t)}
            for name, t in times.items()}


def gemm_shapes(suite: str) -> list[tuple[int, int, int]]:
    """(M, K, N) of every forward GEMM of one step, and the two backward GEMMs of each."""
    if suite == "smollm2":
        tokens, hidden, inner, kv, vocab, layers = 512, 576, 1536, 192, 49152, 30
    else:
        tokens, hidden, inner, kv, vocab, layers = 1024, 512, 2048, 256, 16000, 8
    forward = [(tokens, hidden, hidden)] * 2 + [(tokens, hidden, kv)] * 2 + [(tokens, hidden, inner)] * 2
    forward = forward * 1 + [(tokens, inner, hidden)]
    shapes = forward * layers + [(tokens, hidden, vocab)]
    return [s for m, k, n in shapes for s in ((m, k, n), (m, n, k), (k, m, n))]  # forward, grad-in, grad-w


def worker_matmul(spec: dict) -> dict:
    """GFLOP/s of torch.mm over one step's GEMM shapes (each weighted by how often a step runs it): by wall
    time, and by CPU time per thread (what a dedicated machine would show when the machine is shared)."""
    import torch

    result = {}
    shapes = gemm_shapes(spec["method"])
    for dtype_name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        flops = seconds = cpu_seconds = 0.0
        # bf16: one shape (the feed-forward's), since a CPU without bf16 instructions can be 40x slower
        for m, k, n in sorted(set(shapes)) if dtype_name == "fp32" else [shapes[5 * 3]]:
            a, b = torch.randn(m, k, dtype=dtype), torch.randn(k, n, dtype=dtype)
            torch.mm(a, b)
            repeats, count = 5, shapes.count((m, k, n))
            start, cpu_start = time.perf_counter(), time.process_time()
            for _ in range(repeats):
                torch.mm(a, b)
            seconds += (time.perf_counter() - start) / repeats * count
            cpu_seconds += (time.process_time() - cpu_start) / repeats / THREADS * count
            flops += 2 * m * k * n * count
        result[f"{dtype_name}_gflops"] = flops / seconds / 1e9
        result[f"{dtype_name}_gflops_cpu"] = flops / cpu_seconds / 1e9
    return result


def worker(spec: dict) -> dict:
    import torch

    global THREADS
    THREADS = spec.get("threads", THREADS)
    torch.set_num_threads(THREADS)
    return {"synthetic": worker_synthetic, "smollm2": worker_smollm2, "inference": worker_inference,
            "matmul": worker_matmul}[spec["suite"]](spec)


# ------------------------------------------------------------------------------------------ orchestrator
def run_process(spec: dict, script: str = __file__, threads: int | None = None) -> dict | None:
    threads = str(threads if threads is not None else spec.get("threads", THREADS))
    env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, script, "--worker", json.dumps(spec)], env=env,
                          capture_output=True, text=True, check=False,
                          cwd=Path(__file__).resolve().parents[1])
    for line in done.stdout.splitlines():
        if line.startswith(RESULT):
            return json.loads(line[len(RESULT):])
    print(f"  {spec['suite']}/{spec['method']}/{spec['side']} failed:\n{done.stderr[-2500:]}",
          file=sys.stderr)
    return None


def wait_for_quiet(max_load: float | None, patience: float) -> float:
    """The 1-minute load average, after waiting for it to drop below `max_load` (if given)."""
    waited = 0.0
    while max_load is not None and os.getloadavg()[0] >= max_load and waited < patience:
        time.sleep(10)
        waited += 10
    return os.getloadavg()[0]


def ready(method: str) -> str | None:
    """Why our side of `method` cannot run yet (a strategy that does not import), or None."""
    strategies = SYNTHETIC.get(method, ([],))[0]
    for spec in strategies:
        name = next(iter(spec))
        try:
            from tuneforge.strategies import REGISTRY

            if name not in REGISTRY:
                return f"strategy {name!r} is not registered"
        except Exception as exc:  # noqa: BLE001 - a strategy module being written may not import
            return f"{type(exc).__name__}: {exc}"
    return None


def plan_runs(args) -> list[list[dict]]:
    """Groups of specs to run back to back (a method's sides), one group per method and suite."""
    groups = []
    if "synthetic" in args.suite:
        for method in args.methods or SYNTHETIC:
            if method not in SYNTHETIC:
                continue
            reason = ready(method)
            if reason:
                print(f"note: skipping {method}: {reason}")
                continue
            sides = ["ours"] + (["peft"] if SYNTHETIC[method][1] is not None else [])
            groups.append([{"suite": "synthetic", "method": method, "side": s, "steps": args.steps,
                            "warmup": args.warmup} for s in sides])
    if "smollm2" in args.suite:
        chosen = [m for m in (args.methods or SMOLLM2) if m in SMOLLM2]
        groups.append([{"suite": "smollm2", "method": m, "side": SMOLLM2[m][0], "warmup": 3,
                        "examples": args.examples} for m in chosen])
    if "inference" in args.suite:
        groups.append([{"suite": "inference", "method": "merged-lora", "side": "ours", "steps": 9}])
    if "synthetic" in args.suite:  # the machine's matmul rate, for the GEMM % column
        groups.append([{"suite": "matmul", "method": "synthetic", "side": "torch.mm"}])
    return [[{**spec, "threads": args.threads} for spec in group] for group in groups]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--suite", nargs="+", default=["synthetic", "smollm2", "inference"],
                        choices=["synthetic", "smollm2", "inference"])
    parser.add_argument("--methods", nargs="+", help="only these methods (names as in the table)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=THREADS, help="torch threads of each run, both sides")
    parser.add_argument("--steps", type=int, default=10, help="optimizer steps per synthetic run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the timing")
    parser.add_argument("--examples", type=int, default=SMOLLM2_TRAIN, help="SmolLM2 training examples")
    parser.add_argument("--json", type=Path, help="write every run's numbers here")
    parser.add_argument("--max-load", type=float,
                        help="before each run, wait (up to --patience seconds) until "
                        "the 1-minute load average is below this (a shared machine)")
    parser.add_argument("--patience", type=float, default=120.0)
    parser.add_argument("--render", type=Path, nargs="+", help="only print the tables of saved --json files")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(RESULT + json.dumps(worker(json.loads(args.worker))), flush=True)
        return
    if args.render:  # several files (e.g. one per suite) merge
        saved: dict[tuple, list[dict]] = {}
        for path in args.render:
            data = json.loads(path.read_text())
            for key, runs in data.get("results", data).items():
                saved.setdefault(tuple(key.split("/")), []).extend(runs)
        print(render_tables(saved))
        return

    results: dict[tuple, list[dict]] = {}
    groups = plan_runs(args)
    started = time.time()
    for repeat in range(args.repeats):
        for group in groups:
            for spec in group if repeat % 2 == 0 else group[::-1]:  # A B, then B A
                load = wait_for_quiet(args.max_load, args.patience)
                result = run_process(spec)
                label = f"{spec['suite']}/{spec['method']}/{spec['side']}"
                print(f"[{time.time() - started:6.0f}s load {load:4.1f}] repeat {repeat + 1}: {label}: "
                      + (json.dumps({k: v for k, v in result.items() if not isinstance(v, list)})
                         if result else "failed"), flush=True)
                if result:
                    result["load_before"] = load
                    results.setdefault((spec["suite"], spec["method"], spec["side"]), []).append(result)
    if args.json:
        saved = {"/".join(key): runs for key, runs in results.items()}
        args.json.write_text(json.dumps({**provenance(args), "results": saved}, indent=1) + "\n")
    print()
    print(render_tables(results))


def provenance(args) -> dict:
    """Date, command, threads and machine of an invocation: what a committed result file must carry."""
    import datetime
    import platform

    import peft
    import torch
    import transformers

    info = Path("/proc/cpuinfo")
    lines = info.read_text().splitlines() if info.is_file() else []
    cpu = next((line.split(":", 1)[1].strip() for line in lines if line.startswith("model name")),
               platform.processor())
    return {"date": datetime.date.today().isoformat(),
            "command": "python bench/bench.py " + " ".join(sys.argv[1:]),
            "threads": args.threads, "repeats": args.repeats,
            "machine": {"cpu": cpu, "cores": os.cpu_count(), "affinity": len(os.sched_getaffinity(0)),
                        "torch": torch.__version__, "transformers": transformers.__version__,
                        "peft": peft.__version__}}


# ------------------------------------------------------------------------------------------------ tables
def median(runs: list[dict], key: str) -> float | None:
    values = [run[key] for run in runs if run.get(key) is not None]
    return statistics.median(values) if values else None


def ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}" if a is not None and b else "-"


def cell(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def render_tables(results: dict) -> str:
    """Markdown tables of medians over repeats. Step times by wall clock (the target on a quiet machine) and
    by CPU seconds per step (all threads; robust to other processes sharing the cores)."""
    lines = []
    rate = {(suite, key): median(results.get(("matmul", suite, "torch.mm"), []), key)
            for suite in ("synthetic", "smollm2") for key in ("fp32_gflops", "bf16_gflops", "fp32_gflops_cpu",
                                                               "bf16_gflops_cpu")}
    if any(key[0] == "synthetic" for key in results):
        lines += [(f"Synthetic 39.7M Llama-shaped model, uniform 4 x 256 batches, {THREADS} threads. "
                  f"torch.mm at this model's GEMM shapes: {cell(rate['synthetic', 'fp32_gflops'], 1)} "
                  f"GFLOP/s fp32, {cell(rate['synthetic', 'bf16_gflops'], 1)} bf16 (by CPU time: "
                  f"{cell(rate['synthetic', 'fp32_gflops_cpu'], 1)} / "
                  f"{cell(rate['synthetic', 'bf16_gflops_cpu'], 1)})."),
                  "",
                  ("| method | step s ours | step s PEFT | ratio | CPU s ours | CPU s PEFT | CPU ratio "
                  "| tok/s ours | tok/s PEFT | RSS MB ours | RSS MB PEFT | RSS ratio | trainable ours "
                  "| trainable PEFT | GEMM % ours | GEMM % PEFT |"),
                  "|" + " --- |" * 16]
        for method, (_, _, options) in SYNTHETIC.items():
            ours = results.get(("synthetic", method, "ours"), [])
            peft = results.get(("synthetic", method, "peft"), [])
            if not ours:
                continue
            dtype = options.get("precision", "fp32")
            row = [method]
            for key, digits in (("step_s", 3), ("cpu_step_s", 2)):
                row += [cell(median(ours, key), digits), cell(median(peft, key), digits),
                        ratio(median(ours, key), median(peft, key))]
            row += [cell(median(ours, "tokens_per_s")), cell(median(peft, "tokens_per_s"))]
            row += [cell(median(ours, "peak_rss_mb")), cell(median(peft, "peak_rss_mb")),
                    ratio(median(ours, "peak_rss_mb"), median(peft, "peak_rss_mb"))]
            row += [cell(median(ours, "trainable")), cell(median(peft, "trainable"))]
            for runs in (ours, peft):  # GEMM FLOP rate per thread by CPU time, over torch.mm's
                flops, cpu = median(runs, "gemm_gflops_per_step"), median(runs, "cpu_step_s")
                mm = rate["synthetic", f"{dtype}_gflops_cpu"]
                row.append(cell(100 * flops / (cpu / THREADS) / mm) if flops and cpu and mm else "-")
            lines.append("| " + " | ".join(row) + " |")
        full = results.get(("synthetic", "full", "ours"), [])
        top = results.get(("synthetic", "layerwise-top-half", "ours"), [])
        if full and top:
            lines += ["", ("Bottom half of the layers frozen (layerwise top:4) / full fine-tuning, ours: "
                          f"{ratio(median(top, 'step_s'), median(full, 'step_s'))} by wall time, "
                          f"{ratio(median(top, 'cpu_step_s'), median(full, 'cpu_step_s'))} by CPU time.")]
        lines.append("")
    if any(key[0] == "smollm2" for key in results):
        reference = results.get(("smollm2", "trainer-lora", "trainer"), [])
        lines += [f"SmolLM2-135M on builtin:chatterbot (answers only), LoRA r=8 on q,v, {THREADS} threads.",
                  "",
                  ("| run | step s | non-pad tok/s | vs Trainer | by CPU time: tok/s | vs Trainer "
                  "| peak RSS MB | vs Trainer | train loss/token | held-out loss/token | steps "
                  "| trainable |"),
                  "|" + " --- |" * 12]
        for method, (side, _) in SMOLLM2.items():
            runs = results.get(("smollm2", method, side), [])
            if not runs:
                continue
            row = [method, cell(median(runs, "step_s"), 2)]
            for key in ("tokens_per_s", "cpu_tokens_per_s"):
                row += [cell(median(runs, key)), ratio(median(runs, key), median(reference, key))]
            row += [cell(median(runs, "peak_rss_mb")),
                    ratio(median(runs, "peak_rss_mb"), median(reference, "peak_rss_mb")),
                    cell(median(runs, "loss_per_token"), 4), cell(median(runs, "held_out_loss"), 4),
                    cell(median(runs, "steps")), cell(median(runs, "trainable"))]
            lines.append("| " + " | ".join(row) + " |")
        lines.append("")
    inference = results.get(("inference", "merged-lora", "ours"), [])
    if inference:
        base = statistics.median(run["base"]["step_s"] for run in inference)
        lines += ["Inference, synthetic model, one forward of 4 x 256 (interleaved in one process)", "",
                  "| model | forward s | vs base |", "| --- | --- | --- |"]
        for name in ("base", "lora-merged", "lora-unmerged"):
            step = statistics.median(run[name]["step_s"] for run in inference)
            lines.append(f"| {name} | {step:.3f} | {step / base:.2f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    main()
