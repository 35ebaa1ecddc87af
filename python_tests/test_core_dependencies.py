"""The library (ops, reference, estimators) works with torch and numpy alone; the Dreamer
application and the experiment tools say which extra a missing package comes with."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The packages of the extras: importing any of them fails in the child process.
BLOCK = ("tqdm", "matplotlib", "tensorboard", "PIL", "dm_control", "mujoco", "ray", "pandas")
BLOCKER = f"""
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCK!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
"""


def python(code):
    return subprocess.run([sys.executable, "-c", BLOCKER + code], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


def test_library_needs_only_torch_and_numpy():
    out = python(
        "import torch, tpx_ext\n"
        "from tpx_ext import Estimator, StochasticGraph, gaussian_tpx_backward, reference\n"
        "g = torch.Generator().manual_seed(0)\n"
        "d, eps, sigma = (torch.randn(64, 3, generator=g) for _ in range(3))\n"
        "r = gaussian_tpx_backward(d, eps, sigma.abs() + 0.1, torch.randn(64, generator=g))\n"
        "assert r.grad_mu.shape == (64, 3)\n"
        "Estimator('tpx')\n"
        "loaded = sorted(m for m in sys.modules if m.split('.')[0] in " + repr(BLOCK) + ")\n"
        "assert not loaded, loaded\n"
        "print('ok')\n"
    )
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-3000:]


def test_the_application_names_its_extra():
    out = subprocess.run([sys.executable, "-c", BLOCKER + "import runpy\n"
                          "runpy.run_module('tpx_ext.train', run_name='__main__')\n"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
    assert "comes with tpx_ext's 'dreamer' extra" in out.stderr, out.stderr[-2000:]
    assert "pip install --no-build-isolation '.[dreamer]'" in out.stderr


def test_the_experiment_tools_name_their_extra(tmp_path):
    for module in ("tpx_ext.gradvar", "tpx_ext.sweep"):  # their options need no extra
        out = python(f"import runpy\nsys.argv = ['{module}', '--help']\n"
                     f"runpy.run_module('{module}', run_name='__main__')\n")
        assert out.returncode == 0 and "usage: python -m " + module in out.stdout, out.stderr[-2000:]
    out = python("import runpy\nsys.argv = ['tpx_ext.gradvar', '--system', 'rotor', '--horizons', "
                 f"'1', '--reps', '2', '--out', {str(tmp_path / 'gv')!r}]\n"
                 "runpy.run_module('tpx_ext.gradvar', run_name='__main__')\n")
    assert out.returncode != 0
    assert "comes with tpx_ext's 'experiments' extra" in out.stderr, out.stderr[-2000:]
    assert "pip install --no-build-isolation '.[experiments]'" in out.stderr
