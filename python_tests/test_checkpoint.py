"""Checkpoints of a run: what a save writes, its crash order, damaged files, safe loading."""

import glob
import os
import pickle
import re

import numpy as np
import pytest
import torch

from tpx_ext.dreamer import checkpoint
from tpx_ext.dreamer.replay import CorruptReplay, ReplayBuffer

from test_replay import MARKER, RunsCode, fill


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


def test_the_refusal_names_the_file_and_the_global_it_would_import(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "checkpoint.pt"
    torch.save({**state(1), "agent": RunsCode()}, path)
    module = os.system.__module__  # posix
    with pytest.raises(ValueError) as info:
        checkpoint.safe_load(path)
    assert str(info.value) == (
        f"{path}: refused: it holds a pickled object that loading would have to run (Trying to "
        f"load unsupported GLOBAL {module}.system whose module {module} is blocked). Checkpoints "
        "of tpx_ext hold only tensors and plain values; do not load files from sources you do "
        "not trust")
    assert not (tmp_path / MARKER).exists()


def test_the_environment_cannot_turn_the_refusal_off(tmp_path, monkeypatch):
    """TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1 makes torch.load unpickle anything when its caller
    does not pass weights_only; safe_load passes it."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    torch.save({**state(1), "agent": RunsCode()}, tmp_path / "checkpoint.pt")
    with pytest.raises(ValueError, match="refused: it holds a pickled object"):
        checkpoint.safe_load(tmp_path / "checkpoint.pt")
    assert not (tmp_path / MARKER).exists()


@pytest.mark.filterwarnings("ignore:Detected pickle protocol 4")
def test_files_that_are_not_checkpoints_are_named_with_the_reason(tmp_path):
    """An empty file, a pickle that is not a torch file, another tool's torch file: each is
    reported by name with what is wrong, and load names both when neither loads."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    latest, previous = run_dir / "checkpoint.pt", run_dir / "checkpoint.prev.pt"
    latest.write_bytes(b"")  # a copy that stopped before its first byte
    torch.save({"config": {}, "agent": {}}, previous)  # no counters
    with pytest.raises(ValueError) as info:
        checkpoint.load(str(run_dir))
    assert str(info.value) == (
        f"{run_dir}: no complete checkpoint: {latest} is not a checkpoint this trainer can read "
        f"(EOFError: ); {previous} is not a checkpoint of tpx_ext.train (another tool's file?)")
    torch.save([1, 2], previous)
    with pytest.raises(ValueError, match=re.escape(f"{previous} is not a checkpoint of tpx_ext.train")):
        checkpoint.read_state(str(run_dir))
    pickled = tmp_path / "list.pkl"  # torch's unpickler stops at protocol 4's first opcode
    pickled.write_bytes(pickle.dumps([1, 2], protocol=4))
    with pytest.raises(ValueError) as info:
        checkpoint.safe_load(pickled)
    assert str(info.value).startswith(
        f"{pickled} is not a checkpoint this trainer can read (UnpicklingError: ")


def test_config_agent_and_counters_are_all_a_state_needs(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    torch.save({"config": {"seed": 1}, "agent": {}, "counters": {"env_steps": 5}},
               run_dir / "checkpoint.pt")
    assert checkpoint.read_state(str(run_dir)) == {
        "config": {"seed": 1}, "agent": {}, "counters": {"env_steps": 5}}


def test_read_state_and_load_without_replay_read_no_episode(tmp_path, capsys):
    """Tools that need only the model (evaluate, gradvar) work without the episode files."""
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir)
    fill(buf, [10, 10])
    checkpoint.save(str(run_dir), state(7), buf)
    for name in os.listdir(run_dir / "replay"):
        os.unlink(run_dir / "replay" / name)
    assert checkpoint.read_state(str(run_dir))["counters"]["env_steps"] == 7
    s, replay = checkpoint.load(str(run_dir), with_replay=False)
    assert s["counters"]["env_steps"] == 7 and replay is None
    assert capsys.readouterr().err == ""


def test_map_location_places_the_tensors(tmp_path):
    """The meta device stands for a GPU: every machine has it. Without map_location, the CPU."""
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir)
    fill(buf, [10])
    checkpoint.save(str(run_dir), state(1), buf)
    path = run_dir / "checkpoint.pt"
    assert checkpoint.safe_load(path)["agent"]["w"].device == torch.device("cpu")
    assert checkpoint.read_state(str(run_dir))["agent"]["w"].device == torch.device("cpu")
    assert checkpoint.safe_load(path, "meta")["agent"]["w"].is_meta
    assert checkpoint.read_state(str(run_dir), "meta")["agent"]["w"].is_meta
    assert checkpoint.load(str(run_dir), "meta", with_replay=False)[0]["agent"]["w"].is_meta


def test_a_resumed_run_keeps_the_episodes_of_the_checkpoint_it_loaded(tmp_path):
    """The first save after a load keeps the loaded checkpoint (now checkpoint.prev.pt)
    complete: the episodes it names that the buffer has evicted since stay on disk."""
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir, capacity=30)
    fill(buf, [10, 10, 10])
    checkpoint.save(str(run_dir), state(1), buf)
    _, resumed = checkpoint.load(str(run_dir))
    fill(resumed, [10], start_id=3)  # evicts episode 0
    checkpoint.save(str(run_dir), state(2), resumed)
    assert (run_dir / "replay" / "ep-00000000.npz").exists()
    os.unlink(run_dir / "checkpoint.pt")
    s, r = checkpoint.load(str(run_dir))
    assert s["counters"]["env_steps"] == 1 and r.id_range == (0, 3) and len(r) == 30


