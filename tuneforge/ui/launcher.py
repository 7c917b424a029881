"""What the page starts: `tuneforge train` as a detached process (it outlives the page's server, and the
page finds it again through its status.json), stop (SIGTERM: the run stops at a checkpoint), resume,
and what the commands `validate`, `inspect`, `compare`, `generate` and `export` do, through their own
functions, in the page's process.

Everything a run directory holds is written by `tuneforge` itself; the page keeps its own files under the
runs root: `configs/` (saved configs) and `.ui/` (logs of the runs it started, comparisons, exports).
"""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from tuneforge.run_status import process_alive, read_record, run_state

CONFIGS = "configs"
UI_DIR = ".ui"
_started: dict[Path, subprocess.Popen] = {}  # by run directory; polled, so an ended run is no zombie


def reap() -> None:
    for child in _started.values():
        child.poll()


def launch_state(run_dir: Path) -> tuple[str, str | None] | None:
    """The state of a run this server started, until its process records its own (`starting` while it
    loads; `failed` with the log's last line if it ended before it could, e.g. on a config error)."""
    child = _started.get(run_dir.resolve())
    if child is None or (read_record(run_dir) or {}).get("pid") == child.pid:
        return None
    if child.poll() is None:
        return "starting", None
    if child.returncode == 0:
        return None
    lines = [line for line in log_path_of(run_dir).read_text(errors="replace").splitlines() if line.strip()] \
        if log_path_of(run_dir).is_file() else []
    return "failed", (lines[-1] if lines else f"exit code {child.returncode}")


def started_ids(root: Path) -> list[str]:
    """Runs this server started whose directories may not hold a config.yaml yet."""
    return [path.relative_to(root.resolve()).as_posix() for path in _started
            if path.is_relative_to(root.resolve()) and launch_state(path) is not None]


def tuneforge_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "tuneforge.cli", *args]


def child_env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}


def flat(run_id: str) -> str:
    return run_id.replace("/", "__")


def log_path(root: Path, run_id: str) -> Path:
    return root / UI_DIR / "logs" / f"{flat(run_id)}.log"


_logs: dict[Path, Path] = {}  # run directory -> its log, for the runs this server started


def log_path_of(run_dir: Path) -> Path:
    return _logs.get(run_dir.resolve(), run_dir / ".no-log")


def shown_command(root: Path, config_name: str, run_name: str) -> str:
    """The command line that does what the page's Start does."""
    return shlex.join(["tuneforge", "train", str(root / CONFIGS / f"{config_name}.yaml"), "--output",
                       str(root / run_name)])


def start_train(root: Path, run_id: str, config_file: Path, resume: bool = False) -> int:
    """Start `tuneforge train` detached (its own session: a page restart or Ctrl-C leaves it running)."""
    log = log_path(root, run_id)
    log.parent.mkdir(parents=True, exist_ok=True)
    args = ["train", str(config_file), "--output", str(root / run_id)] + (["--resume"] if resume else [])
    with open(log, "ab") as handle:
        handle.write(f"$ {shlex.join(['tuneforge', *args])}\n".encode())
        handle.flush()
        child = subprocess.Popen(tuneforge_command(*args), stdin=subprocess.DEVNULL, stdout=handle,
                                 stderr=subprocess.STDOUT, start_new_session=True, env=child_env(),
                                 cwd=root)
    _started[(root / run_id).resolve()] = child
    _logs[(root / run_id).resolve()] = log
    return child.pid


def stop_train(run_dir: Path) -> str | None:
    """SIGTERM to the run's own process (as its status.json names it); None when nothing runs there."""
    reap()
    state, record = run_state(run_dir)
    if state != "running" or not process_alive(record):
        return None
    os.kill(record["pid"], signal.SIGTERM)
    return f"SIGTERM sent to process {record['pid']}: the run stops after this step, with a checkpoint"


def resume_train(root: Path, run_id: str) -> int:
    """`tuneforge train RUN/config.yaml --resume --output RUN`: the run's own resolved config."""
    run_dir = root / run_id
    return start_train(root, run_id, run_dir / "config.yaml", resume=True)


def one_at_a_time():
    """Model-loading work of the page (inspect, compare, chat, export) runs in its process, one at a time:
    a second request waits rather than doubling the memory."""
    return _heavy


_heavy = threading.Lock()


ERROR_LINE = re.compile(r"^(?P<file>[^:\n]+?\.ya?ml):(?P<line>\d+): ")


