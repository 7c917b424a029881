"""What the page starts: `tuneforge train` as a detached process (it outlives the page's server, and the
page finds it again through its status.json), stop (SIGTERM: the run stops at a checkpoint), resume,
and the short commands (`validate`'s checks, `inspect`, `compare`, `generate`, `export`).

Everything a run directory holds is written by `tuneforge` itself; the page keeps its own files under the
runs root: `configs/` (saved configs) and `.ui/` (logs of the runs it started, comparisons, exports).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
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


def run_short(args: list[str], timeout: float, cwd: Path) -> tuple[int, str]:
    """A short `tuneforge` command; its exit code and output (stderr after stdout)."""
    try:
        done = subprocess.run(tuneforge_command(*args), capture_output=True, text=True, timeout=timeout,
                              env=child_env(), cwd=cwd, stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return 124, f"tuneforge {args[0]}: no answer within {timeout:.0f} s"
    return done.returncode, (done.stdout + done.stderr).strip()


ERROR_LINE = re.compile(r"^(?P<file>[^:\n]+?\.ya?ml):(?P<line>\d+): ")


def check_config(root: Path, text: str, name: str) -> dict:
    """What `tuneforge validate` says about the editor's text, saved as `configs/NAME.yaml` would be
    (relative paths resolve against `configs/`): {ok, message, line}."""
    from tuneforge.config import load_config
    from tuneforge.errors import TuneforgeError
    from tuneforge.run import validate_run

    configs = root / CONFIGS
    configs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=configs, prefix=".check-", suffix=".yaml", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(text)
    path = Path(handle.name)
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
    """`tuneforge inspect --json` of the editor's text (its own process: a real model is loaded)."""
    configs = root / CONFIGS
    configs.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=configs, prefix=".inspect-", suffix=".yaml", delete=False,
                                     encoding="utf-8") as handle:
        handle.write(text)
    try:
        code, output = run_short(["inspect", handle.name, "--json"], 600, root)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if code != 0:
        return {"ok": False, "message": output.splitlines()[-1] if output else f"exit code {code}"}
    report = json.loads(output.splitlines()[-1])
    return {"ok": True, "total_params": report["total_params"],
            "trainable_params": report["trainable_params"],
            "trainable_by_strategy": report["trainable_by_strategy"], "matched": report["matched"]}


def compare_runs(root: Path, run_ids: list[str]) -> tuple[str, int, str]:
    """`tuneforge compare RUN... --output .ui/compare/KEY`: (KEY, exit code, output)."""
    key = hashlib.sha256("\n".join(sorted(run_ids)).encode()).hexdigest()[:12]
    output = root / UI_DIR / "compare" / key
    code, text = run_short(["compare", *(str(root / r) for r in run_ids), "--output", str(output)], 600, root)
    return key, code, text


def generate(root: Path, model_or_run: str, prompt: str, max_new_tokens: int) -> str:
    code, text = run_short(["generate", model_or_run, "--prompt", prompt, "--max-new-tokens",
                            str(max_new_tokens)], 600, root)
    return text if code == 0 else f"(failed) {text.splitlines()[-1] if text else code}"


def export_merged(root: Path, run_id: str) -> tuple[int, str, Path]:
    output = root / "exports" / f"{flat(run_id)}-merged"
    code, text = run_short(["export", str(root / run_id), "--merged", str(output)], 600, root)
    return code, text, output
