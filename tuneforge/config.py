"""YAML -> typed run config.

Unknown keys and wrong types are errors naming the file, the line and the field; `key=value` overrides
from the command line are applied before validation. Strategy options are validated by each strategy's
own options model (see `tuneforge.strategies`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from tuneforge.errors import ConfigError, shown


class StrictModel(BaseModel):
    """Base for config sections: unknown keys are errors, values are checked on assignment.

    Infinite and NaN numbers are refused everywhere (`lr: .inf` would pass `gt=0`).
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class TemplateConfig(StrictModel):
    """A prompt template: `{field}` placeholders filled from each record (prompt engineering)."""

    prompt: str
    completion: str | None = None  # defaults to the record's completion/output/answer field
    few_shot: int = Field(0, ge=0)  # solved examples from the training data prepended to every prompt
    separator: str = "\n\n"


class DataConfig(StrictModel):
    train: str
    eval: str | None = None
    format: Literal["auto", "text", "completion", "alpaca", "chat", "sharegpt", "classification"] = "auto"
    template: TemplateConfig | None = None
    eval_fraction: float = Field(0.1, gt=0, lt=1)  # held out when no eval file is given
    where: dict[str, list[str | int]] | None = None  # keep records whose field has one of these values
    max_train_examples: int | None = Field(None, ge=1)
    max_eval_examples: int | None = Field(200, ge=1)
    skip_invalid: bool = False  # leave out invalid records (counted, first ones shown in the report)

    @field_validator("template", mode="before")
    @classmethod
    def _template_shorthand(cls, value: Any) -> Any:
        return {"prompt": value} if isinstance(value, str) else value

    @field_validator("where", mode="before")
    @classmethod
    def _where_shorthand(cls, value: Any) -> Any:
        """`where: {label: sports}` means `where: {label: [sports]}`."""
        if isinstance(value, dict):
            return {k: [v] if isinstance(v, (str, int)) and not isinstance(v, bool) else v
                    for k, v in value.items()}
        return value


class TaskConfig(StrictModel):
    """One task of a multi-task or continual run."""

    name: str = Field(pattern=r"^[A-Za-z0-9_-]+$")
    data: DataConfig


class ScheduleConfig(StrictModel):
    """How several tasks are trained: mixed in one stream, or one after another (continual learning)."""

    mode: Literal["mixture", "sequence"] = "mixture"
    sampling: Literal["proportional", "temperature", "round_robin"] = "proportional"
    temperature: float = Field(2.0, gt=0)  # p_i ~ n_i^(1/T) for sampling: temperature


