"""Atomic checkpoints that resume a run exactly. Tensors in safetensors, everything else in JSON.

A checkpoint is a directory `checkpoints/step-00000100/` holding the trained weights, the optimizer and
scheduler state, the RNG states, each strategy's state, the loop position, and `manifest.json` with a
SHA-256 of every file. It is written into `step-00000100.tmp/`, fsynced, then renamed: a killed write
leaves only a `.tmp` directory, which is ignored. Nothing is ever unpickled.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file
from torch import Tensor, nn

from tuneforge.errors import TrainingError
from tuneforge.faults import save_tensors, tree_bytes, warn_if_short_of_space, writing

if TYPE_CHECKING:  # no runtime import: strategy modules import helpers from here
    from tuneforge.strategies import Strategy

MANIFEST = "manifest.json"
CHECKPOINT_NAME = re.compile(r"step-\d{8}")  # not `.tmp` (being written) nor `.old` (being replaced)
# files every checkpoint has: a manifest that lacks one is not a checkpoint, whatever else it lists
REQUIRED_FILES = ("weights.safetensors", "optimizer.safetensors", "strategies.safetensors", "rng.safetensors",
                  "state.json")


def save_checkpoint(
    root: Path,
    step: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    strategies: list[Strategy],
    loop_state: dict,
    keep: int,
    gathered: tuple[dict[str, Tensor], dict] | None = None,
) -> Path:
    """Write checkpoint `step` under `root` atomically, then keep only the newest `keep` checkpoints.

    A failed write (a full disk) removes its partial `.tmp` directory and raises the `OSError`; the
    checkpoints already there are untouched. Warns first when free space is below the last one's size.
    `gathered`: (weights, optimizer state) already made whole by a sharding engine (`tuneforge.engines`);
    else they are read from `model` and `optimizer`.
    """
    final = root / f"step-{step:08d}"
    tmp = root / f"step-{step:08d}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    previous = list_checkpoints(root)
    if previous:
        warn_if_short_of_space(root, tree_bytes(previous[-1]))
    try:
        _write_checkpoint(tmp, model, optimizer, scheduler, strategies, step, loop_state, gathered)
    except BaseException:  # a full disk, or a second signal mid-write: nothing half-written stays
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = root / f"step-{step:08d}.old"  # the same step written again: the old copy goes only after
    if final.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def _write_checkpoint(tmp: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                      strategies: list[Strategy], step: int, loop_state: dict,
                      gathered: tuple[dict[str, Tensor], dict] | None = None) -> None:
    """Every file of a checkpoint into the directory `tmp`, manifest last, all fsynced."""
    tmp.mkdir(parents=True)

    if gathered is None:
        names = {id(p): n for n, p in model.named_parameters()}
        params = [p for group in optimizer.param_groups for p in group["params"]]
        gathered = ({names[id(p)]: p.detach().cpu().contiguous() for p in params}, optimizer.state_dict())
    weights, optimizer_state = gathered
    save_tensors(weights, tmp / "weights.safetensors")

    opt_tensors, opt_meta = _split_optimizer_state(optimizer_state)
    save_tensors(opt_tensors, tmp / "optimizer.safetensors")

    strategy_meta = _write_strategy_state(tmp, strategies)

    rng = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        rng.update({f"cuda.{i}": s for i, s in enumerate(torch.cuda.get_rng_state_all())})
    save_tensors(rng, tmp / "rng.safetensors")

    state = {
        "step": step,
        "loop": loop_state,
        "optimizer": opt_meta,
        "scheduler": scheduler.state_dict(),
        "strategies": strategy_meta,
        "python_random": jsonable(random.getstate()),
    }
    with writing(tmp / "state.json"):
        (tmp / "state.json").write_text(json.dumps(state))
    manifest = {path.name: _sha256(path) for path in sorted(tmp.iterdir())}
    with writing(tmp / MANIFEST):
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    _fsync_dir_files(tmp)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints (renamed into place), oldest first."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and CHECKPOINT_NAME.fullmatch(p.name)]
    return sorted(p for p in found if (p / MANIFEST).is_file())


def latest_checkpoint(root: Path) -> Path | None:
    """The newest checkpoint whose files match their manifest checksums; damaged ones are skipped."""
    for path in reversed(list_checkpoints(root)):
        if verify_checkpoint(path):
            return path
    return None


def verify_checkpoint(path: Path) -> bool:
    """True when every file the manifest lists (all of `REQUIRED_FILES` among them) has its checksum."""
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        if not isinstance(manifest, dict) or not set(REQUIRED_FILES) <= set(manifest):
            return False
        if any(Path(name).name != name or name in (".", "..") for name in manifest):
            return False  # only files inside the checkpoint directory, never a path out of it
        return all(_sha256(path / name) == digest for name, digest in manifest.items())
    except (OSError, ValueError, TypeError):
        return False


def write_atomic(path: Path, text: str) -> None:
    """Write a small file so readers, and a resume after a kill, see the old or the new one, never half.
    A failed write (a full disk) removes its temporary and names `path`."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with writing(path), open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


