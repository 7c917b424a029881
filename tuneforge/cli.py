"""`tuneforge train|eval|generate|validate|strategies|inspect|export|compare|ui`.

Every user error is printed as one line (`tuneforge: error: ...`, exit code 2), never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def _quiet_libraries() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()


def _load(args) -> RunConfig:  # noqa: F821
    from tuneforge.config import load_config

    config = load_config(args.config, args.overrides)
    if getattr(args, "output", None):
        config.output = args.output
    return config


def cmd_train(args) -> int:
    from accelerate import PartialState

    from tuneforge.faults import reported_faults
    from tuneforge.report import console_summary
    from tuneforge.run import last_checkpoint, train_run
    from tuneforge.stopping import Stopped, stop_requests

    config = _load(args)
    with stop_requests(config.train.max_time):  # SIGTERM, Ctrl-C, max_time: stop at a checkpoint
        try:
            # a full disk or out of memory anywhere in the run (evaluation too): one line
            with reported_faults(lambda: last_checkpoint(Path(config.output))):
                results = train_run(config, resume=args.resume, overwrite=args.overwrite)
        except Stopped as stopped:
            if PartialState().is_main_process:
                print(f"tuneforge: {stopped}; resume with: {resume_command(args)}", file=sys.stderr)
            return stopped.exit_code
    if PartialState().is_main_process:  # under torchrun / accelerate launch: one summary, not one per process
        print()
        print(console_summary(results))
        print(f"\nrun directory: {config.output} (report.md, metrics.jsonl, adapter/)")
    return 0


def resume_command(args) -> str:
    """The command line that continues this `train` run."""
    import shlex

    words = ["tuneforge", "train", args.config, *args.overrides]
    if args.output:
        words += ["--output", args.output]
    return shlex.join([*words, "--resume"])


def cmd_validate(args) -> int:
    from tuneforge.run import validate_run
    from tuneforge.strategies import default_parametrization

    config = _load(args)
    summary = validate_run(config)
    labels = f", labels: {', '.join(summary['labels'])}" if summary["labels"] else ""
    strategies = ", ".join(s.name for s in config.strategies) or f"{default_parametrization().name} (default)"
    print(f"{args.config}: ok ({summary['task_type']}: {summary['train_examples']} train, "
          f"{summary['eval_examples']} eval examples{labels}; strategies: {strategies})")
    if config.retain and summary["task_type"] == "classification":
        from tuneforge.tasks import retain_unused_note

        print(f"note: {retain_unused_note(config.retain)}")
    if summary.get("skipped"):
        print(f"skipped {len(summary['skipped'])} invalid record(s) (data.skip_invalid), "
              f"first: {summary['skipped'][0]}")
    return 0


def cmd_inspect(args) -> int:
    from tuneforge.errors import TuneforgeError
    from tuneforge.memory import advice, estimate_memory, format_estimate
    from tuneforge.run import inspect_config

    config = _load(args)
    try:
        estimate = estimate_memory(config)  # first: it counts this process's memory before the model loads
    except TuneforgeError:
        raise
    except Exception as exc:  # noqa: BLE001 - a model whose forward cannot run on the meta device
        estimate = None
        note = f"{type(exc).__name__}: {str(exc)[:120]}"
        print(f"tuneforge: note: no memory estimate ({note})", file=sys.stderr)
    report = inspect_config(config)
    report["memory"] = estimate.as_dict() if estimate else None
    if args.json:
        print(json.dumps(report))
    else:
        print(f"total parameters:     {report['total_params']:,}")
        print(f"trainable parameters: {report['trainable_params']:,} "
              f"({100 * report['trainable_params'] / report['total_params']:.3f}%)")
        for name, count in report["trainable_by_strategy"].items():
            print(f"  {name}: {count:,}")
        for name, text in report["matched"].items():
            print(f"{name}: {text}")
        held = report["base_weights"]  # quantized or not, against the same weights in fp32
        kinds = ", ".join(f"{kind} {e['bytes'] / 2**20:.1f} MiB" for kind, e in held["by_kind"].items())
        print(f"base weights: {held['bytes'] / 2**20:.1f} MiB ({kinds}); "
              f"{held['bytes'] / max(held['fp32_bytes'], 1):.2f}x their fp32 size")
        if estimate is not None:
            print(format_estimate(estimate))
            if not estimate.fits:
                print("to fit, try: " + "; ".join(advice(estimate, config)))
    return 0


def cmd_strategies(args) -> int:
    from tuneforge.strategies import REGISTRY

    for name, entry in sorted(REGISTRY.items()):
        print(f"{name} ({entry.family}): {entry.summary}")
        for field_name, field in entry.options.model_fields.items():
            default = field.default_factory() if field.default_factory else field.default
            print(f"    {field_name} = {default!r}")
    return 0


def cmd_eval(args) -> int:
    """Evaluate the untouched model (prompt engineering baseline) or a run's adapter, no training."""
    from tuneforge.api import load_adapter
    from tuneforge.run import encode_run_data, evaluate_all, load_base_model, load_run_data

    config = _load(args)
    run_data = load_run_data(config)
    from accelerate.utils import set_seed

    set_seed(config.train.seed)  # as a run does: a new classification head draws what the run's drew
    model, tokenizer, _ = load_base_model(config, run_data, [s.name for s in config.strategies])
    if args.adapter:
        from tuneforge.errors import ConfigError
        from tuneforge.export import adapter_model

        task_type, labels = adapter_model(Path(args.adapter))
        loaded = [t.labels for t in run_data.tasks if t.task_type == "classification"]
        named = (Path(args.adapter) / "tuneforge.json").is_file()  # PEFT-made adapters keep no label names
        if named and task_type == "classification" and len(loaded) == 1 and loaded[0] != labels:
            raise ConfigError(f"{args.adapter}: the adapter's head predicts the labels {labels}, the data "
                              f"has {loaded[0]}; evaluate it on the data it was trained for")
        model = load_adapter(model, args.adapter, tokenizer)
    encode_run_data(run_data, config, tokenizer, tag_tasks=run_data.multi_task)
    for note in run_data.notes:
        print(f"tuneforge: note: {note}", file=sys.stderr)
    result = evaluate_all(model, tokenizer, run_data, config, "cpu")
    if args.json:
        print(json.dumps(result))
        return 0
    from tuneforge.formatting import significant

    for split in ("eval", "retain"):
        for key, value in result.get(split, {}).items():
            print(f"{split} {key}: {significant(value, 4) if isinstance(value, float) else value}")
    for sample in result.get("samples", []):
        print(f"\nQ: {sample['prompt']}\nA: {sample['output']}")
    return 0


