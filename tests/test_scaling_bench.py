"""bench/scaling.py and its report: the growth fits recover known laws, the report renders the same text and
plots from the same JSON, docs/scaling.md gets its block where it waits for it, the plan runs each x
value's sides in alternating order, and a real (tiny) point trains and counts its tokens."""

from __future__ import annotations

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _load(relative: str, name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / relative)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


scaling = _load("bench/scaling.py", "scaling_under_test")
report_module = _load("bench/scaling_report.py", "scaling_report_under_test")
render_docs = _load("bench/render_docs.py", "render_docs_for_scaling")

LENGTHS = [256, 512, 1024, 2048, 4096]
PARAMETERS = {"135M": 134_515_008, "360M": 361_821_120, "1B": 1_100_048_384}


def test_loglog_slope_recovers_a_known_exponent():
    assert report_module.loglog_slope(LENGTHS, [3e-3 * x**1.7 for x in LENGTHS]) == pytest.approx(1.7)
    noisy = [3e-3 * x**0.4 * (1.02 if i % 2 else 0.98) for i, x in enumerate(LENGTHS)]
    assert report_module.loglog_slope(LENGTHS, noisy) == pytest.approx(0.4, abs=0.03)


def test_fits_recover_coefficients_and_where_a_budget_is_reached():
    assert report_module.line([1, 2, 3], [5, 7, 9]) == pytest.approx((3, 2))
    a, b, c = report_module.quadratic(LENGTHS, [1000 + 0.5 * x + 1e-3 * x * x for x in LENGTHS])
    assert (a, b, c) == pytest.approx((1000, 0.5, 1e-3), rel=1e-6)
    level = 24 * 1024
    x = report_module.reach((a, b, c), level)
    assert a + b * x + c * x * x == pytest.approx(level)
    # a curve bending down is fitted as a line; three points would only interpolate, so they get a line too
    assert report_module.quadratic(LENGTHS, [1000 + 2 * x - 1e-4 * x * x for x in LENGTHS])[2] == 0
    assert report_module.quadratic([1, 2, 3], [1, 4, 9])[2] == 0
    assert report_module.reach((1000, 0.5), 2000) == pytest.approx(2000)
    assert report_module.reach((1000, -0.5), 2000) is None
    assert [report_module.growth(e) for e in (1.05, 1.5, 1.9)] == [
        "close to linear", "between linear and quadratic", "close to quadratic"]


def fake_report() -> dict:
    """A results file whose numbers follow known laws, so the rendered fits have known values."""
    machine = {"cpu": "Test CPU", "cores_allowed": 1, "threads": 1, "torch": "2.13.0",
               "transformers": "5.24.0", "peft": "0.21.2", "python": "3.12"}
    points = []
    for length in LENGTHS:
        per_token = {"ours-packed": 1e-3 + 1e-6 * length,  # a line: a/b = 1000
                     "ours-packed-ckpt": 1.3e-3 + 1.3e-6 * length, "ours-padded": 1.2e-3 + 1e-6 * length,
                     "trainer": 1e-4 * length**0.5,  # L^0.5: a sequence costs L^1.5
                     "trainer-ckpt": 1.3e-4 * length**0.5}
        for method, seconds in per_token.items():
            peak = 1000 + 1e-3 * length**2 if method == "ours-packed" else 2000 + length
            points.append({"curve": "length", "x": length, "method": method, "side": method,
                           "tokens_per_s": 1 / seconds, "tokens_per_step": 1000.0, "peak_rss_mb": peak})
    for shape, parameters in PARAMETERS.items():
        for method, scale in (("ours-packed", 1.0), ("trainer", 2.0)):
            points.append({"curve": "size", "x": shape, "method": method, "side": method,
                           "parameters": parameters, "tokens_per_s": 1e11 / parameters / scale,
                           "peak_rss_mb": 500 + 4e-6 * parameters})
    for shape, parameters in {**PARAMETERS, "3B": 3.2e9, "7B": 6.7e9}.items():
        for method, bytes_per in (("full", 16), ("lora", 4), ("qlora", 1)):
            points.append({"curve": "estimate", "x": shape, "shape": shape, "method": method,
                           "parameters": parameters, "total_bytes": bytes_per * parameters + 2**30})
    for targets in ("qv", "all"):
        for rank in (8, 64, 256):
            for side, speed in (("ours", 100.0), ("peft", 90.0)):
                points.append({"curve": "lora", "x": rank, "method": f"r{rank}-{targets}", "side": side,
                               "rank": rank, "targets": targets, "tokens_per_s": speed * (8 / rank) ** 0.1,
                               "peak_rss_mb": 1500.0, "trainable": 1000 * rank})
    for shape in ("135M", "360M"):
        for method, speed in (("full", 50.0), ("lora", 80.0), ("qlora", 40.0)):
            points.append({"curve": "methods", "x": shape, "method": method, "side": "ours",
                           "tokens_per_s": speed, "peak_rss_mb": 1000.0 * (3 if method == "full" else 1),
                           "trainable": 10})
    for point in points:  # a quiet machine: CPU time equals wall time
        if "tokens_per_s" in point:
            point["cpu_tokens_per_s"] = point["tokens_per_s"]
    return {"date": "2026-11-29", "command": "python bench/scaling.py --json x.json", "machine": machine,
            "settings": dict(scaling.FULL), "repeats": 1, "points": points, "wall_seconds": 2400.0}