def load_checkpoint(
    path: Path, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
    strategies: list[Strategy],
    place: Callable[[dict[str, Tensor], dict], None] | None = None,
) -> dict:
    """Restore everything `save_checkpoint` wrote; returns the loop state.

    `place(weights, optimizer_state)` puts whole tensors into a sharded model and optimizer (a sharding
    engine's `load_full_state`); else they are copied into `model` and loaded into `optimizer`."""
    if not verify_checkpoint(path):
        raise TrainingError(f"{path}: checkpoint is damaged (checksum mismatch); "
                            "delete it to resume from an older one")
    weights = load_file(str(path / "weights.safetensors"))
    parameters = dict(model.named_parameters())
    unknown = [name for name in weights if name not in parameters]
    if unknown:
        raise TrainingError(f"{path}: checkpoint does not fit this model/config (no parameter {unknown[0]})")
    state = json.loads((path / "state.json").read_text())
    optimizer_tensors = load_file(str(path / "optimizer.safetensors"))
    optimizer_state = _join_optimizer_state(optimizer_tensors, state["optimizer"])
    if place is not None:
        place(weights, optimizer_state)
    else:
        with torch.no_grad():
            for name, tensor in weights.items():
                parameters[name].copy_(tensor)
        optimizer.load_state_dict(optimizer_state)
    scheduler.load_state_dict(state["scheduler"])

    _read_strategy_state(path, state, strategies)

    rng = load_file(str(path / "rng.safetensors"))
    torch.set_rng_state(rng["torch"])
    if torch.cuda.is_available():
        cuda_states = [rng[k] for k in sorted(k for k in rng if k.startswith("cuda."))]
        if cuda_states:
            torch.cuda.set_rng_state_all(cuda_states)
    random.setstate(tuplify(state["python_random"]))
    return state["loop"]


def load_weights_and_strategies(path: Path, model: nn.Module, strategies: list[Strategy]) -> None:
    """Restore a checkpoint's trained weights and strategy state only (a continual run's finished task)."""
    if not verify_checkpoint(path):
        raise TrainingError(f"{path}: checkpoint is damaged (checksum mismatch)")
    parameters = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(path / "weights.safetensors")).items():
            parameters[name].copy_(tensor)
    _read_strategy_state(path, json.loads((path / "state.json").read_text()), strategies)


def save_strategy_state(path: Path, strategies: list[Strategy]) -> None:
    """Rewrite the strategy state of an existing checkpoint (after `on_task_end`), manifest included."""
    state_path = path / "state.json"
    state = json.loads(state_path.read_text())
    state["strategies"] = _write_strategy_state(path, strategies)
    tmp = path / "state.json.tmp"
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_path)
    manifest = {p.name: _sha256(p) for p in sorted(path.iterdir()) if p.name != MANIFEST}
    (path / (MANIFEST + ".tmp")).write_text(json.dumps(manifest, indent=1))
    os.replace(path / (MANIFEST + ".tmp"), path / MANIFEST)


def _write_strategy_state(directory: Path, strategies: list[Strategy]) -> dict:
    """Strategy tensors into strategies.safetensors; returns the JSON-able rest."""
    tensors, meta = {}, {}
    for strategy in strategies:
        for key, value in strategy.state_dict().items():
            if isinstance(value, Tensor):
                tensors[f"{strategy.name}.{key}"] = value.detach().cpu().contiguous()
            else:
                meta[f"{strategy.name}.{key}"] = value
    save_tensors(tensors, directory / "strategies.safetensors.tmp")
    os.replace(directory / "strategies.safetensors.tmp", directory / "strategies.safetensors")
    return meta


def _read_strategy_state(path: Path, state: dict, strategies: list[Strategy]) -> None:
    tensors = load_file(str(path / "strategies.safetensors"))
    for strategy in strategies:
        prefix = strategy.name + "."
        own = {k[len(prefix):]: v for k, v in {**tensors, **state["strategies"]}.items()
               if k.startswith(prefix)}
        strategy.load_state_dict(own)


def _split_optimizer_state(state_dict: dict) -> tuple[dict[str, Tensor], dict]:
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict] = {}
    for index, values in state_dict["state"].items():
        for key, value in values.items():
            if isinstance(value, Tensor):
                tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(index), {})[key] = value
    return tensors, {"param_groups": state_dict["param_groups"], "scalars": scalars}


def _join_optimizer_state(tensors: dict[str, Tensor], meta: dict) -> dict:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        index, _, name = key.partition(".")
        state.setdefault(int(index), {})[name] = value
    for index, values in meta["scalars"].items():
        state.setdefault(int(index), {}).update(values)
    return {"state": state, "param_groups": meta["param_groups"]}


def jsonable(value: Any) -> Any:
    return [jsonable(v) for v in value] if isinstance(value, tuple) else value


def tuplify(value: Any) -> Any:
    return tuple(tuplify(v) for v in value) if isinstance(value, list) else value


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        with writing(path):
            os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir_files(directory: Path) -> None:
    for path in directory.iterdir():
        _fsync(path)
    _fsync(directory)
