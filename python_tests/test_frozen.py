"""python -m tpx_ext.frozen: actors and critics trained in a trained run's frozen world model."""

import csv
import hashlib
import os

import numpy as np
import pytest
import torch

from tpx_ext.dreamer import checkpoint
from tpx_ext.experiments import frozen


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from tpx_ext.dreamer.train import main as train

    threads = torch.get_num_threads()
    run_dir = str(tmp_path_factory.mktemp("frozen") / "model")
    train(["--configs", "debug", "--logdir", run_dir, "--quiet", "--threads", "1", "--steps", "400"])
    torch.set_num_threads(threads)
    return run_dir


def digest(run_dir):
    """sha256 of every file of the run directory (name -> hash)."""
    out = {}
    for root, _, files in os.walk(run_dir):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, run_dir)] = hashlib.sha256(f.read()).hexdigest()
    return out


def spec(**kw):
    args = dict(horizon=4, estimator="tpx", seed=0, updates=4, eval_every=2, eval_episodes=1)
    args.update(kw)
    return frozen.FrozenSpec(**args)


def test_world_model_and_replay_stay_bit_identical(model_dir, tmp_path):
    """Training actor and critic changes neither the world model's parameters nor the
    replay's contents nor any file of the model's run directory; the actor does change."""
    before = digest(model_dir)
    model = frozen.FrozenModel(model_dir)
    replay_before = {k: v.copy() for k, v in model.replay.state_dict().items() if k != "rng"}
    agent0 = model.agent(spec())
    actor0 = {k: v.clone() for k, v in agent0.behavior.actor.state_dict().items()}
    frozen.train_run(model, spec(), str(tmp_path / "run"))
    agent = model.agent(spec())  # a fresh agent holds the stored world model
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=False)
    agent.behavior.load_state_dict(ckpt["behavior"])
    stored = checkpoint.read_state(model_dir)["agent"]["modules"]
    for k, v in agent.world_model.state_dict().items():
        assert torch.equal(v, stored["world_model." + k]), k
    assert any(not torch.equal(actor0[k], v) for k, v in agent.behavior.actor.state_dict().items())
    after = {k: v for k, v in model.replay.state_dict().items() if k != "rng"}
    assert replay_before.keys() == after.keys()
    for k in after:
        assert np.array_equal(replay_before[k], after[k]), k
    assert digest(model_dir) == before


def test_world_model_parameters_get_no_gradient(model_dir):
    """The behaviour update leaves no gradient on a world-model parameter and no step in
    the world model's optimizer."""
    model = frozen.FrozenModel(model_dir)
    agent = model.agent(spec())
    batch = model.replay.sample(agent.cfg.batch_size, agent.cfg.seq_len)
    data = {k: torch.as_tensor(batch[k]) for k in ("obs", "action")}
    with torch.no_grad():
        post = agent.world_model.posterior(data)
    agent.update_behavior(post)
    assert all(p.grad is None and not p.requires_grad for p in agent.world_model.parameters())
    assert agent.model_opt.state_dict()["state"] == {}


def test_interrupted_run_resumes_bit_identical(model_dir, tmp_path):
    """Stopped after 3 of 4 updates (its last checkpoint at update 2) and resumed: the same
    actor, critic and evaluations as one uninterrupted run."""
    model = frozen.FrozenModel(model_dir)
    full = frozen.train_run(model, spec(), str(tmp_path / "full"))
    part = frozen.train_run(model, spec(), str(tmp_path / "part"), stop_after=3)
    assert part["update"] == 3
    resumed = frozen.train_run(model, spec(), str(tmp_path / "part"))
    assert resumed["update"] == 4
    assert [m["return"] for m in resumed["metrics"]] == [m["return"] for m in full["metrics"]]
    assert [m.get("k_action") for m in resumed["metrics"]] == [m.get("k_action") for m in full["metrics"]]
    a = torch.load(tmp_path / "full" / "checkpoint.pt", weights_only=False)
    b = torch.load(tmp_path / "part" / "checkpoint.pt", weights_only=False)
    for k in a["behavior"]:
        assert torch.equal(a["behavior"][k], b["behavior"][k]), k
    with pytest.raises(ValueError, match="other settings"):
        frozen.train_run(model, spec(updates=6), str(tmp_path / "full"))