def test_report_prints_the_fitted_growth_and_where_24_gib_runs_out():
    text = report_module.render(fake_report())
    lines = text.splitlines()
    assert lines[0].startswith("Measured 2026-11-29 on Test CPU, 1 thread (1 core allowed)")
    assert "| 256 | 1,000 | 796 | 612 | 687 | 625 | 481 | 1.27 |" in lines  # tok/s = 1 / (a + b L)
    assert "| 1B | 1.10 B | 90.9 | 45.5 | 2.00 | 4,900 | 4,900 | 1.00 |" in lines
    assert any(line.startswith("- ours packed: L^") and "a/b = 1,000, attention's share of the time at "
               "L = 4096: 80%." in line for line in lines)
    assert any(line.startswith("- Trainer + PEFT: L^1.50, between linear and quadratic;") for line in lines)
    # 1000 + 1e-3 L^2 MB reaches 24 GiB at L = sqrt(23576 / 1e-3)
    assert f"- ours packed: about L = {math.sqrt(23576 / 1e-3):,.0f} (extrapolated)." in lines
    # time per token in proportion to the parameters; RSS 500 MB + 4 bytes a parameter
    assert any(line.startswith("- ours packed: time per token ~ parameters^1.00 (close to linear") and
               f"reaches 24 GiB at about {(24 * 1024 - 500) / 4e-6 / 1e9:.1f} B parameters (extrapolated)"
               in line for line in lines)
    assert ("- full fine-tuning: estimated over 24 GiB from the 3B shape on (48.7 GiB) (1B: 17.4 GiB)."
            in lines)
    assert "- QLoRA (nf4) r 8 all-linear: estimated within 24 GiB at every shape up to 7B." in lines
    assert "- ours, q,v: time per token ~ rank^0.10; rank 256 takes 1.41x the time of rank 8." in lines
    assert ("- 135M: peak RSS QLoRA / LoRA 1.00, LoRA / full 0.33; tok/s LoRA / full 1.60, "
            "QLoRA / LoRA 0.50.") in lines
    for plot in ("length", "size", "lora", "methods"):
        assert f"(scaling/{plot}.png)" in text


def test_report_and_plots_are_the_same_from_the_same_json(tmp_path):
    report = fake_report()
    saved = json.loads(json.dumps(report))
    assert report_module.render(report) == report_module.render(saved)
    first = report_module.write_plots(report, tmp_path / "a")
    second = report_module.write_plots(saved, tmp_path / "b")
    assert [p.name for p in first] == ["length.png", "size.png", "lora.png", "methods.png"]
    for one, other in zip(first, second, strict=True):
        data = one.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) < 150_000
        assert data == other.read_bytes()


def test_a_report_with_one_curve_renders_only_that_curve():
    report = fake_report()
    report["points"] = [p for p in report["points"] if p["curve"] == "lora"]
    text = report_module.render(report)
    assert "### LoRA rank" in text and "### Sequence length" not in text and "### Model size" not in text


