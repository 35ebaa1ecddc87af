"""N environments stepped together: one in this process, or each in a worker process.

    pool = EnvPool(4, "walker_walk", seed=0)      # env i is seeded seed + i
    obs = pool.reset()                            # list of N observations
    results = pool.step(actions)                  # actions [N, A]; list of (obs, r, done, info)

With more than one environment every step is sent to all workers before any result is
read, so the physics (and, for pixels, the rendering) of the N environments run in
parallel while the trainer's policy acts on the batch. One environment stays in this
process: nothing is pickled and the trainer behaves exactly as with a plain DMCEnv.
"""

from __future__ import annotations

import multiprocessing as mp
import signal

import numpy as np

from .envs import make_env


def _worker(conn, kwargs) -> None:
    # Ctrl-C reaches the whole process group: the trainer handles it and closes the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        env = make_env(**kwargs)
    except BaseException as exc:  # reported to the parent, which raises it
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    conn.send(("ok", (env.observation_shape, env.action_dim)))
    with env:
        while True:
            cmd, arg = conn.recv()
            if cmd == "close":
                conn.send(("ok", None))
                return
            try:
                if cmd == "reset":
                    out = env.reset()
                elif cmd == "step":
                    out = env.step(arg)
                elif cmd == "rng_state":
                    out = env.rng_state()
                elif cmd == "set_rng_state":
                    out = env.set_rng_state(arg)
                else:
                    raise ValueError(f"unknown command {cmd!r}")
                conn.send(("ok", out))
            except Exception as exc:
                conn.send(("error", f"{type(exc).__name__}: {exc}"))


class EnvPool:
    def __init__(self, n: int, name: str, obs: str = "state", action_repeat: int = 2,
                 seed: int = 0, episode_length: int = 0):
        if n < 1:
            raise ValueError(f"envs must be >= 1, got {n}")
        self.n = n
        kwargs = [dict(name=name, obs=obs, action_repeat=action_repeat, seed=seed + i,
                       episode_length=episode_length) for i in range(n)]
        self._env, self._conns, self._procs = None, [], []
        if n == 1:
            self._env = make_env(**kwargs[0])
            self.observation_shape, self.action_dim = self._env.observation_shape, self._env.action_dim
            return
        ctx = mp.get_context("spawn")  # MuJoCo's and torch's threads do not survive a fork
        try:
            for kw in kwargs:
                parent, child = ctx.Pipe()
                proc = ctx.Process(target=_worker, args=(child, kw), daemon=True)
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
            specs = self._receive_all()
        except BaseException:
            self.close()
            raise
        self.observation_shape, self.action_dim = specs[0]

    def _receive_all(self) -> list:
        replies = []
        for i, conn in enumerate(self._conns):
            try:
                replies.append(conn.recv())
            except EOFError:
                replies.append(("error", f"worker process exited (code {self._procs[i].exitcode})"))
        for i, (status, value) in enumerate(replies):
            if status == "error":
                raise RuntimeError(f"environment {i} of {self.n}: {value}")
        return [value for _, value in replies]

    def _all(self, cmd: str, args) -> list:
        if self._env is not None:
            return [getattr(self._env, cmd)(*([] if args is None else [args[0]]))]
        for conn, arg in zip(self._conns, args or [None] * self.n):
            conn.send((cmd, arg))
        return self._receive_all()

    def reset(self) -> list:
        return self._all("reset", None)

    def step(self, actions) -> list:
        """actions [N, A] -> [(obs, reward, done, info)] * N."""
        actions = np.asarray(actions)
        if actions.shape != (self.n, self.action_dim):
            raise ValueError(f"actions must have shape ({self.n}, {self.action_dim}), got {actions.shape}")
        return self._all("step", list(actions))

    def rng_state(self) -> list:
        return self._all("rng_state", None)

    def set_rng_state(self, states: list) -> None:
        if len(states) != self.n:
            raise ValueError(f"{len(states)} environment RNG states for {self.n} environments")
        self._all("set_rng_state", list(states))

    def close(self) -> None:
        if self._env is not None:
            self._env.close()
            self._env = None
        for conn, proc in zip(self._conns, self._procs):
            try:
                conn.send(("close", None))
                conn.recv()
            except (OSError, EOFError):
                pass
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
        self._conns, self._procs = [], []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
