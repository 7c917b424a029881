"""Trade-off arithmetic for comparisons: the Pareto front and the mean ± spread over seeds."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence

SEED_SUFFIX = re.compile(r"-seed(\d+)$")


def dominates(a: Sequence[float], b: Sequence[float]) -> bool:
    """`a` is at least as good as `b` in every objective and better in one (all objectives minimized)."""
    return all(x <= y for x, y in zip(a, b)) and any(x < y for x, y in zip(a, b))


def pareto_front(points: Sequence[Sequence[float]]) -> list[int]:
    """Indices of the points no other point dominates, in input order; every objective is minimized
    (negate one to maximize it). Equal points are all kept."""
    return [i for i, point in enumerate(points)
            if not any(dominates(other, point) for j, other in enumerate(points) if j != i)]


def mean_spread(values: Sequence[float | None]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n - 1) of the finite values; the spread is None below two."""
    finite = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return None, None
    mean = sum(finite) / len(finite)
    if len(finite) < 2:
        return mean, None
    return mean, math.sqrt(sum((v - mean) ** 2 for v in finite) / (len(finite) - 1))


def seed_group(run_name: str) -> tuple[str, int | None]:
    """`lora-seed2` -> (`lora`, 2): runs that differ only by their seed suffix form one row."""
    match = SEED_SUFFIX.search(run_name)
    if match is None:
        return run_name, None
    return run_name[:match.start()], int(match.group(1))


def aggregate(runs: Sequence[dict], numeric: Sequence[str]) -> dict:
    """One row from the rows of one configuration's seeds: the first run's other fields, each numeric
    field's mean, and `spread` holding each field's standard deviation over seeds (None for one seed)."""
    row = dict(runs[0])
    row["spread"] = {}
    for key in numeric:
        mean, spread = mean_spread([run.get(key) for run in runs])
        if isinstance(runs[0].get(key), int) and mean is not None and spread in (None, 0.0):
            mean = runs[0][key]  # a count that is the same in every seed stays an int
        row[key], row["spread"][key] = mean, spread
    return row
