"""One number format for every table tuneforge prints (terminal, Markdown, HTML).

The policy:
- a quantity on a linear scale (loss, perplexity, a change in %) is shown with the same number of
  decimals in every cell of its column, chosen so that the column's largest value gets the quantity's
  significant figures (`decimals_for`): `1.407`, `3.310`, `0.781` - never `1.407`, `3.31`, `0.781`;
- a quantity that spans orders of magnitude (sizes, times, throughput) gets its significant figures per
  value (`significant`): `513`, `18.7`, `0.0359`;
- counts are compact with an SI suffix (`si_count`): `135 M`, `57.6 k`, `0`;
- thousands are separated (`3,354`); changes carry a sign and, next to the absolute change, the relative
  change in % (`-1.903 (-57.5%)`); a spread over seeds follows the mean as `1.407 ± 0.012`;
- units live in the headers, so cells hold numbers only; a missing value is `-`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

MISSING = "-"
MINUS = "-"  # plain ASCII, so terminals and Markdown renderers align columns alike


def _finite(value: float | None) -> bool:
    return value is not None and isinstance(value, (int, float)) and math.isfinite(value)


def decimals_for(values: Iterable[float | None], sig: int = 3, min_decimals: int = 0,
                 max_decimals: int = 6) -> int:
    """Decimals that give the largest |value| `sig` significant figures, within the given bounds."""
    magnitudes = [abs(v) for v in values if _finite(v) and v != 0]
    if not magnitudes:
        return min_decimals
    order = math.floor(math.log10(max(magnitudes)))
    return min(max_decimals, max(min_decimals, sig - 1 - order))


def fixed(value: float | None, decimals: int, signed: bool = False) -> str:
    """`value` with `decimals` decimals and thousands separators; a sign when `signed` (zero has none)."""
    if not _finite(value):
        return MISSING
    rounded = round(float(value), decimals)
    if rounded == 0:
        rounded = 0.0  # no "-0.000"
    sign = "+" if signed and rounded != 0 else ""
    return f"{rounded:{sign},.{decimals}f}"


def significant(value: float | None, sig: int = 3, signed: bool = False) -> str:
    """`value` to `sig` significant figures in fixed notation (no exponent), thousands separated."""
    if not _finite(value):
        return MISSING
    if value == 0:
        return "0"
    rounded = round(float(value), decimals_for([value], sig))  # 0.9996 -> 1.0: one digit fewer after it
    return fixed(rounded, decimals_for([rounded], sig), signed)


def si_count(count: float | None, sig: int = 3) -> str:
    """A count with an SI suffix: `134,515,008` -> `135 M`, `57,600` -> `57.6 k`, `512` -> `512`."""
    if not _finite(count):
        return MISSING
    for factor, suffix in ((1e12, " T"), (1e9, " G"), (1e6, " M"), (1e3, " k")):
        if abs(count) >= factor * 0.9995:  # 999,600 rounds to 1.00 M, not 1,000 k
            return significant(count / factor, sig) + suffix
    return significant(count, sig)


def percent(value: float | None, decimals: int = 1, signed: bool = True) -> str:
    """A percentage with its sign: `+1.1%`."""
    text = fixed(value, decimals, signed)
    return text if text == MISSING else text + "%"


def relative_change(before: float | None, after: float | None) -> float | None:
    """(after - before) / |before| in %, or None where it is undefined."""
    if not (_finite(before) and _finite(after)) or before == 0:
        return None
    return 100.0 * (after - before) / abs(before)


def with_spread(mean_text: str, spread: float | None, decimals: int) -> str:
    """`1.407 ± 0.012`: the spread in the mean's decimals; the mean alone when there is no spread."""
    if mean_text == MISSING or not _finite(spread):
        return mean_text
    return f"{mean_text} ± {fixed(spread, decimals)}"


def change_cell(change: float | None, relative: float | None, decimals: int,
                spread: float | None = None) -> str:
    """The absolute change, its spread over seeds if any, then the relative change: `-1.903 (-57.5%)`."""
    text = with_spread(fixed(change, decimals, signed=True), spread, decimals)
    if text == MISSING or relative is None:
        return text
    return f"{text} ({percent(relative)})"
