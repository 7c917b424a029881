"""The strategy boundary: central code reads strategy declarations and never names a strategy.

- no module of `tuneforge/` outside `tuneforge/strategies/` holds a string constant equal to a registered
  strategy name (f-string pieces count; docstrings and comments do not) nor imports a strategy module;
- no strategy module imports another strategy module (shared helpers sit below them);
- the names `surgery.is_injected` treats as injected are exactly the registry's parameter prefixes;
- importing tuneforge changes no global state: the process environment, transformers' attention registry.
"""

from __future__ import annotations

import ast
import json
import os
import pkgutil
import subprocess
import sys
from pathlib import Path

import tuneforge
import tuneforge.strategies
from tuneforge import surgery
from tuneforge.strategies import REGISTRY

PACKAGE = Path(tuneforge.__file__).parent
STRATEGY_DIR = PACKAGE / "strategies"
STRATEGY_MODULES = {m.name for m in pkgutil.iter_modules(tuneforge.strategies.__path__)} - {"base"}

# (file under tuneforge/, string) pairs that are not strategy names, each with its reason. Keep it tiny.
NOT_STRATEGY_NAMES = {
    # "prompt": the data field of the prompt/completion format, a template's prompt, and the key of a
    # generation sample ({"prompt", "reference", "output"}) in results.json; all predate the strategy.
    ("data/formats.py", "prompt"),
    ("config.py", "prompt"),
    ("evaluate.py", "prompt"),
    ("report.py", "prompt"),
    ("cli.py", "prompt"),
    # "adapter": the run directory's `adapter/` folder (PEFT's word for any saved adapter), defined once in
    # export.py; run.py still spells it out in its list of run files.
    ("export.py", "adapter"),
    ("run.py", "adapter"),
    # the kind of a model card's export: the adapter/ folder, beside "merged" and "gguf"
    ("model_card.py", "adapter"),
    # "prompt": the column key of LLaMA-Factory's dataset_info.json (its alpaca `columns.prompt`)
    ("data/registry.py", "prompt"),
}


def _docstrings(tree: ast.AST) -> set[int]:
    """ids of the docstring constants of a module, its classes and functions."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) \
                    and isinstance(first.value.value, str):
                found.add(id(first.value))
    return found


def _imported_modules(tree: ast.AST) -> list[tuple[int, str]]:
    """(line, dotted name) of every import, with `from a import b` also giving `a.b` (b may be a module)."""
    imported = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            imported += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            imported.append((node.lineno, node.module))
            imported += [(node.lineno, f"{node.module}.{alias.name}") for alias in node.names]
    return imported


def _strategy_module(dotted: str) -> str | None:
    """The strategy module a dotted import name reaches into, if any (`tuneforge.strategies.lora...`)."""
    parts = dotted.split(".")
    if parts[:2] == ["tuneforge", "strategies"] and len(parts) > 2 and parts[2] in STRATEGY_MODULES:
        return parts[2]
    return None


def central_files() -> list[Path]:
    return sorted(p for p in PACKAGE.rglob("*.py") if STRATEGY_DIR not in p.parents)


def test_central_code_names_no_strategy():
    names = set(REGISTRY)
    assert {"lora", "full", "prompt", "ewc"} <= names  # the registry was read, not empty
    found = []
    for path in central_files():
        where = path.relative_to(PACKAGE).as_posix()
        tree = ast.parse(path.read_text(), str(path))
        skip = _docstrings(tree)
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip \
                    and node.value in names and (where, node.value) not in NOT_STRATEGY_NAMES:
                found.append(f"{where}:{node.lineno}: string {node.value!r}")
        for line, dotted in _imported_modules(tree):
            if _strategy_module(dotted):
                found.append(f"{where}:{line}: imports {dotted}")
    assert not found, "central modules read declarations, never strategy names:\n" + "\n".join(found)


def test_whitelist_is_still_needed():
    """Every allowed (file, string) pair still occurs, so the list cannot silently outlive its reason."""
    present = set()
    for path in central_files():
        where = path.relative_to(PACKAGE).as_posix()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Constant) and (where, node.value) in NOT_STRATEGY_NAMES:
                present.add((where, node.value))
    assert present == NOT_STRATEGY_NAMES


def test_strategies_import_no_other_strategy():
    found = []
    for name in sorted(STRATEGY_MODULES):
        path = STRATEGY_DIR / f"{name}.py"
        for line, dotted in _imported_modules(ast.parse(path.read_text(), str(path))):
            other = _strategy_module(dotted)
            if other is not None and other != name:
                found.append(f"strategies/{name}.py:{line}: imports {dotted}")
    assert not found, "strategies never import each other (shared helpers sit below):\n" + "\n".join(found)


def test_scanner_sees_literals_imports_and_fstring_pieces():
    """The scan above would catch what it is meant to catch (a guard against a scanner that finds nothing)."""
    source = 'import tuneforge.strategies.lora\nfrom tuneforge.strategies.ia3 import x\ny = f"{z}" + "lora"\n'
    tree = ast.parse(source)
    strings = [n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in REGISTRY]
    assert strings == ["lora"]
    assert [m for _, d in _imported_modules(tree) if (m := _strategy_module(d))] == ["lora", "ia3", "ia3"]
    piece = [n.value for n in ast.walk(ast.parse('f"{a}lora"')) if isinstance(n, ast.Constant)]
    assert piece == ["lora"]  # an f-string's literal parts are constants too
    assert not _docstrings(tree) and _docstrings(ast.parse('"""lora"""\n'))


def test_injected_prefixes_are_the_registry_prefixes():
    declared = {entry.cls.param_prefix for entry in REGISTRY.values() if entry.cls.param_prefix}
    assert set(surgery.injected_prefixes()) == declared
    for prefix in declared:
        assert surgery.is_injected(f"model.layers.0.self_attn.q_proj.{prefix}x.weight")
    assert not surgery.is_injected("model.layers.0.self_attn.q_proj.weight")


def test_exactly_one_default_parametrization():
    defaults = [name for name, entry in REGISTRY.items() if entry.cls.is_default]
    assert len(defaults) == 1 and REGISTRY[defaults[0]].family == "parametrization"


IMPORT_CHECK = """
import json, os, pkgutil, importlib
# Third-party imports first: transformers' modeling_utils sets TORCHINDUCTOR_CACHE_DIR itself.
import torch, transformers, transformers.modeling_utils, transformers.masking_utils
import accelerate, pydantic, yaml
from transformers.masking_utils import AttentionMaskInterface
from transformers.modeling_utils import AttentionInterface
before = dict(os.environ)
import tuneforge
for module in pkgutil.walk_packages(tuneforge.__path__, "tuneforge."):
    importlib.import_module(module.name)
