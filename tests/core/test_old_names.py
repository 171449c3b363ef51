"""The module names of 0.1 keep working for one release: the same module objects (a class
imported either way is one class), with a deprecation warning naming the new place."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

OLD_NEW = [("coe.experts", "coe.backends"), ("coe.experts.base", "coe.backends.base"),
           ("coe.routers", "coe.routing"), ("coe.routers.learned", "coe.learned.classifier"),
           ("coe.aggregators.vote", "coe.aggregation.vote"), ("coe.types", "coe.core.types"),
           ("coe.orchestrator", "coe.apps.api"), ("coe.executor", "coe.execution"),
           ("coe.eval.runner", "coe.apps.eval.runner"), ("coe.cli", "coe.apps.cli")]


@pytest.mark.parametrize("old,new", OLD_NEW)
def test_an_old_module_name_is_the_new_module(old, new):
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        module = importlib.import_module(old)
    assert module is importlib.import_module(new)


def test_a_plugin_written_for_0_1_imports_its_base_classes():
    code = ("import warnings; warnings.simplefilter('ignore')\n"
            "from coe.experts import Backend\nfrom coe.routers import Router\n"
            "from coe.aggregators import Aggregator\nimport coe.backends, coe.routing\n"
            "assert Backend is coe.backends.Backend and Router is coe.routing.Router\n"
            "print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_python_m_coe_cli_still_runs_the_command_line():
    out = subprocess.run([sys.executable, "-m", "coe.cli", "--help"], capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0 and "Composition of Experts" in out.stdout, out.stderr
