"""The package laid out by concern keeps the flat module names of earlier versions: each is the same
module object as its new home (so imports, attributes and monkeypatching all see one module)."""
import importlib

import pytest

import chip_ext


@pytest.mark.parametrize("old, package", sorted(chip_ext._MOVED.items()))
def test_old_module_names_are_the_new_modules(old, package):
    new = importlib.import_module(f"chip_ext.{package}.{old}")
    assert importlib.import_module(f"chip_ext.{old}") is new
    assert getattr(chip_ext, old) is new


def test_the_concern_packages_reach_their_core():
    from chip_ext.distillation import _writable, distill
    from chip_ext.evaluation import METHODS, evaluate

    assert distill is chip_ext.distill and callable(_writable) and callable(evaluate) and "chip" in METHODS
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        chip_ext.distillation.nope
    with pytest.raises(AttributeError, match="has no attribute 'nope'"):
        chip_ext.nope


LAYERS = ["kernels", "distillation", "explanation", "evaluation", "channels"]  # each may import only those before it


def _chip_ext_imports(path, package):
    """(line, target) of every chip_ext import in one module (top level and inside functions): target is the
    first name under chip_ext ('distillation', 'cli', ...)."""
    import ast

    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                parts = alias.name.split(".")
                if parts[0] == "chip_ext":
                    yield node.lineno, parts[1] if len(parts) > 1 else ""
            continue
        if not isinstance(node, ast.ImportFrom):
            continue
        if node.level == 0:
            parts = (node.module or "").split(".")
            if parts[0] != "chip_ext":
                continue
            parts = parts[1:]
        elif node.level == 1:
            parts = [package] + (node.module.split(".") if node.module else [])
        else:
            parts = node.module.split(".") if node.module else [a.name for a in node.names]
        yield node.lineno, parts[0] if parts else ""


@pytest.mark.parametrize("package", LAYERS)
def test_one_way_down_no_import_back_up(package):
    """kernels -> distillation -> explanation -> evaluation -> channels -> cli/demo: a package never imports
    one after it (the model views both distillation and explanation use live in distillation)."""
    from pathlib import Path

    root = Path(chip_ext.__file__).parent
    above = set(LAYERS[LAYERS.index(package) + 1:]) | {"cli", "demo", "__main__"}
    bad = [f"{f.name}:{line} imports chip_ext.{target}" for f in sorted((root / package).glob("*.py"))
           for line, target in _chip_ext_imports(f, package) if target in above]
    assert not bad, bad


def test_the_layer_check_sees_an_upward_import(tmp_path):
    f = tmp_path / "m.py"
    f.write_text("def g():\n    from ..evaluation.core import evaluate\n    from . import ops\nimport chip_ext.cli\n"
                 "from chip_ext.channels import atlas\n")
    assert sorted(_chip_ext_imports(f, "kernels")) == [(2, "evaluation"), (3, "kernels"), (4, "cli"),
                                                           (5, "channels")]