def test_same_fresh_actor_for_every_estimator_of_a_seed(model_dir):
    model = frozen.FrozenModel(model_dir)
    a = model.agent(spec(estimator="rp")).behavior.actor.state_dict()
    b = model.agent(spec(estimator="tpx", horizon=9)).behavior.actor.state_dict()
    c = model.agent(spec(estimator="rp", seed=1)).behavior.actor.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_cli_writes_tables_csv_and_plots(model_dir, tmp_path, capsys):
    out = tmp_path / "res" / "fz"
    records = frozen.main(["--model", model_dir, "--horizons", "3", "--estimators", "rp", "tpx",
                           "--seeds", "2", "--updates", "2", "--eval-every", "1",
                           "--eval-episodes", "1", "--device", "cpu",
                           "--runs", str(tmp_path / "runs"), "--out", str(out)])
    assert len(records) == 4
    with open(f"{out}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 * 3  # evaluations at updates 0, 1, 2
    md = (tmp_path / "res" / "fz.md").read_text()
    assert "| 3 | tpx | 2 |" in md and "cartpole_balance (state), trained 400" in md
    for png in ("fz.png", "fz_weights.png"):
        assert (tmp_path / "res" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "[H3-tpx-s1] update 2/2 eval return" in printed and "done 4/4" in printed
    tpx = [r for r in records if r["spec"]["estimator"] == "tpx"][0]
    k = tpx["metrics"][-1]["k_action"]
    # the diagonal of the matrix weight on LR: finite, near [0, 1] (it is no convex weight)
    assert len(k) == 3 and all(-0.5 <= x <= 1.5 for x in k)
    with pytest.raises(SystemExit):
        frozen.main(["--model", str(tmp_path / "nothing")])
    err = capsys.readouterr().err
    assert "--model: " in err and "no checkpoint.pt (no such directory)" in err


def test_workers_give_the_runs_of_one_process(model_dir, tmp_path):
    """--workers 2 (spawned processes) trains the same runs as one process, bit for bit."""
    args = ["--model", model_dir, "--horizons", "3", "--estimators", "rp", "tpx", "--seeds", "1",
            "--updates", "2", "--eval-every", "1", "--eval-episodes", "1", "--device", "cpu",
            "--quiet"]
    one = frozen.main(args + ["--runs", str(tmp_path / "one"), "--out", str(tmp_path / "one")])
    two = frozen.main(args + ["--runs", str(tmp_path / "two"), "--out", str(tmp_path / "two"),
                              "--workers", "2"])
    assert [r["spec"] for r in one] == [r["spec"] for r in two]
    assert [r["metrics"] for r in one] == [r["metrics"] for r in two]


def test_the_model_runs_estimator_knobs_do_not_reach_other_estimators(tmp_path):
    """A world model trained with tpx and ucb 1: a frozen rp run builds (ucb is tpx's knob),
    and a frozen tpx run takes the library's defaults, not the model run's knobs."""
    from tpx_ext.dreamer.train import main as train

    threads = torch.get_num_threads()
    run_dir = str(tmp_path / "model")
    train(["--configs", "debug", "--logdir", run_dir, "--quiet", "--threads", "1", "--steps", "400",
           "--estimator_args.ucb", "1"])
    torch.set_num_threads(threads)
    model = frozen.FrozenModel(run_dir)
    assert model.config["estimator_args"] == {"ucb": 1.0}
    assert model.agent(spec(estimator="rp")).behavior.estimator.mode == "rp"
    assert model.agent(spec(estimator="tpx")).behavior.estimator.knobs["ucb"] == 2.0
