"""Actor and critic learned in imagination; the actor gradient comes from the estimator API.

Time indices (TPX.md sec. 4), for t = 0 .. H-1 from N start states s_0:
    (mu_t, sigma_t) = actor(s_t);  a_t = tanh(u_t), u_t ~ N(mu_t, sigma_t)     node "action", step t
    h_{t+1} = GRU(z_t, a_t, h_t);   z_{t+1} ~ prior(h_{t+1})        node "latent", step t (optional)
    r_t = reward(s_{t+1});  v_t = target_critic(s_t) for t = 0 .. H
J = sum_t w_t V_t (lambda-returns V_t, `graph.lambda_return` in its "next_reward"
convention) is split by the graph into per-step terms, so each node is credited with the
terms after it; the LR baseline of step t is kappa_t v_t (TPX.md sec. 4).
"""

import contextlib
import copy
from typing import Dict, List, NamedTuple, Optional

import torch
from torch import Tensor, nn

from ..estimators import Estimator, NodeStats, lambda_returns
from .networks import ActorHead, ScalarHead
from .precision import Precision
from .rssm import LatentState

class Imagination(NamedTuple):
    """What one imagined rollout leaves behind (detached): feats [H+1, N, F], values
    [H+1, N] (target critic), rewards [H, N], the actor's sigma [H, N, A] and mean entropy
    (from detached states), and the per-node estimator diagnostics."""

    feats: Tensor
    values: Tensor
    rewards: Tensor
    sigma: Tensor
    entropy: Tensor
    stats: List[NodeStats]


def objective_weights(kind: str, H: int, gamma: float) -> Tensor:
    """w_t [H] of J = sum_t w_t V_t: "discount" gamma^t / H (DreamerV1), "uniform" 1 / H,
    "start" (1, 0, ..., 0) (the start-state value V_0)."""
    if kind == "discount":
        return gamma ** torch.arange(H, dtype=torch.float64) / H
    if kind == "uniform":
        return torch.full((H,), 1.0 / H, dtype=torch.float64)
    if kind == "start":
        return torch.eye(1, H, dtype=torch.float64)[0]
    raise ValueError(f"unknown actor_weights {kind!r}; valid: discount, uniform, start")


