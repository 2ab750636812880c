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
