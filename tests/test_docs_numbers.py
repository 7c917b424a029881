"""Numbers in the docs come from committed JSON: every `<!-- begin NAME -->` ... `<!-- end NAME -->` block
in README.md and docs/*.md equals what `bench/render_docs.py` renders from NAME's JSON, and every JSON
under docs/results/ says when and by which command it was made."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _render_docs():
    spec = importlib.util.spec_from_file_location("render_docs", REPO / "bench" / "render_docs.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("render_docs", module)
    spec.loader.exec_module(module)
    return module


render_docs = _render_docs()
FOUND = [(doc.relative_to(REPO).as_posix(), name, body) for doc in render_docs.documents()
         for name, body in render_docs.marked_blocks(doc.read_text())]


def test_the_docs_have_marked_blocks_and_every_registered_block_is_in_one():
    names = [name for _, name, _ in FOUND]
    assert len(names) == len(set(names)), "a block is marked twice"
    assert set(render_docs.BLOCKS) == set(names), "registry and marked blocks differ"


@pytest.mark.parametrize(("doc", "name", "body"), FOUND, ids=[f"{doc}:{name}" for doc, name, _ in FOUND])
def test_marked_block_equals_its_render_from_json(doc, name, body):
    block = render_docs.BLOCKS[name]
    assert (REPO / block.source).is_file(), f"{name}: {block.source} is not committed"
    assert body == block.text(), f"{doc}: {name} differs from {block.source} (python bench/render_docs.py)"


def test_a_changed_number_is_caught_and_rendered_back():
    doc = REPO / "docs" / "tasks.md"
    text = doc.read_text()
    changed = text.replace("| full | 0.960 ± 0.260 |", "| full | 0.961 ± 0.260 |")
    assert changed != text
    name, body = next((n, b) for n, b in render_docs.marked_blocks(changed) if n == "compare/comparison.json")
    assert body != render_docs.BLOCKS[name].text()
    assert render_docs.render_document(changed) == text


@pytest.mark.parametrize("path", sorted((REPO / "docs" / "results").glob("*.json")), ids=lambda p: p.name)
def test_every_results_json_has_date_and_command(path):
    data = json.loads(path.read_text())
    assert isinstance(data, dict), path
    assert isinstance(data.get("date"), str) and data["date"][:4].isdigit(), f"{path.name}: no date"
    assert isinstance(data.get("command"), str) and data["command"].strip(), f"{path.name}: no command"


def _experiment(name: str):
    sys.path.insert(0, str(REPO / "experiments"))
    try:
        path = REPO / "experiments" / f"{name}.py"
        spec = importlib.util.spec_from_file_location(f"experiment_{name}", path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "experiments"))
    return module


def _fake_run(directory: Path, strategies: list, curve: list[tuple[int, float, float]]) -> None:
    directory.mkdir(parents=True)
    (_, loss0, ppl0), (steps, loss1, ppl1) = curve[0], curve[-1]
    (directory / "results.json").write_text(json.dumps({
        "strategies": strategies, "train_seconds": 12.3, "seed": 0, "steps": steps,
        "before": {"eval": {"loss": loss0}, "retain": {"perplexity": ppl0}},
        "after": {"eval": {"loss": loss1}, "retain": {"perplexity": ppl1}}}))
    (directory / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "split": "eval", "loss": loss, "retain_perplexity": ppl}) + "\n"
        for step, loss, ppl in curve[1:-1]))


def test_forgetting_table_renders_the_same_from_run_directories_and_from_its_recorded_json(tmp_path):
    forgetting = _experiment("forgetting")
    ewc = [{"full": {}}, {"ewc": {"weight": 0.8, "fisher_samples": 64}}]
    _fake_run(tmp_path / "seed0" / "full", [{"full": {}}], [(0, 2.8, 50.0), (10, 1.2, 55.0), (20, 0.9, 60.0)])
    _fake_run(tmp_path / "seed0" / "full-ewc", ewc, [(0, 2.8, 50.0), (20, 2.0, 51.0)])
    _fake_run(tmp_path / "seed1" / "full", [{"full": {}}], [(0, 2.8, 50.0), (20, 1.0, 54.0)])
    _fake_run(tmp_path / "seed1" / "full-ewc", ewc, [(0, 2.8, 50.0), (10, 1.5, 50.5), (20, 1.01, 50.5)])
    _fake_run(tmp_path / "seed0" / "lora", [forgetting.LORA], [(0, 2.8, 50.0), (20, 1.1, 50.2)])
    data = forgetting.collect(tmp_path)
    text = forgetting.render(data)
    assert text == forgetting.render(json.loads(json.dumps(data)))  # what a committed JSON renders
    rows = text.splitlines()
    assert ("| full | - | 0.0002 | 0, 1 | 0.950 (0.900 .. 1.000) | - | +14.0% (+8.0% .. +20.0%) | - | - "
            "| 12 s (12 s .. 12 s) |") in rows
    # seed 0: at task loss 2.0 plain full is half-way from step 0 to 10 (retain +5.0%), and ewc ends at
    # 2.0 / 0.9 - 1 = +122% task loss: not within 2%. Seed 1: plain reaches 1.01 at 1.01/1.0 of the way
    # (retain 50 + 4 * 1.79/1.8 = +7.96%), ewc is within +1% task loss and +1% retain: it meets the target.
    assert ("| full-ewc | ewc 0.8 | 0.0002 | 0, 1 | 1.505 (1.010 .. 2.000) | +61.6% (+1.0% .. +122.2%) "
            "| +1.5% (+1.0% .. +2.0%) | +6.5% (+5.0% .. +8.0%) | no (1 of 2) | 12 s (12 s .. 12 s) |") in rows
    assert "| full-retention | not run | | | | | | | | |" in rows
    assert "| lora | - | 0.0005 | 0 | 1.100 | - | +0.4% | - | - | 12 s |" in rows
    curves = forgetting.render_curves(data).splitlines()
    assert "- `full` seed 0: 0: 2.800/50.00, 10: 1.200/55.00, 20: 0.900/60.00" in curves
    forgetting.plot(data, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_distillation_tables_render_the_same_from_run_directories_and_from_their_recorded_json(tmp_path):
    distill = _experiment("distill_bbc")

    def finished(seed: int, name: str, correct: int, loss: float) -> None:
        (tmp_path / f"seed{seed}" / name).mkdir(parents=True)
        (tmp_path / f"seed{seed}" / name / "results.json").write_text(json.dumps({
            "steps": 104, "seed": seed, "train_seconds": 99.6,
            "after": {"eval": {"accuracy": correct / 445, "examples": 445, "loss": loss}}}))

    finished(1, "student-small", 421, 0.2524)
    finished(2, "student-small", 425, 0.2000)
    finished(1, "student-kd-hidden-small", 424, 0.2300)  # +3 articles, lower loss: better
    finished(2, "student-kd-hidden-small", 423, 0.1900)  # -2 articles: not better on both
    finished(2, "student-tiny", 400, 0.3)  # its pair has no distilled run
    data = distill.collect(tmp_path)
    assert json.loads(json.dumps(data)) == data
    rows = distill.render(data).splitlines()
    assert rows == distill.render(json.loads(json.dumps(data))).splitlines()
    assert "| student-small | 3 | 200 | 104 | 1, 2 | 95.1% (94.6% .. 95.5%) | 0.226 (0.200 .. 0.252) " \
           "| 100 s (100 s .. 100 s) |" in rows
    assert "| teacher | not run | | | | | | |" in rows
    assert not [row for row in rows if row.startswith("| student-kd-t4-small ")]  # explored on seed 0 only
    pairs = distill.render_pairs(data).splitlines()
    assert "| student-small -> student-kd-hidden-small | 1, 2 | +3, -2 | -0.022, -0.010 | 1 of 2 |" in pairs
    assert "| student-tiny -> student-kd-hidden-tiny | not run | | | |" in pairs
    assert distill.config_for("student-kd-hidden-small", 2).strategies[0].options.teacher.endswith(
        "seed2/teacher-model")


HYPOTHESIS_STATISTICS = """\
..                                                                       [100%]
============================ Hypothesis Statistics =============================
tests/test_bad_input.py::test_jsonl_bad_line_is_named:

  - during reuse phase (0.01 seconds):
    - Typical runtimes: ~ 1ms, of which < 1ms in data generation
    - 2 passing, 0 failing, and 0 invalid test cases

  - during generate phase (0.36 seconds):
    - Typical runtimes: ~ 1-135 ms, of which ~ 0-85 ms in data generation
    - 2998 passing, 0 failing, and 41 invalid test cases

  - Stopped because settings.max_examples=3000


