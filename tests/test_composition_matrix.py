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
4. batch B x accum 1 trains like batch B/2 x accum 2: the same data, final weights equal to 1e-5 after 3
   steps (fp32, dropout 0), through `train_run`;
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
In a sequence with replay, invariant 4 compares the first task's weights (the replayed second task is
drawn in a batch-size-dependent order); a two-task mixture is left out of 4 for the same reason.
Measured: the whole module in about 2 minutes on 2 cores (`--durations`: a trial ~0.4 s, a `train_run`
pair 2-6 s).

Known bugs being fixed elsewhere are strict xfails (`XFAILS`): when a fix merges, its entries turn red and
must be removed; failures this matrix found that are not yet filed are strict xfails too ("found by the
matrix: ..."), so the suite stays green while each stays visible.

`python -m tests.test_composition_matrix [--setup]` (from the repository root) prints the refused
combinations as a Markdown table for the README (`--setup` adds those a model kind refuses at setup).
"""

from __future__ import annotations

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


# Failures of today's code, each listed exactly: {(invariant, case id): why}. "issue 11 bug" ones are being
# fixed elsewhere; "found by the matrix" ones are not filed yet. Strict: a fixed case turns red, remove it.
ACCUM = ("issue 11 bug: grad-accum equivalence: mixture_plan's item order depends on batch_size (the task "
         "permutation draws from the same generator first), so B x 1 and B/2 x 2 see different data")
PROMPT_PADDING = ("issue 11 bug: prompt on a decoder classifier: with inputs_embeds the classifier pools the last "
                  "position, a pad for a padded row, so a padded row scores differently from the row alone")
HEADS_PROMPT = ("issue 11 bug: heads + prompt crash: the heads forward calls the body with input_ids=None once the "
                "prompt hook moved them into inputs_embeds")
FULL_HEADS_RETENTION = ("issue 11 bug: [full, heads] + retention: the frozen copy deep-copies the heads' patched "
                        "forward, which still runs the live model, so the reference drifts with training")
DISTILL_HEADS = ("found by the matrix: distill (teacher: base) + heads on a classifier: the teacher runs the model "
                 "without task_id, so the headless body answers (BERT: no logits, AttributeError; Llama: 300 "
                 "vocabulary logits vs 2 labels, ModelError) at the first step")
UNUSED_OUTPUT = ("found by the matrix: full/layerwise + heads on a classifier train the body's own output layer "
                 "(Llama lm_head, BERT pooler) that task heads never use: trainable, in the optimizer, no gradient")
HEADS_EWC = ("found by the matrix: heads + ewc on a language-model + classification mixture: only head_ parameters "
             "train, EWC's retain-text Fisher never reaches them, and its backward raises at step 1")
HEADS_RELOAD = ("found by the matrix: heads on a mixture whose classification task is not task 0: save_adapter "
                "keeps head sizes but not task ids, so load_adapter gives head_t1 task id 0 and routes the "
                "language-model task's batches into it")
L2SP_RESUME = ("found by the matrix: l2sp in a task sequence resumed after the first task re-anchors at that task's "
               "end weights (on_train_start of the resumed task), not at the weights before training")
RETENTION_RESUME = ("found by the matrix: retention with base weights training (a frozen copy) in a task sequence "
                    "resumed after the first task copies that task's end weights as the reference (on_train_start "
                    "of the resumed task), not the model before training")
VALIDATE = ("found by the matrix: `tuneforge validate` never runs check_combination, so a refused list validates "
            "as ok (only train refuses it)")

XFAILS: dict[tuple[str, str], str] = {
    **{("frozen", f"distill+heads-{k}"): DISTILL_HEADS for k in ("dec_cls", "enc_cls")},
    **{("reference", f"distill+heads-{k}"): DISTILL_HEADS for k in ("dec_cls", "enc_cls")},
    **{("padding", f"distill+heads-{k}"): DISTILL_HEADS for k in ("dec_cls", "enc_cls")},
    **{("reload", f"distill+heads-{k}"): DISTILL_HEADS for k in ("dec_cls", "enc_cls")},
    **{("frozen", f"{c}-{k}"): UNUSED_OUTPUT for c in ("full+heads", "heads+layerwise") for k in ("dec_cls", "enc_cls")},
    **{(i, f"heads+prompt-{k}"): HEADS_PROMPT for i in ("frozen", "padding", "reload") for k in ("dec_cls", "enc_cls")},
    **{(i, "multitask-heads+ewc-lm"): HEADS_EWC for i in ("frozen", "padding", "reload")},
    ("reference", "multitask-full+heads+retention-lm"): FULL_HEADS_RETENTION,
    ("reload", "multitask-full+heads+retention-lm"): HEADS_RELOAD,
    ("reload", "multitask-lora+heads+ewc-lm"): HEADS_RELOAD,
    **{("padding", f"{c}-dec_cls"): PROMPT_PADDING
       for c in ("prompt", "adapter+prompt", "distill+prompt", "dropout+prompt", "l2sp+prompt", "ia3+prompt",
                 "layerwise+prompt", "lora+prompt", "prefix+prompt")},
    ("resume", "l2sp+replay-lm"): L2SP_RESUME,
    ("resume", "retention+ewc-lm"): RETENTION_RESUME,
    ("resume", "retention+replay-lm"): RETENTION_RESUME,
}


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
XFAILS.update({("validate", combo): VALIDATE for combo, _, _ in REFUSED})
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
                                    "strategies": [{name: {}} for name in names], "output": str(tmp_path / "run")}))
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
        assert entry["vs_base"] <= 1e-5, f"{entry['label']} no longer computes the base's outputs ({entry['vs_base']:.3g})"
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
    "ewc+lora-lm", "heads+lora-enc_cls", "adapter+distill-dec_cls", "adapter+replay-lm", "l2sp+prefix-dec_cls",
    "prefix+retention-lm", "distill+prompt-lm", "dropout+prompt-enc_cls", "heads+ia3-dec_cls", "dropout+ia3-lm",
    "ewc+replay-lm", "l2sp+replay-lm", "ewc+retention-lm", "replay+retention-lm",  # sequences, resumed in task 2
    # the named hybrids that are more than a pair (layerwise+prefix and adapter+distill are pairs above/in the matrix)
    "lora+ewc+distill-lm", "multitask-lora+heads+ewc-lm",
])


XFAILS.update({("accum", c.id): ACCUM for c in EXPENSIVE if c.context != "mixture"})


@pytest.mark.parametrize("case", params([c for c in EXPENSIVE if c.context != "mixture"], "accum"))
def test_4_grad_accumulation_equivalence(case, assets, tmp_path):
    from tuneforge.errors import ConfigError, ModelError
    from tuneforge.run import train_run

    task = "t0" if "replay" in case.names else last_task(case)
    weights = []
    for batch, accum in ((4, 1), (2, 2)):
        config = make_config(case, assets, tmp_path / f"b{batch}", batch_size=batch, grad_accum=accum)
        try:
            train_run(config)
        except (ModelError, ConfigError) as exc:
            pytest.skip(f"refused: {exc}")
        weights.append(final_weights(tmp_path / f"b{batch}", task))
    one, two = weights
    assert one.keys() == two.keys()
    worst = max((float((one[k] - two[k]).abs().max()), k) for k in one)
    assert worst[0] <= 1e-5, f"B x 1 vs B/2 x 2: {worst[1]} differs by {worst[0]:.3g}"


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
