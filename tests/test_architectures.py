"""The architecture matrix (issue 18): every parametrization on every common architecture trains, or is
refused with a true one-line reason.

Tiny random models (hidden 32, 2 layers, the conftest tokenizer's vocabulary) of 14 decoder families, plus
two attention variants (Mistral with a 4-token sliding window, Falcon with ALiBi), built from each family's
own config class and saved as a user's model folder, train as causal LMs; BERT, RoBERTa and DeBERTa-v2
encoder bodies train as sequence classifiers. Columns (tests/architectures_support.py): every
registered parametrization with tiny sizes and its own defaults otherwise (`lora` with `all-linear`; task
heads only where a run classifies), LoRA with its default targets, DoRA, and one objective hybrid (LoRA + EWC
on the run's retain text).

Each cell is one `tuneforge.run.train_run` of 2 steps. Checks per cell:
- `outcome`: trains (2 finite step losses), or is refused (ModelError/ConfigError, never a traceback) with the
  reason `REFUSALS` expects. A refusal not in `REFUSALS` fails, and so does an entry whose cell now trains.
- `head`: a parameter the base load draws at random (a new classification head) is trained.
- `reload`: the run's adapter loaded into a fresh base (`tuneforge.load_adapter`; a new head drawn from
  another seed, so an unsaved head shows) gives the trained model's logits.
- `peft`: an adapter PEFT can express (`adapter_config.json`) loads in `peft.PeftModel` with the same logits.

Known failures are strict xfails (`XFAILS`), each with the text of the failure it expects: the same failure is
an xfail; a fixed cell passes and turns red (remove its entry); a different failure is red too.

`python -m tests.test_architectures --table` (from the repository root) runs every cell, writes
docs/results/architectures.json and prints the README's support table (about 2 minutes on 2 cores).
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from pathlib import Path

import pytest

# support modules and conftest, also under `python -m tests....`
sys.path.insert(0, str(Path(__file__).parent))

from architectures_support import (
    ARCHITECTURES,
    TOLERANCE,
    Assets,
    Cell,
    CellResult,
    build_assets,
    cells,
    columns,
    markdown_table,
    parametrizations,
    results_json,
    run_cell,
)

CELLS = cells()
CHECKS = ("outcome", "head", "reload", "peft", "peft_keys")

# ---------------------------------------------------------------------------------------------------
# Expected refusals: {cell id: a substring of the reason}. True reasons that say what to use instead.

REFUSALS: dict[str, str] = {
    # Falcon's attention (rotary or ALiBi) is computed in its own code, not through AttentionInterface
    "falcon-prefix": "FalconForCausalLM computes attention without transformers' AttentionInterface",
    "falcon-alibi-prefix": "uses ALiBi position biases, which its code builds for the real tokens only",
    # DeBERTa-v2's disentangled attention has its own code path (no AttentionInterface, no KV cache)
    "deberta-v2-prefix": "computes attention without transformers' AttentionInterface",
    # a classifier cannot score retain text, and a single task has no earlier task to protect
    **{f"{arch}-lora+ewc": "ewc on a classifier protects earlier tasks of a sequence" for arch in
       ("bert", "roberta", "deberta-v2")},
}

# ---------------------------------------------------------------------------------------------------
# Known failures: {(check, cell id): (text of the failure, cause)}. Causes numbered as in issue 18.

def fails(text: str, cause: str) -> tuple[str, str]:
    """A known failure: the text its assertion message holds, and its cause."""
    return text, cause



XFAILS: dict[tuple[str, str], tuple[str, str]] = {
    # PEFT's own limit, not ours: PEFT 0.21.2 checks for `past_key_values`, which BERT-style models under
    # transformers 5.24 no longer take (they take `cache=`); our prefix on them equals the model's own cache
    **{("peft", f"{arch}-prefix"): fails("Model does not support past key values",
                                         "PEFT 0.21.2 cannot run prefix tuning on BERT-style models under "
                                         "transformers 5.24 (it looks for `past_key_values`)")
       for arch in ("bert", "roberta")},
}

# Cells whose adapter has no adapter_config.json on purpose, because PEFT would compute something else.
NO_PEFT_CONFIG: dict[str, str] = {
    **{f"{arch}-prefix": "a sliding window shorter than the context: PEFT's cached prefix leaves the window, "
                         "ours stays visible to every query" for arch in ("gemma2", "mistral-window4")},
    **{f"{arch}-prompt": "the head reads the body's first position: a virtual token in PEFT, the first real "
                         "token here" for arch in ("roberta", "deberta-v2")},
}


class KnownFailure(Exception):
    """The failure an XFAILS entry expects (a different one is an ordinary, red failure)."""


@contextlib.contextmanager
def known(check: str, cell: Cell):
    expected = XFAILS.get((check, cell.id))
    try:
        yield
    except AssertionError as exc:
        if expected and expected[0] in str(exc):
            raise KnownFailure(f"{expected[1]} [{exc}]") from exc
        raise


def params(selected: list[Cell], check: str) -> list:
    marked = []
    for cell in selected:
        entry = XFAILS.get((check, cell.id))
        marks = [pytest.mark.xfail(strict=True, raises=KnownFailure, reason=entry[1])] if entry else []
        marked.append(pytest.param(cell, id=cell.id, marks=marks))
    return marked


# ---------------------------------------------------------------------------------------------------
# One run per cell, shared by the checks


@pytest.fixture(scope="session")
def arch_assets(tmp_path_factory, tokenizer) -> Assets:
    return build_assets(tmp_path_factory.mktemp("architectures"), tokenizer)


_RESULTS: dict[str, CellResult] = {}


@pytest.fixture
def result(cell, arch_assets, tmp_path_factory) -> CellResult:
    if cell.id not in _RESULTS:
        _RESULTS[cell.id] = run_cell(cell, arch_assets, tmp_path_factory.mktemp("cell"))
    return _RESULTS[cell.id]


def trained(result: CellResult) -> None:
    if not result.trains:
        pytest.skip(f"did not train (checked by test_outcome): {result.refused or result.crash}")


HINTS = ("use", "try", "available", "set", "list", "give", "load", "add", "remove")


@pytest.mark.parametrize("cell", params(CELLS, "outcome"))
def test_outcome(cell, result):
    expected = REFUSALS.get(cell.id)
    with known("outcome", cell):
        assert not result.crash, f"crashes (a traceback, not a one-line refusal): {result.crash}"
        if expected:
            assert result.refused, f"trains, but REFUSALS expects a refusal ({expected!r}): remove the entry"
            assert expected in result.refused, f"refused for another reason: {result.refused}"
            assert "\n" not in result.refused.strip(), f"a refusal is one line: {result.refused!r}"
            assert any(word in result.refused.lower() for word in HINTS), \
                f"says what to use instead: {result.refused}"
        else:
            assert not result.refused, f"refused: {result.refused}"
            assert len(result.losses) == 2, f"expected 2 logged steps, got {result.losses}"
            assert all(math.isfinite(loss) for loss in result.losses), f"loss not finite: {result.losses}"


@pytest.mark.parametrize("cell", params(CELLS, "head"))
def test_head(cell, result):
    trained(result)
    with known("head", cell):
        assert not result.untrained_new, (f"the new head ({', '.join(result.untrained_new)}) "
                                          f"is never trained (created at random by the base load)")


@pytest.mark.parametrize("cell", params(CELLS, "reload"))
def test_reload(cell, result):
    trained(result)
    with known("reload", cell):
        assert not result.reload_error, f"load_adapter fails: {result.reload_error}"
        assert result.reload is not None and result.reload <= TOLERANCE, (
            f"the reloaded adapter gives other logits (max diff {result.reload:.3g})")


@pytest.mark.parametrize("cell", params([c for c in CELLS if c.peft_expressible], "peft"))
def test_peft(cell, result):
    pytest.importorskip("peft")
    trained(result)
    with known("peft", cell):
        if cell.id in NO_PEFT_CONFIG:
            assert not result.peft_config, f"expected no adapter_config.json: {NO_PEFT_CONFIG[cell.id]}"
            return
        assert result.peft_config, "a single PEFT-expressible strategy wrote no adapter_config.json"
        assert not result.peft_error, f"peft.PeftModel.from_pretrained fails: {result.peft_error}"
        assert result.peft is not None and result.peft <= TOLERANCE, (
            f"PEFT-loaded logits differ (max diff {result.peft:.3g})")


@pytest.mark.parametrize("cell", params([c for c in CELLS if c.peft_expressible], "peft_keys"))
def test_peft_keys(cell, result):
    """PEFT builds exactly the adapted modules the adapter holds weights for: `target_modules` selects in
    PEFT's model what it selected in ours (PEFT warns about adapter keys it expected and did not find)."""
    pytest.importorskip("peft")
    trained(result)
    if not result.peft_config or result.peft_error:
        pytest.skip("PEFT did not load it (checked by test_peft)")
    with known("peft_keys", cell):
        assert not result.peft_key_warnings, f"PEFT warns: {result.peft_key_warnings[0]}"


