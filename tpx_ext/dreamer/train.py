"""Train Dreamer on a dm_control task: `python -m tpx_ext.train [--configs P ...] [--key value ...]`.

    python -m tpx_ext.train                                  # CPU default: cartpole_balance, tpx
    python -m tpx_ext.train --configs debug --estimator rp   # seconds
    python -m tpx_ext.train --configs dmc_vision --task walker_walk --horizon 100
    python -m tpx_ext.train --logdir runs/x --resume         # continue a stopped run exactly

A run directory holds config.json (the resolved config), metrics.jsonl, tb/ (TensorBoard),
eval/*.gif and the checkpoint. Training stops at the first episode end at or after `steps`
environment steps (checkpoints are taken at episode ends, where a resume is exact).
"""

import argparse
import dataclasses
import json
import os
import sys
import time
from collections import defaultdict
from typing import Dict, List, NamedTuple, Optional, Tuple

import numpy as np
import torch
from ..extras import needs

with needs("dreamer"):
    from tqdm import tqdm

from ..cli import Parser, UsageError
from . import checkpoint, configs
from .agent import Dreamer
from .env_pool import EnvPool
from .envs import make_env, rendering_error, task_names
from .logger import Logger, save_gif
from .replay import ReplayBuffer

# Counters kept across the whole run (and checkpointed).
COUNTERS = ("env_steps", "episodes", "updates", "evals", "model_skipped", "actor_skipped",
            "critic_skipped", "actor_clipped")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {name!r} requested but torch sees no CUDA device")
    return device


