"""The comparison report built from synthetic finished run directories: seed aggregation, the Pareto
front, the summary, the number format in every table, the HTML page and the figures."""

from __future__ import annotations

import json
import math
import re

import pytest
from report_support import fake_run

import tuneforge.plotting
from tuneforge.cli import main
from tuneforge.compare import compare

# name -> (strategies, task loss after per seed, retain ppl after per seed, trainable params, train seconds)
RUNS = {
    "big": ([{"full": {}}], (1.0, 1.1, 1.2), (50.0, 50.5, 51.0), 100_000_000, 100.0),
    "small": ([{"ia3": {}}], (1.6, 1.7, 1.8), (48.0, 48.1, 48.2), 50_000, 60.0),
    # learns less than small, forgets more and costs more: dominated on every axis
    "bad": ([{"lora": {}}], (1.9, 2.0, 2.1), (49.0, 49.1, 49.2), 5_000_000, 40.0),
}


@pytest.fixture
def seeded_runs(tmp_path):
    """Three seeds of three configurations and an untrained baseline; task loss 3.0 and retain
    perplexity 48.8 before training."""
    dirs = []
    for seed in range(3):
        for name, (strategies, task, ppl, params, seconds) in RUNS.items():
            dirs.append(fake_run(tmp_path / "runs", f"{name}-seed{seed}", strategies, (3.0, task[seed]),
                                 (48.8, ppl[seed]), params, seed=seed, train_seconds=seconds))
        dirs.append(fake_run(tmp_path / "runs", f"baseline-seed{seed}", [], (3.0, 3.0), (48.8, 48.8), 0,
                             seed=seed, steps=0, train_seconds=0.0))
    return [str(d) for d in dirs]


def test_seeds_are_averaged_and_the_front_and_summary_name_the_right_runs(seeded_runs, tmp_path):
    out = tmp_path / "report"
    compare(seeded_runs, out, command="tuneforge compare runs/*")
    report = json.loads((out / "comparison.json").read_text())
    rows = {row["run"]: row for row in report["rows"]}
    assert list(rows) == ["big", "small", "bad", "baseline"]
    big = rows["big"]
    assert big["seeds"] == [0, 1, 2] and big["runs"] == ["big-seed0", "big-seed1", "big-seed2"]
    assert big["task"] == pytest.approx(1.1) and big["spread"]["task"] == pytest.approx(0.1)
    assert big["task_gain"] == pytest.approx(1.9) and big["task_change_pct"] == pytest.approx(-190 / 3)
    assert big["forgetting_pct"] == pytest.approx(100 * (50.5 / 48.8 - 1))
    assert big["forgetting"] == pytest.approx(sum(math.log(p / 48.8) for p in RUNS["big"][2]) / 3)
    assert big["trainable_params"] == 100_000_000 and len(report["runs"]) == 12  # old fields and every run
    assert {name: row["pareto"] for name, row in rows.items()} == \
        {"big": True, "small": True, "bad": False, "baseline": True}
    summary = report["summary"]
    assert summary["learned_most"] == "big" and summary["forgot_least"] == "small"
    assert [g["run"] for g in summary["budget"]] == ["small", "big"]  # cheapest first
    assert "Dominated" in summary["text"] and "**bad**" in summary["text"].split("Dominated")[1]
    # big leads small in gain by 0.6 with a spread of sqrt(0.1² + 0.1²): a real difference
    assert "leads **small** in task gain by 0.600 ± 0.141, more than twice" in summary["text"]
    assert "So **" not in summary["text"]  # big's lead is real: no cheaper run learns as much
    # small forgets -1.43% of perplexity, bad +0.61%; each has a spread of 0.205 points over its seeds
    assert "In forgetting, **small** is ahead of **bad** by 2.0 ± 0.3 percentage points" in summary["text"]

    markdown = (out / "report.md").read_text()
    assert "seeds (0, 1, 2)" in markdown and "3 seeds" in markdown
    big_line = next(line for line in markdown.splitlines() if line.startswith("| ★ big |"))
    assert "**1.100 ± 0.100**" in big_line  # the best task loss, bold, with its spread
    assert "-1.900 ± 0.100 (-63.3%)" in big_line and "100 M" in big_line
    bad_line = next(line for line in markdown.splitlines() if line.startswith("| bad |"))
    assert "**40**" in bad_line  # fastest: bold even though it is dominated
    for line in markdown.splitlines():
        if line.startswith("| ") and "±" in line:  # every loss cell of the table has three decimals
            assert not re.search(r"\b\d\.\d{1,2} ±|\b\d\.\d{4,} ±", line.split("|")[5]), line


