"""python -m tpx_ext.control: the simulators' gradients, exact resume, what a run records."""

import csv
import json
import math

import pytest
import torch

from tpx_ext.experiments import control, report
from tpx_ext.experiments.systems import SYSTEMS, CartPoleSwingUp, DoublePendulum


@pytest.fixture(autouse=True)
def restore_threads():
    threads = torch.get_num_threads()  # the workers set one thread
    yield
    torch.set_num_threads(threads)


def tiny(system="rotor", estimator="tpx", iters=6, **kw):
    args = dict(system=system, horizon=4, estimator=estimator, seed=1, iters=iters, batch=8,
                lr=1e-2, hidden=4, eval_every=2, eval_batch=16, checkpoint_every=2)
    args.update(kw)
    return control.RunSpec(**args)


@pytest.mark.parametrize("system", control.CONTROL_SYSTEMS)
def test_simulator_gradients_match_finite_differences(system):
    """The simulators RP differentiates: d(step, reward)/d(state, action) in float64 against
    central differences (torch.autograd.gradcheck, its default tolerances)."""
    sim = SYSTEMS[system]()
    gen = torch.Generator().manual_seed(0)
    like = torch.zeros((), dtype=torch.float64)
    s = (sim.initial(3, like, gen) + 0.3 * torch.randn(3, 4 if system != "rotor" else 1,
                                                       generator=gen, dtype=torch.float64))
    s.requires_grad_(True)
    a = torch.randn(3, sim.action_dim, generator=gen, dtype=torch.float64).tanh().requires_grad_(True)
    mean_step = sim.mean_step if hasattr(sim, "mean_step") else sim.step
    assert torch.autograd.gradcheck(mean_step, (s, a))
    assert torch.autograd.gradcheck(sim.reward, (s,))
    assert torch.autograd.gradcheck(lambda x: sim.features(x), (s,))


def test_cartpole_conserves_energy_without_friction_and_force():
    """The cart-pole's accelerations are those of its Lagrangian (cart M, uniform rod m of
    length l): with no friction and no force, RK4 on them keeps the energy
    1/2 (M + m) v^2 + 1/2 m l v w cos(th) + 1/6 m l^2 w^2 - 1/2 m g l cos(th) within 1e-6
    of its start over 2 s of large swings (a wrong term in either acceleration breaks
    this); and the simulator's own step (RK4 at dt / 2) stays within 2e-2 of it."""
    sim = CartPoleSwingUp(friction=0.0)
    M, m, l, g = sim.M, sim.m, sim.l, sim.g

    def energy(s):
        x, th, v, w = s.unbind(1)
        return (0.5 * (M + m) * v**2 + 0.5 * m * l * v * w * torch.cos(th)
                + m * l**2 * w**2 / 6 - 0.5 * m * g * l * torch.cos(th))

    def deriv(s):
        x, th, v, w = s.unbind(1)
        acc_x, acc_th = sim._acceleration(th, v, w, torch.zeros_like(v))
        return torch.stack([v, w, acc_x, acc_th], dim=1)

    s0 = torch.tensor([[0.0, 2.5, 0.3, 0.0], [0.2, -1.0, 0.0, 4.0]], dtype=torch.float64)
    s, h = s0, 0.005
    for _ in range(400):
        k1 = deriv(s)
        k2 = deriv(s + h / 2 * k1)
        k3 = deriv(s + h / 2 * k2)
        k4 = deriv(s + h * k3)
        s = s + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)
    assert (s[:, 1] - 2.5).abs().max() > 0.5  # it swung
    assert torch.allclose(energy(s), energy(s0), atol=1e-6, rtol=0)
    s = s0
    for _ in range(20):
        s = sim.mean_step(s, torch.zeros(2, 1, dtype=torch.float64))
    assert torch.allclose(energy(s), energy(s0), atol=2e-2, rtol=0)


def test_cartpole_reward_is_one_upright_at_the_centre_and_tiny_hanging():
    sim = CartPoleSwingUp()
    s = torch.tensor([[0.0, math.pi, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0], [0.25, math.pi, 0.0, 0.0]])
    r = sim.reward(s)
    assert r[0] == pytest.approx(1.0) and r[1] == pytest.approx(math.exp(-8.0), rel=1e-4)
    assert r[2] == pytest.approx(math.exp(-0.5), rel=1e-5)  # one width to the side


def test_expected_return_is_common_noise_and_leaves_the_global_generator_alone():
    sim = DoublePendulum()
    torch.manual_seed(0)
    policy = sim.make_policy(4)
    state = torch.get_rng_state()
    a = control.expected_return(sim, policy, 5, 32)
    assert torch.equal(torch.get_rng_state(), state)
    torch.manual_seed(99)
    assert control.expected_return(sim, policy, 5, 32) == a
    assert control.expected_return(sim, policy, 5, 32, seed=1) != a


@pytest.mark.parametrize("estimator", ["rp", "tpx"])
def test_interrupted_run_resumes_bit_identical(estimator, tmp_path):
    """Stopped after 3 of 6 iterations (mid checkpoint interval) and resumed: the same
    policy, Adam state and metrics as one uninterrupted run."""
    spec = tiny(system="pendulum", estimator=estimator)
    full = control.train_run(spec, str(tmp_path / "full"))
    part = control.train_run(spec, str(tmp_path / "part"), stop_after=3)
    assert part["iteration"] == 3
    resumed = control.train_run(spec, str(tmp_path / "part"))
    assert resumed["iteration"] == 6
    assert resumed["metrics"] == full["metrics"]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for k in a["policy"]:
        assert torch.equal(a["policy"][k], b["policy"][k]), k
    assert torch.equal(a["generator"], b["generator"])
    lines = (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x) for x in lines] == full["metrics"]
    # a finished run is not rerun
    again = control.train_run(spec, str(tmp_path / "full"))
    assert again["metrics"] == full["metrics"] and again["seconds"] == full["seconds"]