def check_config(root: Path, text: str, name: str) -> dict:
    """What `tuneforge validate` says about the editor's text, saved as `configs/NAME.yaml` would be
    (relative paths resolve against `configs/`): {ok, message, line}."""
    from tuneforge.config import load_config
    from tuneforge.errors import TuneforgeError
    from tuneforge.run import validate_run

    path = _checked_copy(root, text, ".check-")
    try:
        summary = validate_run(load_config(path))
    except TuneforgeError as exc:
        message = " ".join(str(exc).splitlines()).replace(str(path), f"{name}.yaml")
        match = ERROR_LINE.match(message)
        return {"ok": False, "message": message, "line": int(match["line"]) if match else None}
    finally:
        path.unlink(missing_ok=True)
    labels = f", labels: {', '.join(summary['labels'])}" if summary["labels"] else ""
    return {"ok": True, "line": None,
            "message": (f"ok ({summary['task_type']}: {summary['train_examples']} train, "
                        f"{summary['eval_examples']} eval examples{labels})")}


def inspect_config(root: Path, text: str) -> dict:
    """The parameter counts of `tuneforge inspect` for the editor's text (the model is built, no weight
    trained; the memory estimate is left to the command)."""
    from tuneforge.config import load_config
    from tuneforge.errors import TuneforgeError
    from tuneforge.run import inspect_config as inspect

    path = _checked_copy(root, text, ".inspect-")
    try:
        with one_at_a_time():
            report = inspect(load_config(path))
    except TuneforgeError as exc:
        return {"ok": False, "message": " ".join(str(exc).splitlines()).replace(str(path), "config.yaml")}
    finally:
        path.unlink(missing_ok=True)
    return {"ok": True, "total_params": report["total_params"],
            "trainable_params": report["trainable_params"],
            "trainable_by_strategy": report["trainable_by_strategy"], "matched": report["matched"]}


def _checked_copy(root: Path, text: str, prefix: str) -> Path:
    """The editor's text as a file in `configs/` (so relative paths resolve as they will when saved)."""
    configs = root / CONFIGS
    configs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=configs, prefix=prefix, suffix=".yaml", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(text)
    return Path(handle.name)


def compare_runs(root: Path, run_ids: list[str]) -> tuple[str, str | None]:
    """`tuneforge compare RUN... --output .ui/compare/KEY` for finished runs: (KEY, error or None)."""
    from tuneforge.compare import compare
    from tuneforge.errors import TuneforgeError

    key = hashlib.sha256("\n".join(sorted(run_ids)).encode()).hexdigest()[:12]
    output = root / UI_DIR / "compare" / key
    sources = [str(root / r) for r in run_ids]
    command = shlex.join(["tuneforge", "compare", *sources, "--output", str(output)])
    try:
        with one_at_a_time():
            compare(sources, output, command=command)
    except TuneforgeError as exc:
        return key, " ".join(str(exc).splitlines())
    return key, None


def generate(model_or_run: str, prompt: str, max_new_tokens: int) -> str:
    """`tuneforge generate MODEL_OR_RUN --prompt ...`."""
    from tuneforge.cli import generate_reply
    from tuneforge.errors import TuneforgeError

    try:
        with one_at_a_time():
            return generate_reply(model_or_run, prompt, max_new_tokens=max_new_tokens)
    except TuneforgeError as exc:
        return f"(failed) {exc}"


def export_gguf(root: Path, run_id: str) -> tuple[str | None, Path]:
    """`tuneforge export RUN --gguf exports/RUN/RUN-q8_0.gguf --quant q8_0`: (error or None, the file)."""
    from tuneforge.cli import export_run
    from tuneforge.errors import TuneforgeError

    folder = root / "exports" / f"{flat(run_id)}-gguf"
    output = folder / f"{flat(run_id)}-q8_0.gguf"
    try:
        with one_at_a_time():
            folder.mkdir(parents=True, exist_ok=True)
            export_run(root / run_id, None, output, "q8_0")
    except TuneforgeError as exc:
        return " ".join(str(exc).splitlines()), output
    return None, output


def export_merged(root: Path, run_id: str) -> tuple[str | None, Path]:
    """`tuneforge export RUN --merged exports/RUN-merged`: (error or None, output folder)."""
    from tuneforge.cli import export_run
    from tuneforge.errors import TuneforgeError

    output = root / "exports" / f"{flat(run_id)}-merged"
    try:
        with one_at_a_time():
            export_run(root / run_id, output)
    except TuneforgeError as exc:
        return " ".join(str(exc).splitlines()), output
    return None, output
