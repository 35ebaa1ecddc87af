"""Checkpoints of a run: what a save writes, its crash order, damaged files, safe loading."""

import glob
import os

import numpy as np
import pytest
import torch

from tpx_ext.dreamer import checkpoint
from tpx_ext.dreamer.replay import CorruptReplay, ReplayBuffer

from test_replay import fill


def run_buffer(run_dir, capacity=10**6):
    return checkpoint.new_replay(str(run_dir), capacity, (2,), np.float32, 3, seed=0)


def state(step):
    # a model-sized payload, so that the checkpoint file is not all manifest
    return {"config": {"seed": 0}, "agent": {"w": torch.ones(1000)}, "counters": {"env_steps": step},
            "numpy_rng": np.random.default_rng(step).bit_generator.state,
            "env_rng": np.random.RandomState(step).get_state()}


def files(run_dir):
    """{inode: size} of every file under run_dir (a renamed file keeps its inode)."""
    out = {}
    for path in glob.glob(os.path.join(run_dir, "**"), recursive=True):
        if os.path.isfile(path):
            st = os.stat(path)
            out[st.st_ino] = st.st_size
    return out


def test_a_checkpoint_writes_only_what_is_new(tmp_path):
    """Ten episodes and a checkpoint after a checkpoint write the ten episode files and one
    checkpoint file, the same bytes whether the buffer holds 20 or 2000 episodes."""
    written = []
    for stored in (20, 2000):
        run_dir = tmp_path / f"run{stored}"
        buf = run_buffer(run_dir)
        fill(buf, [50] * stored)
        checkpoint.save(str(run_dir), state(1), buf)
        before = files(run_dir)
        fill(buf, [50] * 10, start_id=stored)
        checkpoint.save(str(run_dir), state(2), buf)
        new = {ino: size for ino, size in files(run_dir).items() if ino not in before}
        episode = os.path.getsize(run_dir / "replay" / "ep-00000000.npz")
        latest = os.path.getsize(run_dir / "checkpoint.pt")
        assert len(new) == 11 and sum(new.values()) == 10 * episode + latest
        written.append(sum(new.values()))
    assert abs(written[1] - written[0]) <= 16, written  # the ids' pickled width, no more


def test_evicted_episode_files_go_once_no_checkpoint_names_them(tmp_path):
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir, capacity=30)
    fill(buf, [10, 10, 10])
    checkpoint.save(str(run_dir), state(1), buf)  # names episodes 0-2
    fill(buf, [10], start_id=3)  # evicts episode 0
    assert os.path.exists(run_dir / "replay" / "ep-00000000.npz")  # checkpoint.pt needs it
    checkpoint.save(str(run_dir), state(2), buf)  # names 1-3; the previous one still 0-2
    assert len(os.listdir(run_dir / "replay")) == 4
    fill(buf, [10], start_id=4)
    checkpoint.save(str(run_dir), state(3), buf)  # names 2-4; the previous one 1-3
    assert sorted(os.listdir(run_dir / "replay")) == [f"ep-0000000{i}.npz" for i in (1, 2, 3, 4)]
    # both kept checkpoints load, each with its own episodes
    s, r = checkpoint.load(str(run_dir))
    assert s["counters"]["env_steps"] == 3 and r.id_range == (2, 5)
    os.unlink(run_dir / "checkpoint.pt")
    s, r = checkpoint.load(str(run_dir))
    assert s["counters"]["env_steps"] == 2 and r.id_range == (1, 4)


@pytest.mark.parametrize("failing", ["episode", "checkpoint", "rotation"])
def test_a_failed_save_leaves_the_previous_checkpoint_complete(tmp_path, monkeypatch, failing):
    """Whichever write fails (an episode file, the checkpoint file, or the crash between
    rotating the old checkpoint and renaming the new one), a complete checkpoint loads with
    every episode it names, and the next save succeeds."""
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir, capacity=30)
    fill(buf, [10, 10, 10])
    checkpoint.save(str(run_dir), state(1), buf)
    fill(buf, [10], start_id=3)
    if failing == "episode":
        monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            fill(buf, [10], start_id=4)
    elif failing == "checkpoint":
        monkeypatch.setattr(torch, "save", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
        with pytest.raises(OSError, match="disk full"):
            checkpoint.save(str(run_dir), state(2), buf)
    else:
        real = os.replace
        def crash_after_rotation(src, dst):
            real(src, dst)
            if dst.endswith(checkpoint.PREVIOUS_FILE):
                raise KeyboardInterrupt  # the process dies here
        monkeypatch.setattr(os, "replace", crash_after_rotation)
        with pytest.raises(KeyboardInterrupt):
            checkpoint.save(str(run_dir), state(2), buf)
    monkeypatch.undo()
    s, r = checkpoint.load(str(run_dir))
    assert s["counters"]["env_steps"] == 1 and r.id_range == (0, 3) and len(r) == 30
    checkpoint.save(str(run_dir), state(3), buf)
    s, r = checkpoint.load(str(run_dir))
    assert s["counters"]["env_steps"] == 3 and r.num_episodes == 3


def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(tmp_path, capsys):
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir)
    fill(buf, [10, 10])
    checkpoint.save(str(run_dir), state(1), buf)
    fill(buf, [10], start_id=2)
    checkpoint.save(str(run_dir), state(2), buf)
    latest = run_dir / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:200])  # truncated
    s, r = checkpoint.load(str(run_dir))
    err = capsys.readouterr().err
    assert f"{latest} is not a checkpoint this trainer can read" in err
    assert "using the previous checkpoint" in err and "(env step 1)" in err
    assert s["counters"]["env_steps"] == 1 and r.num_episodes == 2
    assert latest.exists()  # a reader leaves the run as it is
    # a run that continues moves the damaged file aside, so its next save keeps the good one
    s, r = checkpoint.load(str(run_dir), quarantine=True)
    assert not latest.exists() and (run_dir / "checkpoint.pt.bad").exists()
    checkpoint.save(str(run_dir), state(3), r)
    os.unlink(latest)
    assert checkpoint.load(str(run_dir))[0]["counters"]["env_steps"] == 1


