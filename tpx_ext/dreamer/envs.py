"""DeepMind Control Suite tasks behind a small, uniform interface.

    with make_env("cartpole_swingup", obs="pixels") as env:
        obs = env.reset()                                  # uint8 [3, 64, 64]
        obs, reward, done, info = env.step(action)         # action in [-1, 1]^action_dim

Needs the `dreamer` extra (`pip install --no-build-isolation ".[dreamer]"`). State
observations need no OpenGL; drawing frames (pixel observations, `render`) goes through a
headless MuJoCo OpenGL backend, chosen among those that load here (`rendering.py`).
"""

from __future__ import annotations

import numpy as np

from ..extras import needs
from .rendering import RenderingUnavailable, configure_rendering, load_triton_first, rendering_error

def _suite():
    configure_rendering()
    load_triton_first()
    with needs("dreamer"):
        from dm_control import suite

    return suite


def task_names() -> list[str]:
    """Every suite task as "<domain>_<task>", e.g. "cartpole_swingup", "ball_in_cup_catch"."""
    return [f"{d}_{t}" for d, t in _suite().ALL_TASKS]


class DMCEnv:
    """One suite task with action repeat, actions in [-1, 1] and flat or pixel observations.

    step() returns (obs, reward, done, info): reward summed over the repeated physics
    steps, done at the time limit, info["discount"] the product of the suite's discounts
    over the repeat (1.0 at a time limit: it truncates, it does not terminate)."""

    def __init__(
        self, name: str, obs: str = "state", action_repeat: int = 2, seed: int = 0, size: int = 64,
        episode_length: int = 0,
    ):
        if episode_length < 0:
            raise ValueError(f"episode_length must be >= 0, got {episode_length}")
        if obs not in ("state", "pixels"):
            raise ValueError(f"obs must be 'state' or 'pixels', got {obs!r}")
        if action_repeat < 1:
            raise ValueError(f"action_repeat must be >= 1, got {action_repeat}")
        suite = _suite()
        if obs == "pixels" and (why := rendering_error()) is not None:
            raise RenderingUnavailable(f"{name}: pixel observations need rendering. {why}")
        # Domains such as ball_in_cup contain underscores, so match against the full list.
        tasks = {f"{d}_{t}": (d, t) for d, t in suite.ALL_TASKS}
        if name not in tasks:
            raise ValueError(f"unknown task {name!r}; valid names: {', '.join(sorted(tasks))}")
        domain, task = tasks[name]
        self.name, self.obs_mode, self.action_repeat, self.size = name, obs, action_repeat, size
        self._env = suite.load(domain, task, task_kwargs={"random": seed})
        spec = self._env.action_spec()
        self.action_dim = int(spec.shape[0])
        # A few tasks (quadruped) have bounds other than [-1, 1]; map [-1, 1] onto them.
        self._act_low = spec.minimum.astype(np.float64)
        self._act_high = spec.maximum.astype(np.float64)
        # Dreamer's convention: quadruped is seen from camera 2, the rest from camera 0.
        self._camera = 2 if domain == "quadruped" else 0
        if obs == "pixels":
            self.observation_shape = (3, size, size)
        else:
            n = sum(int(np.prod(s.shape)) for s in self._env.observation_spec().values())
            self.observation_shape = (n,)
        # Shorter episodes (in physics steps, 0 = the suite's limit) truncate like the
        # suite's own time limit: done with discount 1.
        self.episode_length = episode_length
        self._t = 0
        self._needs_reset = True

    @property
    def unwrapped(self):
        """The underlying dm_control environment (physics, specs)."""
        return self._env

    def _observe(self, time_step) -> np.ndarray:
        if self.obs_mode == "pixels":
            return self.render(self.size)
        # The suite's observation dict has a fixed, task-defined key order.
        values = time_step.observation.values()
        return np.concatenate([np.asarray(v, np.float32).ravel() for v in values])

    def render(self, size: int = 64) -> np.ndarray:
        """The current frame as uint8 [3, size, size], from the task's usual camera.
        Raises RenderingUnavailable where no OpenGL backend loads."""
        if (why := rendering_error()) is not None:
            raise RenderingUnavailable(why)
        frame = self._env.physics.render(size, size, camera_id=self._camera)
        return np.ascontiguousarray(frame.transpose(2, 0, 1))

    def rng_state(self):
        """The task's random state, which draws every initial state: with it restored before
        a reset, the next episode starts exactly as it would have (checkpoints, resume)."""
        return self._env.task.random.get_state()

    def set_rng_state(self, state) -> None:
        # a checkpoint stores the MT19937 key as an int64 tensor (see checkpoint.to_tensors)
        name, key, *rest = state
        key = np.asarray(key.cpu() if hasattr(key, "cpu") else key).astype(np.uint32)
        self._env.task.random.set_state((name, key, *rest))

    def reset(self) -> np.ndarray:
        self._needs_reset = False
        self._t = 0
        return self._observe(self._env.reset())

    def step(self, action):
        if self._needs_reset:
            raise RuntimeError("call reset() before step() (at the start and after done)")
        a = np.asarray(action, dtype=np.float64)
        if a.shape != (self.action_dim,):
            raise ValueError(f"{self.name}: action must have shape ({self.action_dim},), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"{self.name}: action contains NaN or inf: {a}")
        a = np.clip(a, -1.0, 1.0)
        a = self._act_low + (a + 1.0) * 0.5 * (self._act_high - self._act_low)
        reward, discount = 0.0, 1.0
        for _ in range(self.action_repeat):
            time_step = self._env.step(a)
            self._t += 1
            reward += time_step.reward
            discount *= time_step.discount
            if time_step.last():
                break
        done = time_step.last() or 0 < self.episode_length <= self._t
        self._needs_reset = done
        return self._observe(time_step), float(reward), done, {"discount": float(discount)}

    def close(self) -> None:
        # Free the rendering context now: left to interpreter shutdown it raises noisy errors.
        if self._env is not None:
            self._env.physics.free()
            self._env = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def make_env(
    name: str, obs: str = "state", action_repeat: int = 2, seed: int = 0, size: int = 64,
    episode_length: int = 0,
) -> DMCEnv:
    return DMCEnv(name, obs=obs, action_repeat=action_repeat, seed=seed, size=size,
                  episode_length=episode_length)
