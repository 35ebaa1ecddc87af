#!/usr/bin/env bash
# Headless OpenGL for MuJoCo (pixel observations, evaluation GIFs), called by `make setup`.
# State observations and the default training job need none, so a machine without it is
# not an error: where no backend loads, root with apt-get installs OSMesa (software
# rendering); anyone else is told the one command to run, and setup carries on.
#
# Environment: PYTHON  the python with tpx_ext and dm_control (default .venv/bin/python)
set -uo pipefail

py="${PYTHON:-.venv/bin/python}"
check='import sys, tpx_ext.dreamer.rendering as e
why = e.rendering_error()
print(why or "headless OpenGL: MUJOCO_GL=" + e.configure_rendering())
sys.exit(1 if why else 0)'

if env -u TPX_MUJOCO_GL_CHECKED -u TPX_MUJOCO_GL_ERROR "$py" -c "$check" >/dev/null 2>&1; then
  exit 0
fi
if [[ "$(id -u)" == 0 ]] && command -v apt-get >/dev/null; then
  echo "ensure_gl.sh: no headless OpenGL backend loads; installing libosmesa6 (apt-get)"
  if DEBIAN_FRONTEND=noninteractive apt-get update -qq &&
     DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libosmesa6 >/dev/null &&
     env -u TPX_MUJOCO_GL_CHECKED -u TPX_MUJOCO_GL_ERROR "$py" -c "$check"; then
    exit 0
  fi
  echo "ensure_gl.sh: installing libosmesa6 did not make rendering work"
fi
echo "ensure_gl.sh: no headless OpenGL here. State observations and the default job (make run)"
echo "  do not need it; pixel observations and evaluation GIFs do. Install it with:"
echo "    sudo apt-get install libosmesa6"
exit 0
