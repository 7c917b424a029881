"""What the experiment scripts share about runs over seeds: where a seed's run directories live, collecting
the finished ones, and the `mean (min .. max)` their tables show."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from pathlib import Path


def seed_dir(out: Path, seed: int) -> Path:
    """Where one seed's run directories live: OUT/seedS."""
    return out / f"seed{seed}"


def collect_by_seed(out: Path, names: Iterable[str], summary: Callable[[str, Path], dict | None]) -> dict:
    """Every finished run under `out`, by variant and seed (`summary` reads one run directory, None when it
    has not finished), as the scripts' `record` writes it."""
    seeds = sorted(int(d.name.removeprefix("seed")) for d in out.glob("seed*") if d.name[4:].isdigit())
    variants = {}
    for name in names:
        runs = {str(seed): summary(name, seed_dir(out, seed) / name) for seed in seeds}
        variants[name] = {seed: run for seed, run in runs.items() if run is not None}
    return {"variants": variants}


def spread(values: list[float], scale: float = 1.0, digits: int = 3, sign: str = "", unit: str = "") -> str:
    """mean (min .. max) of `values` times `scale`; the bare value for one run."""
    mean = sum(values) / len(values)
    shown = [f"{v * scale:{sign}.{digits}f}{unit}" for v in (mean, min(values), max(values))]
    return shown[0] if len(values) == 1 else f"{shown[0]} ({shown[1]} .. {shown[2]})"