def test_the_doc_waits_for_its_block_and_gets_it_with_the_results(tmp_path, monkeypatch):
    doc = tmp_path / "scaling.md"
    doc.write_text((REPO / "docs" / "scaling.md").read_text())
    registered = "scaling.json" in render_docs.BLOCKS
    marked = [name for name, _ in render_docs.marked_blocks(doc.read_text())
              if not name.startswith("document-attention")]
    assert marked == (["scaling.json"] if registered else [])
    if registered:
        return  # the results exist: test_docs_numbers checks the block against them
    assert report_module.install_doc(doc)
    assert not report_module.install_doc(doc)  # once
    results = tmp_path / "2026-11-29-scaling.json"
    results.write_text(json.dumps(fake_report()))
    block = render_docs.Block(str(results), render_docs.scaling)
    monkeypatch.setitem(render_docs.BLOCKS, "scaling.json", block)
    rendered = render_docs.render_document(doc.read_text())
    assert [(n, b) for n, b in render_docs.marked_blocks(rendered)] == [
        ("scaling.json", report_module.render(fake_report()))]
    assert "Not measured yet" not in rendered


def test_plan_alternates_the_sides_and_times_long_rows_once():
    groups = scaling.plan_points(list(scaling.CURVES), scaling.FULL, Path("/models"))
    assert [g[0]["curve"] for g in groups[:3]] == ["save"] * 3  # 135M, 360M, 1B: saved once, first
    length = [g for g in groups if g[0]["curve"] == "length"]
    assert [g[0]["x"] for g in length] == LENGTHS
    for group in length:
        names = [spec["method"] for spec in group]
        with_ckpt = group[0]["x"] in scaling.FULL["checkpointing_lengths"]
        assert len(names) == (5 if with_ckpt else 3)
        assert all(spec["folder"] == "/models/135M" for spec in group)
        assert {spec["steps"] for spec in group if spec["side"] == "ours-packed"} == {
            3 if group[0]["x"] <= 1024 else 2}
    order = list(scaling.run_order(groups, repeats=2))
    assert sum(spec["curve"] == "save" for _, spec in order) == 3  # not again on the second repeat
    for repeat in (0, 1):  # each x value's sides in the opposite order of the one before
        sides = [[spec["method"] for r, spec in order if r == repeat and spec["curve"] == "length"
                  and spec["x"] == length] for length in (256, 512, 1024)]
        assert {frozenset(s) for s in sides[::2]} == {frozenset(scaling.FULL["length_sides"])}
        assert [method for method in sides[0] if method in sides[1]] == sides[1][::-1]
        assert sides[2] == sides[0]
    first_256 = [spec["method"] for r, spec in order if spec["curve"] == "length" and spec["x"] == 256]
    assert first_256[:5] == first_256[5:][::-1]  # and the second repeat reverses the first


def test_the_mask_side_runs_packed_rows_with_the_block_diagonal_mask():
    settings = {**scaling.FULL, "lengths": [2048], "length_sides": ["ours-packed", "ours-packed-mask"]}
    group, = [g for g in scaling.plan_points(["length"], settings, Path("/m")) if g[0]["curve"] == "length"]
    assert {(spec["method"], spec["side"], spec["attention"]) for spec in group} == {
        ("ours-packed", "ours-packed", "auto"), ("ours-packed-mask", "ours-packed", "mask")}


def test_the_forced_side_attends_per_document_below_the_threshold(tiny_folder, monkeypatch):
    from tuneforge import document_attention

    settings = {**scaling.FULL, "lengths": [512], "length_sides": ["ours-packed", "ours-packed-documents"]}
    group, = [g for g in scaling.plan_points(["length"], settings, Path("/m")) if g[0]["curve"] == "length"]
    assert {spec["method"]: spec["attention"] for spec in group} == {
        "ours-packed": "auto", "ours-packed-documents": "documents"}
    monkeypatch.setattr(document_attention, "MIN_ROW_LENGTH", document_attention.MIN_ROW_LENGTH)
    spec = {"curve": "length", "side": "ours-packed", "shape": "tiny", "folder": tiny_folder, "length": 32,
            "tokens": 64, "steps": 2, "strategies": [{"lora": {"rank": 8, "targets": ["q_proj", "v_proj"]}}]}
    assert scaling.documents_point(spec)["attention"] == "mask"  # rows of 32: below the threshold
    assert scaling.documents_point({**spec, "attention": "documents"})["attention"] == "documents"