class Trainer:
    def __init__(self, cfg: configs.Config, run_dir: str, resume: bool = False, quiet: bool = False):
        self.cfg, self.run_dir, self.quiet = cfg, run_dir, quiet
        os.makedirs(os.path.join(run_dir, "eval"), exist_ok=True)
        if cfg.threads > 0:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(cfg.seed)
        self.device = resolve_device(cfg.device)
        self.env = EnvPool(cfg.envs, cfg.task, cfg.obs, cfg.action_repeat, seed=cfg.seed,
                           episode_length=cfg.episode_length)
        self.agent = Dreamer(self.env.observation_shape, self.env.action_dim, cfg, self.device)
        obs_dtype = np.uint8 if cfg.obs == "pixels" else np.float32
        self.replay = checkpoint.new_replay(run_dir, cfg.replay_capacity,
                                            self.env.observation_shape, obs_dtype,
                                            self.env.action_dim, seed=cfg.seed)
        self.rng = np.random.default_rng(cfg.seed)  # random actions while prefilling
        self.counters = dict.fromkeys(COUNTERS, 0)
        self.last_eval: Optional[Dict] = None
        self._gif_warned = False
        if resume:
            self._restore()
        else:
            with open(os.path.join(run_dir, "config.json"), "w") as f:
                json.dump(dataclasses.asdict(cfg), f, indent=2)
        self.logger = Logger(run_dir, cfg.tensorboard,
                             resume_step=self.counters["env_steps"] if resume else None)

    # ----------------------------------------------------------------- main loop
    def train(self) -> Dict:
        """Run to `steps` environment steps; returns the final evaluation."""
        cfg, c = self.cfg, self.counters
        bar = tqdm(total=cfg.steps, initial=min(c["env_steps"], cfg.steps), unit="step",
                   dynamic_ncols=True, disable=self.quiet, file=sys.stderr,
                   mininterval=0.5 if sys.stderr.isatty() else 30)
        try:
            if c["env_steps"] == 0 and c["evals"] == 0:
                self._evaluate()  # the untrained agent: the first point of the curve
            while c["env_steps"] < cfg.steps:
                t0, before = time.perf_counter(), c["env_steps"]
                ret, length, update_metrics = self._episode(bar)
                c["episodes"] += self.env.n
                record = {"train_return": ret, "episode_length": length,
                          "env_steps_per_second": (c["env_steps"] - before) / (time.perf_counter() - t0),
                          **update_metrics, **{k: c[k] for k in COUNTERS if k != "env_steps"}}
                self.logger.write(c["env_steps"], record)
                done = c["env_steps"] >= cfg.steps
                if done or c["env_steps"] // cfg.eval_every > before // cfg.eval_every:
                    self._evaluate()
                if done or c["env_steps"] // cfg.checkpoint_every > before // cfg.checkpoint_every:
                    self._save()
                bar.set_postfix(ret=f"{ret:.1f}", eval=f"{self.last_eval['eval_return']:.1f}",
                                upd=c["updates"], skipped=c["model_skipped"] + c["actor_skipped"])
        except KeyboardInterrupt:
            step = self._checkpoint_step()
            if step is None:
                print(f"\ninterrupted at {c['env_steps']} env steps, before the run's first "
                      f"checkpoint (every {cfg.checkpoint_every} env steps): there is nothing to "
                      f"resume; the same command starts the run again", file=sys.stderr)
            else:
                print(f"\ninterrupted at {c['env_steps']} env steps; the last checkpoint is at "
                      f"{step} steps. Continue with:\n  python -m tpx_ext.train --logdir "
                      f"{self.run_dir} --resume", file=sys.stderr)
            raise
        finally:
            bar.close()
            self.close()
        return self.last_eval

    def _episode(self, bar):
        """One training episode in each environment: act on their batch, train every
        `train_every` env steps (counted over all environments); the finished episodes are
        stored in the environments' order. Returns the mean return, the episode length and the mean
        update metrics."""
        cfg, c, n, action_dim = self.cfg, self.counters, self.env.n, self.env.action_dim
        obs, state = self.env.reset(), None
        episodes = [[(o, np.zeros(action_dim), 0.0, 1.0)] for o in obs]
        ret, length, done = np.zeros(n), 0, False
        sums, profiles, updates_done = defaultdict(float), defaultdict(lambda: 0.0), 0
        while not done:
            if c["env_steps"] < cfg.prefill:
                action = self.rng.uniform(-1, 1, (n, action_dim)).astype(np.float32)
            else:
                action, state = self.agent.act(np.stack(obs), state, explore=True)
            results = self.env.step(action)
            dones = {r[2] for r in results}
            if len(dones) > 1:
                raise RuntimeError(f"{cfg.task}: the {n} environments' episodes ended at different "
                                   "steps; --envs needs episodes of one length (time limits)")
            done = dones.pop()
            for i, (o, reward, _, info) in enumerate(results):
                episodes[i].append((o, action[i], reward, info["discount"]))
                ret[i] += reward
            obs = [r[0] for r in results]
            if done:  # stored before this step's training, which may sample them
                for steps in episodes:
                    for t, (o, a, r, discount) in enumerate(steps):
                        self.replay.add(o, a, r, discount, first=t == 0, last=t == len(steps) - 1)
            length += cfg.action_repeat
            before = c["env_steps"]
            c["env_steps"] += n * cfg.action_repeat
            bar.update(n * cfg.action_repeat)
            phases = c["env_steps"] // cfg.train_every - before // cfg.train_every
            if c["env_steps"] < cfg.prefill or self.replay.num_episodes == 0:
                continue
            for _ in range(phases):
                # The first phase (no update yet) takes `pretrain` updates when it is set.
                for _ in range(cfg.pretrain if c["updates"] == 0 else cfg.train_steps):
                    m = self.agent.update(self.replay.sample(cfg.batch_size, cfg.seq_len))
                    self._count(m)
                    updates_done += 1
                    for k, v in m.items():
                        if v.numel() == 1:
                            sums[k] += float(v)
                        else:
                            profiles[k] = profiles[k] + v.detach().cpu().numpy()
        means = {k: v / updates_done for k, v in sums.items()}
        means.update({k: v / updates_done for k, v in profiles.items()})
        return float(ret.mean()), length, means

    def _count(self, m: Dict[str, torch.Tensor]) -> None:
        c = self.counters
        c["updates"] += 1
        c["model_skipped"] += int(m["model_skipped"])
        if "actor_skipped" in m:
            c["actor_skipped"] += int(m["actor_skipped"])
            c["critic_skipped"] += int(m["critic_skipped"])
            c["actor_clipped"] += int(m["actor_clipped"])

    # ----------------------------------------------------------------- evaluation
    def _evaluate(self) -> None:
        """`eval_episodes` episodes with the mean action on a separately seeded env; the
        first is saved as a GIF. Uses its own torch RNG, so training is not perturbed."""
        cfg, c = self.cfg, self.counters
        gif = cfg.eval_gif and self._can_draw_frames()
        returns, frames = evaluate(self.agent, cfg, cfg.seed + 10_000 + c["evals"],
                                   cfg.eval_episodes, frames=gif)
        if frames:
            save_gif(os.path.join(self.run_dir, "eval", f"step_{c['env_steps']:09d}.gif"), frames)
        c["evals"] += 1
        self.last_eval = {"eval_return": float(np.mean(returns)),
                          "eval_return_std": float(np.std(returns)), "eval_episodes": len(returns)}
        self.logger.write(c["env_steps"], self.last_eval)

    def _can_draw_frames(self) -> bool:
        """Pixel runs render anyway; a state run's GIF is skipped where no OpenGL backend
        loads, with one warning per run, since training itself needs no rendering."""
        if self.cfg.obs == "pixels":
            return True
        why = rendering_error()
        if why is not None and not self._gif_warned:
            self._gif_warned = True
            tqdm.write(f"warning: evaluation GIFs are skipped: {why} (--eval_gif false "
                       f"silences this)", file=sys.stderr)
        return why is None

    # ----------------------------------------------------------------- checkpoints
    def _save(self) -> None:
        state = {
            "config": dataclasses.asdict(self.cfg), "agent": self.agent.checkpoint_state(),
            "counters": dict(self.counters), "last_eval": self.last_eval,
            "torch_rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else None,
            "numpy_rng": self.rng.bit_generator.state, "env_rngs": self.env.rng_state(),
        }
        checkpoint.save(self.run_dir, state, self.replay)

    def _restore(self) -> None:
        state, self.replay = checkpoint.load(self.run_dir, self.device, quarantine=True)
        self.agent.load_checkpoint_state(state["agent"])
        self.counters.update(state["counters"])
        self.last_eval = state["last_eval"]
        torch.set_rng_state(state["torch_rng"].cpu())
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda_rng"]])
        self.rng.bit_generator.state = state["numpy_rng"]
        # checkpoints made before --envs hold one environment's state as env_rng
        self.env.set_rng_state(state["env_rngs"] if "env_rngs" in state else [state["env_rng"]])

    def _checkpoint_step(self) -> Optional[int]:
        if not checkpoint.exists(self.run_dir):
            return None
        return checkpoint.read_state(self.run_dir)["counters"]["env_steps"]

    def close(self) -> None:
        self.env.close()
        if hasattr(self, "logger"):
            self.logger.close()