@contextlib.contextmanager
def frozen(*modules: nn.Module):
    """No parameter gradients for `modules` inside the block (gradients still flow through)."""
    params = [p for m in modules for p in m.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def finite_step(optimizer: torch.optim.Optimizer, params, clip: float,
                scaler: Optional[torch.amp.GradScaler] = None):
    """Clip the gradient norm and step, unless the norm is non-finite: then the gradients
    are dropped and the weights stay untouched. With an active grad `scaler` the gradients
    are unscaled first, and its scale is updated (lowered after a non-finite one). Returns
    (norm before clipping, stepped)."""
    scaling = scaler is not None and scaler.is_enabled()
    if scaling:
        scaler.unscale_(optimizer)
    norm = nn.utils.clip_grad_norm_(params, clip)
    ok = bool(torch.isfinite(norm))
    if ok:
        scaler.step(optimizer) if scaling else optimizer.step()
    if scaling:
        scaler.update()  # lowers the scale after a non-finite gradient
    optimizer.zero_grad(set_to_none=True)
    return norm.detach(), ok


class ActorCritic(nn.Module):
    def __init__(self, feat_dim: int, action_dim: int, cfg, precision: Precision):
        super().__init__()
        self.cfg, self.action_dim = cfg, action_dim
        self.actor = ActorHead(feat_dim, action_dim, cfg.hidden, cfg.actor_layers,
                               cfg.actor_init_std, cfg.actor_min_std, cfg.actor_mean_scale)
        self.critic = ScalarHead(feat_dim, cfg.hidden, cfg.critic_layers)
        # The values of imagined states (the actor's objective and the critic's targets)
        # come from a slow copy of the critic, or from the critic itself (DreamerV1).
        self.slow_critic = (copy.deepcopy(self.critic).requires_grad_(False)
                            if cfg.slow_critic_every > 0 else None)
        self.estimator = Estimator.from_name(cfg.estimator, **cfg.estimator_args)
        self.actor_opt = torch.optim.Adam(self.actor.parameters(), cfg.actor_lr, eps=cfg.adam_eps)
        self.critic_opt = torch.optim.Adam(self.critic.parameters(), cfg.critic_lr, eps=cfg.adam_eps)
        self.precision = precision  # the agent's
        self.actor_scaler, self.critic_scaler = self.precision.scaler(), self.precision.scaler()
        self._weights: Dict = {}  # (horizon, device) -> w [H]
        self.updates = 0

    @property
    def target_critic(self) -> nn.Module:
        """The critic whose values enter the lambda-returns: the slow critic, or the critic
        itself when slow_critic_every is 0."""
        return self.critic if self.slow_critic is None else self.slow_critic

    def objective_weights(self, horizon: int, device) -> Tensor:
        """w_t [H] of the objective J = sum_t w_t V_t (float32, cached)."""
        key = (horizon, str(device))
        if key not in self._weights:
            w = objective_weights(self.cfg.actor_weights, horizon, self.cfg.gamma)
            self._weights[key] = w.float().to(device)
        return self._weights[key]

    def actor_gradient(self, world_model, start: LatentState, estimator: Estimator,
                       horizon: int) -> Imagination:
        """Imagine `horizon` steps from start states [N, S / Dh] and accumulate the gradient
        of the actor's loss -J into .grad with `estimator` (world model and critic frozen)."""
        cfg, H = self.cfg, horizon
        weights = self.objective_weights(H, start.deter.device)
        rssm, target = world_model.rssm, self.target_critic
        with frozen(world_model, self.critic):
            with self.precision.autocast():
                graph = estimator.graph()
                act = graph.sampler("action")
                latent = graph.sampler("latent") if cfg.latent_nodes else None
                state, feats, values, sigmas = start, [start.feat], [], []
                for t in range(H):
                    actor_in = state.feat if cfg.actor_state_grad else state.feat.detach()
                    mu, sigma = self.actor(graph.cut(actor_in))
                    sigmas.append(sigma)
                    values.append(target(state.feat))
                    action = torch.tanh(act(mu, sigma))
                    deter = rssm.deter_step(state.stoch, action, state.deter)
                    mean, std = rssm.prior(deter)
                    stoch = (latent(mean, std) if latent else
                             mean + std * torch.randn(mean.shape, device=mean.device).to(mean.dtype))
                    state = LatentState(mean, std, stoch, deter)
                    feats.append(state.feat)
                values.append(target(state.feat))
                # [H+1, N, F], [H+1, N], [H, N]; the returns in float32
                feats, values = torch.stack(feats), torch.stack(values).float()
                rewards = world_model.reward(feats[1:]).float()
                # TPX.md sec. 4: r_t = r(s_{t+1}), values of s_0 .. s_H; each node's baseline is
                # kappa_t v(s_t) (the graph's value baseline for this convention).
                returns = graph.lambda_return(rewards, values, cfg.gamma, cfg.lam,
                                              convention="next_reward")
                objective = (weights[:, None] * returns).sum(0).mean()
                # Entropy of the pre-tanh Gaussian. It must not depend on the samples (it stays
                # outside the nodes' weighting): the rollout's sigmas qualify when the actor reads
                # detached states; otherwise it takes its own forward over the detached states.
                sigma_d = torch.stack(sigmas)
                if cfg.actor_entropy and cfg.actor_state_grad:
                    _, sigma_d = self.actor(feats[:-1].detach())
                entropy = sigma_d.float().log().sum(-1).mean()
                loss = graph.loss(-(objective + cfg.actor_entropy * entropy))
            self.actor_scaler.scale(loss).backward()
        stats = graph.stats
        return Imagination(feats.detach(), values.detach(), rewards.detach(), sigma_d.detach(),
                           entropy.detach(), stats)

    def update(self, world_model, start: LatentState) -> Dict[str, Tensor]:
        """One actor and one critic step from start states [..., S / Dh] (detached here)."""
        cfg, H = self.cfg, self.cfg.horizon
        start = start.map(lambda x: x.detach().reshape(-1, x.shape[-1]))
        im = self.actor_gradient(world_model, start, self.estimator, H)
        feats, values, rewards, sigma_d, entropy, stats = im
        actor_norm, actor_ok = finite_step(self.actor_opt, self.actor.parameters(), cfg.grad_clip,
                                           self.actor_scaler)

        # Critic: regress v(s_t) on lambda-returns built from the target critic's values
        # (computed before this step).
        targets = lambda_returns(rewards, values, cfg.gamma, cfg.lam)  # [H, N]
        disc = self.cfg.gamma ** torch.arange(H, device=feats.device, dtype=torch.float32)
        with self.precision.autocast():
            pred = self.critic(feats[:-1])
        err = pred.float() - targets
        critic_loss = 0.5 * (disc[:, None] * err.pow(2)).mean()
        self.critic_scaler.scale(critic_loss).backward()
        critic_norm, critic_ok = finite_step(self.critic_opt, self.critic.parameters(), cfg.grad_clip,
                                             self.critic_scaler)

        self.updates += 1
        if self.slow_critic is not None and self.updates % cfg.slow_critic_every == 0:
            self.slow_critic.load_state_dict(self.critic.state_dict())
        metrics = {
            "actor_grad_norm": actor_norm, "actor_skipped": torch.tensor(float(not actor_ok)),
            "actor_clipped": (actor_norm > cfg.grad_clip).float(),
            "critic_loss": critic_loss.detach(), "critic_grad_norm": critic_norm,
            "critic_skipped": torch.tensor(float(not critic_ok)),
            "imag_return": targets[0].mean(), "imag_reward": rewards.mean(),
            "action_std": sigma_d.mean(), "entropy": entropy,
        }
        metrics.update(self._node_metrics(stats))
        return metrics

    def _node_metrics(self, stats) -> Dict[str, Tensor]:
        """TPX weight on LR per horizon step (mean over the mu coordinates; 1 = all LR) and
        the count of coordinates where both estimators were non-finite."""
        out = {}
        for name in ("action", "latent"):
            nodes = [s for s in stats if s.name == name and s.k is not None]
            if not nodes:
                continue
            D = nodes[0].k.numel() // 2
            out[f"k_{name}"] = torch.stack([s.k[:D] for s in nodes]).float().nanmean(1)  # [H]
            out[f"nonfinite_{name}"] = torch.stack([s.nonfinite for s in nodes]).sum().float()
        return out

    def act(self, feat: Tensor, explore: bool) -> Tensor:
        """Actions [N, A] in [-1, 1]: tanh of a sample (explore) or of the mean."""
        mu, sigma = self.actor(feat)
        return torch.tanh(mu + sigma * torch.randn_like(mu) if explore else mu)

    def state_dict_extra(self):
        return {
            "actor_opt": self.actor_opt.state_dict(), "critic_opt": self.critic_opt.state_dict(),
            "scalers": [self.actor_scaler.state_dict(), self.critic_scaler.state_dict()],
            "updates": self.updates,
            # (var_lr, var_rp) of the coordinate-wise rule, one [3, C, C] tensor of the matrix rule
            "running_stats": [(n, s, buffers) for (n, s), buffers in self.estimator.running_stats.items()],
        }

    def load_state_dict_extra(self, state):
        self.actor_opt.load_state_dict(state["actor_opt"])
        self.critic_opt.load_state_dict(state["critic_opt"])
        for scaler, saved in zip((self.actor_scaler, self.critic_scaler), state.get("scalers", ())):
            if saved:  # an active scaler's state (an inactive one saves {})
                scaler.load_state_dict(saved)
        self.updates = state["updates"]
        self.estimator.running_stats = {  # also checkpoints that stored (n, s, var_lr, var_rp)
            (e[0], e[1]): e[2] if len(e) == 3 else (e[2], e[3]) for e in state["running_stats"]}
