"""Atomic checkpoints of a training run: everything needed to continue it exactly.

A checkpoint is `checkpoint.pt` (model, optimizers, counters, RNG states, the name of the
replay file) plus `replay-<step>.npz`. Both are written to temporary files and renamed; the
replay file is named by step and written first, so a crash at any point leaves a
`checkpoint.pt` whose replay file exists. Older replay files are deleted afterwards.
"""

import glob
import os

import torch

from .atomic import atomic_write

CHECKPOINT_FILE = "checkpoint.pt"


def atomic_torch_save(obj, path: str) -> None:
    atomic_write(path, lambda f: torch.save(obj, f))


def save(run_dir: str, state: dict, replay, step: int) -> None:
    replay_name = f"replay-{step:010d}.npz"
    replay.save(os.path.join(run_dir, replay_name))
    atomic_torch_save({**state, "replay_file": replay_name}, os.path.join(run_dir, CHECKPOINT_FILE))
    for old in glob.glob(os.path.join(run_dir, "replay-*.npz")):
        if os.path.basename(old) != replay_name:
            os.unlink(old)


def exists(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, CHECKPOINT_FILE))


def read_state(run_dir: str, map_location="cpu") -> dict:
    """The state saved in the run's checkpoint.pt (config, agent, counters, RNG states, the
    name of the replay file). The one place that reads a checkpoint file."""
    path = os.path.join(run_dir, CHECKPOINT_FILE)
    if not os.path.exists(path):
        why = ("no such directory" if not os.path.isdir(run_dir) else
               "not a run directory, or the run stopped before its first checkpoint")
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT_FILE} ({why})")
    # Our own file, holding numpy RNG states: not loadable with weights_only=True.
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as exc:  # truncated, corrupt, or another program's file
        raise ValueError(f"{path} is not a checkpoint this trainer can read "
                         f"({type(exc).__name__}: {exc})") from exc
    if not isinstance(state, dict) or not {"config", "agent", "counters"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint of tpx_ext.train (another tool's file?)")
    return state


def replay_path(run_dir: str, state: dict) -> str:
    """The replay file that the checkpoint `state` (from read_state) names."""
    path = os.path.join(run_dir, state["replay_file"])
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: {CHECKPOINT_FILE} names {state['replay_file']}, "
                                "which is missing")
    return path


def load(run_dir: str, replay, map_location="cpu") -> dict:
    """The checkpoint's state; fills `replay` from its replay file."""
    state = read_state(run_dir, map_location)
    replay.load(replay_path(run_dir, state))
    return state
