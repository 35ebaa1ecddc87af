"""DeepMind Control Suite tasks behind a small, uniform interface.

    with make_env("cartpole_swingup", obs="pixels") as env:
        obs = env.reset()                                  # uint8 [3, 64, 64]
        obs, reward, done, info = env.step(action)         # action in [-1, 1]^action_dim

Needs the `dreamer` extra (`pip install --no-build-isolation ".[dreamer]"`). State observations need no OpenGL; drawing
frames (pixel observations, `render`) goes through a headless MuJoCo OpenGL backend, chosen
by `configure_rendering` among those that load here.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import numpy as np

from ..extras import needs

# Headless OpenGL backends MuJoCo renders with, and the Debian packages that provide them.
GL_PACKAGES = {"osmesa": "libosmesa6", "egl": "libegl1 libegl-mesa0 libgl1-mesa-dri"}
# dm_control's and mujoco's MUJOCO_GL value for physics without rendering.
NO_RENDERING = "disable"
_NO_RENDERING_VALUES = ("off", "disable", "disabled", "false", "0")
# Set by configure_rendering for this process and the processes it starts, so that the
# backend is probed once per process tree: the MUJOCO_GL value found to work, and, when
# rendering is off, why.
_CHECKED_ENV = "TPX_MUJOCO_GL_CHECKED"
_ERROR_ENV = "TPX_MUJOCO_GL_ERROR"
_PROBE = ("from dm_control import _render\n"
          "context = _render.Renderer(max_width=8, max_height=8)\n"
          "context.free()\n")


class RenderingUnavailable(RuntimeError):
    """A frame was asked for where no OpenGL backend can render."""


def _nvidia_gpu_present() -> bool:
    if os.path.exists("/dev/nvidia0"):
        return True
    if shutil.which("nvidia-smi") is None:
        return False
    try:
        result = subprocess.run(["nvidia-smi", "-L"], check=False, capture_output=True, timeout=10)
        return result.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


def gl_backend_order(gpu_present: bool) -> list[str]:
    """Backends in the order they are tried: EGL renders on an NVIDIA GPU; without one,
    OSMesa first (software rendering, as fast as Mesa's EGL and safe to fork after), then
    EGL through Mesa."""
    return ["egl", "osmesa"] if gpu_present else ["osmesa", "egl"]


def probe_gl_backend(backend: str, timeout: float = 120.0) -> str | None:
    """None when MuJoCo can create a `backend` context on this machine, else why not.
    Probed in a child process: a backend whose import failed cannot be replaced in this
    one (PyOpenGL fixes its platform at its first import)."""
    env = {**os.environ, "MUJOCO_GL": backend}
    env.pop("PYOPENGL_PLATFORM", None)
    try:
        result = subprocess.run([sys.executable, "-c", _PROBE], env=env, capture_output=True,
                                text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return f"creating a context took more than {timeout:.0f} s"
    if result.returncode == 0:
        return None
    lines = [line.strip() for line in result.stderr.splitlines() if line.strip()]
    return lines[-1] if lines else f"exit status {result.returncode}"


def pick_gl_backend(candidates, probe=probe_gl_backend) -> tuple[str | None, dict[str, str]]:
    """The first candidate that loads (or None), and why each one before it did not."""
    errors = {}
    for backend in candidates:
        why = probe(backend)
        if why is None:
            return backend, errors
        errors[backend] = why
    return None, errors


def no_backend_message(errors: dict[str, str]) -> str:
    tried = "; ".join(f"{backend}: {why}" for backend, why in errors.items())
    installs = " or ".join(f"`apt-get install {GL_PACKAGES[b]}` ({b})"
                           for b in errors if b in GL_PACKAGES) or "`apt-get install libosmesa6`"
    return (f"MuJoCo cannot render on this machine: no headless OpenGL backend loads ({tried}). "
            f"Pixel observations and evaluation GIFs need one: install it with {installs} on "
            f"Debian/Ubuntu, then start Python again. State observations need none.")


def configure_rendering() -> str:
    """Choose MuJoCo's OpenGL backend and return the MUJOCO_GL value in effect.

    dm_control and mujoco read MUJOCO_GL once, at import, and a backend that fails to load
    there breaks the import even for state observations. So, before their import, the
    requested backend (MUJOCO_GL) or else each of `gl_backend_order` is probed, and the
    first that works is used; if none does, rendering is turned off (MUJOCO_GL=disable)
    and `rendering_error()` says why, so that physics and state observations still work.
    After dm_control's import this changes nothing."""
    current = os.environ.get("MUJOCO_GL", "")
    if "dm_control" in sys.modules or current.strip().lower() in _NO_RENDERING_VALUES:
        return current
    if current and os.environ.get(_CHECKED_ENV) == current:
        return current  # probed by this process or the one that started it
    backend, errors = pick_gl_backend([current] if current else gl_backend_order(_nvidia_gpu_present()))
    if backend is not None:
        os.environ["MUJOCO_GL"] = os.environ[_CHECKED_ENV] = backend
        return backend
    os.environ["MUJOCO_GL"] = NO_RENDERING
    os.environ[_ERROR_ENV] = no_backend_message(errors)
    return NO_RENDERING


def rendering_error() -> str | None:
    """Why frames cannot be drawn in this process, or None when they can. Chooses the
    backend first if dm_control has not been imported yet."""
    configure_rendering()
    if os.environ.get("MUJOCO_GL", "").strip().lower() not in _NO_RENDERING_VALUES:
        return None
    return os.environ.get(_ERROR_ENV) or (
        f"rendering is turned off (MUJOCO_GL={os.environ['MUJOCO_GL']}); unset MUJOCO_GL or "
        f"set it to osmesa or egl to draw frames")


def _load_triton_first() -> None:
    """Mesa's software OpenGL (OSMesa, or EGL without an NVIDIA driver) loads its own
    LLVM when dm_control starts rendering; importing triton (torch.compile's and
    torch.func's lazy import) after that segfaults the process as the two LLVMs
    collide. Loaded in the other order both work, so load triton first if installed."""
    if "dm_control" in sys.modules:
        return
    try:
        import triton  # noqa: F401
    except ImportError:
        pass


def _suite():
    configure_rendering()
    _load_triton_first()
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
        self._env.task.random.set_state(state)

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
