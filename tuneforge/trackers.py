"""Experiment trackers (`report_to: [tensorboard, wandb, mlflow, aim]`) through Accelerate's tracker classes.

TensorBoard events are always written to the run directory (`tuneforge.metrics`). The others are
opened on the main process only, with the run directory's name as the run name and the resolved config
(flattened to dotted keys) as its parameters. They receive every metrics record (train loss, each
strategy's loss term, eval and retain metrics), then the run's results (before/after, forgetting,
benchmarks, costs) and its files (results.json, report.md, config.yaml, loss.png).

Where each one writes follows its own environment variables: `WANDB_PROJECT`, `WANDB_MODE=offline`,
`WANDB_DIR` (default: the run directory); `MLFLOW_TRACKING_URI`, `MLFLOW_EXPERIMENT_NAME`; `AIM_REPO`
(default: the runs folder). The project or experiment is `tuneforge` unless set there.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tuneforge.errors import ConfigError

if TYPE_CHECKING:
    from tuneforge.config import RunConfig

PROJECT = "tuneforge"
# report_to name -> (module, how to install)
EXTERNAL = {
    "wandb": ("wandb", "pip install wandb==0.31.0"),
    "mlflow": ("mlflow", "pip install mlflow-skinny==3.17.2"),
    "aim": ("aim", "pip install aim==3.29.1"),
}
ARTIFACTS = ("results.json", "report.md", "config.yaml", "loss.png")
START_HINTS = {
    "wandb": "log in with `wandb login`, or set WANDB_MODE=offline",
    "mlflow": "check MLFLOW_TRACKING_URI (a file: store needs MLFLOW_ALLOW_FILE_STORE=true)",
    "aim": "check AIM_REPO",
}


def check_trackers(config: RunConfig) -> None:
    """Every requested tracker is importable; else one line naming the config line and the install."""
    from tuneforge.config import config_location

    for name in config.report_to:
        if name in EXTERNAL and importlib.util.find_spec(EXTERNAL[name][0]) is None:
            raise ConfigError(f"{config_location(config, 'report_to')}: report_to: {name} is not installed "
                              f"({EXTERNAL[name][1]}, or pip install 'tuneforge[trackers]')")


def flatten(values: dict, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists as their string form (trackers take scalars as parameters)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, f"{name}."))
        elif value is None or isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = str(value)
    return flat


class Trackers:
    """The run's open trackers; steps stay increasing across the tasks of a sequence (W&B needs that)."""

    def __init__(self, trackers: list):
        self.trackers = trackers
        self.offset = 0  # added to a task's steps once they restart from 0
        self.last = -1

    def __bool__(self) -> bool:
        return bool(self.trackers)

    def log(self, values: dict[str, float], step: int) -> None:
        if step + self.offset < self.last:
            self.offset = self.last
        self.last = step + self.offset
        for tracker in self.trackers:
            tracker.log(values, step=self.last)

    def log_results(self, results: dict, run_dir: Path) -> None:
        """The run's outcome as metrics at its last step, and its files as artifacts."""
        if not self.trackers:
            return
        summary = {f"results/{k}": v for k, v in flatten(results).items()
                   if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.startswith(("before.samples", "after.samples"))}
        self.log(summary, max(self.last, 0))
        files = [run_dir / name for name in ARTIFACTS if (run_dir / name).is_file()]
        for tracker in self.trackers:
            _log_files(tracker, files, run_dir)

    def close(self) -> None:
        for tracker in self.trackers:
            tracker.finish()
        self.trackers = []


def open_trackers(config: RunConfig, run_dir: Path, main_process: bool = True) -> Trackers:
    """Start the trackers `report_to` names (besides TensorBoard) and log the resolved config."""
    names = [name for name in config.report_to if name in EXTERNAL]
    if not main_process or not names:
        return Trackers([])
    check_trackers(config)
    from accelerate.tracking import AimTracker, MLflowTracker, WandBTracker

    from tuneforge.config import config_location

    opened = []
    for name in names:
        if name == "wandb":
            tracker = WandBTracker(os.environ.get("WANDB_PROJECT", PROJECT), name=run_dir.name,
                                   dir=os.environ.get("WANDB_DIR", str(run_dir)))
        elif name == "mlflow":
            tracker = MLflowTracker(PROJECT, run_name=run_dir.name)
        else:
            tracker = AimTracker(run_dir.name, logging_dir=os.environ.get("AIM_REPO", str(run_dir.parent)))
        try:
            tracker.start()
            tracker.store_init_configuration(flatten(config.resolved_dict()))
        except Exception as exc:  # noqa: BLE001 - no login, an unreachable server: one line, not a traceback
            Trackers(opened).close()
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:160]
            raise ConfigError(f"{config_location(config, 'report_to')}: report_to: {name} could not start "
                              f"({type(exc).__name__}: {first}); {START_HINTS[name]}") from None
        opened.append(tracker)
    return Trackers(opened)


def _log_files(tracker, files: list[Path], run_dir: Path) -> None:
    if tracker.name == "wandb":
        for path in files:
            tracker.run.save(str(path), base_path=str(run_dir), policy="now")
    elif tracker.name == "mlflow":
        from mlflow.tracking import MlflowClient

        client = MlflowClient()
        for path in files:
            client.log_artifact(tracker.active_run.info.run_id, str(path))
    # Aim keeps metrics and parameters; its artifact store needs a separate setup, so files stay in the run
