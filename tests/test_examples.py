"""Every shipped example config loads, validates (data included) and builds its strategies."""

from __future__ import annotations

from pathlib import Path

import pytest

from tuneforge.compose import build_strategies
from tuneforge.config import load_config
from tuneforge.run import validate_run

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_config_validates(path):
    config = load_config(path)
    summary = validate_run(config)
    assert summary["train_examples"] > 0
    assert [s.name for s in build_strategies(config.strategies)] == [s.name for s in config.strategies]
