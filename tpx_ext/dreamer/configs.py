"""Named configuration presets, stacked left to right, then single-key overrides.

    python -m tpx_ext.train --configs dmc_vision --task walker_walk --estimator tpx

`Config`'s defaults are always applied first: the CPU default, a small state-based agent
that learns cartpole_balance on a 2-core machine in about 20 minutes. Every key can be
overridden with `--<key> <value>` (parsed as the default's type).

The CPU default differs from DreamerV1 (the `dmc_*` presets) in the values marked "V1:" in
the comments below. Its model size, batch and training schedule are cut to fit two CPU
cores; the actor and critic learning rates were chosen by measurement (docs/DREAMER.md); the actor
gradient flows through the actor's input state, as the estimators' total propagation
defines it (docs/API.md), where V1 and V2 detach that input; the other marked choices (KL
balancing, free nats, slow critic, entropy bonus, actor std, no exploration noise, Adam
eps) are DreamerV2's (the `dreamerv2_choices` preset); the README's documented run used
them. docs/DREAMER.md tabulates every difference between each preset and DreamerV1, with
the measurements behind them.
"""

import dataclasses
import math
from typing import Dict, List, Optional, Tuple

from ..estimators.modes import KNOBS, MODE_TABLE, NAMES, parse, resolve
from .precision import PRECISIONS

# The agent's actor-gradient estimators: every mode and named variant but tp, whose
# per-sample parameter gradients cost O(B x P) memory at every node.
ESTIMATORS = tuple(n for n in NAMES if n != "tp")
# Config keys that became estimator_args (the saved configs of older runs still load).
RENAMED = {"mix_rho": "rho", "tpx_weights": "weights", "tpx_ucb": "ucb", "tpx_momentum": "momentum"}


@dataclasses.dataclass
class Config:
    # run
    task: str = "cartpole_balance"
    obs: str = "state"              # state | pixels
    action_repeat: int = 2
    episode_length: int = 0         # physics steps per episode; 0: the suite's own limit
    steps: int = 60_000             # environment steps (physics steps: agent steps x repeat)
    seed: int = 0
    envs: int = 1                   # environments stepped in worker processes, env i seeded
                                    # seed + i; the policy acts on their batch
    device: str = "auto"            # auto | cpu | cuda | cuda:N
    threads: int = 0                # torch CPU threads; 0 keeps torch's default
    precision: str = "32"           # 32 | bf16 | 16: autocast of the world model, actor and
                                    # critic (16 with grad scalers); tpx_ext/dreamer/precision.py
    # replay and training schedule
    replay_capacity: int = 1_000_000
    prefill: int = 5_000            # environment steps of random actions before training
    train_every: int = 10           # environment steps between training phases (V1: 1000)
    train_steps: int = 1            # updates per training phase (V1: 100)
    pretrain: int = 0               # updates of the first training phase, right after the
                                    # prefill (DreamerV1's `pretrain`); 0: train_steps
    batch_size: int = 16            # V1: 50
    seq_len: int = 32               # V1: 50
    # world model
    stoch: int = 16                 # V1: 30
    deter: int = 128                # V1: 200
    hidden: int = 128               # width of the MLPs (V1: 400)
    rssm_hidden: int = 0            # width of the RSSM's input and prior/posterior layers;
                                    # 0: hidden (V1: 200, its deter)
    mlp_layers: int = 2             # hidden layers of the heads and of the state decoder
                                    # (the state encoder has one less)
    reward_layers: int = 0          # 0: mlp_layers (V1: 2)
    cnn_depth: int = 32
    cnn_act: str = "relu"           # relu | elu: the conv encoder's and decoder's activation
    latent_min_std: float = 0.1
    kl_balance: float = 0.8         # in (0, 1): DreamerV2's KL balancing, the weight of
                                    # KL(sg(q) || p), which trains the prior; 0: no balancing,
                                    # plain KL(q || p) with gradients into both (V1)
    free_nats: float = 1.0          # V1: 3
    kl_scale: float = 1.0
    model_lr: float = 6e-4
    # actor and critic
    estimator: str = "tpx"          # rp | lr | mix | tpx, or a named variant (tpx-coord, ...)
    # The estimator's knobs (tpx_ext.estimators.modes: rho for mix; weights, ucb, momentum for
    # tpx), e.g. --estimator_args.ucb 1; unset knobs take the library's defaults.
    estimator_args: Dict[str, object] = dataclasses.field(default_factory=dict)
    horizon: int = 15
    imag_starts: int = 0            # start states imagined from (a random subset of the B x T
                                    # posterior states); 0 = all of them
    latent_nodes: bool = False      # also make the imagined latents z_t nodes
    gamma: float = 0.99
    lam: float = 0.95
    actor_weights: str = "discount"  # discount | uniform | start (see behavior.objective_weights)
    # faster than DreamerV1's 8e-5 (which the dmc presets keep) on the CPU default's small
    # budget (docs/DREAMER.md)
    actor_lr: float = 3e-4
    critic_lr: float = 3e-4
    actor_layers: int = 0           # 0: mlp_layers (V1: 4)
    critic_layers: int = 0          # 0: mlp_layers (V1: 3)
    actor_entropy: float = 1e-4     # V1: 0
    actor_init_std: float = 1.0     # V1: 5
    actor_min_std: float = 0.1      # V1: 1e-4
    actor_mean_scale: float = 5.0
    actor_state_grad: bool = True   # the actor gradient also flows through the actor's
                                    # input state into earlier imagined steps (V1: false,
                                    # the input is detached)
    expl_noise: float = 0.0         # std of Gaussian noise added to the sampled action while
                                    # collecting data, then clipped to [-1, 1] (V1: 0.3)
    slow_critic_every: int = 100    # updates between copies of the critic into the slow
                                    # critic, whose values are the targets; 0: no slow
                                    # critic, the critic's own values are (V1)
    adam_eps: float = 1e-5          # V1: 1e-7 (TensorFlow's default)
    grad_clip: float = 100.0
    # evaluation and checkpoints (in environment steps; both happen at episode ends, where
    # metrics are logged too)
    eval_every: int = 10_000
    eval_episodes: int = 5
    eval_gif: bool = True           # save the first evaluation episode as a GIF
    checkpoint_every: int = 10_000
    tensorboard: bool = True