class TrainConfig(StrictModel):
    epochs: int = Field(1, ge=1)
    max_steps: int | None = Field(None, ge=0)  # optimizer steps; overrides epochs; 0 = evaluate only
    batch_size: int = Field(8, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(2e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["linear", "cosine", "constant"] = "linear"
    warmup_steps: int = Field(0, ge=0)
    max_grad_norm: float | None = Field(1.0, gt=0)
    max_seq_len: int = Field(256, ge=8)
    seed: int = 0
    precision: Literal["fp32", "bf16"] = "fp32"
    eval_every: int | None = Field(None, ge=1)  # optimizer steps between evals; None: at the end only
    save_every: int | None = Field(None, ge=1)  # optimizer steps between checkpoints; None: at the end
    keep_checkpoints: int = Field(2, ge=1)
    log_every: int = Field(10, ge=1)
    packing: bool = False
    gradient_checkpointing: bool = False
    compile: bool = False  # the transformer blocks through torch.compile while training (tuneforge.compiling)
    # wall-clock seconds for this process (`3h30m`, `90m`, `45s`): stop at a checkpoint before a job's limit
    max_time: float | None = Field(None, gt=0)

    @field_validator("max_time", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        from tuneforge.stopping import parse_duration

        return value if value is None or isinstance(value, bool) else parse_duration(value)


class BenchmarkConfig(StrictModel):
    """One lm-evaluation-harness task, run before and after training (`tuneforge.benchmarks`)."""

    task: str = Field(min_length=1)  # an lm-eval task or group name, or the bundled `trivia-mc`
    limit: int | None = Field(None, ge=1)  # documents per task (the first ones); None: all
    num_fewshot: int = Field(0, ge=0)
    path: str | None = None  # a task YAML file or a folder of them (lm-eval's include_path)

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value: Any) -> Any:
        """`- mmlu` means `- {task: mmlu}`."""
        return {"task": value} if isinstance(value, str) else value


class EvaluationConfig(StrictModel):
    retain_examples: int = Field(64, ge=1)  # max_seq_len-token chunks of retain text
    samples: int = Field(3, ge=0)  # greedy generations shown before and after training
    max_new_tokens: int = Field(48, ge=1)
    batch_size: int | None = Field(None, ge=1)  # defaults to train.batch_size
    benchmarks: list[BenchmarkConfig] = Field(default_factory=list)  # lm-eval tasks, before and after


class FsdpConfig(StrictModel):
    """FSDP2 (`torch.distributed.fsdp.fully_shard`) options; see docs/distributed.md."""

    reshard_after_forward: bool = True  # free gathered weights after each layer's forward (ZeRO-3-like)
    cpu_offload: bool = False  # keep the sharded parameters, gradients and AdamW state in CPU memory


class DistributedConfig(StrictModel):
    """How several processes share the work (launch with torchrun; one process runs unsharded)."""

    engine: Literal["ddp", "fsdp", "deepspeed"] = "ddp"
    fsdp: FsdpConfig = Field(default_factory=FsdpConfig)
    # a DeepSpeed config: a JSON file (relative to this config's directory) or the same mapping inline
    deepspeed: str | dict[str, Any] | None = None


class StrategySpec(StrictModel):
    """One entry of `strategies:`: a registered name and its validated options."""

    name: str
    options: BaseModel

    def as_dict(self) -> dict[str, dict]:
        return {self.name: self.options.model_dump(mode="json")}


class RunConfig(StrictModel):
    model: str = "smollm2-135m"
    data: DataConfig | None = None  # one task; or `tasks:` for several
    tasks: list[TaskConfig] | None = None
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    retain: str | None = "builtin:shakespeare"  # original-domain text; null turns retain measurement off
    strategies: list[StrategySpec] = Field(default_factory=list)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    distributed: DistributedConfig = Field(default_factory=DistributedConfig)
    output: str = "runs/run"
    trust_remote_code: bool = False
    # keep the frozen base's block linear weights quantized (tuneforge.quantize): QLoRA with lora
    quantize: Literal["none", "nf4", "fp4", "int8", "gguf"] = "none"
    # experiment trackers besides the run directory's TensorBoard events (tuneforge.trackers)
    report_to: list[Literal["tensorboard", "wandb", "mlflow", "aim"]] = Field(
        default_factory=lambda: ["tensorboard"])
    _origin: tuple = PrivateAttr(default=("<config>", None, ()))  # (file, YAML node tree, overrides)

    @model_validator(mode="after")
    def _check_composition(self) -> RunConfig:
        if (self.data is None) == (self.tasks is None):
            raise ValueError("give either `data:` (one task) or `tasks:` (several), not both or neither")
        if self.tasks is not None:
            if not self.tasks:
                raise ValueError("`tasks:` is empty")
            task_names = [task.name for task in self.tasks]
            if len(set(task_names)) != len(task_names):
                raise ValueError(f"task names must be unique (got {', '.join(task_names)})")
        names = [spec.name for spec in self.strategies]
        duplicates = sorted({name for name in names if names.count(name) > 1})
        if duplicates:
            raise ValueError(f"strategy listed twice: {', '.join(duplicates)}")
        return self

    @field_validator("report_to", mode="before")
    @classmethod
    def _report_to_shorthand(cls, value: Any) -> Any:
        """`report_to: wandb` means `[wandb]`; `none` or null means TensorBoard only."""
        if value is None or value == "none":
            return []
        return [value] if isinstance(value, str) else value

    def task_list(self) -> list[TaskConfig]:
        """The run's tasks; a single `data:` section is one task named `task`."""
        return self.tasks if self.tasks is not None else [TaskConfig(name="task", data=self.data)]

    def resolved_dict(self) -> dict[str, Any]:
        """The config as plain YAML-able data, strategies back in their single-key form."""
        data = self.model_dump(mode="json", exclude={"strategies"})
        data["strategies"] = [spec.as_dict() for spec in self.strategies]
        return data


def parse_strategies(value: Any) -> list[StrategySpec]:
    """Turn `[{"lora": {...}}, "full", ...]` into validated `StrategySpec`s.

    Raises `StrategyOptionsError` carrying the path of the bad field, so the caller can name its line.
    """
    from tuneforge.strategies import REGISTRY

    if value is None:
        return []
    if not isinstance(value, list):
        raise StrategyOptionsError((), "must be a list of single-key entries such as `- lora: {rank: 8}`")
    specs = []
    for index, item in enumerate(value):
        if isinstance(item, StrategySpec):
            specs.append(item)
            continue
        if isinstance(item, str):
            item = {item: {}}
        if not isinstance(item, dict) or len(item) != 1:
            raise StrategyOptionsError((index,), "each entry has exactly one key, the strategy name "
                                                 "(e.g. `- lora: {rank: 8}`)")
        (name, options), = item.items()
        if name not in REGISTRY:
            raise StrategyOptionsError((index, name),
                                       f"unknown strategy (available: {', '.join(sorted(REGISTRY))})")
        options_model = REGISTRY[name].options
        try:
            specs.append(StrategySpec(name=name, options=options_model.model_validate(options or {})))
        except ValidationError as exc:
            error = exc.errors()[0]
            loc = tuple(error["loc"])
            if error["type"] == "extra_forbidden":
                message = f"unknown option (allowed: {', '.join(sorted(options_model.model_fields))})"
            else:
                got = error.get("input")
                hidden = error["type"] == "missing" or isinstance(got, dict)
                got_text = "" if hidden else f" (got {shown(got)})"
                message = error["msg"].removeprefix("Value error, ") + got_text
            raise StrategyOptionsError((index, name, *loc), message) from None
    return specs


class StrategyOptionsError(ValueError):
    def __init__(self, loc: tuple, message: str):
        super().__init__(message)
        self.loc, self.message = loc, message


# ---------------------------------------------------------------------------------------------------
# Loading, overrides and error messages with line numbers


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config, apply `key=value` overrides, validate, and resolve paths.

    Data, retain and model paths are resolved relative to the config file; `output` relative to the
    current directory (where the user wants results).
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        line = path.read_bytes().count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"{path}:{line}: not valid UTF-8 (save the config as UTF-8)") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config ({exc.strerror or exc})") from None
    try:
        # safe_load builds plain data only: tags such as !!python/object are errors, never code
        root = yaml.compose(text)
        raw = yaml.safe_load(text)
    except RecursionError:
        raise ConfigError(f"{path}: invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, OverflowError) as exc:  # e.g. a timestamp such as 2024-13-01
        raise ConfigError(f"{path}: invalid YAML value: {shown(str(exc), 120)[1:-1]}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        position = getattr(exc, "position", None)
        if mark is not None:
            line = f":{mark.line + 1}"
        elif isinstance(position, int):  # a ReaderError (a character YAML forbids): a position, no mark
            line = ":" + str(text.count("\n", 0, position) + 1)
        else:
            line = ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}{line}: invalid YAML: {shown(problem, 120)[1:-1]}") from None
    if root is not None:
        refuse_duplicate_keys(root, path)
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of sections "
                          "(model, data, strategies, train ...)")
    for override in overrides or []:
        apply_override(raw, override)
    config = validate_config(raw, source=str(path), root=root, overrides=overrides or [])
    config._origin = (str(path), root, tuple(overrides or ()))
    return resolve_paths(config, path.parent)


def refuse_duplicate_keys(root: yaml.Node, path: Path) -> None:
    """A key given twice in one mapping (a second `train:` block) is an error naming both lines: YAML
    loaders keep the last silently, which would drop every setting of the first."""
    seen_nodes: set[int] = set()
    pending: list[tuple[yaml.Node, str]] = [(root, "")]
    while pending:
        node, where = pending.pop()
        if id(node) in seen_nodes:  # aliases share nodes: each is checked once (no alias bomb)
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            lines: dict[str, int] = {}
            for key, value in node.value:
                name = key.value if isinstance(key, yaml.ScalarNode) else None
                dotted = f"{where}.{name}" if where else str(name)
                if name is not None and name != "<<":
                    if name in lines:
                        raise ConfigError(f"{path}:{key.start_mark.line + 1}: {shown(dotted)[1:-1]} is given "
                                          f"twice (lines {lines[name]} and {key.start_mark.line + 1}); "
                                          f"the second would silently replace the first: merge them")
                    lines[name] = key.start_mark.line + 1
                pending.append((value, dotted))
        elif isinstance(node, yaml.SequenceNode):
            pending.extend((item, f"{where}[{index}]") for index, item in enumerate(node.value))


def config_location(config: RunConfig, dotted: str) -> str:
    """`file:line` of a config field, for problems found after validation (e.g. against the model)."""
    source, root, overrides = config._origin
    if any(o.split("=", 1)[0].strip() == dotted for o in overrides):
        return f"{source} (override {dotted})"
    parts = [int(part) if part.isdigit() else part for part in dotted.split(".")]
    return f"{source}:{_line_of(root, parts)}" if root is not None else source


def validate_config(
    raw: dict, source: str = "<config>", root: yaml.Node | None = None, overrides: list[str] | None = None
) -> RunConfig:
    raw = dict(raw)
    try:
        raw["strategies"] = parse_strategies(raw.get("strategies"))
    except StrategyOptionsError as exc:
        loc = ["strategies", *exc.loc]
        dotted = ".".join(str(part) for part in loc)
        where = f"{source}:{_line_of(root, loc)}" if root is not None else source
        raise ConfigError(f"{where}: {dotted}: {exc.message}") from None
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source, root, overrides or [])) from None


