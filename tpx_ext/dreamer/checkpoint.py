"""Atomic checkpoints of a training run: everything needed to continue it exactly.

A run directory holds

    checkpoint.pt         the newest checkpoint: model, optimizers, counters, RNG states and
                          the replay's manifest (configuration, RNG, range of episode ids)
    checkpoint.prev.pt    the one before it, used when the newest cannot be read
    replay/ep-<id>.npz    one file per finished episode, written once when it finishes

A checkpoint therefore writes only what is new: its own file, whose size does not grow
with the buffer, and the episodes finished since the last one (already on disk). Every file
is written to a temporary file and renamed. The order of a save (episodes, then the new
checkpoint, then rotating the old one to checkpoint.prev.pt, then deleting the episode files
that neither names) means a crash at any point leaves at least one complete checkpoint
whose episodes all exist.

Checkpoints hold only tensors and plain values (RNG states as tensors and JSON), so they
are read with torch.load(weights_only=True): a file from someone else cannot run code when
it is loaded by --resume, `gradvar --checkpoint` or `tpx_ext.evaluate`.
"""

import glob
import json
import os
import pickle
import sys

import numpy as np
import torch

from .atomic import atomic_write
from .replay import CorruptReplay, ReplayBuffer, reading

CHECKPOINT_FILE = "checkpoint.pt"
PREVIOUS_FILE = "checkpoint.prev.pt"
REPLAY_DIR = "replay"

# numpy's uint32 arrays, which checkpoints written before the replay moved to episode files
# hold (the environment's RNG key): allowed so that those runs still load. Together these
# globals build nothing but plain arrays of that dtype (an object array is refused).
_LEGACY_GLOBALS = [np.zeros(1).__reduce__()[0], np.ndarray, np.dtype, type(np.dtype(np.uint32))]


def safe_load(path, map_location="cpu"):
    """torch.load(weights_only=True), with a clear error for a file holding pickled objects
    (which could run code) and for one that is truncated or not a torch file."""
    try:
        with torch.serialization.safe_globals(_LEGACY_GLOBALS):
            return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:
        lines = str(exc).splitlines() or [""]
        # torch names the global the file would import, or the type it would build, on one
        # line of its long message
        code = next((ln.strip().rstrip(".") for ln in lines
                     if "GLOBAL" in ln or "Can only build" in ln), None)
        if isinstance(exc, pickle.UnpicklingError) and code is not None:
            raise ValueError(f"{path}: refused: it holds a pickled object that loading would "
                             f"have to run ({code}). Checkpoints of tpx_ext hold only tensors "
                             "and plain values; do not load files from sources you do not "
                             "trust") from None
        # truncated, corrupt, or not a torch file at all
        raise ValueError(f"{path} is not a checkpoint this trainer can read "
                         f"({type(exc).__name__}: {lines[0]})") from exc