# DreamerV1 for the DeepMind Control Suite (Hafner et al. 2020; danijar/dreamer, dreamer.py
# define_config and models.py): every key that changes training. `steps` is the config's 5e6
# (pass --steps for shorter runs); the replay keeps every episode of such a run, as V1 does.
# docs/DREAMER.md lists what still differs and why.
DREAMERV1 = dict(
    estimator="rp", action_repeat=2, episode_length=0, steps=5_000_000,
    replay_capacity=5_000_000, prefill=5_000, train_every=1_000, train_steps=100, pretrain=100,
    batch_size=50, seq_len=50,
    stoch=30, deter=200, hidden=400, rssm_hidden=200, reward_layers=2, cnn_depth=32,
    cnn_act="relu", latent_min_std=0.1, kl_balance=0.0, free_nats=3.0, kl_scale=1.0,
    model_lr=6e-4,
    horizon=15, imag_starts=0, latent_nodes=False, gamma=0.99, lam=0.95,
    actor_weights="discount", actor_lr=8e-5, critic_lr=8e-5, actor_layers=4, critic_layers=3,
    actor_entropy=0.0, actor_init_std=5.0, actor_min_std=1e-4, actor_mean_scale=5.0,
    actor_state_grad=False, expl_noise=0.3, slow_critic_every=0, adam_eps=1e-7,
    grad_clip=100.0,
)