def test_unknown_setting_is_one_line(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["scaling.py", "--dry-run", "--set", "length_token=2048"])
    with pytest.raises(SystemExit) as stopped:
        scaling.main()
    assert stopped.value.code == 2
    assert "--set length_token=2048: unknown setting 'length_token'" in capsys.readouterr().err


@pytest.fixture
def tiny_folder(tmp_path, monkeypatch, tokenizer):
    import tuneforge.train as loop

    # bench.run_ours swaps the loop's logger for its clock: the real one comes back after the test
    monkeypatch.setattr(loop, "MetricsLogger", loop.MetricsLogger)
    monkeypatch.setattr(scaling, "pad_tokenizer", lambda: tokenizer)
    folder = tmp_path / "tiny"
    scaling.save_shape({"shape": "tiny", "folder": str(folder)})
    return str(folder)


@pytest.mark.parametrize("side", ["ours-packed", "trainer"])
def test_a_tiny_point_trains_and_counts_its_non_padding_tokens(tiny_folder, side):
    spec = {"curve": "length", "side": side, "shape": "tiny", "folder": tiny_folder, "length": 32,
            "tokens": 64, "steps": 3, "checkpointing": side == "trainer",
            "strategies": [{"lora": {"rank": 8, "alpha": 16, "targets": ["q_proj", "v_proj"]}}]}
    result = scaling.documents_point(spec)
    assert result["steps"] == 3 and len(result["step_times"]) == 2
    # LoRA r 8 on q (64 -> 64) and v (64 -> 32) in 2 layers, on both sides
    assert result["trainable"] == 2 * 8 * ((64 + 64) + (64 + 32))
    documents = scaling.documents(20, 32, 512)
    if side == "ours-packed":  # two full-ish rows of 32 a step, never more
        assert result["batch"] == 2 and 32 < result["tokens_per_step"] <= 64
    else:  # batches of round(64 / 20) = 3 documents: the Trainer shuffles them, the tokens are theirs
        assert result["batch"] == 3
        assert min(len(d["input_ids"]) for d in documents) * 3 <= result["tokens_per_step"]
    assert result["tokens_per_s"] > 0 and result["peak_rss_mb"] > 100
    assert math.isfinite(result["loss_per_token"])


def test_the_attention_table_sets_per_document_against_mask_and_trainer():
    report = fake_report()
    report["points"] = [p for p in report["points"] if p["curve"] == "length" and p["method"] in
                        ("ours-packed", "trainer")]
    for point in list(report["points"]):
        if point["method"] == "ours-packed":
            point["attention"] = "documents"
            report["points"].append({**point, "method": "ours-packed-mask", "attention": "mask",
                                     "cpu_tokens_per_s": point["cpu_tokens_per_s"] / 2,
                                     "peak_rss_mb": 2 * point["peak_rss_mb"]})
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ")
            for line in report_module.attention_section(report).splitlines() if line.startswith("| 4096")}
    cells = rows["4096"]
    assert cells[1] == "documents" and cells[4] == "2.00"  # per document / mask
    # a forced per-document side (below tuneforge's threshold) takes the per-document column where it ran
    forced = [{**p, "method": "ours-packed-documents", "cpu_tokens_per_s": 3 * p["cpu_tokens_per_s"]}
              for p in report["points"] if p["method"] == "ours-packed" and p["x"] == 4096]
    report["points"] += forced
    line, = [row for row in report_module.attention_section(report).splitlines() if row.startswith("| 4096")]
    assert line.split(" | ")[4] == "6.00"
    trainer = 1 / (1e-4 * 4096**0.5)
    assert cells[6] == f"{(1 / (1e-3 + 1e-6 * 4096)) / trainer:.2f}"
