"""python -m tpx_ext.evaluate: a saved agent's return, GIF and open-loop video, read-only."""

import hashlib
import json
import os

import numpy as np
import pytest
import torch

from tpx_ext.dreamer import evaluate
from tpx_ext.dreamer.rendering import rendering_error
from tpx_ext.dreamer.train import load_run, main as train


def trained(tmp_path_factory, *args):
    threads = torch.get_num_threads()
    run_dir = str(tmp_path_factory.mktemp("evaluate") / "run")
    train(["--configs", "debug", "--logdir", run_dir, "--quiet", "--threads", "1", *args])
    torch.set_num_threads(threads)
    return run_dir


@pytest.fixture(scope="module")
def state_run(tmp_path_factory):
    return trained(tmp_path_factory, "--steps", "400")


def digest(run_dir):
    """Every file and directory under run_dir, files with their contents' hash."""
    out = {}
    for root, dirs, files in os.walk(run_dir):
        for d in dirs:
            out[os.path.relpath(os.path.join(root, d), run_dir)] = "dir"
        for f in files:
            path = os.path.join(root, f)
            out[os.path.relpath(path, run_dir)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
    return out


def test_returns_json_and_gif_leave_the_run_untouched(state_run, tmp_path, capsys):
    before = digest(state_run)
    out, gif = tmp_path / "res" / "eval.json", tmp_path / "first.gif"
    result = evaluate.main([state_run, "--episodes", "2", "--out", str(out), "--gif", str(gif)])
    printed = capsys.readouterr().out
    assert f"eval return: {result['mean']:.1f} +- {result['std']:.1f} (2 episodes, mean action)" in printed
    saved = json.loads(out.read_text())
    assert saved["returns"] == result["returns"] and len(saved["returns"]) == 2
    assert saved["mean"] == pytest.approx(np.mean(saved["returns"])) and saved["env_steps"] == 400
    assert gif.read_bytes()[:6] == b"GIF89a"
    assert digest(state_run) == before
    # The same seed gives the same returns; the policy's samples give others.
    again = evaluate.main([state_run, "--episodes", "2"])
    assert again["returns"] == result["returns"]
    sampled = evaluate.main([state_run, "--episodes", "2", "--sample"])
    assert sampled["action"] == "sampled" and sampled["returns"] != result["returns"]


def test_a_damaged_newest_checkpoint_is_reported_and_the_previous_evaluated(
        tmp_path_factory, capsys):
    """debug: checkpoints at 400 (episodes 0-1) and 800 env steps (0-3). Without episode 3
    the newest is incomplete: the result and its env steps are the previous checkpoint's."""
    run_dir = trained(tmp_path_factory, "--steps", "800")
    missing = os.path.join(run_dir, "replay", "ep-00000003.npz")
    os.unlink(missing)
    before = digest(run_dir)
    result = evaluate.main([run_dir, "--episodes", "1"])
    captured = capsys.readouterr()
    assert f"{missing}: missing" in captured.err and "using the previous checkpoint" in captured.err
    assert result["env_steps"] == 400 and "after 400 env steps" in captured.out
    assert digest(run_dir) == before


@pytest.mark.parametrize("args, match", [
    (["NOWHERE"], "NOWHERE holds no run of python -m tpx_ext.train"),
    (["STATE", "--episodes", "0"], "--episodes must be >= 1"),
    (["STATE", "--openloop", "x.gif"], "--openloop needs a run from pixels"),
    (["FOREIGN"], "is not a checkpoint this trainer can read"),
])
def test_errors_are_one_line(state_run, tmp_path, capsys, args, match):
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "checkpoint.pt").write_bytes(b"\x80\x04junk")
    args = [{"STATE": state_run, "FOREIGN": str(foreign)}.get(x, x) for x in args]
    with pytest.raises(SystemExit) as info:
        evaluate.main(args)
    err = capsys.readouterr().err
    assert info.value.code == 2 and err.count("\n") == 1 and match in err, err


@pytest.mark.skipif(rendering_error() is not None, reason="pixels need a headless OpenGL backend")
def test_openloop_video_puts_the_real_frames_beside_the_model(tmp_path_factory, tmp_path):
    run_dir = trained(tmp_path_factory, "--obs", "pixels", "--steps", "600")
    agent, replay, cfg, _ = load_run(run_dir)
    frames = evaluate.openloop_frames(agent, replay, sequences=2, seed=3)
    T = evaluate.CONTEXT + evaluate.OPENLOOP
    assert len(frames) == T and frames[0].shape == (3, 3 * 64, 2 * 64)
    replay.reseed(3)  # the same draw as openloop_frames: its top row is the real frames
    real = replay.sample(2, T)["obs"]
    for t in (0, evaluate.CONTEXT, T - 1):
        np.testing.assert_array_equal(frames[t][:, :64, :64], real[0, t])
        np.testing.assert_array_equal(frames[t][:, :64, 64:], real[1, t])
    gif = tmp_path / "openloop.gif"
    evaluate.main([run_dir, "--episodes", "1", "--openloop", str(gif)])
    assert gif.read_bytes()[:6] == b"GIF89a"