after = dict(os.environ)
registered = [k for k in (*AttentionInterface(), *AttentionMaskInterface()) if k.startswith("tuneforge")]
changed = sorted(k for k in before.keys() | after.keys() if before.get(k) != after.get(k))
print(json.dumps({"changed": changed, "registered": registered}))
"""


def test_importing_tuneforge_changes_no_global_state():
    # Unset in the child (the test run sets them) so that an import setting them is seen; importing
    # makes no hub request, so no offline flag is needed.
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TOKENIZERS_PARALLELISM")}
    env["PYTHONPATH"] = str(PACKAGE.parent)
    done = subprocess.run([sys.executable, "-c", IMPORT_CHECK], capture_output=True, text=True, env=env,
                          timeout=300, check=False)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report == {"changed": [], "registered": []}


def test_design_doc_example_strategy_plugs_in_alone():
    """The new-strategy example of docs/design.md registers and composes with no other file changed."""
    from conftest import tiny_llama

    from tuneforge.compose import applied_strategies
    from tuneforge.strategies import refusal

    text = (PACKAGE.parent / "docs" / "design.md").read_text()
    code = text.split("```python\n", 1)[1].split("```", 1)[0]
    try:
        exec(compile(code, "docs/design.md", "exec"), {"__name__": "bitfit_example"})  # noqa: S102 (our doc)
        assert refusal(["full", "bitfit"]) and refusal(["lora", "bitfit"]) is None
        model = tuneforge.prepare(tiny_llama(layers=2), [{"bitfit": {"norms": True}}, "ewc"])
        trainable = {name for name, p in model.named_parameters() if p.requires_grad}
        assert trainable and all("norm" in name for name in trainable)
        assert REGISTRY["bitfit"].cls.label({"norms": True}) == "bitfit (+norms)"
        assert [s.name for s in applied_strategies(model)] == ["bitfit", "ewc"]
    finally:
        REGISTRY.pop("bitfit", None)


def test_reference_eval_mode_restores_the_training_flag():
    from torch import nn

    from tuneforge.reference import eval_mode

    model = nn.Sequential(nn.Dropout(0.5))
    for flag in (True, False):
        model.train(flag)
        with eval_mode(model):
            assert not model.training and not model[0].training
        assert model.training is flag and model[0].training is flag


def test_variant_labels_come_from_the_strategy():
    from tuneforge.compare import strategies_label
    from tuneforge.strategies import default_parametrization

    specs = [{"lora": {"dora": True, "rslora": True}}, {"ewc": {}}, {"removed-strategy": {}}]
    expected = "lora (dora, rslora) + ewc + removed-strategy"
    assert strategies_label({"steps": 3, "strategies": specs}) == expected
    assert strategies_label({"steps": 3, "strategies": []}) == default_parametrization().name
