"""Which headless OpenGL backend MuJoCo draws frames with, probed before dm_control's import.

dm_control and mujoco read MUJOCO_GL once, at import, and a backend that fails to load there
breaks the import even for state observations: `configure_rendering` probes the candidates
in subprocesses and turns rendering off (with the reason, `rendering_error`) when none loads.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

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


def load_triton_first() -> None:
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
