"""The package layout: the experiment tools live in tpx_ext.experiments, and the commands users
know, `python -m tpx_ext.gradvar`, `python -m tpx_ext.control`, `python -m tpx_ext.frozen` and
`python -m tpx_ext.sweep`, run them."""

import os
import subprocess
import sys

import pytest

import tpx_ext.control
import tpx_ext.frozen
import tpx_ext.gradvar
import tpx_ext.sweep
from tpx_ext.experiments import control, frozen, gradvar, sweep

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", ["tpx_ext.gradvar", "tpx_ext.control", "tpx_ext.frozen",
                                    "tpx_ext.sweep", "tpx_ext.experiments.gradvar",
                                    "tpx_ext.experiments.control", "tpx_ext.experiments.frozen",
                                    "tpx_ext.experiments.sweep", "tpx_ext.evaluate",
                                    "tpx_ext.dreamer.evaluate"])
def test_command_runs(module):
    out = subprocess.run([sys.executable, "-m", module, "--help"], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "usage: python -m tpx_ext." in out.stdout


def test_commands_are_the_subpackage_mains():
    assert tpx_ext.gradvar.main is gradvar.main
    assert tpx_ext.control.main is control.main
    assert tpx_ext.frozen.main is frozen.main
    assert tpx_ext.sweep.main is sweep.main


def test_every_module_folder_is_a_package():
    # setup.py lists the packages with find_packages, which skips a folder without
    # __init__.py: its modules would be missing from a non-editable install.
    for folder, dirs, files in os.walk(os.path.join(ROOT, "tpx_ext")):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        if any(f.endswith(".py") for f in files):
            assert "__init__.py" in files, os.path.relpath(folder, ROOT)