def cmd_generate(args) -> int:
    print(generate_reply(args.model, args.prompt, args.adapter, args.max_new_tokens, args.temperature,
                         args.raw))
    return 0


def generate_reply(model_or_run: str, prompt: str, adapter: str | None = None, max_new_tokens: int = 64,
                   temperature: float = 0.0, raw: bool = False) -> str:
    """What `tuneforge generate` prints: the reply of a model, a model + adapter, or a run's adapter."""
    import torch

    from tuneforge.api import load_adapter
    from tuneforge.export import ADAPTER_DIR
    from tuneforge.models import load_model

    model_name = model_or_run
    run_dir = Path(model_or_run)
    if (run_dir / "config.yaml").is_file() and (run_dir / ADAPTER_DIR).is_dir():
        import yaml

        model_name = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
        adapter = adapter or str(run_dir / ADAPTER_DIR)
    model, tokenizer, _ = load_model(model_name)
    if adapter:
        model = load_adapter(model, adapter, tokenizer)
    model.eval()
    if tokenizer.chat_template and not raw:
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        encoded = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    else:
        encoded = tokenizer(prompt, return_tensors="pt")
    with torch.no_grad():
        output = model.generate(**encoded, max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                temperature=temperature or None, pad_token_id=tokenizer.pad_token_id)
    return tokenizer.decode(output[0, encoded["input_ids"].shape[1]:], skip_special_tokens=True).strip()


def cmd_export(args) -> int:
    from tuneforge.errors import ConfigError

    if not args.merged and not args.gguf:
        raise ConfigError("export: give --merged OUT (a Hugging Face folder) or --gguf OUT.gguf, or both")
    export_run(Path(args.run_dir), Path(args.merged) if args.merged else None,
               Path(args.gguf) if args.gguf else None, args.quant)
    return 0


