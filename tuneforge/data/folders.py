"""Data folders and Arrow files: Hugging Face `datasets` folders, shard folders, and `.arrow` files.

Read with pyarrow alone (no `datasets` needed):

- a `Dataset.save_to_disk` folder: `state.json` lists its `data-*.arrow` files (Arrow IPC streams);
- a `DatasetDict.save_to_disk` folder (`dataset_dict.json`) holds one such folder per split: point at
  the split, e.g. `data/squad/train`;
- any other folder: its data files (`*.parquet`, `*.arrow`, `*.jsonl`, ...) of one kind, in name order,
  as a hub snapshot or `to_parquet` shards leave them (`train-00000-of-00004.parquet`, ...);
- an `.arrow` file: an Arrow IPC stream (what `datasets` writes) or IPC file (Feather v2).

Records are numbered by row within their file (1-based), so an error names the shard and the row.
"""

from __future__ import annotations

import json
from pathlib import Path

from tuneforge.errors import DataError


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:200] if str(exc).strip() else type(exc).__name__


def read_arrow_rows(path: Path) -> list[dict]:
    """Every row of an Arrow IPC stream or file, as dicts."""
    import pyarrow as pa

    source = str(path)
    try:
        with pa.memory_map(source) as mapped:
            try:
                table = pa.ipc.open_stream(mapped).read_all()
            except pa.ArrowInvalid:
                mapped.seek(0)
                table = pa.ipc.open_file(mapped).read_all()
        return table.to_pylist()
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"{source}: not a readable Arrow file: {_first_line(exc)}") from None


def folder_files(folder: Path, extensions: tuple[str, ...]) -> list[Path]:
    """The data files a folder stands for, in reading order; a `DataError` when it holds none or a mix."""
    source = str(folder)
    if (folder / "dataset_dict.json").is_file():
        splits = _json(folder / "dataset_dict.json").get("splits")
        names = ", ".join(map(str, splits)) if isinstance(splits, list) else "see dataset_dict.json"
        first = splits[0] if isinstance(splits, list) and splits else "train"
        raise DataError(
            f"{source}: a dataset with several splits ({names}); point at one split's folder, "
            f"e.g. {folder / str(first)}"
        )
    if (folder / "state.json").is_file():
        return _save_to_disk_files(folder)
    found = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in extensions)
    kinds = sorted({p.suffix.lower() for p in found})
    if not found:
        raise DataError(
            f"{source}: folder holds no data files ({', '.join(extensions)}) and is not a saved "
            "Hugging Face dataset (no state.json)"
        )
    if len(kinds) > 1:
        raise DataError(
            f"{source}: folder mixes data files of several kinds ({', '.join(kinds)}); "
            "keep one kind of shard per folder"
        )
    return found


def _json(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DataError(f"{path}: not a readable JSON file: {_first_line(exc)}") from None
    if not isinstance(value, dict):
        raise DataError(f"{path}: expected a JSON object")
    return value


def _save_to_disk_files(folder: Path) -> list[Path]:
    state_file = folder / "state.json"
    entries = _json(state_file).get("_data_files")
    if not isinstance(entries, list) or not entries:
        raise DataError(f'{state_file}: field "_data_files" must list the data-*.arrow files')
    files = []
    for index, entry in enumerate(entries):
        name = entry.get("filename") if isinstance(entry, dict) else None
        if not isinstance(name, str) or Path(name).name != name:
            raise DataError(f"{state_file}: _data_files[{index}].filename must be a file name in the folder")
        if not (folder / name).is_file():
            raise DataError(f"{state_file}: _data_files[{index}]: {folder / name} not found")
        files.append(folder / name)
    return files
