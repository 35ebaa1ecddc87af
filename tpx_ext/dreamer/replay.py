"""Episode replay buffer for Dreamer: whole episodes in, fixed-length sequences out.

Each stored step i of an episode holds obs_i together with the action, reward and discount
that led to it (the first step of an episode holds zeros, 0.0 and 1.0), the convention the
world model trains on:

    buf = ReplayBuffer(capacity=1_000_000, obs_shape=(3, 64, 64), obs_dtype=np.uint8, action_dim=6)
    obs = env.reset();  buf.add(obs, np.zeros(6), 0.0, 1.0, first=True)
    obs, r, done, info = env.step(a);  buf.add(obs, a, r, info["discount"], last=done)
    batch = buf.sample(16, 64)   # dict of [16, 64, ...] arrays

An episode becomes sampleable when a step with last=True finishes it (or when the next
first=True step begins a new one, which keeps the unfinished one as it is).

On disk (`directory=`), every finished episode is written once, atomically, to
`<directory>/ep-<id>.npz` (ids count episodes from 0), so a checkpoint needs only
`manifest()`: the buffer's configuration, RNG state and the range of ids it holds, a few
hundred bytes at any size. Evicted episodes' files stay until `prune` (called by the
checkpoint once no checkpoint kept on disk names them).
"""

from __future__ import annotations

import itertools
import json
import os
import zipfile
from collections import deque
from contextlib import contextmanager

import numpy as np

from .atomic import atomic_write

_FIELDS = ("obs", "action", "reward", "discount")


class CorruptReplay(ValueError):
    """An episode file named by a checkpoint is missing, truncated or not what it should be."""


@contextmanager
def reading(path: str):
    """Reading an .npz file: whatever a truncated, corrupt or foreign one raises becomes a
    CorruptReplay naming it, so a checkpoint that names it counts as damaged."""
    try:
        yield
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as exc:
        raise CorruptReplay(f"{path}: unreadable, truncated or corrupt "
                            f"({type(exc).__name__}: {exc})") from exc