def test_a_run_directory_with_other_settings_is_refused(tmp_path):
    control.train_run(tiny(iters=2), str(tmp_path))
    with pytest.raises(ValueError, match="other settings"):
        control.train_run(tiny(iters=2, lr=0.5), str(tmp_path))


def test_same_initial_policy_for_every_estimator_of_a_seed(tmp_path):
    a = control.train_run(tiny(estimator="rp", iters=1), str(tmp_path / "a"))
    b = control.train_run(tiny(estimator="lr", iters=1), str(tmp_path / "b"))
    assert a["metrics"][0] == b["metrics"][0] and a["metrics"][0]["iteration"] == 0


def test_training_ascends_the_return(tmp_path):
    """The optimiser maximises: 25 tpx steps on the rotor at H = 5 raise the expected return
    by more than 0.1 per step. A sign error (Adam minimising, or a gradient of -J) lowers
    it instead."""
    rec = control.train_run(tiny(iters=25, horizon=5, batch=32, eval_every=25, hidden=8),
                            str(tmp_path))
    first, last = rec["metrics"][0]["return"], rec["metrics"][-1]["return"]
    assert last - first > 0.1, (first, last)


def test_a_nonfinite_gradient_is_not_applied(tmp_path, monkeypatch):
    real = control.policy_gradient

    def poisoned(estimator, policy, *args):
        stats = real(estimator, policy, *args)
        next(policy.parameters()).grad[0] = math.nan
        return stats

    monkeypatch.setattr(control, "policy_gradient", poisoned)
    spec = tiny(iters=2)
    rec = control.train_run(spec, str(tmp_path))
    assert rec["nonfinite"] == 2
    _, policy, _, _ = control._new_state(spec)
    ckpt = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    for k, v in policy.state_dict().items():
        assert torch.equal(v, ckpt["policy"][k]), k


def test_lr_weights_profile_per_node_and_step():
    from tpx_ext.estimators import NodeStats

    stats = [NodeStats("action", 0, k=torch.tensor([0.2, 0.4], dtype=torch.float64)),
             NodeStats("latent", 0, k=torch.tensor([1.0, math.nan], dtype=torch.float64)),
             NodeStats("action", 2, k=torch.tensor([0.5], dtype=torch.float64)),
             NodeStats("action", 1)]
    w = control.lr_weights(stats)
    assert w["latent"] == [1.0]
    assert w["action"][0] == pytest.approx(0.3) and math.isnan(w["action"][1]) and w["action"][2] == 0.5


def test_welch_p_matches_the_textbook_value():
    # a = (1, 2, 3, 4), b = (3, 5, 7): t = -2.5 / sqrt(5/12 + 4/3) = -1.8898, Welch's
    # df = 1.75^2 / ((5/12)^2 / 3 + (4/3)^2 / 2) = 3.2347 -> p = 0.1485 (t table)
    assert report.welch_p([1, 2, 3, 4], [3, 5, 7]) == pytest.approx(0.1485, abs=2e-4)
    assert math.isnan(report.welch_p([1.0], [2.0, 3.0]))


def test_cli_writes_tables_csv_and_plots(tmp_path, capsys):
    out = tmp_path / "res" / "ctl"
    argv = ["--systems", "rotor", "--horizons", "3", "--estimators", "rp", "tpx", "--seeds", "2",
            "--iters", "4", "--batch", "8", "--hidden", "4", "--eval-every", "2", "--eval-batch", "8",
            "--checkpoint-every", "2", "--runs", str(tmp_path / "runs"), "--out", str(out),
            "--log-every", "2"]
    records = control.main(argv)
    assert len(records) == 4
    with open(f"{out}.csv") as f:
        data = list(csv.DictReader(f))
    assert len(data) == 4 * 3  # evaluations at iterations 0, 2, 4
    assert {(r["estimator"], r["seed"], r["iteration"]) for r in data} == {
        (e, str(s), str(i)) for e in ("rp", "tpx") for s in (0, 1) for i in (0, 2, 4)}
    md = (tmp_path / "res" / "ctl.md").read_text()
    assert "| rotor | 3 | tpx | 2 |" in md and "python -m tpx_ext.control --systems rotor" in md
    for png in ("ctl.png", "ctl_weights.png"):
        assert (tmp_path / "res" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "[rotor-H3-tpx-s1] it 4/4 return/step" in printed and "done 4/4" in printed
    # tpx records its weight on LR at every step of the horizon (the diagonal of the matrix
    # weight: finite, near [0, 1], but no convex weight)
    rec = [r for r in records if r["spec"]["estimator"] == "tpx"][0]
    k = rec["metrics"][-1]["lr_weight"]["node0"]
    assert len(k) == 3 and all(-0.5 <= x <= 1.5 for x in k)


def test_cli_rejects_bad_arguments(capsys):
    for argv, msg in ((["--iters", "0"], "--iters must be >= 1"), (["--lr", "-1"], "--lr must be > 0"),
                      (["--systems", "lorenz"], "no default horizons")):
        with pytest.raises(SystemExit):
            control.main(argv)
        assert msg in capsys.readouterr().err