PRESETS: Dict[str, Dict] = {
    # Seconds on a CPU: a tiny model and 200-step episodes; used by the tests.
    "debug": dict(
        steps=1_200, episode_length=200, prefill=400, train_every=20, batch_size=4, seq_len=8, stoch=4, deter=16,
        hidden=16, cnn_depth=4, horizon=5, eval_every=600, eval_episodes=1,
        checkpoint_every=400, eval_gif=False, tensorboard=False,
    ),
    # DreamerV1's DMC setup from 64x64 pixels, for a GPU. Evaluation (10 episodes every 10k
    # steps) and checkpoints do not change training.
    "dmc_vision": dict(
        obs="pixels", **DREAMERV1, eval_every=10_000, eval_episodes=10, checkpoint_every=50_000,
    ),
    # The same agent from proprioceptive states (V1 has no state-based setup): MLP encoder
    # and decoder with mlp_layers hidden layers of `hidden` units.
    "dmc_proprio": dict(
        obs="state", **DREAMERV1, mlp_layers=3, eval_every=10_000, eval_episodes=10,
        checkpoint_every=50_000,
    ),
    # The horizon experiment of docs/RESULTS.md (sec. 7) on one GPU, from pixels: stack it on
    # dmc_vision (--configs dmc_vision horizon_gpu). DreamerV1's agent unchanged, for 500k
    # environment steps instead of 5M so that 12 trials (rp and tpx, two horizons, 3 seeds)
    # fit one GPU; evaluation (10 episodes) and checkpoints every 25k steps.
    "horizon_gpu": dict(steps=500_000, eval_every=25_000, eval_episodes=10,
                        checkpoint_every=25_000),
    # DreamerV2's choices that the CPU default uses (danijar/dreamerv2, configs.yaml, dmc):
    # KL balancing 0.8 with 1 free nat, a slow critic copied every 100 updates, entropy
    # bonus 1e-4, actor min std 0.1, Adam eps 1e-5, no exploration noise. Stack it on a
    # dmc preset: --configs dmc_vision dreamerv2_choices. Not V2 itself: V2's actor is a
    # truncated normal (here tanh-normal with init std 1) and its latents are discrete.
    "dreamerv2_choices": dict(
        kl_balance=0.8, free_nats=1.0, slow_critic_every=100, actor_entropy=1e-4,
        actor_init_std=1.0, actor_min_std=0.1, adam_eps=1e-5, expl_noise=0.0,
    ),
}


def build(presets: List[str], overrides: Dict[str, object]) -> Config:
    """The default, then `presets` left to right, then `overrides` (key -> value, values
    parsed by the default's type; "estimator_args.<knob>" keys set one knob)."""
    cfg = Config()
    for name in presets:
        if name not in PRESETS:
            raise ValueError(f"unknown config preset {name!r}; valid: {', '.join(PRESETS)}")
        cfg = dataclasses.replace(cfg, **PRESETS[name])
    cfg.estimator_args = dict(cfg.estimator_args)
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for key, value in overrides.items():
        if key in RENAMED:
            raise ValueError(f"config key {key!r} is now estimator_args.{RENAMED[key]} "
                             f"(--estimator_args.{RENAMED[key]} VALUE)")
        if key.startswith("estimator_args."):
            knob = key.split(".", 1)[1]
            if knob not in KNOBS:
                raise ValueError(f"unknown estimator knob {knob!r} in --{key}; knobs: "
                                 f"{', '.join(KNOBS)}")
            cfg.estimator_args[knob] = parse_knob(value)
        elif key == "estimator_args":
            if not isinstance(value, dict):
                raise ValueError(f"estimator_args must be a mapping, got {value!r}")
            cfg.estimator_args = dict(value)
        elif key not in fields:
            raise ValueError(f"unknown config key {key!r}; valid keys: {', '.join(fields)}")
        else:
            setattr(cfg, key, parse_value(key, value, type(getattr(Config(), key))))
    validate(cfg)
    return resolve_derived(cfg)


# key -> the key whose value a 0 stands for (resolved by `build`, so that the modules and
# config.json see values only)
DERIVED = {"pretrain": "train_steps", "rssm_hidden": "hidden", "reward_layers": "mlp_layers",
           "actor_layers": "mlp_layers", "critic_layers": "mlp_layers"}


def resolve_derived(cfg: Config) -> Config:
    """Every "0: another key's value" replaced by that value; imag_starts 0 by all the
    batch's posterior states (batch_size x seq_len)."""
    for key, source in DERIVED.items():
        if getattr(cfg, key) == 0:
            setattr(cfg, key, getattr(cfg, source))
    if cfg.imag_starts == 0:
        cfg.imag_starts = cfg.batch_size * cfg.seq_len
    return cfg


def from_saved(saved: Dict[str, object]) -> Dict[str, object]:
    """A run's saved config (config.json, a checkpoint's) as overrides for `build`: the keys
    that became estimator_args move there (those that applied to its estimator)."""
    out = {k: v for k, v in saved.items() if k not in RENAMED}
    if any(k in saved for k in RENAMED):
        takes = knobs_of(saved.get("estimator", Config.estimator))
        args = dict(saved.get("estimator_args", {}))
        for old, knob in RENAMED.items():
            if old in saved and knob in takes:
                args.setdefault(knob, saved[old])
        out["estimator_args"] = args
    return out


def knobs_of(estimator: str) -> Tuple[str, ...]:
    """The knobs an estimator (a mode or named variant) takes."""
    return MODE_TABLE[parse(estimator)[0]].knobs


