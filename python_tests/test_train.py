"""The trainer end to end (debug preset: tiny model, 200-step episodes, seconds per run)."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from tpx_ext.dreamer import checkpoint, configs, plot
from tpx_ext.dreamer.logger import read_metrics
from tpx_ext.dreamer.train import load_run, main
from tpx_ext.experiments.sweep import read_checkpoint

TIMING = {"env_steps_per_second", "update_seconds"}  # the only fields allowed to differ


def run(tmp_path, name, *args):
    logdir = str(tmp_path / name)
    result = main(["--configs", "debug", "--logdir", logdir, "--quiet", "--threads", "1", *args])
    return logdir, result


def records(logdir):
    return [{k: v for k, v in r.items() if k not in TIMING}
            for r in read_metrics(os.path.join(logdir, "metrics.jsonl"))]


def weights(logdir):
    state = checkpoint.read_state(logdir)
    return state["agent"]["modules"], state["counters"]


@pytest.mark.parametrize("estimator,horizon", [
    ("rp", 5), ("lr", 5), ("mix", 5), ("tpx", 5), ("rp", 15), ("tpx", 15), ("rp", 100), ("tpx", 100),
])
def test_smoke_state(tmp_path, estimator, horizon):
    knobs = ["--estimator_args.rho", "0.5"] if estimator == "mix" else []
    logdir, result = run(tmp_path, "r", "--estimator", estimator, "--horizon", str(horizon), *knobs)
    recs = read_metrics(os.path.join(logdir, "metrics.jsonl"))
    trained = [r for r in recs if "actor_grad_norm" in r]
    assert trained, "no training update was logged"
    assert np.isfinite(result["eval_return"])
    last = trained[-1]
    assert last["updates"] > 0 and last["model_skipped"] == 0
    if estimator != "rp":
        assert len(last["k_action"]) == horizon
    saved = json.load(open(os.path.join(logdir, "config.json")))
    assert saved["estimator"] == estimator and saved["horizon"] == horizon
    assert saved["estimator_args"] == ({"rho": 0.5} if estimator == "mix" else {})


def test_smoke_pixels_with_latent_nodes_and_gif(tmp_path):
    logdir, result = run(tmp_path, "px", "--obs", "pixels", "--steps", "600", "--latent_nodes",
                         "true", "--eval_gif", "true", "--tensorboard", "true")
    assert np.isfinite(result["eval_return"])
    rec = [r for r in read_metrics(os.path.join(logdir, "metrics.jsonl")) if "k_latent" in r]
    assert rec and len(rec[-1]["k_latent"]) == 5
    gifs = sorted(os.listdir(os.path.join(logdir, "eval")))
    assert gifs and gifs[0].endswith(".gif")
    from PIL import Image
    with Image.open(os.path.join(logdir, "eval", gifs[0])) as im:
        # 100 frames (200 physics steps, repeat 2); PIL merges identical consecutive ones.
        assert im.size == (64, 64) and 1 < im.n_frames <= 100
    assert any(f.startswith("events") for f in os.listdir(os.path.join(logdir, "tb")))


# DreamerV1's features: exploration noise (torch's RNG), a first phase of `pretrain`
# updates (which a resume must not repeat), no slow critic, plain KL, detached actor input.
V1_FEATURES = ["--expl_noise", "0.3", "--pretrain", "7", "--slow_critic_every", "0",
               "--kl_balance", "0", "--actor_state_grad", "false"]


@pytest.mark.parametrize("extra,delay", [([], 0.0), ([], 0.6), (V1_FEATURES, 0.0),
                                         (["--envs", "2"], 0.0)],
                         ids=["default", "default_later", "v1_features", "two_envs"])
def test_kill_and_resume_matches_uninterrupted_run(tmp_path, extra, delay):
    """SIGKILL a run right after its first checkpoint (or `delay` s later, while it writes
    episodes the checkpoint does not name), resume it, and compare with a run that was
    never interrupted: same weights, counters, metrics records and episode files."""
    full, _ = run(tmp_path, "full", *extra)
    killed = str(tmp_path / "killed")
    cmd = [sys.executable, "-m", "tpx_ext.train", "--configs", "debug", "--logdir", killed,
           "--quiet", "--threads", "1", *extra]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while not checkpoint.exists(killed):
        assert proc.poll() is None, proc.stderr.read().decode()
        assert time.time() < deadline, "no checkpoint within 120 s"
        time.sleep(0.01)
    time.sleep(delay)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    _, counters = weights(killed)
    assert counters["env_steps"] < configs.build(["debug"], {}).steps, "killed too late"
    main(["--logdir", killed, "--resume", "--quiet"])
    (w_full, c_full), (w_res, c_res) = weights(full), weights(killed)
    assert c_full == c_res
    for k in w_full:
        assert torch.equal(w_full[k], w_res[k]), k
    assert records(full) == records(killed)
    episodes = [sorted(os.listdir(os.path.join(d, "replay"))) for d in (full, killed)]
    assert episodes[0] == episodes[1] and len(episodes[0]) == 6  # 1200 env steps
    for name in episodes[0]:
        with np.load(os.path.join(full, "replay", name)) as a, \
                np.load(os.path.join(killed, "replay", name)) as b:
            assert all(np.array_equal(a[k], b[k]) for k in a.files), name


def test_pretrain_runs_its_updates_once_after_the_prefill(tmp_path):
    # debug: prefill 400 env steps, one update per 20 env steps, 200-step episodes.
    logdir, _ = run(tmp_path, "p", "--pretrain", "7", "--steps", "600")
    trained = [r for r in read_metrics(os.path.join(logdir, "metrics.jsonl")) if "updates" in r]
    assert [r["updates"] for r in trained] == [0, 7, 17]  # then 10 phases of 1 update
    logdir, _ = run(tmp_path, "n", "--steps", "600")
    trained = [r for r in read_metrics(os.path.join(logdir, "metrics.jsonl")) if "updates" in r]
    assert [r["updates"] for r in trained] == [0, 1, 11]


def test_exploration_noise_changes_the_collected_actions(tmp_path):
    a, _ = run(tmp_path, "a", "--steps", "600")
    b, _ = run(tmp_path, "b", "--steps", "600", "--expl_noise", "0.3")
    actions = [load_run(logdir).replay.state_dict()["action"] for logdir in (a, b)]
    assert len(actions[0]) == len(actions[1]) == 3 * 101  # 3 episodes of 100 steps + first
    # The first two episodes are the random prefill: the same numpy draws in both runs.
    np.testing.assert_array_equal(actions[0][:202], actions[1][:202])
    assert not np.allclose(actions[0][202:], actions[1][202:])
    assert np.abs(actions[1]).max() <= 1


def test_missing_checkpoint_errors(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    for where, why in ((empty, "stopped before its first checkpoint"),
                       (tmp_path / "nowhere", "no such directory")):
        with pytest.raises(FileNotFoundError, match=f"no checkpoint.pt \\(.*{why}"):
            checkpoint.read_state(str(where))
        with pytest.raises(FileNotFoundError, match="no checkpoint.pt"):
            load_run(str(where))
        assert read_checkpoint(str(where)) is None  # a sweep's trial that has not started
    logdir, _ = run(tmp_path, "r", "--steps", "400")
    state = checkpoint.read_state(logdir)
    assert state["counters"]["env_steps"] == 400
    assert state["replay"]["end_id"] == 2  # 400 env steps: 2 episodes
    missing = os.path.join(logdir, "replay", "ep-00000001.npz")
    os.unlink(missing)
    with pytest.raises(ValueError, match=f"no complete checkpoint: {missing}: missing"):
        load_run(logdir)


def refused(capsys, argv, match):
    """A user's mistake ends as argparse's do: one line on stderr, exit status 2."""
    with pytest.raises(SystemExit) as info:
        main(argv)
    err = capsys.readouterr().err
    assert info.value.code == 2, err
    assert err.startswith("python -m tpx_ext.train: error: ") and err.count("\n") == 1, err
    assert match is None or match in err, err


def test_resume_refusals(tmp_path, capsys):
    logdir, _ = run(tmp_path, "r", "--steps", "400")
    capsys.readouterr()
    refused(capsys, ["--configs", "debug", "--logdir", logdir, "--quiet"], "already holds a run")
    refused(capsys, ["--logdir", logdir, "--resume", "--horizon", "7"], "only --steps may")
    refused(capsys, ["--logdir", str(tmp_path / "nothing"), "--resume"], "--resume needs --logdir")
    # A directory with a checkpoint but no config of this trainer (another tool's run).
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.pt").write_bytes(b"not ours")
    refused(capsys, ["--logdir", str(foreign), "--resume"], "cannot read the run's config")
    # Extending a finished run with more steps continues it.
    main(["--logdir", logdir, "--resume", "--steps", "800", "--quiet"])
    assert weights(logdir)[1]["env_steps"] == 800


@pytest.mark.parametrize("args,match", [
    (["--estimator", "tp"], "estimator must be one of"),
    (["--estimator", "foo"], "estimator must be one of"),
    (["--horizon", "0"], "horizon must be >= 1"),
    (["--envs", "0"], "envs must be >= 1, got 0"),
    (["--bogus_key", "1"], "unrecognized arguments: --bogus_key 1"),
    (["--horizon", "ten"], "expected int"),
    (["--latent_nodes", "maybe"], "expected true/false"),
    (["--task", "cartpole_nope"], "unknown task 'cartpole_nope'; valid:"),
    (["--configs", "nope"], "unknown config preset"),
    (["--tpx_ucb", "1"], "--tpx_ucb is now --estimator_args.ucb"),
    (["--mix_rho=0.3"], "--mix_rho is now --estimator_args.rho"),
    (["--estimator", "mix"], "rho is required by mode 'mix'"),
    (["--estimator_args.ucb", "-1"], "ucb must be a finite number >= 0"),
    (["--estimator", "rp", "--estimator_args.ucb", "1"], "ucb applies to mode 'tpx' only"),
    (["--estimator_args.nope", "1"], "unknown estimator knob 'nope'"),
])
def test_bad_arguments(tmp_path, capsys, args, match):
    refused(capsys, ["--logdir", str(tmp_path / "x"), "--quiet", *args], match)
    assert not os.path.exists(tmp_path / "x")


def test_plot_groups_runs(tmp_path):
    a, _ = run(tmp_path, "a", "--steps", "400", "--seed", "0")
    b, _ = run(tmp_path, "b", "--steps", "400", "--seed", "1")
    out = plot.plot([a, b], str(tmp_path / "c.png"))
    assert os.path.getsize(out) > 1000
    out = plot.plot([a], str(tmp_path / "d.png"), metrics="train_return")
    assert os.path.exists(out)
    with pytest.raises(ValueError, match="never logged"):
        plot.plot([a], str(tmp_path / "e.png"), metrics=["eval_return", "no_such_metric"])


def test_plot_horizon_profile(tmp_path):
    a, _ = run(tmp_path, "a", "--steps", "800", "--horizon", "7")
    recs = [r["k_action"] for r in read_metrics(os.path.join(a, "metrics.jsonl")) if "k_action" in r]
    np.testing.assert_allclose(plot.profile(a, "k_action", last=1.0), np.mean(recs, axis=0))
    np.testing.assert_allclose(plot.profile(a, "k_action", last=1e-9), recs[-1])
    out = plot.plot_profiles([a], str(tmp_path / "k.png"))
    assert os.path.getsize(out) > 1000
    log_out = plot.plot_profiles([a], str(tmp_path / "k_log.png"), log=True)
    assert open(log_out, "rb").read() != open(out, "rb").read(), "--log drew the same axis"
    rp, _ = run(tmp_path, "rp", "--steps", "400", "--estimator", "rp")
    with pytest.raises(ValueError, match="rp runs have no"):
        plot.profile(rp, "k_action")


def test_envs_steps_environments_in_parallel_and_stores_each_episode(tmp_path):
    """--envs 2: every round is one episode per environment (env i seeded seed + i), both
    stored in order, env steps and training phases counted over both; --envs 1 is the
    trainer as it was (test_kill_and_resume compares runs of it bit for bit)."""
    logdir, result = run(tmp_path, "two", "--envs", "2")
    trained = [r for r in read_metrics(os.path.join(logdir, "metrics.jsonl")) if "train_return" in r]
    # debug: 200-step episodes, prefill 400, one update every 20 env steps
    assert [(r["step"], r["episodes"], r["updates"]) for r in trained] == \
        [(400, 2, 1), (800, 4, 21), (1200, 6, 41)]
    replay = load_run(logdir).replay
    obs = replay.state_dict()["obs"].reshape(6, 101, -1)
    from tpx_ext.dreamer.envs import make_env
    for i in range(2):  # the first round: env i starts where a lone env seeded i starts
        with make_env("cartpole_balance", seed=i, episode_length=200) as env:
            np.testing.assert_array_equal(obs[i, 0], env.reset())
    assert not np.array_equal(obs[0, 0], obs[1, 0])