def test_a_damaged_episode_file_with_no_complete_checkpoint_is_named(tmp_path):
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir)
    fill(buf, [10, 10])
    checkpoint.save(str(run_dir), state(1), buf)
    checkpoint.save(str(run_dir), state(2), buf)
    episode = run_dir / "replay" / "ep-00000001.npz"
    episode.write_bytes(episode.read_bytes()[:-30])
    with pytest.raises(ValueError, match="no complete checkpoint") as info:
        checkpoint.load(str(run_dir))
    assert str(info.value).count(f"{episode}: unreadable, truncated or corrupt") == 2
    # what is saved stays: the damaged file is reported, not deleted
    assert episode.exists() and (run_dir / "checkpoint.pt").exists()
    assert isinstance(CorruptReplay("x"), ValueError)


class RunsCode:
    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


MARKER = "ran-code-marker"


def test_a_checkpoint_holding_a_pickled_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({**state(1), "agent": RunsCode()}, run_dir / "checkpoint.pt")
    with pytest.raises(ValueError, match=r"refused: it holds a pickled object .*(posix|os)\.system"):
        checkpoint.load(str(run_dir))
    with pytest.raises(ValueError, match="refused"):
        checkpoint.safe_load(run_dir / "checkpoint.pt")
    # numpy arrays are let through for old checkpoints, but only of plain dtypes
    torch.save({"x": np.array([RunsCode()], dtype=object)}, tmp_path / "objects.pt")
    with pytest.raises(ValueError, match=r"refused: .*ObjectDType"):
        checkpoint.safe_load(tmp_path / "objects.pt")
    assert not (tmp_path / MARKER).exists()


def test_checkpoints_hold_only_what_weights_only_loads(tmp_path):
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir)
    fill(buf, [10])
    buf.add(np.zeros(2), np.zeros(3), 0.0, 1.0, first=True)  # an unfinished episode too
    checkpoint.save(str(run_dir), state(1), buf)
    s = torch.load(run_dir / "checkpoint.pt", weights_only=True)  # no allow-list at all
    assert s["env_rng"][1].dtype == torch.int64 and s["replay"]["pending"]["obs"].shape == (1, 2)
    key = np.random.RandomState(1).get_state()[1]
    np.testing.assert_array_equal(s["env_rng"][1].numpy().astype(np.uint32), key)


def test_a_checkpoint_from_before_episode_files_loads_and_migrates(tmp_path):
    """Runs saved as one replay-<step>.npz beside a checkpoint.pt holding numpy arrays still
    load (read-only tools and --resume); the resumed run's saves move to episode files and
    drop the old file once neither checkpoint names it."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    old = ReplayBuffer(1000, (2,), np.float32, 3)
    fill(old, [10, 12])
    np.savez(run_dir / "replay-0000000022.npz", **old.state_dict())
    torch.save({**state(22), "replay_file": "replay-0000000022.npz"}, run_dir / "checkpoint.pt")
    s, buf = checkpoint.load(str(run_dir))
    assert s["counters"]["env_steps"] == 22 and isinstance(s["env_rng"][1], np.ndarray)
    assert not (run_dir / "replay").exists()  # reading changes nothing in the run
    for k, v in old.state_dict().items():
        np.testing.assert_array_equal(buf.state_dict()[k], v, err_msg=k)
    checkpoint.save(str(run_dir), state(30), buf)
    assert sorted(os.listdir(run_dir / "replay")) == ["ep-00000000.npz", "ep-00000001.npz"]
    assert (run_dir / "replay-0000000022.npz").exists()  # checkpoint.prev.pt names it
    checkpoint.save(str(run_dir), state(40), buf)
    assert not (run_dir / "replay-0000000022.npz").exists()
    assert checkpoint.load(str(run_dir))[1].state_dict()["obs"].shape == (22, 2)