# ---------------------------------------------------------------------------------------------------
# The tables themselves


def test_every_parametrization_is_a_column_and_every_architecture_a_row():
    used = {next(iter(s)) for strategies in columns().values() for s in strategies}
    assert set(parametrizations()) <= used
    assert {c.arch for c in CELLS} == set(ARCHITECTURES)
    assert len({c.id for c in CELLS}) == len(CELLS)


def test_every_entry_names_a_real_cell():
    ids = {c.id for c in CELLS}
    peft_ids = {c.id for c in CELLS if c.peft_expressible}
    unknown = sorted(c for c in REFUSALS if c not in ids)
    unknown += sorted(f"{check}:{c}" for check, c in XFAILS
                      if check not in CHECKS or c not in (peft_ids if check == "peft" else ids))
    assert not unknown, f"entries that match no cell: {unknown}"
    both = sorted(c for check, c in XFAILS if check == "outcome" and c in REFUSALS)
    assert not both, f"a cell is either an expected refusal or a known failure: {both}"


# ---------------------------------------------------------------------------------------------------
# The README table: python -m tests.test_architectures --table


def main(argv: list[str]) -> int:
    """`--table`: run every cell, write the JSON, print the table; `--from-json`: print the committed JSON's
    table; architecture names: run those only (nothing written)."""
    import tempfile
    import time

    import torch
    import transformers
    from conftest import make_tokenizer

    path = Path(__file__).parent.parent / "docs" / "results" / "architectures.json"
    if "--from-json" in argv:
        print(markdown_table(json.loads(path.read_text())["cells"]))
        return 0
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    only = [a for a in argv if not a.startswith("--")]
    selected = [c for c in CELLS if not only or c.arch in only]
    results = {}
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as directory:
        assets = build_assets(Path(directory), make_tokenizer())
        for index, cell in enumerate(selected):
            results[cell.id] = run_cell(cell, assets, Path(directory) / "cells" / cell.id)
            print(f"[{index + 1}/{len(selected)}] {cell.id}", file=sys.stderr, flush=True)
    data = results_json(selected, results, "python -m tests.test_architectures --table")
    data["seconds"] = round(time.perf_counter() - started, 1)
    data["known_failures"] = {f"{check}:{cell}": cause for (check, cell), (_, cause) in XFAILS.items()}
    data["expected_refusals"] = REFUSALS
    if "--table" in argv and not only:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
        print(f"wrote {path}", file=sys.stderr)
    print(markdown_table(data["cells"]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