def export_run(run_dir: Path, merged: Path | None, gguf: Path | None = None, quant: str = "f32") -> dict:
    """What `tuneforge export RUN [--merged OUT] [--gguf OUT.gguf --quant Q]` does: the run's adapter folded
    into its base and checked, written as a Hugging Face folder and/or a GGUF file (with an Ollama
    Modelfile), each with a model card. Returns the last export's report."""
    import yaml

    from tuneforge.api import load_adapter
    from tuneforge.errors import ConfigError
    from tuneforge.export import ADAPTER_DIR, adapter_model, export_merged, merge_in_place
    from tuneforge.model_card import write_run_card
    from tuneforge.models import load_model
    from tuneforge.quantize import dequantize_model

    if not (run_dir / "config.yaml").is_file() or not (run_dir / ADAPTER_DIR).is_dir():
        raise ConfigError(f"{run_dir}: not a finished run directory (needs config.yaml and adapter/)")
    if gguf:
        _check_gguf_target(gguf, quant)
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    # the base loads as the run loaded it: a classifier with the run's labels (its head is in the adapter)
    task_type, labels = adapter_model(run_dir / ADAPTER_DIR)
    trust = bool(config.get("trust_remote_code"))
    quantize = config.get("quantize", "none")
    model, tokenizer, _ = load_model(config["model"], task_type, labels, trust, quantize)
    dequantize_model(model)  # a quantized run merges into the base it trained on, decoded to fp32
    model = load_adapter(model, run_dir / ADAPTER_DIR, tokenizer)
    check = dict(tokenizer(["The quick brown fox", "Hello"], return_tensors="pt", padding=True))
    carded = (run_dir / "results.json").is_file()
    report: dict = {}
    if merged:
        report = export_merged(model, tokenizer, merged, check)
        if carded:
            write_run_card(merged, run_dir, "merged")
        print(f"merged model written to {merged}: {json.dumps(report)}")
    if gguf:
        from tuneforge.gguf_export import write_gguf
        from tuneforge.ollama import write_modelfile

        done = {} if merged else merge_in_place(model, check)  # --merged merged it already
        report = {**done, **write_gguf(model, tokenizer, gguf, quant, name=run_dir.resolve().name)}
        modelfile, reason = write_modelfile(gguf, tokenizer)
        card = write_run_card(gguf.parent, run_dir, "gguf") if carded else None
        print(f"GGUF written to {gguf} ({report['bytes'] / 2**20:.1f} MiB, {quant}, "
              f"{report['seconds']:.1f} s), {modelfile.name} beside it"
              f"{', and README.md' if card else ''}: {json.dumps(report)}")
        for note in [*report["notes"], *([f"no TEMPLATE in {modelfile.name}: {reason}"] if reason else [])]:
            print(f"tuneforge: note: {note}", file=sys.stderr)
    return report


def _check_gguf_target(path: Path, quant: str) -> None:
    """Refuse a bad --gguf/--quant before loading anything."""
    from tuneforge.errors import ConfigError
    from tuneforge.gguf_export import QUANTS

    if quant not in QUANTS:
        raise ConfigError(f"export: --quant {quant!r}: expected one of {', '.join(QUANTS)}")
    if path.suffix != ".gguf":
        raise ConfigError(f"export: --gguf {path}: the file name must end in .gguf")
    if not path.parent.is_dir():
        raise ConfigError(f"export: --gguf {path}: folder {path.parent} does not exist")


def cmd_compare(args) -> int:
    from tuneforge.compare import check_cost, compare, parse_seeds

    # `key=value` items among the sources are overrides applied to every config that is trained
    overrides = [*args.overrides, *(s for s in args.sources if "=" in s and not Path(s).exists())]
    sources = [s for s in args.sources if s not in overrides]
    runs = ["--runs-dir", args.runs_dir] if args.runs_dir else []
    command = "tuneforge compare " + " ".join([*sources, "--output", args.output, *runs, *overrides])
    runs_dir = Path(args.runs_dir) if args.runs_dir else None
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    check_cost(args.cost)  # both checked before anything trains
    if seeds is not None:
        command += f" --seeds {args.seeds}"
    if args.cost != "params":
        command += f" --cost {args.cost}"
    report = compare(sources, Path(args.output), overrides, command, runs_dir, seeds, args.cost)
    from tuneforge.compare_report import console_comparison

    print(console_comparison(json.loads((report.parent / "comparison.json").read_text())))
    print(f"\ncomparison written to {report} (and report.html, comparison.json, plots)")
    return 0


