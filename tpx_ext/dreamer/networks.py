"""Encoders, decoders and heads. Pixels: DreamerV1's 64x64 conv stack; states: MLPs."""

import math

import torch
from torch import Tensor, nn


def mlp(inp: int, out: int, hidden: int, layers: int) -> nn.Sequential:
    """`layers` hidden ELU layers of width `hidden`, then a linear output."""
    mods, width = [], inp
    for _ in range(layers):
        mods += [nn.Linear(width, hidden), nn.ELU()]
        width = hidden
    mods.append(nn.Linear(width, out))
    return nn.Sequential(*mods)


ACTIVATIONS = {"relu": nn.ReLU, "elu": nn.ELU}


class ConvEncoder(nn.Module):
    """uint8-range pixels [..., 3, 64, 64] -> embedding [..., 32 * depth] (4 stride-2 convs).
    act: "relu" (DreamerV1) or "elu"."""

    def __init__(self, depth: int = 32, act: str = "relu"):
        super().__init__()
        d, Act = depth, ACTIVATIONS[act]
        self.net = nn.Sequential(
            nn.Conv2d(3, d, 4, 2), Act(), nn.Conv2d(d, 2 * d, 4, 2), Act(),
            nn.Conv2d(2 * d, 4 * d, 4, 2), Act(), nn.Conv2d(4 * d, 8 * d, 4, 2), Act(),
        )
        self.out_dim = 32 * depth  # 8d channels x 2 x 2

    def forward(self, obs: Tensor) -> Tensor:
        lead = obs.shape[:-3]
        x = obs.reshape(-1, *obs.shape[-3:]).float() / 255.0 - 0.5
        return self.net(x).reshape(*lead, self.out_dim)


class ConvTranspose2dOn1x1(nn.ConvTranspose2d):
    """A transposed convolution of a 1x1 input, computed as the matrix product it is:
    out[n, co, i, j] = b[co] + sum_ci x[n, ci] W[ci, co, i, j]. mkldnn's transposed
    convolution is slow at it on a CPU: with it as the decoder's first layer a dmc_vision
    update takes 1.27x as long (docs/BENCHMARKS.md). Same parameters, so the same state_dict."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, stride: int = 1):
        # without padding, dilation or groups: on a 1x1 input the stride then does not matter
        super().__init__(in_channels, out_channels, kernel_size, stride)

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[-2:] != (1, 1):
            raise ValueError(f"expects a 1x1 input, got spatial size {tuple(x.shape[-2:])}")
        (kh, kw), (cin, cout) = self.kernel_size, self.weight.shape[:2]
        y = nn.functional.linear(x.reshape(-1, cin),
                                 self.weight.permute(2, 3, 1, 0).reshape(kh * kw * cout, cin),
                                 self.bias.repeat(kh * kw))
        return y.reshape(-1, kh, kw, cout).permute(0, 3, 1, 2)  # channels_last, as the rest


class ConvDecoder(nn.Module):
    """features [..., F] -> mean image [..., 3, 64, 64] in the encoder's [-0.5, 0.5] scale.
    act: "relu" (DreamerV1) or "elu"."""

    def __init__(self, feat_dim: int, depth: int = 32, act: str = "relu"):
        super().__init__()
        d, Act = depth, ACTIVATIONS[act]
        self.fc = nn.Linear(feat_dim, 32 * d)
        self.net = nn.Sequential(
            ConvTranspose2dOn1x1(32 * d, 4 * d, 5, 2), Act(),
            nn.ConvTranspose2d(4 * d, 2 * d, 5, 2), Act(),
            nn.ConvTranspose2d(2 * d, d, 6, 2), Act(),
            nn.ConvTranspose2d(d, 3, 6, 2),
        )

    def forward(self, feat: Tensor) -> Tensor:
        lead = feat.shape[:-1]
        x = self.fc(feat.reshape(-1, feat.shape[-1]))
        return self.net(x[:, :, None, None]).reshape(*lead, 3, 64, 64)


def pixel_target(obs: Tensor) -> Tensor:
    """The decoder's regression target for uint8 pixels: the encoder's input scaling."""
    return obs.float() / 255.0 - 0.5


class ActorHead(nn.Module):
    """features [N, F] -> (mu, sigma) [N, A] of the pre-tanh Gaussian u; the action is tanh(u).

    mu = mean_scale * tanh(raw / mean_scale) keeps the pre-tanh mean bounded (DreamerV1);
    sigma = softplus(raw + shift) + min_std, with shift making sigma = init_std at raw = 0
    (DreamerV1's shift makes it init_std + min_std).
    """

    def __init__(self, feat_dim: int, action_dim: int, hidden: int, layers: int,
                 init_std: float = 1.0, min_std: float = 0.1, mean_scale: float = 5.0):
        super().__init__()
        if not init_std > min_std > 0:
            raise ValueError(f"need init_std > min_std > 0, got {init_std}, {min_std}")
        self.net = mlp(feat_dim, 2 * action_dim, hidden, layers)
        self.min_std, self.mean_scale = min_std, mean_scale
        self.std_shift = math.log(math.expm1(init_std - min_std))

    def forward(self, feat: Tensor):
        raw_mu, raw_std = self.net(feat).chunk(2, -1)
        mu = self.mean_scale * torch.tanh(raw_mu / self.mean_scale)
        sigma = nn.functional.softplus(raw_std + self.std_shift) + self.min_std
        return mu, sigma


class ScalarHead(nn.Module):
    """features [..., F] -> [...] (reward and value heads)."""

    def __init__(self, feat_dim: int, hidden: int, layers: int):
        super().__init__()
        self.net = mlp(feat_dim, 1, hidden, layers)

    def forward(self, feat: Tensor) -> Tensor:
        return self.net(feat).squeeze(-1)