def apply_override(raw: dict, override: str) -> None:
    """Apply `train.lr=1e-4` (the value is parsed as YAML) to the raw config mapping."""
    key, sep, value = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r}: expected key=value, e.g. train.lr=1e-4")
    parts = key.strip().split(".")
    node = raw
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is not a section")
        node = child
    try:
        node[parts[-1]] = yaml.safe_load(value)
    except yaml.YAMLError:
        node[parts[-1]] = value


def resolve_paths(config: RunConfig, base: Path) -> RunConfig:
    def resolve(value: str | None) -> str | None:
        if value is None or value.startswith("builtin:") or Path(value).is_absolute():
            return value
        candidate = base / value
        return str(candidate) if candidate.exists() or not Path(value).exists() else value

    for data in [task.data for task in config.task_list()]:
        data.train = resolve(data.train)
        data.eval = resolve(data.eval)
    config.retain = resolve(config.retain)
    if "/" in config.model or Path(config.model).suffix:
        config.model = resolve(config.model)
    for spec, name, value in _path_options(config):
        setattr(spec.options, name, resolve(value))
    for benchmark in config.evaluation.benchmarks:
        benchmark.path = resolve(benchmark.path)
    return config


def _path_options(config: RunConfig):
    """Strategy options that name a file or folder, as each strategy declares (`path_options`)."""
    from tuneforge.strategies import REGISTRY

    for spec in config.strategies:
        for name, keywords in REGISTRY[spec.name].cls.path_options.items():
            value = getattr(spec.options, name, None)
            if isinstance(value, str) and value not in keywords:
                yield spec, name, value


