"""Where a training step's time goes: torch.profiler's per-operator table for one side of a bench method.

    python bench/profile_step.py synthetic full ours
    python bench/profile_step.py synthetic lora-qv peft --rows 20
    python bench/profile_step.py smollm2 lora-packed ours
    python bench/profile_step.py smollm2 lora-packed ours --threads 1 --json bench/results/profile.json

Runs a few warm-up steps, then profiles one (forward, backward, clip, optimizer step) and prints the
operators by self CPU time: matrix products (mm/addmm/bmm), attention, the optimizer's foreach ops,
and the memory-bound rest. `--json` also writes the operator table and those shares, with the date and
command, for docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=["synthetic", "smollm2"])
    parser.add_argument("method")
    parser.add_argument("side", choices=["ours", "peft", "trainer"])
    parser.add_argument("--rows", type=int, default=15)
    parser.add_argument("--threads", type=int, default=bench.THREADS)
    parser.add_argument("--json", type=Path, help="add the operator table and category shares to this file")
    parser.add_argument("--label", help="this profile's column in the docs (default: suite method side)")
    args = parser.parse_args()

    import torch
    from torch.profiler import profile

    torch.set_num_threads(args.threads)
    step = build_step(args.suite, args.method, args.side)
    for _ in range(3):  # warm-up (and, compiled, the compile)
        step()
    with profile() as profiler:
        step()
    averages = profiler.key_averages()
    print(averages.table(sort_by="self_cpu_time_total", row_limit=args.rows))
    if args.json:
        record(args, averages)


def record(args, averages) -> None:
    """Add this profile (by its label) to the `--json` file: the operator table, category shares, command."""
    operators = sorted(((e.key, e.self_cpu_time_total, e.count) for e in averages
                        if e.self_cpu_time_total > 0), key=lambda row: -row[1])
    total = sum(us for _, us, _ in operators)
    shares: dict[str, float] = {}
    for name, us, _ in operators:
        shares[category(name)] = shares.get(category(name), 0.0) + us / total
    profile = {"label": args.label or f"{args.suite} {args.method} {args.side}",
               "command": "python bench/profile_step.py " + " ".join(sys.argv[1:]), "threads": args.threads,
               "step_cpu_ms": total / 1e3, "shares": shares,
               "operators": [{"name": n, "self_cpu_ms": us / 1e3, "share": us / total, "calls": c}
                             for n, us, c in operators[:args.rows]]}
    saved = json.loads(args.json.read_text()) if args.json.is_file() else {"profiles": []}
    profiles = [p for p in saved["profiles"] if p["label"] != profile["label"]] + [profile]
    commands = "; ".join(p["command"] for p in profiles)
    args.json.write_text(json.dumps({"date": datetime.date.today().isoformat(), "command": commands,
                                     "profiles": profiles}, indent=1) + "\n")


CATEGORIES = (  # (category, operator-name fragments), first match wins
    ("attention", ("scaled_dot_product", "flash_attention", "_efficient_attention")),
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear")),
    ("optimizer", ("_fused_adam", "_foreach", "clip_grad")),
    ("compiled kernels", ("compiled", "cpp_fused", "triton", "inductor", "torch-compiled")),
)


def category(operator: str) -> str:
    """The share a profiled operator counts in: matmul, attention, the optimizer, compiled fused kernels, or
    the element-wise and copying rest."""
    for name, fragments in CATEGORIES:
        if any(fragment in operator for fragment in fragments):
            return name
    return "element-wise and the rest"


def build_step(suite: str, method: str, side: str):
    """A closure running one full training step of (suite, method, side)."""
    import torch

    import tuneforge
    from tuneforge.data import collate
    from tuneforge.evaluate import label_head
    from tuneforge.packing import packed_collate
    from tuneforge.train import task_loss

    if suite == "synthetic":
        ours, peft_spec, options = bench.SYNTHETIC[method]
        model = bench.synthetic_model()
        items = bench.synthetic_items(4)
        batch = collate(items, 0)
    else:
        _, options = bench.SMOLLM2[method]
        model, tokenizer, train, _ = bench.smollm2_data(64)
        ours, peft_spec = [{"lora": bench.LORA_QV}], ("lora", bench.PEFT_LORA_QV)
        batch = packed_collate(train[:9], tokenizer.pad_token_id, 256) if options.get("packing") else \
            collate(train[:8], tokenizer.pad_token_id)
    precision = options.get("precision") == "bf16"
    if side == "ours":
        model = tuneforge.prepare(model, ours)
        strategies = model.tuneforge_strategies
        if options.get("compile"):  # as the loop does under `train.compile: true`, for the process
            from tuneforge.compiling import compiled_blocks

            compiled_blocks(model, True, strategies, "ddp").__enter__()
        full_logits = options.get("full_logits") or any(s.needs_logits() for s in strategies)
        head = None if full_logits else label_head(model)

        def loss():
            return task_loss(model, batch, head=head)[0] / int((batch["labels"][:, 1:] != -100).sum())
    else:
        if peft_spec not in ("plain", "plain-top-half"):
            import peft

            kind, settings = peft_spec
            config_class = {"lora": peft.LoraConfig, "prefix": peft.PrefixTuningConfig,
                            "prompt": peft.PromptTuningConfig, "ia3": peft.IA3Config}[kind]
            config = config_class(task_type="CAUSAL_LM", **settings)
            model = peft.get_peft_model(model, config)
        inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "labels")}

        def loss():
            return model(**inputs).loss
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    model.train()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision):
            value = loss()
        value.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


if __name__ == "__main__":
    main()
