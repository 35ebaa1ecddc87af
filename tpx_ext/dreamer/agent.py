"""The Dreamer agent: world-model learning, behaviour learning in imagination, acting."""

import time
from typing import Dict, Optional, Tuple

import numpy as np
import torch
from torch import Tensor, nn

from . import configs
from .behavior import ActorCritic, finite_step
from .precision import Precision
from .rssm import LatentState
from .world_model import WorldModel

# What the agent carries between environment steps: the filtered latent state and the
# previous action (the one that led to the current observation).
PolicyState = Tuple[LatentState, Tensor]


class Dreamer(nn.Module):
    def __init__(self, obs_shape, action_dim: int, cfg, device="cpu"):
        super().__init__()
        configs.validate(cfg)  # the one place that checks a config's values
        self.cfg, self.obs_shape, self.action_dim = cfg, tuple(obs_shape), action_dim
        self.world_model = WorldModel(obs_shape, action_dim, cfg)
        if len(self.obs_shape) == 3:
            # NHWC convolutions: 1.2x faster updates at dmc_vision sizes on the CPU
            # (bench/train_step.py --versus, docs/BENCHMARKS.md), and what cuDNN prefers
            self.world_model.to(memory_format=torch.channels_last)
        self.precision = Precision(cfg.precision, device)
        self.behavior = ActorCritic(self.world_model.rssm.feat_dim, action_dim, cfg, self.precision)
        self.model_opt = torch.optim.Adam(self.world_model.parameters(), cfg.model_lr,
                                          eps=cfg.adam_eps)
        self.model_scaler = self.precision.scaler()
        self.to(device)
        self.device = torch.device(device)

    # ----------------------------------------------------------------- learning
    def update(self, batch: Dict[str, np.ndarray]) -> Dict[str, Tensor]:
        """One world-model step on a replay batch [B, T, ...], then one actor and one critic
        step imagined from its posterior states. A non-finite world-model loss or gradient
        skips the whole update (the weights stay as they were); it is counted in the metrics."""
        t0 = time.perf_counter()
        data = {k: torch.as_tensor(batch[k], device=self.device)
                for k in ("obs", "action", "reward")}
        with self.precision.autocast():
            loss, post, metrics = self.world_model.loss(data)
        if torch.isfinite(loss):
            self.model_scaler.scale(loss).backward()
            norm, ok = finite_step(self.model_opt, self.world_model.parameters(), self.cfg.grad_clip,
                                   self.model_scaler)
        else:
            self.model_opt.zero_grad(set_to_none=True)
            norm, ok = torch.tensor(float("nan")), False
        metrics["model_grad_norm"] = norm
        metrics["model_skipped"] = torch.tensor(float(not ok))
        if ok:
            metrics.update(self.update_behavior(post))
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        metrics["update_seconds"] = torch.tensor(time.perf_counter() - t0)
        return metrics

    def update_behavior(self, post: LatentState) -> Dict[str, Tensor]:
        """One actor and one critic step imagined from posterior states [B, T, ...]
        (`imag_starts` of them drawn with torch's RNG, or all when it is at least B x T)."""
        start = post.map(lambda x: x.reshape(-1, x.shape[-1]))
        n = self.cfg.imag_starts
        if n < start.deter.shape[0]:
            keep = torch.randperm(start.deter.shape[0], device=self.device)[:n]
            start = start.map(lambda x: x[keep])
        return self.behavior.update(self.world_model, start)

    # ----------------------------------------------------------------- acting
    def initial_policy_state(self, n: int = 1) -> PolicyState:
        return (self.world_model.rssm.initial(n, self.device),
                torch.zeros(n, self.action_dim, device=self.device))

    @torch.no_grad()
    def act(self, obs: np.ndarray, state: Optional[PolicyState], explore: bool):
        """One environment step: obs [*obs_shape] -> (action [A] float32 numpy, next state),
        or a batch of environments' obs [N, *obs_shape] -> actions [N, A]. state None starts
        new episodes. explore: sample the actor, then add `expl_noise` Gaussian noise and
        clip to [-1, 1] (DreamerV1's additive exploration; the noise comes from torch's RNG,
        which checkpoints save); else the mean action."""
        obs = np.asarray(obs)
        batched = obs.ndim == len(self.obs_shape) + 1
        obs_t = torch.as_tensor(obs if batched else obs[None], device=self.device)
        latent, prev_action = self.initial_policy_state(len(obs_t)) if state is None else state
        latent, _ = self.world_model.rssm.obs_step(latent, prev_action, self.world_model.embed(obs_t))
        action = self.behavior.act(latent.feat, explore)
        if explore and self.cfg.expl_noise > 0:
            action = (action + self.cfg.expl_noise * torch.randn_like(action)).clamp(-1.0, 1.0)
        out = action.cpu().numpy().astype(np.float32)
        return (out if batched else out[0]), (latent, action)

    # ----------------------------------------------------------------- checkpoints
    def checkpoint_state(self) -> dict:
        return {"modules": self.state_dict(), "model_opt": self.model_opt.state_dict(),
                "model_scaler": self.model_scaler.state_dict(),
                "behavior": self.behavior.state_dict_extra()}

    def load_checkpoint_state(self, state: dict) -> None:
        self.load_state_dict(state["modules"])
        self.model_opt.load_state_dict(state["model_opt"])
        if state.get("model_scaler"):  # an active scaler's state (an inactive one saves {})
            self.model_scaler.load_state_dict(state["model_scaler"])
        self.behavior.load_state_dict_extra(state["behavior"])