def test_html_is_one_sortable_self_contained_page(seeded_runs, tmp_path):
    out = tmp_path / "report"
    compare(seeded_runs, out)
    page = (out / "report.html").read_text()
    assert '<p class="summary"><b>Summary.</b>' in page and "<b>big</b> learned most" in page
    assert '<table class="sortable" id="results">' in page and "addEventListener(\"click\"" in page
    results = page.split('id="results">')[1].split("</thead>")[0]
    assert results.count("<th ") == results.count('title="click to sort"') == 11  # every column sorts
    assert 'data-value="1.1"' in page and 'class="best"' in page and "<tr class=front>" in page
    assert page.count("data:image/png;base64,") == 4 and page.count("<figcaption>") == 4
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page)  # nothing fetched: it opens offline


def test_every_figure_has_a_title_and_a_caption(seeded_runs, tmp_path, monkeypatch):
    titles = {}
    save = tuneforge.plotting.save

    def recording_save(figure, path):
        titles[path.name] = [axis.get_title() for axis in figure.axes]
        return save(figure, path)

    monkeypatch.setattr(tuneforge.plotting, "save", recording_save)
    monkeypatch.setattr("tuneforge.compare_plots.save", recording_save)
    compare(seeded_runs, tmp_path / "report", cost="time")
    assert set(titles) == {"tradeoff.png", "metric_vs_params.png", "forgetting.png", "loss_curves.png"}
    assert titles["tradeoff.png"][0] == "Task gain vs forgetting (marker size: training time)"
    assert all(any(t for t in figure_titles) for figure_titles in titles.values())
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert [f"*Figure {n}." in markdown for n in range(1, 5)] == [True] * 4


def test_the_cost_axis_changes_the_front(seeded_runs, tmp_path):
    compare(seeded_runs, tmp_path / "time", cost="time")
    rows = {r["run"]: r for r in json.loads((tmp_path / "time" / "comparison.json").read_text())["rows"]}
    assert rows["bad"]["pareto"]  # the fastest trained run is on the front of gain, forgetting and time
    assert "training time" in (tmp_path / "time" / "report.md").read_text()


def test_one_seed_says_its_noise_is_unknown(tmp_path):
    dirs = [fake_run(tmp_path, name, s, (3.0, task[0]), (48.8, ppl[0]), params)
            for name, (s, task, ppl, params, _) in RUNS.items()]
    compare([str(d) for d in dirs], tmp_path / "report")
    report = json.loads((tmp_path / "report" / "comparison.json").read_text())
    assert "how noisy these numbers are is unknown" in report["summary"]["text"]
    assert all(row["seeds"] == [0] for row in report["rows"])
    assert "±" not in (tmp_path / "report" / "report.md").read_text().split("## Results")[1].split("\n\n")[1]


@pytest.mark.parametrize(("flag", "value", "message"), [
    ("--seeds", "0,x", "--seeds '0,x': expected comma-separated non-negative integers, e.g. 0,1,2"),
    ("--seeds", "1,1", "--seeds '1,1': a seed is listed twice"),
    ("--cost", "money", "--cost 'money': unknown (choose one of: params, time, memory)"),
])
def test_bad_seeds_and_cost_are_one_line_errors(tmp_path, capsys, flag, value, message):
    code = main(["compare", str(tmp_path / "missing.yaml"), "--output", str(tmp_path / "out"), flag, value])
    err = capsys.readouterr().err
    assert code == 2 and err.strip() == f"tuneforge: error: {message}" and "Traceback" not in err


def test_loss_curves_are_smoothed_by_a_centred_moving_average():
    from tuneforge.compare_plots import moving_average

    assert moving_average([1.0, 2.0, 3.0, 4.0, 5.0], window=3) == [1.5, 2.0, 3.0, 4.0, 4.5]
    assert moving_average([2.0], window=5) == [2.0]


def test_a_cheaper_run_tied_with_the_leader_is_named_the_bargain(tmp_path):
    dirs = []
    for seed, (big, cheap) in enumerate(((1.0, 1.2), (1.2, 1.1), (1.0, 1.0))):  # tied within the noise
        dirs.append(fake_run(tmp_path, f"big-seed{seed}", [{"full": {}}], (3.0, big), (48.8, 49.0), 2_000_000,
                             seed=seed))
        dirs.append(fake_run(tmp_path, f"cheap-seed{seed}", [{"lora": {}}], (3.0, cheap), (48.8, 50.0),
                             50_000, seed=seed))
    compare([str(d) for d in dirs], tmp_path / "report")
    text = json.loads((tmp_path / "report" / "comparison.json").read_text())["summary"]["text"]
    assert ("So **cheap** learns as much as **big** within the noise and costs 40× less (trainable "
            "parameters: 50.0 k vs 2.00 M).") in text
