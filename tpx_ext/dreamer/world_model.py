"""The world model: encoder, RSSM, decoder, reward head, and their loss on a replay batch."""

from typing import Dict, Tuple

from torch import Tensor, nn

from .networks import ConvDecoder, ConvEncoder, ScalarHead, mlp, pixel_target
from .rssm import RSSM, LatentState, balanced_kl


class WorldModel(nn.Module):
    """obs_shape (3, 64, 64) (uint8 pixels) or (O,) (float states)."""

    def __init__(self, obs_shape, action_dim: int, cfg):
        super().__init__()
        self.pixels = len(obs_shape) == 3
        if self.pixels:
            if tuple(obs_shape) != (3, 64, 64):
                raise ValueError(f"the conv encoder needs 3x64x64 pixels, got {tuple(obs_shape)}")
            self.encoder = ConvEncoder(cfg.cnn_depth, cfg.cnn_act)
            embed_dim = self.encoder.out_dim
        else:
            embed_dim = cfg.hidden
            self.encoder = mlp(obs_shape[0], embed_dim, cfg.hidden, cfg.mlp_layers - 1)
        self.rssm = RSSM(action_dim, embed_dim, cfg.stoch, cfg.deter,
                         cfg.rssm_hidden, cfg.latent_min_std)
        feat = self.rssm.feat_dim
        self.decoder = (ConvDecoder(feat, cfg.cnn_depth, cfg.cnn_act) if self.pixels
                        else mlp(feat, obs_shape[0], cfg.hidden, cfg.mlp_layers))
        self.reward = ScalarHead(feat, cfg.hidden, cfg.reward_layers)
        self.kl_balance, self.free_nats, self.kl_scale = cfg.kl_balance, cfg.free_nats, cfg.kl_scale

    def embed(self, obs: Tensor) -> Tensor:
        return self.encoder(obs if self.pixels else obs.float())

    def posterior(self, batch: Dict[str, Tensor]) -> LatentState:
        """The posterior states [B, T, ...] of a replay batch (obs, action), without the loss."""
        return self.rssm.observe(self.embed(batch["obs"]), batch["action"])[0]

    def loss(self, batch: Dict[str, Tensor]) -> Tuple[Tensor, LatentState, Dict[str, Tensor]]:
        """batch: obs [B, T, *obs], action [B, T, A], reward [B, T].

        Returns the loss, the posterior states [B, T, ...] (the actor's start states) and
        detached metrics. Log-likelihoods are unit-variance Gaussians summed over obs dims."""
        obs = batch["obs"]
        post, prior = self.rssm.observe(self.embed(obs), batch["action"])
        feat = post.feat
        target = pixel_target(obs) if self.pixels else obs
        obs_dims = tuple(range(2, target.dim()))
        obs_loss = 0.5 * (self.decoder(feat) - target).pow(2).sum(obs_dims).mean()
        reward_loss = 0.5 * (self.reward(feat) - batch["reward"]).pow(2).mean()
        kl_loss, kl = balanced_kl(post, prior, self.kl_balance, self.free_nats)
        loss = obs_loss + reward_loss + self.kl_scale * kl_loss
        metrics = {"model_loss": loss, "obs_loss": obs_loss, "reward_loss": reward_loss,
                   "kl": kl, "prior_ent": prior.std.log().sum(-1).mean()}
        return loss, post, {k: v.detach() for k, v in metrics.items()}