def test_no_checkpoint_says_why(tmp_path):
    with pytest.raises(FileNotFoundError) as info:
        checkpoint.load(str(tmp_path / "nowhere"))
    assert str(info.value) == f"{tmp_path / 'nowhere'}: no checkpoint.pt (no such directory)"
    with pytest.raises(FileNotFoundError) as info:
        checkpoint.read_state(str(tmp_path))
    assert str(info.value) == (f"{tmp_path}: no checkpoint.pt (not a run directory, or the run "
                               "stopped before its first checkpoint)")


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


def legacy_run(run_dir, **arrays):
    """A run saved before episode files: checkpoint.pt naming replay-0000000022.npz, the
    buffer's state_dict() with `arrays` replacing its own."""
    run_dir.mkdir()
    old = ReplayBuffer(1000, (2,), np.float32, 3)
    fill(old, [10, 12])
    np.savez(run_dir / "replay-0000000022.npz", **{**old.state_dict(), **arrays})
    torch.save({**state(22), "replay_file": "replay-0000000022.npz"}, run_dir / "checkpoint.pt")
    return run_dir / "replay-0000000022.npz"


def test_a_missing_legacy_replay_file_is_named(tmp_path):
    path = legacy_run(tmp_path / "run")
    os.unlink(path)
    with pytest.raises(ValueError) as info:
        checkpoint.load(str(tmp_path / "run"))
    assert str(info.value) == (f"{tmp_path / 'run'}: no complete checkpoint: "
                               f"{path}: missing (named by the checkpoint)")


def test_a_legacy_replay_file_holding_a_pickled_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    legacy_run(tmp_path / "run", config=np.array([RunsCode()]))
    path = tmp_path / "run" / "replay-0000000022.npz"
    with pytest.raises(ValueError, match=f"^{tmp_path / 'run'}: no complete checkpoint: {path}: "
                                         r"unreadable, truncated or corrupt \(ValueError: Object "
                                         "arrays cannot be loaded when allow_pickle=False"):
        checkpoint.load(str(tmp_path / "run"))
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("damage", ["truncated", "no config"])
def test_a_damaged_legacy_replay_file_is_named_and_the_previous_checkpoint_used(tmp_path, capsys, damage):
    """A legacy replay that is cut short (a zip without its directory) or lacks an array
    is a damaged checkpoint like any other: named, and the previous one used if complete."""
    path = legacy_run(tmp_path / "run")
    if damage == "truncated":
        path.write_bytes(path.read_bytes()[:200])
        why = "BadZipFile: File is not a zip file"
    else:
        with np.load(path) as data:
            arrays = {k: data[k] for k in data.files if k != "config"}
        np.savez(path, **arrays)
        why = "KeyError: 'config is not a file in the archive'"
    with pytest.raises(ValueError) as info:
        checkpoint.load(str(tmp_path / "run"))
    assert str(info.value) == (f"{tmp_path / 'run'}: no complete checkpoint: {path}: unreadable, "
                               f"truncated or corrupt ({why})")
    previous = run_buffer(tmp_path / "run")
    fill(previous, [5])
    checkpoint.save(str(tmp_path / "run"), state(5), previous)
    os.replace(tmp_path / "run" / "checkpoint.pt", tmp_path / "run" / "checkpoint.prev.pt")
    torch.save({**state(22), "replay_file": path.name}, tmp_path / "run" / "checkpoint.pt")
    loaded, replay = checkpoint.load(str(tmp_path / "run"))
    assert loaded["counters"]["env_steps"] == 5 and replay.num_episodes == 1
    assert f"warning: {path}: unreadable, truncated or corrupt ({why})" in capsys.readouterr().err


def test_exists_means_a_checkpoint_file_either_way(tmp_path):
    run_dir = tmp_path / "run"
    assert not checkpoint.exists(str(run_dir))
    run_dir.mkdir()
    (run_dir / "replay").mkdir()
    (run_dir / "checkpoint.pt.bad").write_bytes(b"")
    assert not checkpoint.exists(str(run_dir))
    (run_dir / "checkpoint.prev.pt").write_bytes(b"")
    assert checkpoint.exists(str(run_dir))
    os.unlink(run_dir / "checkpoint.prev.pt")
    (run_dir / "checkpoint.pt").write_bytes(b"")
    assert checkpoint.exists(str(run_dir))


def test_a_new_replay_samples_by_its_seed(tmp_path):
    samples = []
    for run, seed in (("a", 3), ("b", 3), ("c", 4)):
        buf = checkpoint.new_replay(str(tmp_path / run), 1000, (2,), np.float32, 3, seed=seed)
        fill(buf, [10, 10])
        samples.append(buf.sample(32, 3)["obs"])
    np.testing.assert_array_equal(samples[0], samples[1])
    assert not np.array_equal(samples[0], samples[2])


def test_the_unfinished_episode_comes_back_with_its_values_and_dtypes(tmp_path):
    run_dir = tmp_path / "run"
    buf = run_buffer(run_dir)
    fill(buf, [4])
    for i in range(2):
        buf.add(np.array([0.25, i]), np.full(3, 0.5), 1.5, 0.75, first=i == 0)
    checkpoint.save(str(run_dir), state(1), buf)
    _, restored = checkpoint.load(str(run_dir))
    for k, v in buf.state_dict().items():
        got = restored.state_dict()[k]
        assert got.dtype == v.dtype, k
        np.testing.assert_array_equal(got, v, err_msg=k)
