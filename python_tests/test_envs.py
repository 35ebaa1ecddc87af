"""dm_control suite wrapper: observations, action repeat, seeding, errors, pixels."""

import itertools
import subprocess
import sys

import numpy as np
import pytest

from tpx_ext.dreamer.envs import make_env, task_names
from tpx_ext.dreamer.rendering import (
    configure_rendering,
    gl_backend_order,
    no_backend_message,
    pick_gl_backend,
    probe_gl_backend,
    rendering_error,
)


@pytest.mark.parametrize(
    "name, obs_dim, action_dim",
    [("cartpole_swingup", 5, 1), ("walker_walk", 24, 6), ("ball_in_cup_catch", 8, 2)],
)
def test_state_observations(name, obs_dim, action_dim):
    with make_env(name) as env:
        assert env.observation_shape == (obs_dim,) and env.action_dim == action_dim
        obs = env.reset()
        assert obs.shape == (obs_dim,) and obs.dtype == np.float32
        obs, reward, done, info = env.step(np.zeros(action_dim))
        assert obs.shape == (obs_dim,) and obs.dtype == np.float32
        assert isinstance(reward, float) and done is False and info["discount"] == 1.0


def test_task_names_cover_the_suite():
    names = task_names()
    assert "cheetah_run" in names and "reacher_easy" in names and "ball_in_cup_catch" in names
    assert len(names) == len(set(names)) > 20


def run_episode(env, actions):
    env.reset()
    rewards, done = [], False
    while not done:
        _, r, done, info = env.step(actions[len(rewards)])
        rewards.append(r)
    return rewards, info


def test_action_repeat_sums_rewards_and_counts_steps():
    actions = np.random.default_rng(0).uniform(-1, 1, size=(1000, 1))
    with make_env("cartpole_swingup", action_repeat=1, seed=3) as env1:
        r1, info1 = run_episode(env1, actions.repeat(1, axis=0))
    with make_env("cartpole_swingup", action_repeat=2, seed=3) as env2:
        r2, info2 = run_episode(env2, actions[:500])
    assert len(r1) == 1000 and len(r2) == 500  # the suite's 1000-step time limit
    # Repeating action j twice with repeat 1 is the same physics as one step with repeat 2.
    with make_env("cartpole_swingup", action_repeat=1, seed=3) as env1:
        r1, _ = run_episode(env1, actions[:500].repeat(2, axis=0))
    np.testing.assert_allclose(r2, np.add(r1[0::2], r1[1::2]), rtol=1e-12)
    assert sum(r2) > 0
    # A time limit truncates: the discount stays 1.
    assert info1["discount"] == info2["discount"] == 1.0


def test_same_seed_same_trajectory():
    actions = np.random.default_rng(1).uniform(-1, 1, size=(20, 6))

    def trajectory(seed):
        with make_env("walker_walk", seed=seed) as env:
            out = [env.reset()]
            for a in actions:
                obs, r, _, _ = env.step(a)
                out += [obs, np.float32(r)]
            return np.concatenate([np.atleast_1d(x) for x in out])

    np.testing.assert_array_equal(trajectory(0), trajectory(0))
    assert not np.array_equal(trajectory(0), trajectory(1))


def test_actions_are_clipped_and_mapped_onto_task_bounds():
    # quadruped's actuators have bounds other than [-1, 1]; the control the physics
    # receives is not clamped by MuJoCo in data.ctrl, so this sees the mapping itself.
    with make_env("quadruped_walk", action_repeat=1) as env:
        spec, ctrl = env.unwrapped.action_spec(), env.unwrapped.physics.data.ctrl
        assert not np.all(spec.maximum == 1.0)
        env.reset()
        for scale in (1.0, 5.0):
            env.step(scale * np.ones(12))
            np.testing.assert_allclose(ctrl, spec.maximum)
            env.step(-scale * np.ones(12))
            np.testing.assert_allclose(ctrl, spec.minimum)
        env.step(np.zeros(12))
        np.testing.assert_allclose(ctrl, (spec.minimum + spec.maximum) / 2)


def test_unknown_task_lists_valid_names():
    with pytest.raises(ValueError, match="unknown task 'cartpole_fly'.*cartpole_swingup"):
        make_env("cartpole_fly")
    with pytest.raises(ValueError, match="obs must be"):
        make_env("cartpole_swingup", obs="rgb")


def test_bad_actions():
    with make_env("reacher_easy") as env:
        with pytest.raises(RuntimeError, match="reset"):
            env.step(np.zeros(2))
        env.reset()
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            env.step(np.zeros(3))
        with pytest.raises(ValueError, match=r"shape \(2,\)"):
            env.step(0.0)
        with pytest.raises(ValueError, match="NaN or inf"):
            env.step([0.0, np.nan])
        with pytest.raises(ValueError, match="NaN or inf"):
            env.step([np.inf, 0.0])


def test_backend_order_and_choice():
    assert gl_backend_order(gpu_present=True) == ["egl", "osmesa"]
    assert gl_backend_order(gpu_present=False) == ["osmesa", "egl"]
    fails = {"osmesa": "no libOSMesa"}
    assert pick_gl_backend(["osmesa", "egl"], fails.get) == ("egl", {"osmesa": "no libOSMesa"})
    assert pick_gl_backend(["egl"], fails.get) == ("egl", {})
    backend, errors = pick_gl_backend(["osmesa", "egl"], lambda b: f"{b} broken")
    assert backend is None and list(errors) == ["osmesa", "egl"]
    msg = no_backend_message(errors)
    assert "osmesa: osmesa broken" in msg and "apt-get install libosmesa6" in msg
    assert "apt-get install libegl1 libegl-mesa0 libgl1-mesa-dri" in msg


def test_a_backend_that_loads_is_found_here():
    """This machine renders (the pixel tests need it): the backend in use passes its probe."""
    assert rendering_error() is None
    assert probe_gl_backend(configure_rendering()) is None


def test_pixel_observations_render():
    with make_env("cartpole_swingup", obs="pixels", size=64) as env:
        assert env.observation_shape == (3, 64, 64)
        frames = [env.reset()]
        for _ in range(4):
            frames.append(env.step(np.ones(1))[0])
    for f in frames:
        assert f.shape == (3, 64, 64) and f.dtype == np.uint8
    assert frames[0].std() > 0  # not a blank image
    assert all(not np.array_equal(f, g) for f, g in itertools.pairwise(frames))


def test_rendering_then_torch_compile_imports_do_not_crash():
    """Mesa's LLVM (software rendering) and triton's collide when triton loads second:
    the process segfaulted on torch.compile / torch.func after the first rendered frame.
    A fresh process, because the test process has loaded both already."""
    code = (
        "from tpx_ext.dreamer.envs import make_env\n"
        "with make_env('cartpole_swingup', obs='pixels') as env:\n"
        "    env.reset()\n"
        "import torch\n"
        "from torch.utils._triton import has_triton_package\n"
        "print('triton loaded:', has_triton_package())\n"  # imports triton when installed
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "triton loaded:" in out.stdout
