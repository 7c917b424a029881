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