tests/test_bad_input.py::test_corrupt_parquet_is_one_line:

  - during generate phase (0.61 seconds):
    - 204 passing, 1 failing, and 0 invalid test cases

  - Stopped because nothing left to do

1 failed, 41 passed in 55.27s
"""


def test_fuzz_campaign_counts_every_phase_and_renders_them():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import fuzz_campaign
    finally:
        sys.path.remove(str(REPO / "bench"))
    tests = fuzz_campaign.parse_statistics(HYPOTHESIS_STATISTICS)
    assert tests == {
        "test_jsonl_bad_line_is_named": {"passing": 3000, "failing": 0, "invalid": 41,
                                         "stopped": "settings.max_examples=3000"},
        "test_corrupt_parquet_is_one_line": {"passing": 204, "failing": 1, "invalid": 0,
                                             "stopped": "nothing left to do"}}
    outcome = fuzz_campaign.parse_outcome(HYPOTHESIS_STATISTICS)
    assert outcome == {"failed": 1, "passed": 41}
    text = fuzz_campaign.render({"date": "2026-11-30", "command": "c", "machine": "m", "examples": 3000,
                                 "seconds": 600, "outcome": outcome, "tests": tests})
    assert "**3,205 generated inputs, 1 failing**; pytest: 1 failed, 41 passed." in text
    assert "| `test_corrupt_parquet_is_one_line` | 205 | 1 | 0 | nothing left to do |" in text
