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


def load(run_dir: str, replay, map_location="cpu") -> dict:
    """The checkpoint's state; fills `replay` from its replay file."""
    # Our own file, holding numpy RNG states: not loadable with weights_only=True.
    state = torch.load(os.path.join(run_dir, CHECKPOINT_FILE), map_location=map_location,
                       weights_only=False)
    replay.load(os.path.join(run_dir, state["replay_file"]))
    return state