class ReplayBuffer:
    def __init__(self, capacity: int, obs_shape, obs_dtype, action_dim: int, seed: int = 0,
                 directory=None):
        """capacity: the most stored steps (over finished episodes); the oldest episodes
        are evicted to stay within it. obs_dtype: np.uint8 (pixels) or np.float32 (states).
        directory: where finished episodes are written (None: memory only)."""
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.obs_dtype = np.dtype(obs_dtype)
        if self.obs_dtype not in (np.uint8, np.float32):
            raise ValueError(f"obs_dtype must be uint8 or float32, got {self.obs_dtype}")
        self.capacity = int(capacity)
        self.obs_shape = tuple(int(s) for s in obs_shape)
        self.action_dim = int(action_dim)
        self._rng = np.random.default_rng(seed)
        self._episodes: deque[dict[str, np.ndarray]] = deque()
        self._steps = 0
        self._pending: dict[str, list] = {k: [] for k in _FIELDS}
        self._starts_cache = None  # (T, episode indices, cumulative valid starts)
        # created by the first flush, so that a reader (evaluate, frozen) changes no run
        self.directory = None if directory is None else os.fspath(directory)
        self._first_id = 0  # id of the oldest stored episode
        self._written = 0  # episodes with smaller ids are on disk
        # first id named by the checkpoint last written or read (see checkpoint.save)
        self.checkpointed_from = None

    # -- adding -------------------------------------------------------------------------
    def add(
        self, obs, action, reward: float, discount: float, first: bool = False, last: bool = False
    ) -> None:
        obs = np.asarray(obs)
        if obs.shape != self.obs_shape:
            raise ValueError(f"obs must have shape {self.obs_shape}, got {obs.shape}")
        # Casting floats into uint8 would silently wrap; pixels must arrive as uint8.
        if self.obs_dtype == np.uint8 and obs.dtype != np.uint8:
            raise ValueError(f"pixel obs must be uint8, got {obs.dtype}")
        action = np.asarray(action, dtype=np.float32)
        if action.shape != (self.action_dim,):
            raise ValueError(f"action must have shape ({self.action_dim},), got {action.shape}")
        if first:
            self._commit()
        elif not self._pending["obs"]:
            raise ValueError("the first step of an episode must be added with first=True")
        p = self._pending
        p["obs"].append(obs.astype(self.obs_dtype, copy=True))
        p["action"].append(action)
        p["reward"].append(np.float32(reward))
        p["discount"].append(np.float32(discount))
        if last:
            self._commit()

    def _commit(self) -> None:
        if not self._pending["obs"]:
            return
        episode = {k: np.stack(v) for k, v in self._pending.items()}
        self._pending = {k: [] for k in _FIELDS}
        self._store(episode)

    def _store(self, episode: dict[str, np.ndarray]) -> None:
        n = len(episode["obs"])
        if n > self.capacity:
            raise ValueError(f"an episode of {n} steps does not fit in capacity {self.capacity}")
        self._episodes.append(episode)
        self._steps += n
        while self._steps > self.capacity:
            self._steps -= len(self._episodes.popleft()["obs"])
            self._first_id += 1
        self._starts_cache = None
        if self.directory is not None:
            self.flush()

    # -- inspecting ---------------------------------------------------------------------
    def __len__(self) -> int:
        """Stored steps in finished episodes."""
        return self._steps

    @property
    def num_episodes(self) -> int:
        return len(self._episodes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the stored episodes' arrays (the unfinished episode excluded)."""
        return sum(a.nbytes for ep in self._episodes for a in ep.values())

    # -- sampling -----------------------------------------------------------------------
    def reseed(self, seed: int) -> None:
        """Restart the sampling RNG (e.g. after loading a checkpoint, for an analysis that
        must not depend on where training stopped)."""
        self._rng = np.random.default_rng(seed)

    def rng_state(self) -> dict:
        """The sampling RNG's state (for a user of the buffer that checkpoints itself)."""
        return self._rng.bit_generator.state

    def set_rng_state(self, state: dict) -> None:
        self._rng.bit_generator.state = state

    def sample(self, batch_size: int, seq_len: int) -> dict[str, np.ndarray]:
        """batch_size sequences of seq_len consecutive steps, each inside one episode, the
        start drawn uniformly over all valid starts of all stored episodes. Returns obs,
        action, reward, discount as [B, T, ...] and is_first [B, T] (True where a sequence
        begins at the start of its episode)."""
        if seq_len < 1 or batch_size < 1:
            raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}")
        if self._starts_cache is None or self._starts_cache[0] != seq_len:
            lengths = np.array([len(ep["obs"]) for ep in self._episodes], dtype=np.int64)
            eligible = np.flatnonzero(lengths >= seq_len)  # shorter episodes are skipped
            self._starts_cache = (seq_len, eligible, np.cumsum(lengths[eligible] - seq_len + 1))
        _, eligible, cum = self._starts_cache
        if len(eligible) == 0:
            longest = max((len(ep["obs"]) for ep in self._episodes), default=0)
            raise ValueError(
                f"no stored episode has {seq_len} steps "
                f"(episodes: {self.num_episodes}, longest: {longest})"
            )
        flat = self._rng.integers(0, cum[-1], size=batch_size)
        which = np.searchsorted(cum, flat, side="right")
        starts = flat - np.concatenate([[0], cum[:-1]])[which]
        out = {k: [] for k in _FIELDS}
        for w, s in zip(which, starts):
            ep = self._episodes[eligible[w]]
            for k in _FIELDS:
                out[k].append(ep[k][s : s + seq_len])
        batch = {k: np.stack(v) for k, v in out.items()}
        batch["is_first"] = np.zeros((batch_size, seq_len), dtype=bool)
        batch["is_first"][:, 0] = starts == 0
        return batch

    # -- checkpointing ------------------------------------------------------------------
    def state_dict(self) -> dict[str, np.ndarray]:
        """Everything, as flat numpy arrays: episodes concatenated with their lengths, the
        unfinished episode, the configuration and the RNG state (so sampling after a
        restore continues exactly as it would have). The concatenation is a copy: saving
        needs as much free memory as the buffer holds (nbytes)."""
        state = {
            "config": np.array(self._config_json()),
            # PCG64's state holds 128-bit integers, which JSON keeps exactly.
            "rng": np.array(json.dumps(self._rng.bit_generator.state)),
            "lengths": np.array([len(ep["obs"]) for ep in self._episodes], dtype=np.int64),
        }
        empty = self._empty_fields()
        for k in _FIELDS:
            state[k] = np.concatenate([empty[k]] + [ep[k] for ep in self._episodes])
            state["pending_" + k] = np.stack(self._pending[k]) if self._pending[k] else empty[k]
        return state

    def load_state_dict(self, state) -> None:
        config = json.loads(str(state["config"]))
        mine = json.loads(self._config_json())
        if config != mine:
            raise ValueError(
                "checkpoint was made by a buffer with (capacity, obs_shape, obs_dtype, action_dim) = "
                f"{config}, this one has {mine}"
            )
        bounds = np.cumsum(np.concatenate([[0], state["lengths"]]))
        self._episodes = deque(
            {k: np.array(state[k][a:b]) for k in _FIELDS} for a, b in itertools.pairwise(bounds)
        )
        self._steps = int(bounds[-1])
        self._first_id = self._written = 0  # none of these is on disk yet
        self._pending = {k: list(np.array(state["pending_" + k])) for k in _FIELDS}
        self._rng.bit_generator.state = json.loads(str(state["rng"]))
        self._starts_cache = None

    def load(self, path) -> None:
        """Fill the buffer from a state_dict() saved with np.savez (the single-file replay
        of checkpoints made before episodes were written one by one)."""
        with np.load(path, allow_pickle=False) as data:
            self.load_state_dict({k: data[k] for k in data.files})

    # -- on disk ------------------------------------------------------------------------
    def episode_path(self, episode_id: int) -> str:
        return os.path.join(self.directory, f"ep-{episode_id:08d}.npz")

    @property
    def id_range(self) -> tuple[int, int]:
        """(first, end): the stored episodes' ids are first, ..., end - 1."""
        return self._first_id, self._first_id + len(self._episodes)

    def flush(self) -> None:
        """Write the stored episodes not yet on disk (each once, atomically)."""
        os.makedirs(self.directory, exist_ok=True)
        first, end = self.id_range
        for i in range(max(self._written, first), end):
            episode = self._episodes[i - first]
            atomic_write(self.episode_path(i), lambda f: np.savez(f, **episode), suffix=".npz.tmp")
        self._written = max(self._written, end)

    def manifest(self) -> dict:
        """What a checkpoint stores of a buffer whose episodes are on disk (flush() first):
        its configuration, RNG state and id range, and the unfinished episode, if any."""
        if self.directory is None or self._written < self.id_range[1]:
            raise ValueError("manifest() needs every stored episode on disk: give the buffer a "
                             "directory and flush() it first")
        empty = self._empty_fields()
        return {
            "config": self._config_json(),
            "rng": json.dumps(self._rng.bit_generator.state),
            "first_id": self._first_id, "end_id": self.id_range[1],
            "pending": {k: np.stack(v) if v else empty[k] for k, v in self._pending.items()},
        }

    @classmethod
    def open(cls, directory, manifest: dict) -> "ReplayBuffer":
        """The buffer a manifest describes, its episodes read from `directory`. Raises
        CorruptReplay naming the first episode file that is missing or damaged."""
        capacity, obs_shape, obs_dtype, action_dim = json.loads(manifest["config"])
        buf = cls(capacity, obs_shape, np.dtype(obs_dtype), action_dim, directory=directory)
        first, end = int(manifest["first_id"]), int(manifest["end_id"])
        buf._episodes = deque(buf._read_episode(i) for i in range(first, end))
        buf._steps = sum(len(ep["obs"]) for ep in buf._episodes)
        buf._first_id, buf._written = first, end
        buf._pending = {k: list(np.asarray(v)) for k, v in manifest["pending"].items()}
        buf._rng.bit_generator.state = json.loads(manifest["rng"])
        return buf

    def _read_episode(self, episode_id: int) -> dict[str, np.ndarray]:
        path = self.episode_path(episode_id)
        if not os.path.exists(path):
            raise CorruptReplay(f"{path}: missing (the checkpoint holds episodes "
                                f"{self._first_id}.. of this directory)")
        # Reading every member checks the zip's CRCs, so flipped bytes are caught too.
        with reading(path), np.load(path, allow_pickle=False) as data:
            episode = {k: data[k] for k in _FIELDS}
        empty, n = self._empty_fields(), len(episode["obs"])
        for k, e in empty.items():
            if episode[k].dtype != e.dtype or episode[k].shape != (n, *e.shape[1:]):
                raise CorruptReplay(f"{path}: field {k} is {episode[k].dtype}{list(episode[k].shape)}, "
                                    f"expected {e.dtype}{[n, *e.shape[1:]]}")
        if not 0 < n <= self.capacity:
            raise CorruptReplay(f"{path}: an episode of {n} steps (capacity {self.capacity})")
        return episode

    def prune(self, keep_from: int) -> None:
        """Delete the episode files with ids below keep_from or beyond the stored ones (left by
        a run that crashed after its last checkpoint), and unfinished temporary files."""
        end = self.id_range[1]
        for name in os.listdir(self.directory):
            if name.endswith(".tmp"):
                os.unlink(os.path.join(self.directory, name))
            elif name.startswith("ep-") and name.endswith(".npz"):
                try:
                    i = int(name[3:-4])
                except ValueError:
                    continue
                if i < keep_from or i >= end:
                    os.unlink(os.path.join(self.directory, name))

    def _config_json(self) -> str:
        return json.dumps([self.capacity, list(self.obs_shape), self.obs_dtype.str, self.action_dim])

    def _empty_fields(self) -> dict[str, np.ndarray]:
        return {
            "obs": np.zeros((0, *self.obs_shape), self.obs_dtype),
            "action": np.zeros((0, self.action_dim), np.float32),
            "reward": np.zeros(0, np.float32),
            "discount": np.zeros(0, np.float32),
        }