def run_name(task: str, estimator: str, horizon: int, seed: int, obs: Optional[str] = None) -> str:
    """The name of a run's directory: the trainer's default (with obs) and the sweep's
    trials (whose obs is one for the whole sweep)."""
    return "_".join([task, *([obs] if obs else []), estimator, f"h{horizon}", f"s{seed}"])


def estimator_knobs(cfg: Config) -> Dict[str, object]:
    """Every knob of cfg's estimator, with its value (the variant's, then estimator_args)."""
    mode, knobs = parse(cfg.estimator)
    return resolve(mode, {**knobs, **cfg.estimator_args})


def parse_knob(value):
    if not isinstance(value, str):
        return value
    try:
        return float(value)
    except ValueError:
        return value


def parse_value(key: str, value, kind):
    if not isinstance(value, str):
        return kind(value)
    if kind is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"--{key}: expected true/false, got {value!r}")
    try:
        return int(float(value)) if kind is int and "e" in value.lower() else kind(value)
    except ValueError:
        raise ValueError(f"--{key}: expected {kind.__name__}, got {value!r}") from None


def validate(cfg: Config) -> None:
    checks = [
        (cfg.obs in ("state", "pixels"), f"obs must be 'state' or 'pixels', got {cfg.obs!r}"),
        (cfg.precision in PRECISIONS,
         f"precision must be one of {', '.join(PRECISIONS)}, got {cfg.precision!r}"),
        (cfg.estimator in ESTIMATORS,
         f"estimator must be one of {', '.join(ESTIMATORS)}, got {cfg.estimator!r} (tp forms "
         f"per-sample parameter gradients, B x P: use it through tpx_ext.Estimator on small "
         f"models)"),
        (cfg.horizon >= 1, f"horizon must be >= 1, got {cfg.horizon}"),
        (cfg.action_repeat >= 1, f"action_repeat must be >= 1, got {cfg.action_repeat}"),
        (cfg.batch_size >= 1 and cfg.seq_len >= 1, "batch_size and seq_len must be >= 1"),
        (cfg.train_every >= 1 and cfg.train_steps >= 1, "train_every and train_steps must be >= 1"),
        (cfg.steps >= 1, f"steps must be >= 1, got {cfg.steps}"),
        (cfg.envs >= 1, f"envs must be >= 1, got {cfg.envs}"),
        (cfg.imag_starts >= 0, f"imag_starts must be >= 0, got {cfg.imag_starts}"),
        (cfg.episode_length >= 0, f"episode_length must be >= 0, got {cfg.episode_length}"),
        (cfg.eval_every >= 1 and cfg.checkpoint_every >= 1 and cfg.eval_episodes >= 1,
         "eval_every, checkpoint_every and eval_episodes must be >= 1"),
        (cfg.pretrain >= 0, f"pretrain must be >= 0 (0: train_steps), got {cfg.pretrain}"),
        (0.0 <= cfg.kl_balance < 1.0,
         f"kl_balance must be 0 (no balancing: plain KL, DreamerV1) or in (0, 1) (DreamerV2's "
         f"balancing), got {cfg.kl_balance}"),
        (cfg.slow_critic_every >= 0,
         f"slow_critic_every must be >= 0 (0: no slow critic), got {cfg.slow_critic_every}"),
        (math.isfinite(cfg.expl_noise) and cfg.expl_noise >= 0.0,
         f"expl_noise must be a finite std >= 0, got {cfg.expl_noise}"),
        (cfg.actor_init_std > cfg.actor_min_std > 0.0,
         f"need actor_init_std > actor_min_std > 0, got {cfg.actor_init_std}, {cfg.actor_min_std}"),
        (cfg.cnn_act in ("relu", "elu"), f"cnn_act must be 'relu' or 'elu', got {cfg.cnn_act!r}"),
        (min(cfg.rssm_hidden, cfg.reward_layers, cfg.actor_layers, cfg.critic_layers) >= 0,
         "rssm_hidden, reward_layers, actor_layers and critic_layers must be >= 0 (0: the "
         "hidden / mlp_layers value)"),
        (cfg.mlp_layers >= 1, f"mlp_layers must be >= 1, got {cfg.mlp_layers}"),
    ]
    for ok, msg in checks:
        if not ok:
            raise ValueError(msg)
    try:
        estimator_knobs(cfg)
    except ValueError as exc:
        raise ValueError(f"estimator_args of estimator {cfg.estimator!r}: {exc}") from None
