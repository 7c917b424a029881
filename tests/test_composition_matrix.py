"""The composition matrix: every registered strategy alone, every pair, and the named hybrids of the README
and examples/hybrids, on three tiny model kinds built from configs (a Llama causal LM `lm`, a Llama sequence
classifier `dec_cls`, a BERT classifier `enc_cls`). Generated from `tuneforge.strategies.REGISTRY`, so a new
strategy is in every pair the day it is registered.

Each combination is either REFUSED, with a one-line reason that names both strategies or says what to change
(by `check_combination` before any model loads, or by a ModelError/ConfigError at setup or at the start of
training, before any step), or it holds these invariants, one test function each:

1. identity start: where every strategy declares `identity_start`, the prepared model's logits at step 0
   equal the base model's (atol 1e-6);
2. every parameter that requires grad is in the optimizer (`build_optimizer`) and gets a nonzero gradient
   in the trial's steps (3 steps, or 2 per task of a sequence: LoRA's A under B = 0 gets none at step 1 by
   construction, a later task's head none before its task), and no frozen parameter moves over training;
3. a frozen copy kept as a teacher or reference is bit-unchanged after training and its outputs differ from
   the trained model's; every reference (copy or disabled adapters) still computes the base model's outputs;
4. batch B x accum 1 trains like batch B/2 x accum 2: every step's loss, named loss terms and gradient norm
   equal (rel 1e-4; measured agreement ~1e-7 on losses) over 3 steps (6 in a sequence; fp32, dropout 0);
5. in eval mode a padded row scores as it does alone (causal LM: the row's per-token losses; classifiers:
   its logits), to 1e-5;
6. `save_adapter`, then `load_adapter` into a fresh base, gives equal outputs (1e-5);
7. kill and resume is bit-equal: a run of 4 steps (batch 2 x accum 2, save_every 2), and a run resumed with
   `resume=True` from a copy of what the first had on disk after checkpoint 2, end with identical weights.

Contexts: replay and EWC get a sequence of two tasks (EWC on the LM also gets retain text, which retention
needs); heads get classification tasks; a kind that cannot give the context is skipped (id suffix
`-skipped`) with the reason as the skip message; LoRA next to IA3 takes the layers IA3 leaves free.

Invariants 1-3, 5, 6 come from one short trial per case (`matrix_support.run_trial`: the run path's setup,
`start_session`, then the loop's arithmetic with `build_optimizer`). Invariants 4 and 7 cost two
`train_run`s each, so they run on a fixed subset (`EXPENSIVE`, 20 cases): pairs and hybrids chosen so that
every strategy appears in at least two of them, across all three kinds (the whole matrix through
`train_run` would take several times the 5-minute budget on 2 cores). A kill is simulated by copying the
uninterrupted run's files as they were after the checkpoint (same schedule, unlike a shorter max_steps).
Measured: the whole module in about 2 minutes on 2 cores (`--durations`: a trial ~0.4 s, a `train_run`
pair 2-6 s).

Known failures would be strict xfails (`XFAILS`, empty now): a fixed case turns red and its entry must go.
The matrix found seven combination bugs beyond those issue 11 listed (distill + heads, heads' unused body
outputs, heads + EWC on a mixture, heads' task ids on reload, L2-SP and retention references after a
resumed sequence, `validate` accepting refused lists); each is fixed, and the case that found it is here.

`python -m tests.test_composition_matrix [--setup]` (from the repository root) prints the refused
combinations as a Markdown table for the README (`--setup` adds those a model kind refuses at setup).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # matrix_support, conftest: also under `python -m tests....`

from matrix_support import (
    Assets,
    Case,
    build_assets,
    cases,
    copy_killed_run,
    final_weights,
    last_task,
    make_config,
    refused_at_setup,
    refused_combos,
    run_trial,
)

CASES = cases()
LIVE = [c for c in CASES if not c.skip]


# Known failures, each listed exactly: {(invariant, case id): why}. Strict: a fixed case turns red; remove it.
# Empty: every combination below is refused with a reason or holds every invariant.
XFAILS: dict[tuple[str, str], str] = {}


def _xfail(invariant: str, case_id: str) -> list:
    reason = XFAILS.get((invariant, case_id))
    return [pytest.mark.xfail(strict=True, reason=reason)] if reason else []


def params(selected: list[Case], invariant: str):
    marked = []
    for case in selected:
        marks = []
        if case.skip:
            marks.append(pytest.mark.skip(reason=case.skip))
        reason = XFAILS.get((invariant, case.id))
        if reason:
            marks.append(pytest.mark.xfail(strict=True, reason=reason))
        case_id = case.id if not case.skip else f"{case.id}-skipped"
        marked.append(pytest.param(case, id=case_id, marks=marks))
    return marked


# ---------------------------------------------------------------------------------------------------
# Assets and the cached trial per case


@pytest.fixture(scope="session")
def assets(tmp_path_factory, tiny_model_dir, tokenizer) -> Assets:
    return build_assets(tmp_path_factory.mktemp("matrix"), tokenizer, tiny_model_dir)


_TRIALS: dict[str, object] = {}


@pytest.fixture
def trial(case, assets, tmp_path_factory):
    if case.id not in _TRIALS:
        _TRIALS[case.id] = run_trial(case, assets, tmp_path_factory.mktemp("trial"))
    result = _TRIALS[case.id]
    if result.refused:
        pytest.skip(f"refused (reason checked by test_setup_refusal_reason): {result.refused}")
    return result


def raise_recorded(trial, stage: str) -> None:
    if stage in trial.errors:
        raise trial.errors[stage]


# ---------------------------------------------------------------------------------------------------
# Refusals


REFUSED = refused_combos()
CHANGE_WORDS = ("list", "set", "add", "remove", "use", "try", "give", "load", "needs", "drop")


def assert_good_reason(reason: str, names: tuple[str, ...]) -> None:
    assert "\n" not in reason.strip(), f"a refusal is one line: {reason!r}"
    named = all(name in reason for name in names)
    says = any(word in reason.lower() for word in CHANGE_WORDS)
    assert named or says, f"a refusal names both strategies or says what to change: {reason!r}"


@pytest.mark.parametrize(("names", "reason"), [(n, r) for _, n, r in REFUSED], ids=[c for c, _, _ in REFUSED])
def test_refused_before_loading_with_a_reason(names, reason):
    from tuneforge.compose import check_combination
    from tuneforge.errors import ModelError

    with pytest.raises(ModelError) as raised:
        check_combination(list(names))
    assert reason in str(raised.value)
    assert_good_reason(str(raised.value), names)


@pytest.mark.parametrize(("names", "reason"), [pytest.param(n, r, id=c, marks=_xfail("validate", c))
                                              for c, n, r in REFUSED])
def test_validate_refuses_before_loading(names, reason, assets, tmp_path, monkeypatch):
    import contextlib
    import io

    import yaml

    import tuneforge.run
    from tuneforge.cli import main

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(tuneforge.run, "build_model", no_model)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump({"model": str(assets.llama), "data": {"train": str(assets.lm_tasks[0])},
                                    "strategies": [{name: {}} for name in names],
                                    "output": str(tmp_path / "run")}))
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
        code = main(["validate", str(path)])
    assert code == 2, f"tuneforge validate accepted {'+'.join(names)}"
    assert_good_reason(stderr.getvalue().strip(), names)


@pytest.mark.parametrize("case", params(LIVE, "refusal"))
def test_setup_refusal_reason(case, assets, tmp_path_factory):
    if case.id not in _TRIALS:
        _TRIALS[case.id] = run_trial(case, assets, tmp_path_factory.mktemp("trial"))
    reason = _TRIALS[case.id].refused
    if not reason:
        return  # accepted: the invariants below apply
    assert_good_reason(reason, case.names)
    # a setup refusal names the strategy that refuses (strategies prefix their errors with their name)
    assert any(name in reason for name in case.names), reason


# ---------------------------------------------------------------------------------------------------
# Invariants 1-3, 5, 6 (one trial per case)


@pytest.mark.parametrize("case", params([c for c in CASES if c.declared_identity], "identity"))
def test_1_identity_start(case, trial):
    raise_recorded(trial, "identity")
    assert trial.identity <= 1e-6, f"step-0 logits differ from the base's by {trial.identity:.3g}"


@pytest.mark.parametrize("case", params(CASES, "frozen"))
def test_2_trainable_in_optimizer_get_gradients_frozen_stay(case, trial):
    raise_recorded(trial, "train")
    assert trial.trainable, "nothing trains"
    assert not sorted(trial.trainable - trial.in_optimizer), "trainable but not in the optimizer"
    assert not trial.zero_grad, f"no gradient in two steps: {trial.zero_grad[:5]} ({len(trial.zero_grad)})"
    assert not trial.moved_frozen, f"frozen but moved: {trial.moved_frozen[:5]} ({len(trial.moved_frozen)})"


@pytest.mark.parametrize("case", params([c for c in CASES if c.keeps_reference], "reference"))
def test_3_references_unchanged(case, trial):
    raise_recorded(trial, "references")
    assert trial.references, "a strategy holding a teacher/reference kept none after on_train_start"
    for entry in trial.references:
        assert entry["vs_base"] <= 1e-5, (f"{entry['label']} no longer computes the base's outputs "
                                          f"({entry['vs_base']:.3g})")
        if entry["copy"]:
            assert not entry["changed"], f"{entry['label']}: frozen copy changed: {entry['changed'][:5]}"
            assert entry["differs"] > 1e-6, f"{entry['label']}: the copy computes what the trained model does"


@pytest.mark.parametrize("case", params(CASES, "padding"))
def test_5_padded_row_scores_as_alone(case, trial):
    raise_recorded(trial, "padding")
    assert trial.padding <= 1e-5, f"padded row differs from the row alone by {trial.padding:.3g}"


@pytest.mark.parametrize("case", params(CASES, "reload"))
def test_6_save_then_load_into_fresh_base(case, trial):
    raise_recorded(trial, "reload")
    assert trial.reload <= 1e-5, f"reloaded outputs differ by {trial.reload:.3g}"


# ---------------------------------------------------------------------------------------------------
# Invariants 4 and 7 through the public run path, on a fixed subset


def _pick(ids: list[str]) -> list[Case]:
    """Cases by id (a pair in either order); an unknown id is an error, so a renamed case cannot drop out."""
    by_id = {}
    for case in CASES:
        by_id[case.id] = case
        if len(case.names) == 2 and case.combo == "+".join(case.names):
            by_id[f"{case.names[1]}+{case.names[0]}-{case.kind}"] = case
    return [by_id[i] for i in ids]


EXPENSIVE = _pick([
    # pairs across the three kinds, every strategy in at least two of them
    "full+heads-dec_cls", "distill+full-enc_cls", "layerwise+retention-lm", "l2sp+layerwise-enc_cls",
    "ewc+lora-lm", "heads+lora-enc_cls", "adapter+distill-dec_cls", "adapter+replay-lm",
    "l2sp+prefix-dec_cls", "prefix+retention-lm", "distill+prompt-lm", "dropout+prompt-enc_cls",
    "heads+ia3-dec_cls", "dropout+ia3-lm",
    # sequences, resumed in task 2
    "ewc+replay-lm", "l2sp+replay-lm", "ewc+retention-lm", "replay+retention-lm",
    # the named hybrids that are more than a pair (layerwise+prefix and adapter+distill are pairs
    # above/in the matrix)
    "lora+ewc+distill-lm", "multitask-lora+heads+ewc-lm",
])




STEP_FIELDS = ("loss", "grad_norm")  # plus every named loss term the strategies log


def step_records(run_dir: Path) -> list[dict]:
    """The training records of metrics.jsonl (one per optimizer step, log_every: 1), evaluation left out."""
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if r.get("split") != "eval" and "loss" in r]


@pytest.mark.parametrize("case", params(EXPENSIVE, "accum"))
def test_4_grad_accumulation_equivalence(case, assets, tmp_path):
    """Every step's loss, every named term and the gradient norm agree to 1e-4 (relative): the same data and
    the same gradient at every step, so the same training. Final weights are not compared elementwise: AdamW
    turns float-level noise in an analytically zero gradient (BERT's key bias, a softmax shift) into steps of
    about lr in either direction, which says nothing about the split."""
    from tuneforge.errors import ConfigError, ModelError
    from tuneforge.run import train_run

    runs = []
    for batch, accum in ((4, 1), (2, 2)):
        config = make_config(case, assets, tmp_path / f"b{batch}", batch_size=batch, grad_accum=accum)
        try:
            train_run(config)
        except (ModelError, ConfigError) as exc:
            pytest.skip(f"refused: {exc}")
        runs.append(step_records(tmp_path / f"b{batch}"))
    one, two = runs
    assert len(one) == len(two) >= 3
    for first, second in zip(one, two, strict=True):
        fields = [k for k in first if k in STEP_FIELDS or (isinstance(first[k], float) and k not in
                                                            ("lr", "tokens_per_s"))]
        assert set(fields) <= set(second), (first, second)
        for field_name in fields:
            assert second[field_name] == pytest.approx(first[field_name], rel=1e-4, abs=1e-6), (
                f"step {first['step']}: {field_name} {first[field_name]} (B x 1) "
                f"vs {second[field_name]} (B/2 x 2)")


@pytest.mark.parametrize("case", params(EXPENSIVE, "resume"))
def test_7_kill_and_resume_is_bit_equal(case, assets, tmp_path):
    from tuneforge.errors import ConfigError, ModelError
    from tuneforge.run import train_run

    train = {"max_steps": 4, "batch_size": 2, "grad_accum": 2, "save_every": 2}
    whole = make_config(case, assets, tmp_path / "whole", **train)
    try:
        train_run(whole)
    except (ModelError, ConfigError) as exc:
        pytest.skip(f"refused: {exc}")
    copy_killed_run(tmp_path / "whole", tmp_path / "killed", case, step=2)
    train_run(make_config(case, assets, tmp_path / "killed", **train), resume=True)
    task = last_task(case)
    a, b = final_weights(tmp_path / "whole", task), final_weights(tmp_path / "killed", task)
    assert a.keys() == b.keys()
    differing = sorted(k for k in a if not torch.equal(a[k], b[k]))
    assert not differing, f"resumed weights differ: {differing[:5]} ({len(differing)} of {len(a)})"


def test_every_strategy_is_in_the_expensive_subset_at_least_twice():
    from matrix_support import _is_test_helper

    from tuneforge.strategies import REGISTRY

    counts = {name: sum(name in c.names for c in EXPENSIVE) for name in REGISTRY if not _is_test_helper(name)}
    assert all(count >= 2 for count in counts.values()), counts
    assert {c.kind for c in EXPENSIVE} == {"lm", "dec_cls", "enc_cls"}


def test_every_xfail_names_a_real_case():
    ids = {c.id for c in CASES} | {combo for combo, _, _ in REFUSED}
    invariants = {"identity", "frozen", "reference", "accum", "padding", "reload", "resume", "validate"}
    unknown = sorted(key for key in XFAILS if key[1] not in ids or key[0] not in invariants)
    assert not unknown, f"xfail entries that match no case: {unknown}"
    skipped = sorted(key for key in XFAILS if key[1] in {c.id for c in CASES if c.skip})
    assert not skipped, f"xfail entries on skipped cases: {skipped}"


# ---------------------------------------------------------------------------------------------------
# The README table


def refusal_table(setup: list[tuple[Case, str]] | None = None) -> str:
    """The refused combinations and why, as Markdown: those refused before any model loads, and (given
    `setup`, from `refused_at_setup`) those a model kind refuses when the strategies are applied."""
    rows = ["| strategies | model kinds | refused because |", "| --- | --- | --- |"]
    for combo, _, reason in REFUSED:
        rows.append(f"| `{combo}` | all (before loading) | {reason.replace('|', '/')} |")
    by_reason: dict[tuple[str, str], list[str]] = {}
    for case, reason in setup or []:
        by_reason.setdefault((case.combo, reason.split(": ", 1)[0]), []).append(case.kind)
    for case, reason in setup or []:
        kinds = by_reason.pop((case.combo, reason.split(": ", 1)[0]), None)
        if kinds:
            rows.append(f"| `{case.combo}` | {', '.join(kinds)} | {reason.replace('|', '/')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    setup = None
    if "--setup" in sys.argv:  # also apply every case to its tiny model (about a minute)
        import tempfile

        from conftest import make_tokenizer

        with tempfile.TemporaryDirectory() as directory:
            setup = refused_at_setup(LIVE, build_assets(Path(directory), make_tokenizer()), Path(directory))
    print(refusal_table(setup))
    print(f"\n{len(REFUSED)} refused before loading; {len({c.combo for c in CASES})} accepted combinations "
          f"x {len({c.kind for c in CASES})} model kinds = {len(CASES)} cases ({len(LIVE)} apply)"
          + (f"; {len(setup)} of them refused at setup" if setup is not None else ""))