def to_tensors(obj):
    """obj with every numpy array replaced by a tensor (uint32 widened to int64, which
    torch stores everywhere), so it loads with weights_only=True."""
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
    if isinstance(obj, dict):
        return {k: to_tensors(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_tensors(v) for v in obj)
    return obj


def replay_dir(run_dir: str) -> str:
    return os.path.join(run_dir, REPLAY_DIR)


def new_replay(run_dir: str, capacity: int, obs_shape, obs_dtype, action_dim: int,
               seed: int) -> ReplayBuffer:
    """The replay buffer of a new run, writing its episodes into the run directory."""
    return ReplayBuffer(capacity, obs_shape, obs_dtype, action_dim, seed=seed,
                        directory=replay_dir(run_dir))


def save(run_dir: str, state: dict, replay: ReplayBuffer) -> None:
    """Write `state` (plain values and tensors) with the replay's manifest as the newest
    checkpoint; the previous newest becomes checkpoint.prev.pt."""
    replay.flush()  # episodes a legacy buffer has only in memory; normally nothing
    kept_from = replay.checkpointed_from
    manifest = replay.manifest()
    latest, previous = os.path.join(run_dir, CHECKPOINT_FILE), os.path.join(run_dir, PREVIOUS_FILE)
    atomic_write(latest + ".new", lambda f: torch.save(to_tensors({**state, "replay": manifest}), f))
    if os.path.exists(latest):
        os.replace(latest, previous)
    os.replace(latest + ".new", latest)
    # checkpoint.prev.pt still names the episodes from the last checkpoint's first id on
    first = manifest["first_id"]
    replay.prune(first if kept_from is None else min(first, kept_from))
    if kept_from is not None:  # neither checkpoint is one from before episode files
        for legacy in glob.glob(os.path.join(run_dir, "replay-*.npz")):
            os.unlink(legacy)
    replay.checkpointed_from = first


def exists(run_dir: str) -> bool:
    return any(os.path.exists(os.path.join(run_dir, f)) for f in (CHECKPOINT_FILE, PREVIOUS_FILE))


def _candidates(run_dir: str):
    paths = [os.path.join(run_dir, f) for f in (CHECKPOINT_FILE, PREVIOUS_FILE)]
    paths = [p for p in paths if os.path.exists(p)]
    if not paths:
        why = ("no such directory" if not os.path.isdir(run_dir) else
               "not a run directory, or the run stopped before its first checkpoint")
        raise FileNotFoundError(f"{run_dir}: no {CHECKPOINT_FILE} ({why})")
    return paths


def _read(path: str, map_location) -> dict:
    state = safe_load(path, map_location)
    if not isinstance(state, dict) or not {"config", "agent", "counters"} <= set(state):
        raise ValueError(f"{path} is not a checkpoint of tpx_ext.train (another tool's file?)")
    return state


def _open_replay(run_dir: str, state: dict) -> ReplayBuffer:
    if "replay" in state:
        manifest = state["replay"]
        pending = {k: np.asarray(v.cpu()) for k, v in manifest["pending"].items()}
        replay = ReplayBuffer.open(replay_dir(run_dir), {**manifest, "pending": pending})
        replay.checkpointed_from = replay.id_range[0]
        return replay
    # a checkpoint from before episode files: the whole buffer in one .npz it names
    path = os.path.join(run_dir, state["replay_file"])
    if not os.path.exists(path):
        raise CorruptReplay(f"{path}: missing (named by the checkpoint)")
    with reading(path):
        with np.load(path, allow_pickle=False) as data:
            capacity, obs_shape, obs_dtype, action_dim = json.loads(str(data["config"]))
        replay = ReplayBuffer(capacity, obs_shape, np.dtype(obs_dtype), action_dim,
                              directory=replay_dir(run_dir))
        replay.load(path)  # checkpointed_from stays None: the next save keeps the .npz
    return replay


def load(run_dir: str, map_location="cpu", with_replay: bool = True, quarantine: bool = False):
    """(state, replay) of the run's newest complete checkpoint (replay None without
    with_replay). A newest checkpoint that cannot be read, or whose episode files are
    missing or damaged, is reported on stderr by name and the previous one is used; with
    `quarantine` (a run about to continue) it is renamed to `<name>.bad`, so the next save
    keeps the good one as its previous. Raises ValueError naming every file when none is
    complete."""
    problems = []
    for path in _candidates(run_dir):
        try:
            state = _read(path, map_location)
            replay = _open_replay(run_dir, state) if with_replay else None
        except (ValueError, OSError) as exc:  # CorruptReplay is a ValueError
            problems.append(str(exc))
            continue
        if problems:
            print(f"warning: {problems[0]}\nwarning: using the previous checkpoint {path} "
                  f"(env step {state['counters']['env_steps']})", file=sys.stderr)
            if quarantine and os.path.basename(path) == PREVIOUS_FILE:
                latest = os.path.join(run_dir, CHECKPOINT_FILE)
                if os.path.exists(latest):
                    os.replace(latest, latest + ".bad")
        return state, replay
    raise ValueError(f"{run_dir}: no complete checkpoint: " + "; ".join(problems))


def read_state(run_dir: str, map_location="cpu") -> dict:
    """The state saved in the run's newest readable checkpoint (config, agent, counters, RNG
    states, the replay's manifest), without reading the replay."""
    return load(run_dir, map_location, with_replay=False)[0]
