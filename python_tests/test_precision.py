"""Mixed precision (`precision` 32 | bf16 | 16) on the CPU: the same losses and gradients as
float32 within the low precision's resolution, scalers kept by checkpoints, a bf16 run learns."""

import os

import numpy as np
import pytest
import torch

from tpx_ext.dreamer.agent import Dreamer
from tpx_ext.dreamer.configs import build
from tpx_ext.dreamer.logger import read_metrics

A = 2


def cfg(**kw):
    return build(["debug"], {"horizon": 4, **kw})


def data(seed=0, B=3, T=6):
    rng = np.random.default_rng(seed)
    return {"obs": torch.as_tensor(rng.standard_normal((B, T, 5)).astype(np.float32)),
            "action": torch.as_tensor(rng.uniform(-1, 1, (B, T, A)).astype(np.float32)),
            "reward": torch.as_tensor(rng.random((B, T)).astype(np.float32))}


def gradients(precision):
    """World-model loss and gradients, then the rp actor gradient, from one fixed batch."""
    torch.manual_seed(0)
    agent = Dreamer((5,), A, cfg(precision=precision, estimator="rp", actor_entropy=0.0))
    with agent.precision.autocast():
        loss, post, _ = agent.world_model.loss(data())
    loss.backward()
    wm = torch.cat([p.grad.flatten() for p in agent.world_model.parameters()])
    agent.world_model.zero_grad()
    start = post.map(lambda x: x.detach().float().reshape(-1, x.shape[-1]))
    torch.manual_seed(1)
    agent.behavior.actor_gradient(agent.world_model, start, agent.behavior.estimator, 4)
    actor = torch.cat([p.grad.flatten() for p in agent.behavior.actor.parameters()])
    if agent.behavior.actor_scaler.is_enabled():  # finite_step unscales it before the step
        actor = actor / agent.behavior.actor_scaler.get_scale()
    return float(loss), wm, actor


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_losses_and_gradients_match_float32(precision):
    """bf16 keeps 8 bits of mantissa, float16 11: the loss within 1%, the gradients within
    a few percent of their norm."""
    loss32, wm32, actor32 = gradients("32")
    loss, wm, actor = gradients(precision)
    assert loss == pytest.approx(loss32, rel=0.01)
    for got, want in ((wm, wm32), (actor, actor32)):
        assert got.dtype == torch.float32
        assert float((got - want).norm() / want.norm()) < 0.05


@pytest.mark.parametrize("precision", ["bf16", "16"])
def test_updates_are_finite_and_float16_scalers_survive_a_checkpoint(precision):
    torch.manual_seed(0)
    agent = Dreamer((5,), A, cfg(precision=precision, estimator="tpx"))
    for i in range(3):
        m = agent.update({k: v.numpy() for k, v in data(i).items()})
        assert float(m["model_skipped"]) == 0 and float(m["actor_skipped"]) == 0
        assert torch.isfinite(m["actor_grad_norm"]) and torch.isfinite(m["critic_loss"])
    state = agent.checkpoint_state()
    other = Dreamer((5,), A, cfg(precision=precision, estimator="tpx"))
    other.load_checkpoint_state(state)
    scalers = [(agent.model_scaler, other.model_scaler),
               (agent.behavior.actor_scaler, other.behavior.actor_scaler),
               (agent.behavior.critic_scaler, other.behavior.critic_scaler)]
    for a, b in scalers:
        assert a.is_enabled() == (precision == "16")
        assert a.state_dict() == b.state_dict()



def test_float16_reports_the_unscaled_gradient_norms():
    """The grad scalers multiply the losses by 2^16; the reported norms (and the clipping)
    are of the unscaled gradients, within float16's rounding of float32's."""
    norms = {}
    for precision in ("32", "16"):
        torch.manual_seed(0)
        agent = Dreamer((5,), A, cfg(precision=precision, estimator="rp", actor_entropy=0.0))
        torch.manual_seed(1)
        m = agent.update({k: v.numpy() for k, v in data(0).items()})
        norms[precision] = [float(m[k]) for k in ("model_grad_norm", "actor_grad_norm",
                                                   "critic_grad_norm")]
    assert agent.behavior.actor_scaler.get_scale() > 1000
    np.testing.assert_allclose(norms["16"], norms["32"], rtol=0.05)

def test_bf16_learns_like_float32(tmp_path):
    """bf16 fits a batch as float32 does (40 updates: the world-model loss falls by more than
    15%, ending within 5% of float32's), and a short run of the trainer follows float32's
    curve within bf16's rounding."""
    from tpx_ext.dreamer.train import main as train

    final = {}
    for precision in ("32", "bf16"):
        torch.manual_seed(0)
        agent = Dreamer((5,), A, cfg(precision=precision, model_lr=3e-3))
        batch = {k: v.numpy() for k, v in data(0).items()}
        losses = [float(agent.update(batch)["model_loss"]) for _ in range(40)]
        assert losses[-1] < 0.85 * losses[0], losses
        final[precision] = losses[-1]
    assert final["bf16"] == pytest.approx(final["32"], rel=0.05)

    threads = torch.get_num_threads()
    curves = {}
    for precision in ("32", "bf16"):
        run_dir = str(tmp_path / precision)
        train(["--configs", "debug", "--logdir", run_dir, "--quiet", "--threads", "1",
               "--precision", precision])
        curves[precision] = [r["model_loss"] for r in read_metrics(os.path.join(run_dir, "metrics.jsonl"))
                             if "model_loss" in r]
    torch.set_num_threads(threads)
    assert len(curves["bf16"]) == len(curves["32"]) >= 4
    np.testing.assert_allclose(curves["bf16"], curves["32"], rtol=0.05)


@pytest.mark.parametrize("precision, dtype", [("bf16", torch.bfloat16), ("16", torch.float16)])
def test_imagined_latent_samples_are_in_the_autocast_dtype(precision, dtype):
    """Each imagined stoch = mean + std * eps is formed in the prior's autocast dtype (eps
    drawn in float32, then cast), so every imagined sample is a number of that dtype, as
    the mean and std it is made of; a float32 sample would carry precision they do not."""
    torch.manual_seed(0)
    agent = Dreamer((5,), A, cfg(precision=precision, estimator="rp"))
    with agent.precision.autocast():
        _, post, _ = agent.world_model.loss(data())
    start = post.map(lambda x: x.detach().float().reshape(-1, x.shape[-1]))
    im = agent.behavior.actor_gradient(agent.world_model, start, agent.behavior.estimator, 4)
    S = agent.cfg.stoch
    imagined = im.feats[1:, :, :S]  # the stoch of s_1 .. s_H, stacked in float32
    assert imagined.dtype == torch.float32
    assert torch.equal(imagined.to(dtype).float(), imagined)
    drawn = torch.randn(imagined.shape)  # float32 numbers are not, so the check can fail
    assert not torch.equal(drawn.to(dtype).float(), drawn)
