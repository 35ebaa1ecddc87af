"""State-observation work on a machine where no OpenGL library loads.

Each test runs in a fresh process whose dynamic loader finds broken files in place of the
GL libraries (LD_LIBRARY_PATH is searched first, and a file that is not a library fails
the load), so that every headless backend (OSMesa, EGL) fails as if it were not installed,
whatever this machine has.
"""

import os
import subprocess
import sys

import pytest

GL_LIBRARIES = ("libOSMesa.so", "libOSMesa.so.6", "libOSMesa.so.8", "libEGL.so", "libEGL.so.1",
                "libGL.so", "libGL.so.1", "libOpenGL.so.0", "libGLX.so.0")

# The suite's tests that create, step or train on dm_control tasks from states: each kind
# once (the other parameters exercise the estimators, not the environment).
STATE_TESTS = [
    "python_tests/test_envs.py::test_state_observations",
    "python_tests/test_envs.py::test_task_names_cover_the_suite",
    "python_tests/test_envs.py::test_action_repeat_sums_rewards_and_counts_steps",
    "python_tests/test_envs.py::test_same_seed_same_trajectory",
    "python_tests/test_envs.py::test_actions_are_clipped_and_mapped_onto_task_bounds",
    "python_tests/test_train.py::test_smoke_state[tpx-5]",
    "python_tests/test_train.py::test_kill_and_resume_matches_uninterrupted_run[default]",
    "python_tests/test_gradvar.py::test_gradvar_on_a_dreamer_checkpoint",
    "python_tests/test_sweep.py::test_sweep_fails_resumes_skips_and_summarizes",
]
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def without_gl(tmp_path, mujoco_gl=None):
    """The environment of a process in which no GL library loads."""
    libs = tmp_path / "no_gl"
    libs.mkdir(exist_ok=True)
    for name in GL_LIBRARIES:
        (libs / name).write_text("not a shared library\n")
    env = {k: v for k, v in os.environ.items()
           if k not in ("MUJOCO_GL", "PYOPENGL_PLATFORM", "TPX_MUJOCO_GL_CHECKED",
                        "TPX_MUJOCO_GL_ERROR")}
    env["LD_LIBRARY_PATH"] = os.pathsep.join(filter(None, [str(libs), env.get("LD_LIBRARY_PATH")]))
    if mujoco_gl is not None:
        env["MUJOCO_GL"] = mujoco_gl
    return env


def python(code, env, timeout=600):
    out = subprocess.run([sys.executable, "-c", code], env=env, cwd=ROOT, capture_output=True,
                         text=True, timeout=timeout)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return out


def test_no_backend_loads_and_pixels_say_what_to_install(tmp_path):
    code = (
        "import tpx_ext.dreamer.envs as e, tpx_ext.dreamer.rendering as r\n"
        "why = r.rendering_error()\n"
        "assert why is not None and r.configure_rendering() == 'disable', why\n"
        "for b in ('osmesa', 'egl'):\n"
        "    assert r.probe_gl_backend(b) is not None, b\n"
        "try:\n"
        "    e.make_env('cartpole_swingup', obs='pixels')\n"
        "except e.RenderingUnavailable as x:\n"
        "    msg = str(x)\n"
        "else:\n"
        "    raise AssertionError('pixel observations without OpenGL did not raise')\n"
        "assert 'apt-get install libosmesa6' in msg and 'libegl1' in msg and 'osmesa:' in msg, msg\n"
        "with e.make_env('cartpole_swingup') as env:\n"
        "    env.reset()\n"
        "    try:\n"
        "        env.render(8)\n"
        "    except e.RenderingUnavailable:\n"
        "        print('render refused')\n"
    )
    assert "render refused" in python(code, without_gl(tmp_path)).stdout


def test_a_requested_backend_that_does_not_load_still_runs_state_tasks(tmp_path):
    code = (
        "import numpy as np, tpx_ext.dreamer.envs as e\n"
        "with e.make_env('walker_walk') as env:\n"
        "    env.reset(); obs = env.step(np.zeros(6))[0]\n"
        "assert obs.shape == (24,)\n"
        "try:\n"
        "    e.make_env('walker_walk', obs='pixels')\n"
        "except e.RenderingUnavailable as x:\n"
        "    assert 'egl:' in str(x) and 'libegl1' in str(x), str(x)\n"
        "    print('pixels refused')\n"
    )
    assert "pixels refused" in python(code, without_gl(tmp_path, mujoco_gl="egl")).stdout


def test_state_run_skips_its_gif_with_one_warning(tmp_path):
    def train(name, *args):
        logdir = tmp_path / name
        out = subprocess.run(
            [sys.executable, "-m", "tpx_ext.train", "--configs", "debug", "--logdir", str(logdir),
             "--threads", "1", "--steps", "800", *args],
            env=without_gl(tmp_path), cwd=ROOT, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return logdir, out.stderr

    logdir, err = train("gif", "--eval_gif", "true")  # evaluations at 0, 600 and 800 steps
    assert err.count("warning: evaluation GIFs are skipped") == 1, err[-3000:]
    assert "apt-get install libosmesa6" in err and "--eval_gif false" in err
    assert not (logdir / "eval").exists() or not list((logdir / "eval").glob("*.gif"))
    assert (logdir / "checkpoint.pt").exists()
    _, err = train("nogif", "--eval_gif", "false")
    assert "warning" not in err


def test_the_state_tests_pass_without_opengl(tmp_path):
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          *STATE_TESTS], env=without_gl(tmp_path), cwd=ROOT,
                         capture_output=True, text=True, timeout=1200)
    summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else ""
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-2000:]
    assert "passed" in summary and "skipped" not in summary and "failed" not in summary, summary
