"""Config loading: typed sections, errors that name file, line and field, overrides, path resolution."""

from __future__ import annotations

import pytest

from tuneforge.config import load_config
from tuneforge.errors import ConfigError

GOOD = """\
model: smollm2-135m
data:
  train: data/train.jsonl
strategies:
  - lora: {rank: 8, alpha: 16, targets: [q_proj, v_proj]}
  - layerwise: {train_layers: "top:2"}
train: {epochs: 1, batch_size: 8, lr: 2.0e-4}
output: runs/x
"""


def write(tmp_path, text: str):
    path = tmp_path / "config.yaml"
    path.write_text(text)
    (tmp_path / "data").mkdir(exist_ok=True)
    (tmp_path / "data" / "train.jsonl").write_text('{"text": "hello"}\n')
    return path


def error_of(tmp_path, text: str, overrides=None) -> str:
    with pytest.raises(ConfigError) as caught:
        load_config(write(tmp_path, text), overrides)
    return str(caught.value)


def test_good_config_is_typed_and_paths_resolve_relative_to_the_file(tmp_path):
    config = load_config(write(tmp_path, GOOD))
    assert [s.name for s in config.strategies] == ["lora", "layerwise"]
    assert config.strategies[0].options.rank == 8
    assert config.train.lr == 2e-4 and config.train.batch_size == 8
    assert config.data.train == str(tmp_path / "data" / "train.jsonl")
    assert config.retain == "builtin:shakespeare"  # forgetting is measured by default
    assert config.resolved_dict()["strategies"][0]["lora"]["targets"] == ["q_proj", "v_proj"]


def test_unknown_key_names_line_and_allowed_keys(tmp_path):
    message = error_of(tmp_path, GOOD.replace("train: {epochs: 1,", "train: {epochz: 1,"))
    assert "config.yaml:7: train.epochz: unknown key" in message
    assert "epochs" in message and "max_steps" in message


def test_wrong_type_names_line_field_and_value(tmp_path):
    message = error_of(tmp_path, GOOD.replace("lr: 2.0e-4", "lr: fast"))
    assert "config.yaml:7: train.lr:" in message and "'fast'" in message


def test_strategy_option_errors_point_at_the_option(tmp_path):
    message = error_of(tmp_path, GOOD.replace("rank: 8", "rank: 0"))
    assert "config.yaml:5: strategies.0.lora.rank:" in message and "greater than or equal to 1" in message
    message = error_of(tmp_path, GOOD.replace("rank: 8", "rnak: 8"))
    assert "strategies.0.lora.rnak: unknown option" in message and "rank" in message


def test_unknown_strategy_lists_the_available_ones(tmp_path):
    message = error_of(tmp_path, GOOD.replace("- layerwise:", "- layerwize:"))
    assert "config.yaml:6: strategies.1.layerwize: unknown strategy" in message and "layerwise" in message


def test_duplicate_strategy_is_refused(tmp_path):
    message = error_of(tmp_path, GOOD.replace("- layerwise: {train_layers: \"top:2\"}", "- lora: {rank: 4}"))
    assert "strategy listed twice: lora" in message


def test_broken_yaml_names_the_line(tmp_path):
    message = error_of(tmp_path, GOOD.replace("train: {epochs", "train: [epochs"))
    assert "config.yaml:" in message and "invalid YAML" in message


def test_missing_required_section(tmp_path):
    assert "give either `data:` (one task) or `tasks:`" in error_of(tmp_path, "model: smollm2-135m\n")


def test_overrides_are_parsed_as_yaml_and_validated(tmp_path):
    config = load_config(write(tmp_path, GOOD), ["train.lr=1e-3", "train.max_steps=5", "output=elsewhere"])
    assert config.train.lr == 1e-3 and config.train.max_steps == 5 and config.output == "elsewhere"
    message = error_of(tmp_path, GOOD, ["train.batch_size=-1"])
    assert "override train.batch_size" in message
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(write(tmp_path, GOOD), ["train.lr"])


def test_missing_config_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_a_key_given_twice_is_refused_with_both_lines(tmp_path):
    """YAML keeps the last of two `train:` blocks: every setting of the first would be lost unseen."""
    text = "model: x\ntrain:\n  lr: 1.0e-3\ndata: {train: t.jsonl}\ntrain:\n  epochs: 2\n"
    with pytest.raises(ConfigError, match=r"config.yaml:5: train is given twice \(lines 2 and 5\)"):
        load_config(write(tmp_path, text))
    nested = "data: {train: t.jsonl}\nstrategies:\n  - lora:\n      rank: 4\n      alpha: 8\n      rank: 8\n"
    twice = r":6: strategies\[0\]\.lora\.rank is given twice \(lines 4 and 6\)"
    with pytest.raises(ConfigError, match=twice):
        load_config(write(tmp_path, nested))
    # a merge key and anchors are not duplicates; the same alias used many times is checked once
    shared = "base: &b {lr: 1.0e-3}\ndata: {train: t.jsonl}\ntrain:\n  <<: *b\n  epochs: 2\n"
    with pytest.raises(ConfigError, match="base"):  # the unknown top-level key, not a duplicate
        load_config(write(tmp_path, shared))