def cmd_ui(args) -> int:
    from tuneforge.errors import ConfigError

    try:
        import jinja2  # noqa: F401
        import starlette  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError as exc:
        raise ConfigError(f"tuneforge ui needs {exc.name}: pip install -r requirements.txt "
                          "(starlette, uvicorn, jinja2, python-multipart)") from None
    from tuneforge.ui import serve

    if not 0 < args.port < 65536:
        raise ConfigError(f"--port {args.port}: expected 1-65535")
    serve(Path(args.runs), args.host, args.port)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tuneforge", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(name: str, help_text: str) -> argparse.ArgumentParser:
        command = sub.add_parser(name, help=help_text)
        command.add_argument("config", help="YAML config file")
        command.add_argument("overrides", nargs="*", help="key=value overrides, e.g. train.lr=1e-4")
        return command

    train = with_config("train", "fine-tune as the config says")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint")
    train.add_argument("--overwrite", action="store_true",
                       help="replace an existing run in the output directory")
    train.add_argument("--output", help="run directory (overrides `output:`)")
    train.set_defaults(run=cmd_train)
    with_config("validate", "check a config and its data without loading a model") \
        .set_defaults(run=cmd_validate)
    inspect = with_config("inspect", "count parameters per strategy and show the modules each matched")
    inspect.add_argument("--json", action="store_true")
    inspect.set_defaults(run=cmd_inspect)
    evaluate = with_config("eval", "evaluate without training (prompt-only baseline, or --adapter)")
    evaluate.add_argument("--adapter", help="adapter directory to apply first")
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(run=cmd_eval)
    sub.add_parser("strategies", help="list strategies and their options").set_defaults(run=cmd_strategies)
    generate = sub.add_parser("generate", help="generate text from a model, a model + adapter, or a run")
    generate.add_argument("model", help="bundled model name, model folder, or run directory")
    generate.add_argument("--prompt", required=True)
    generate.add_argument("--adapter")
    generate.add_argument("--max-new-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--raw", action="store_true", help="do not wrap the prompt in the chat template")
    generate.set_defaults(run=cmd_generate)
    export = sub.add_parser("export", help="write a merged model folder, or a GGUF file, from a run")
    export.add_argument("run_dir", metavar="RUN", help="run directory")  # not `run`: that is the handler
    export.add_argument("--merged", help="output folder for the merged model (Hugging Face format)")
    export.add_argument("--gguf", metavar="OUT.gguf", help="GGUF file for llama.cpp, Ollama and LM Studio "
                        "(an Ollama Modelfile is written beside it)")
    export.add_argument("--quant", default="f32",
                        help="GGUF tensor type: f32 (default), f16, bf16, q8_0 or q4_1")
    export.set_defaults(run=cmd_export)
    compare = sub.add_parser("compare", help="train (or collect) several runs and report them side by side")
    compare.add_argument("sources", nargs="+", help="config files to train, or finished run directories")
    compare.add_argument("--output", required=True, help="folder for report.md, report.html and plots")
    compare.add_argument("--runs-dir", help="where trained runs go (default: OUTPUT/runs)")
    compare.add_argument("--seeds", help="train every config once per seed, in turn (e.g. 0,1,2); "
                         "rows show mean ± spread")
    compare.add_argument("--cost", default="params", help="the cost axis of the Pareto front: params "
                         "(trainable parameters, default), time (training time) or memory (peak memory)")
    compare.set_defaults(run=cmd_compare, overrides=[])
    ui = sub.add_parser("ui", help="a local web page to start, watch, stop, resume and compare runs")
    ui.add_argument("--runs", default="runs", 
                    help="the runs root: every run under it is shown (default: runs)")
    ui.add_argument("--host", default="127.0.0.1",
                    help="address to bind (default 127.0.0.1; any other needs the token printed at start)")
    ui.add_argument("--port", type=int, default=7860)
    ui.set_defaults(run=cmd_ui)
    return parser


def main(argv: list[str] | None = None) -> int:
    from tuneforge.errors import TuneforgeError

    # The CLI is the program, so it may set the process environment (importing tuneforge never does); the
    # training processes `compare` starts inherit it.
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # a hub lookup would hang ~50 s before failing
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # key=value overrides may come after options too (`train cfg.yaml --resume train.lr=1e-4`)
    if extra and (not hasattr(args, "overrides")
                  or not all("=" in item and not item.startswith("-") for item in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if extra:
        args.overrides = [*args.overrides, *extra]
    try:
        _quiet_libraries()
        return args.run(args)
    except TuneforgeError as exc:
        message = " ".join(str(exc).splitlines())  # one line, whatever a message quoted
        print(f"tuneforge: error: {message}", file=sys.stderr)
        return 2
    except Exception as exc:  # a failed write outside a run (a full disk during export): one line too
        from tuneforge.faults import as_os_error, describe_os_error

        failed = as_os_error(exc)
        if failed is None:
            raise
        print(f"tuneforge: error: {' '.join(describe_os_error(failed).splitlines())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("tuneforge: interrupted (checkpoints written so far are kept; resume with --resume)",
              file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