def evaluate(agent: Dreamer, cfg: configs.Config, seed: int, episodes: int, frames: bool = False,
             explore: bool = False):
    """(returns, frames of the first episode) of `episodes` episodes with the mean action (or
    with `explore`, the policy's samples) on an environment seeded with `seed`. Uses its own
    torch RNG (seeded with `seed`), so the caller's is not perturbed."""
    returns, shown = [], []
    env = make_env(cfg.task, cfg.obs, cfg.action_repeat, seed=seed, episode_length=cfg.episode_length)
    devices = [agent.device] if agent.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), env:
        torch.manual_seed(seed)
        for i in range(episodes):
            obs, state, done, ret = env.reset(), None, False, 0.0
            while not done:
                if frames and i == 0:
                    shown.append(obs if cfg.obs == "pixels" else env.render(64))
                action, state = agent.act(obs, state, explore=explore)
                obs, reward, done, _ = env.step(action)
                ret += reward
            returns.append(ret)
    return returns, shown


class LoadedRun(NamedTuple):
    agent: Dreamer
    replay: ReplayBuffer
    cfg: configs.Config
    env_steps: int  # of the checkpoint that was read (the previous one if the newest is damaged)


def load_run(run_dir: str, device="cpu") -> LoadedRun:
    """The agent, replay, config and env steps of a run's newest complete checkpoint, for
    analysis (`python -m tpx_ext.gradvar --checkpoint`, `tpx_ext.evaluate`); no environment
    is created and nothing in the run directory changes."""
    state, replay = checkpoint.load(run_dir, map_location=device)
    cfg = configs.build([], configs.from_saved(state["config"]))
    agent = Dreamer(replay.obs_shape, replay.action_dim, cfg, device)
    agent.load_checkpoint_state(state["agent"])
    return LoadedRun(agent, replay, cfg, state["counters"]["env_steps"])


def default_logdir(cfg: configs.Config) -> str:
    return os.path.join("runs", configs.run_name(cfg.task, cfg.estimator, cfg.horizon, cfg.seed,
                                                 cfg.obs))


