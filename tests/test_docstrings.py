"""The examples in the docstrings run, and every public callback and function has one where promised."""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import cm_monitor

MODULES = sorted(
    info.name for info in pkgutil.walk_packages(cm_monitor.__path__, prefix="cm_monitor.") if not info.ispkg
)


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples_run(name):
    module = importlib.import_module(name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, verbose=False)
    assert result.failed == 0, f"{result.failed} docstring example(s) of {name} failed"


@pytest.mark.parametrize(
    "obj",
    [cm_monitor.CMDimensionMonitor, cm_monitor.DiffeoStabilityMonitor, cm_monitor.ElasticityMonitor],
    ids=lambda o: o.__name__,
)
def test_callbacks_have_a_runnable_example(obj):
    examples = doctest.DocTestFinder().find(obj, obj.__name__)
    assert sum(len(t.examples) for t in examples) >= 3