def check_output_location(config: RunConfig) -> None:
    """Refuse an `output` that would put a run where it can destroy what it did not make.

    The rule: a run directory is not the filesystem root, not the home directory, and holds none of the
    run's inputs (model folder, data files, retain file, teacher). `--overwrite` clears run files there, and
    results written among the inputs could replace them.
    """
    output = Path(config.output).expanduser().resolve()
    where = config_location(config, "output")
    if output == Path(output.anchor) or output == Path.home().resolve():
        raise ConfigError(f"{where}: output: {config.output!r} is {output}; "
                          "give a directory of its own, e.g. runs/NAME")
    inputs = [config.model, config.retain] + [v for task in config.task_list()
                                              for v in (task.data.train, task.data.eval)]
    inputs += [value for _, _, value in _path_options(config)]
    for value in inputs:
        if not value or value.startswith("builtin:") or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if path == output or output in path.parents:
            raise ConfigError(
                f"{where}: output: {config.output!r} holds the input {value}; a run writes (and --overwrite "
                "clears) files there, so give it a directory of its own, e.g. runs/NAME"
            )


def _describe(exc: ValidationError, source: str, root: yaml.Node | None, overrides: list[str]) -> str:
    error = exc.errors()[0]
    loc = [part for part in error["loc"] if not (isinstance(part, str) and part in _PYDANTIC_WRAPPERS)]
    dotted = ".".join(str(part) for part in loc) or "<root>"
    if any(o.split("=", 1)[0].strip() == dotted for o in overrides):
        where = f"{source} (override {dotted})"
    else:
        where = f"{source}:{_line_of(root, loc)}" if root is not None else source
    if error["type"] == "extra_forbidden":
        allowed = _allowed_keys(loc[:-1])
        hint = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f"{where}: {dotted}: unknown key{hint}"
    message = error["msg"].removeprefix("Value error, ")
    got = error.get("input")
    hidden = error["type"] in ("missing", "value_error") or isinstance(got, dict)
    got_text = "" if hidden else f" (got {shown(got)})"
    return f"{where}: {dotted}: {message}{got_text}"


_PYDANTIC_WRAPPERS = {"function-after", "function-before", "tagged-union"}


def _allowed_keys(loc: list) -> list[str]:
    model: type[BaseModel] | None = RunConfig
    for part in loc:
        if model is None:
            return []
        if isinstance(part, int):
            continue
        field = model.model_fields.get(str(part))
        if field is None:  # a strategy name inside `strategies`
            from tuneforge.strategies import REGISTRY

            model = REGISTRY[part].options if part in REGISTRY else None
            continue
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        model = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
    return sorted(model.model_fields) if model is not None else []


def _line_of(root: yaml.Node | None, loc: list) -> int:
    """1-based line of the deepest YAML node on the error's path."""
    node, line = root, (root.start_mark.line + 1 if root is not None else 1)
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            match = next(((k, v) for k, v in node.value if k.value == str(part)), None)
            if match is None:
                # `strategies[i].lora.rank`: pydantic's path skips the strategy name; look one level down
                if len(node.value) == 1 and isinstance(node.value[0][1], yaml.MappingNode):
                    inner = next((v for k, v in node.value[0][1].value if k.value == str(part)), None)
                    if inner is not None:
                        node, line = inner, inner.start_mark.line + 1
                        continue
                break
            node, line = match[1], match[0].start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            break
    return line