def prepare(presets: List[str], overrides: Dict[str, object], logdir: Optional[str] = None,
            resume: bool = False) -> Tuple[configs.Config, str]:
    """(config, run directory) of a run to start, or with `resume` to continue (its saved
    config; only `steps` may be overridden). UsageError or ValueError name what to change."""
    if resume:
        if not logdir or not checkpoint.exists(logdir):
            raise UsageError(f"--resume needs --logdir pointing at a run with a "
                             f"{checkpoint.CHECKPOINT_FILE} (got {logdir!r})")
        if presets or set(overrides) - {"steps"}:
            raise UsageError("--resume continues a run with its saved config.json; only --steps "
                             f"may be changed (got --configs {presets} and overrides "
                             f"{sorted(overrides)})")
        path = os.path.join(logdir, "config.json")
        try:
            with open(path) as f:
                saved = json.load(f)
        except (OSError, json.JSONDecodeError) as exc:
            raise UsageError(f"--resume: cannot read the run's config {path}: {exc}") from None
        cfg = configs.build([], {**configs.from_saved(saved), **overrides})
        run_dir = logdir
    else:
        cfg = configs.build(presets, overrides)
        run_dir = logdir or default_logdir(cfg)
        if checkpoint.exists(run_dir):
            raise UsageError(f"{run_dir} already holds a run: continue it with --resume, or pick "
                             "another --logdir")
    if cfg.task not in task_names():
        raise UsageError(f"unknown task {cfg.task!r}; valid: {', '.join(sorted(task_names()))}")
    return cfg, run_dir


def run(cfg: configs.Config, run_dir: str, resume: bool = False, quiet: bool = False) -> Dict:
    """Train (or continue) the run; returns the final evaluation and the counters."""
    print(f"tpx_ext.train | {cfg.task} ({cfg.obs}) | estimator {cfg.estimator} | horizon "
          f"{cfg.horizon} | {cfg.steps} env steps | device {resolve_device(cfg.device)} | "
          f"run dir {run_dir}", flush=True)
    trainer = Trainer(cfg, run_dir, resume=resume, quiet=quiet)
    result = trainer.train()
    c = trainer.counters
    print(f"final eval return: {result['eval_return']:.1f} +- {result['eval_return_std']:.1f} "
          f"({result['eval_episodes']} episodes) after {c['env_steps']} env steps, {c['updates']} "
          f"updates ({c['model_skipped']} model / {c['actor_skipped']} actor updates skipped as "
          f"non-finite); curves: python -m tpx_ext.plot {run_dir}", flush=True)
    return result


def parse_args(argv: Optional[List[str]] = None):
    parser = Parser(
        prog="python -m tpx_ext.train", description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Presets: " + ", ".join(configs.PRESETS) + ". Every config key (see "
               "tpx_ext/dreamer/configs.py) is an option: " + " ".join(
                   f"--{f.name}" for f in dataclasses.fields(configs.Config)
                   if f.name != "estimator_args")
               + "; the estimator's knobs: " + " ".join(
                   f"--estimator_args.{k}" for k in configs.KNOBS))
    parser.add_argument("--configs", nargs="+", default=[], metavar="PRESET",
                        help="presets applied left to right over the CPU default")
    parser.add_argument("--logdir", default=None,
                        help="run directory (default runs/<task>_<obs>_<estimator>_h<H>_s<seed>)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --logdir from its checkpoint")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    for f in dataclasses.fields(configs.Config):
        if f.name != "estimator_args":
            parser.add_argument(f"--{f.name}", default=None, help=argparse.SUPPRESS)
    args, rest = parser.parse_known_args(argv)
    keys = {f.name for f in dataclasses.fields(configs.Config)}
    overrides = {k: v for k, v in vars(args).items() if k in keys and v is not None}
    # --estimator_args.<knob> VALUE (or =VALUE): one knob of the estimator
    while rest:
        token = rest.pop(0)
        key, eq, value = token[2:].partition("=")
        if key in configs.RENAMED:
            parser.error(f"--{key} is now --estimator_args.{configs.RENAMED[key]}")
        if not token.startswith("--estimator_args."):
            parser.error(f"unrecognized arguments: {' '.join([token] + rest)}")
        if not eq and not rest:
            parser.error(f"{token}: expected a value")
        overrides[key] = value if eq else rest.pop(0)
    return parser, args, overrides


def main(argv: Optional[List[str]] = None) -> Dict:
    parser, args, overrides = parse_args(argv)
    with parser.reporting(ValueError):
        cfg, run_dir = prepare(args.configs, overrides, args.logdir, args.resume)
    return run(cfg, run_dir, resume=args.resume, quiet=args.quiet)


if __name__ == "__main__":
    main()
