"""The command line: one-line errors (exit code 2), validate, inspect --json, strategies, train, generate."""

from __future__ import annotations

import json

import pytest

from tuneforge.cli import main


def write_config(tmp_path, tiny_model_dir, train_file, **extra) -> str:
    import yaml

    config = {
        "model": str(tiny_model_dir),
        "data": {"train": str(train_file), "max_eval_examples": 4},
        "retain": None,
        "strategies": [{"lora": {"rank": 4, "targets": ["q_proj", "v_proj"]}}],
        "train": {"max_steps": 3, "batch_size": 4, "lr": 1e-2, "max_seq_len": 64},
        "evaluation": {"samples": 1, "max_new_tokens": 4},
        "output": str(tmp_path / "run"),
        **extra,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return str(path)


def one_line_error(capsys, argv) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("tuneforge: error: ") and "\n" not in err and "Traceback" not in err
    return err


def test_validate_ok(tmp_path, tiny_model_dir, task_file, capsys):
    assert main(["validate", write_config(tmp_path, tiny_model_dir, task_file)]) == 0
    assert "ok (causal_lm: 58 train, 4 eval examples" in capsys.readouterr().out


def test_validate_bad_record_names_file_line_and_field(tmp_path, tiny_model_dir, capsys):
    data = tmp_path / "train.jsonl"
    data.write_text('{"prompt": "a", "completion": "b"}\n' * 3 + '{"prompt": "a"}\n')
    err = one_line_error(capsys, ["validate", write_config(tmp_path, tiny_model_dir, data)])
    assert "train.jsonl:4" in err and "completion" in err


def test_validate_bad_config_value(tmp_path, tiny_model_dir, task_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, task_file)
    err = one_line_error(capsys, ["validate", path, "train.lr=-1"])
    assert "train.lr" in err and "greater than 0" in err


def test_missing_data_file_and_model(tmp_path, tiny_model_dir, task_file, capsys):
    err = one_line_error(capsys,
                         ["validate", write_config(tmp_path, tiny_model_dir, tmp_path / "none.jsonl")])
    assert "none.jsonl" in err and "not found" in err
    err = one_line_error(capsys, ["validate", write_config(tmp_path, tmp_path / "no-model", task_file)])
    assert "no-model" in err


def test_inspect_json_counts(tmp_path, tiny_model_dir, task_file, capsys):
    assert main(["inspect", write_config(tmp_path, tiny_model_dir, task_file), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    # q: 32 -> 32 and v: 32 -> 16 in 4 layers, rank 4: 4 * (4 * 64 + 4 * 48)
    assert report["trainable_params"] == report["trainable_by_strategy"]["lora"] == 4 * (4 * 64 + 4 * 48)
    assert report["total_params"] > report["trainable_params"]


def test_strategies_lists_options(capsys):
    assert main(["strategies"]) == 0
    out = capsys.readouterr().out
    assert "lora (parametrization)" in out and "rank = 8" in out and "layerwise" in out


def test_train_then_generate_then_refuse_to_clobber(tmp_path, tiny_model_dir, task_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, task_file)
    assert main(["train", path, "train.max_steps=2"]) == 0
    out = capsys.readouterr().out
    assert "task loss" in out and "trainable parameters" in out
    assert main(["generate", str(tmp_path / "run"), "--prompt", "What colour is the cat?",
                 "--max-new-tokens", "3"]) == 0
    assert capsys.readouterr().out.strip() != ""
    err = one_line_error(capsys, ["train", path])
    assert "a run already exists" in err
    assert main(["train", path, "--resume", "train.max_steps=3"]) == 0


def test_unknown_override_flag_is_an_argparse_error(tmp_path, tiny_model_dir, task_file):
    with pytest.raises(SystemExit) as caught:
        main(["train", write_config(tmp_path, tiny_model_dir, task_file), "--nope"])
    assert caught.value.code == 2


def test_eval_without_training_is_the_prompt_only_baseline(tmp_path, tiny_model_dir, task_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, task_file,
                        data={"train": str(task_file), "max_eval_examples": 4,
                              "template": {"prompt": "Q: {prompt}\nA:", "few_shot": 1}})
    assert main(["eval", path, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["eval"]["loss"] > 0 and result["eval"]["tokens"] > 0
    assert result["samples"][0]["prompt"].startswith("Q: ")


def test_bf16_and_gradient_checkpointing_run(tmp_path, tiny_model_dir, task_file, capsys):
    path = write_config(tmp_path, tiny_model_dir, task_file)
    assert main(["train", path, "train.precision=bf16", "train.gradient_checkpointing=true",
                 "train.max_steps=2"]) == 0
    assert "task loss" in capsys.readouterr().out
