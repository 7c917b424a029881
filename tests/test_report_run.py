"""The run report on a synthetic run directory: the before/after table with relative changes, the one
loss figure with two axes and a line per loss term, samples side by side, and the terminal summary."""

from __future__ import annotations

import json

from report_support import fake_run

import tuneforge.plotting
from tuneforge.report import console_summary, write_report


def make_run(tmp_path):
    run_dir = fake_run(tmp_path, "lora-ewc", [{"lora": {}}, {"ewc": {}}], (3.31, 1.407), (48.8, 49.3),
                       4_884_480, steps=60)
    return run_dir, json.loads((run_dir / "results.json").read_text())


def test_before_after_table_has_one_precision_per_row_and_relative_changes(tmp_path):
    run_dir, results = make_run(tmp_path)
    report = write_report(run_dir, results).read_text()
    assert "| task loss | 3.310 | 1.407 | -1.903 (-57.5%) |" in report
    assert "| retain perplexity | 48.80 | 49.30 | +0.50 (+1.0%) |" in report
    assert "| retain loss | 3.888 | 3.898 | +0.010 (+0.3%) |" in report
    assert "| trainable parameters | 4,884,480 of 1,000,000 (488%) |" in report
    assert "| adapter size | 18.6 MiB |" in report and "![Task, eval and retain loss" in report


def test_samples_before_and_after_side_by_side(tmp_path):
    run_dir, results = make_run(tmp_path)
    report = write_report(run_dir, results).read_text()
    assert "| prompt | reference | before | after |" in report
    assert "| What is a fox? | An animal \\| quick. | I do not know. | A small animal. |" in report


def test_one_loss_figure_with_two_axes_and_a_line_per_term(tmp_path, monkeypatch):
    figures = {}
    save = tuneforge.plotting.save

    def recording_save(figure, path):
        figures[path.name] = [(axis.get_title(), axis.get_ylabel(), [line.get_label() for line in axis.lines])
                              for axis in figure.axes]
        return save(figure, path)

    monkeypatch.setattr(tuneforge.plotting, "save", recording_save)
    run_dir, results = make_run(tmp_path)
    write_report(run_dir, results)
    (title, left_label, left), (_, right_label, right) = figures["loss.png"]
    assert title == "lora-ewc: what it learned and what it forgot"
    assert left == ["task loss (train)", "eval loss", "ewc term (train)"]
    assert right == ["retain loss (forgetting)"] and "forgetting" in right_label and "nats" in left_label
    assert (run_dir / "loss.png").stat().st_size > 10_000


def test_terminal_summary_prints_changes_in_one_format(tmp_path):
    _, results = make_run(tmp_path)
    text = console_summary(results)
    lines = text.splitlines()
    assert lines[0].split() == ["metric", "before", "after", "change", "(relative)"]
    assert lines[1].split() == ["task", "loss", "3.310", "1.407", "-1.903", "(-57.5%)"]
    assert lines[4].split() == ["retain", "perplexity", "48.80", "49.30", "+0.50", "(+1.0%)"]
    assert "peak memory: 1,500 MiB" in text
