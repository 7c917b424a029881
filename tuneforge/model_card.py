"""A `README.md` model card for an adapter or an exported model, in the Hugging Face Hub's format.

The Hub reads YAML front matter (huggingface.co/docs/hub/model-cards): `base_model`, `library_name`,
`tags`, `pipeline_tag`, and `model-index` for evaluation results. The card states what the run did from its
`config.yaml` and `results.json`: the strategies and their options, the data, the eval and retain metrics
before and after training, and the forgetting (retain metrics after minus before).
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tuneforge.checkpoint import write_atomic
from tuneforge.formatting import significant

MARKER = "<!-- written by tuneforge: replaced on the next export -->"
LIBRARIES = {"adapter": "peft", "merged": "transformers", "gguf": "gguf"}
PIPELINES = {"causal_lm": "text-generation", "classification": "text-classification"}


def base_model_id(model: str) -> str | None:
    """The Hub id of a bundled model, or of a local folder that names one in its config; None otherwise."""
    from tuneforge.models import BUNDLED_MODELS

    if model in BUNDLED_MODELS:
        return BUNDLED_MODELS[model].hub_id
    try:
        named = json.loads((Path(model) / "config.json").read_text()).get("_name_or_path", "")
    except (OSError, ValueError):
        return None
    parts = named.split("/") if isinstance(named, str) else []
    return named if len(parts) == 2 and all(parts) and not Path(named).exists() else None


def front_matter(results: dict, config: dict, kind: str, peft: bool = True) -> dict:
    """The card's metadata: Hub keys, and every before/after metric in `model-index` (`peft`: whether an
    adapter has PEFT's layout; one that does not is tuneforge's own)."""
    strategies = [next(iter(spec)) for spec in results.get("strategies", [])]
    task_type = results.get("task_type", "causal_lm")
    meta: dict = {}
    base = base_model_id(str(results.get("model", config.get("model", ""))))
    if base:
        meta["base_model"] = base
    meta["library_name"] = LIBRARIES[kind] if peft or kind != "adapter" else "tuneforge"
    meta["pipeline_tag"] = PIPELINES.get(task_type, "text-generation")
    meta["tags"] = ["tuneforge", *strategies, *(["gguf"] if kind == "gguf" else [])]
    metrics = []
    for split in ("eval", "retain"):
        for moment in ("before", "after"):
            for key, value in (results.get(moment, {}).get(split) or {}).items():
                if key != "tokens" and isinstance(value, (int, float)):
                    metrics.append({"type": f"{split}_{key}_{moment}", "value": value})
    for key, value in (results.get("forgetting") or {}).items():
        metrics.append({"type": f"forgetting_{key}", "value": value})
    if metrics:
        meta["model-index"] = [{"name": config.get("output") and Path(str(config["output"])).name or "run",
                                "results": [{"task": {"type": meta["pipeline_tag"]},
                                             "dataset": {"name": _data_name(config), "type": "custom"},
                                             "metrics": metrics}]}]
    return meta


def card_text(results: dict, config: dict, kind: str, peft: bool = True) -> str:
    """The whole card: front matter, then what the run did, in Markdown."""
    from tuneforge.strategies import default_parametrization

    meta = front_matter(results, config, kind, peft)
    model = results.get("model", config.get("model"))
    what = {"adapter": "an adapter for", "merged": "a merged fine-tune of",
            "gguf": "a GGUF export of a fine-tune of"}
    lines = ["---", yaml.safe_dump(meta, sort_keys=False).rstrip(), "---", MARKER, "",
             f"# {meta['model-index'][0]['name'] if 'model-index' in meta else 'tuneforge run'}", "",
             f"This is {what[kind]} `{meta.get('base_model', model)}`, trained with tuneforge.", "",
             "## Strategies", ""]
    for spec in results.get("strategies", []) or [{default_parametrization().name: {}}]:
        name, options = next(iter(spec.items()))
        shown = ", ".join(f"{k}={v}" for k, v in (options or {}).items())
        lines.append(f"- `{name}`{': ' + shown if shown else ''}")
    data = config.get("data") or {}
    lines += ["", "## Data", ""]
    if data.get("train"):
        lines.append(f"- train: `{data['train']}`")
    if data.get("eval"):
        lines.append(f"- eval: `{data['eval']}`")
    lines.append(f"- retain (forgetting measured on): `{config.get('retain')}`" if config.get("retain")
                 else "- retain: none (forgetting not measured)")
    if config.get("tasks"):
        lines.append(f"- tasks: {', '.join(str(t.get('name')) for t in config['tasks'])}")
    lines += ["", "## Results", "", "| split | metric | before | after | change |",
              "| --- | --- | --- | --- | --- |"]
    for split in ("eval", "retain"):
        before, after = results.get("before", {}).get(split) or {}, results.get("after", {}).get(split) or {}
        for key in (k for k in after if k != "tokens" and isinstance(after[k], (int, float))):
            old = before.get(key)
            change = significant(after[key] - old, 4, signed=True) if old is not None else "-"
            cells = [split, key, significant(old, 4), significant(after[key], 4), change]
            lines.append(f"| {' | '.join(cells)} |")
    forgetting = results.get("forgetting") or {}
    lines += ["", "## Forgetting", ""]
    if "loss" in forgetting:
        verdict = "rose (the model forgot some of it)" if forgetting["loss"] > 0 else "did not rise"
        lines.append(f"Loss on the retain set {verdict}: {significant(forgetting['loss'], 4, signed=True)} "
                     f"(perplexity {significant(forgetting.get('perplexity'), 4, signed=True)}).")
    else:
        lines.append("Not measured (no retain set).")
    trained = f"{results.get('trainable_params', 0):,} of {results.get('total_params', 0):,} parameters"
    steps = f"{results.get('steps')} steps, seed {results.get('seed')}"
    lines += ["", "## Training", "", f"{steps}, {trained} trained."]
    return "\n".join(lines) + "\n"


def write_card(directory: Path, results: dict, config: dict, kind: str) -> Path | None:
    """Write `directory/README.md` atomically; a README.md tuneforge did not write is kept (returns None)."""
    path = Path(directory) / "README.md"
    if path.is_file() and MARKER not in path.read_text(encoding="utf-8", errors="replace"):
        return None
    peft = (Path(directory) / "adapter_config.json").is_file()
    write_atomic(path, card_text(results, config, kind, peft))
    return path


def write_run_card(directory: Path, run_dir: Path, kind: str) -> Path | None:
    """`write_card` from a finished run directory's `results.json` and `config.yaml`."""
    results = json.loads((Path(run_dir) / "results.json").read_text())
    config = yaml.safe_load((Path(run_dir) / "config.yaml").read_text()) or {}
    return write_card(directory, results, config, kind)


def _data_name(config: dict) -> str:
    data = config.get("data") or {}
    if data.get("train"):
        return str(data["train"])
    return ", ".join(str(t.get("name")) for t in config.get("tasks") or []) or "data"
