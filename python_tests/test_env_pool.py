"""EnvPool: N environments in worker processes behave as N separately seeded environments."""

import numpy as np
import pytest

from tpx_ext.dreamer.env_pool import EnvPool
from tpx_ext.dreamer.envs import make_env


def test_workers_step_like_environments_seeded_seed_plus_i():
    rng = np.random.default_rng(0)
    actions = rng.uniform(-1, 1, (5, 3, 1)).astype(np.float32)
    with EnvPool(3, "cartpole_swingup", seed=10, episode_length=10) as pool:
        assert (pool.observation_shape, pool.action_dim) == ((5,), 1)
        got = [pool.reset()] + [pool.step(a) for a in actions]
        states = pool.rng_state()
    for i in range(3):
        with make_env("cartpole_swingup", seed=10 + i, episode_length=10) as env:
            np.testing.assert_array_equal(got[0][i], env.reset())
            for t, a in enumerate(actions, 1):
                o, r, d, info = env.step(a[i])
                go, gr, gd, ginfo = got[t][i]
                np.testing.assert_array_equal(go, o)
                assert (gr, gd, ginfo) == (r, d, info)
            assert got[-1][i][2] is True  # 5 steps of repeat 2: the 10-step limit
            np.testing.assert_array_equal(states[i][1], env.rng_state()[1])


def test_rng_state_round_trip_restarts_episodes_exactly():
    with EnvPool(2, "cartpole_swingup", seed=0) as pool:
        pool.reset()
        saved = pool.rng_state()
        first = pool.reset()
        pool.set_rng_state(saved)
        again = pool.reset()
    for a, b in zip(first, again):
        np.testing.assert_array_equal(a, b)


def test_errors_name_the_environment():
    with pytest.raises(ValueError, match="envs must be >= 1, got 0"):
        EnvPool(0, "cartpole_swingup")
    with pytest.raises(RuntimeError, match=r"environment 0 of 2: ValueError: unknown task 'nope'"):
        EnvPool(2, "nope")
    with EnvPool(2, "cartpole_swingup") as pool:
        pool.reset()
        with pytest.raises(ValueError, match=r"actions must have shape \(2, 1\)"):
            pool.step(np.zeros((3, 1)))
        with pytest.raises(RuntimeError, match="environment 1 of 2: .*action contains NaN"):
            pool.step(np.array([[0.0], [np.nan]]))
        with pytest.raises(ValueError, match="1 environment RNG states for 2"):
            pool.set_rng_state([None])


def test_one_environment_stays_in_this_process():
    with EnvPool(1, "cartpole_swingup", seed=3) as pool, \
            make_env("cartpole_swingup", seed=3) as env:
        assert pool._procs == []
        np.testing.assert_array_equal(pool.reset()[0], env.reset())
