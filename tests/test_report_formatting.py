"""The number policy (`tuneforge.formatting`) and the trade-off arithmetic (`tuneforge.tradeoff`) on
known values."""

from __future__ import annotations

import math

import pytest

from tuneforge import formatting as fmt
from tuneforge.tradeoff import aggregate, mean_spread, pareto_front, seed_group


def test_a_linear_column_shares_its_decimals():
    column = [1.4067, 3.3097, 0.781, None]
    decimals = fmt.decimals_for(column, sig=4)
    assert decimals == 3
    assert [fmt.fixed(v, decimals) for v in column] == ["1.407", "3.310", "0.781", "-"]
    assert fmt.decimals_for([48.8, 62.78], sig=4) == 2 and fmt.decimals_for([3354.2, 1103.0], sig=4) == 0
    assert fmt.decimals_for([], sig=3, min_decimals=1) == 1


def test_fixed_separates_thousands_signs_changes_and_has_no_negative_zero():
    assert fmt.fixed(134515008.0, 0) == "134,515,008"
    assert fmt.fixed(1234.56, 1) == "1,234.6"
    assert fmt.fixed(0.0064, 3, signed=True) == "+0.006" and fmt.fixed(-11.2634, 2, signed=True) == "-11.26"
    assert fmt.fixed(-0.0001, 3) == "0.000" and fmt.fixed(0.0, 2, signed=True) == "0.00"
    assert fmt.fixed(float("nan"), 2) == "-" and fmt.fixed(None, 2) == "-"


def test_significant_figures_per_value_for_quantities_that_span_decades():
    assert [fmt.significant(v) for v in (513.2, 18.69, 0.035877, 0.23)] == ["513", "18.7", "0.0359", "0.230"]
    assert fmt.significant(0.99996) == "1.00"  # rounding up adds a digit before the point, not after
    assert fmt.significant(0) == "0" and fmt.significant(None) == "-"


def test_counts_get_an_si_suffix():
    assert [fmt.si_count(n) for n in (134_515_008, 4_884_480, 57_600, 9_216, 512, 0)] == \
        ["135 M", "4.88 M", "57.6 k", "9.22 k", "512", "0"]
    assert fmt.si_count(999_700) == "1.00 M"


def test_changes_show_absolute_then_relative_and_the_spread_over_seeds():
    assert fmt.relative_change(3.31, 1.407) == pytest.approx(-57.49, abs=0.01)
    assert fmt.relative_change(0.0, 1.0) is None and fmt.relative_change(None, 1.0) is None
    assert fmt.change_cell(1.407 - 3.31, fmt.relative_change(3.31, 1.407), 3) == "-1.903 (-57.5%)"
    assert fmt.change_cell(-1.9, -57.5, 3, spread=0.0123) == "-1.900 ± 0.012 (-57.5%)"
    assert fmt.change_cell(0.5, None, 2) == "+0.50" and fmt.change_cell(None, 3.0, 2) == "-"
    assert fmt.percent(1.04) == "+1.0%" and fmt.percent(None) == "-"
    assert fmt.with_spread("1.407", None, 3) == "1.407"
    assert fmt.with_spread("1.407", 0.1, 3) == "1.407 ± 0.100"


def test_pareto_front_of_known_points():
    # minimize both: (3, 3) is dominated by (2, 2); equal points are both kept
    points = [(1, 5), (2, 2), (3, 1), (3, 3), (2, 2), (4, 4)]
    assert pareto_front(points) == [0, 1, 2, 4]
    # three objectives: (-gain, forgetting, cost); the cheap run stays on the front though it learns least
    runs = [(-2.3, 2.5, 135e6), (-2.1, 0.2, 4.9e6), (-1.7, -0.2, 5.8e4), (-1.5, 0.3, 6e6), (0, 0, 0)]
    assert pareto_front(runs) == [0, 1, 2, 4]  # (-1.5, 0.3, 6e6) is beaten by (-2.1, 0.2, 4.9e6) everywhere
    assert pareto_front([]) == [] and pareto_front([(1, 1)]) == [0]


def test_mean_and_spread_over_seeds():
    assert mean_spread([1.0, 2.0, 3.0]) == (2.0, 1.0)
    mean, spread = mean_spread([None, 2.0, 4.0])
    assert mean == 3.0 and spread == pytest.approx(math.sqrt(2))
    assert mean_spread([5.0]) == (5.0, None) and mean_spread([None]) == (None, None)


def test_seed_groups_and_aggregation():
    assert seed_group("lora-seed2") == ("lora", 2) and seed_group("lora") == ("lora", None)
    assert seed_group("my-seedling") == ("my-seedling", None)
    runs = [{"run": f"a-seed{i}", "task": v, "params": 7} for i, v in enumerate((1.0, 1.1, 1.2))]
    row = aggregate(runs, ["task", "params"])
    assert row["task"] == pytest.approx(1.1) and row["spread"]["task"] == pytest.approx(0.1)
    assert row["params"] == 7 and isinstance(row["params"], int)  # the same count in every seed stays a count
    assert row["run"] == "a-seed0"  # other fields come from the first run; the caller names the row
