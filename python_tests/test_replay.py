"""Replay buffer: eviction, sequence sampling, episode files, exact restore."""

import os
import re

import numpy as np
import pytest

from tpx_ext.dreamer.replay import CorruptReplay, ReplayBuffer

MARKER = "ran-code-marker"


class RunsCode:
    """An object whose unpickling runs a command: it creates MARKER in the working directory."""

    def __reduce__(self):
        return (os.system, (f"touch {MARKER}",))


def fill(buf, lengths, start_id=0):
    """Episodes whose obs encode (episode id, step), so samples can be traced back."""
    for e, n in enumerate(lengths, start_id):
        for i in range(n):
            obs = np.array([e, i], np.float32)
            action = np.full(buf.action_dim, e + i / 100, np.float32)
            buf.add(obs, action, reward=float(i), discount=0.5, first=i == 0, last=i == n - 1)


def state_buffer(capacity=1000, seed=0, directory=None):
    return ReplayBuffer(capacity, obs_shape=(2,), obs_dtype=np.float32, action_dim=3, seed=seed,
                        directory=directory)


def test_capacity_evicts_oldest_episodes():
    buf = state_buffer(capacity=25)
    fill(buf, [10, 10])
    assert len(buf) == 20 and buf.num_episodes == 2
    fill(buf, [10], start_id=2)  # 30 > 25: episode 0 goes
    assert len(buf) == 20 and buf.num_episodes == 2
    assert set(buf.sample(64, 10)["obs"][:, 0, 0]) == {1.0, 2.0}
    per_step = 2 * 4 + 3 * 4 + 4 + 4  # obs, action, reward, discount as float32
    assert buf.nbytes == 20 * per_step
    with pytest.raises(ValueError, match="does not fit"):
        fill(buf, [26], start_id=3)


def test_sequences_stay_inside_episodes_and_cover_starts_uniformly():
    buf = state_buffer()
    fill(buf, [5, 8, 3])  # T=4: 2 + 5 valid starts; the 3-step episode is skipped
    b = buf.sample(7000, 4)
    ep, step = b["obs"][..., 0], b["obs"][..., 1]
    assert np.all(ep == ep[:, :1])
    assert np.all(np.diff(step, axis=1) == 1)
    assert np.all(b["reward"] == step) and np.all(b["discount"] == 0.5)
    np.testing.assert_allclose(b["action"][..., 0], ep + step / 100, rtol=1e-6)
    np.testing.assert_array_equal(b["is_first"], (step == 0) & (np.arange(4) == 0))
    starts, counts = np.unique(b["obs"][:, 0], axis=0, return_counts=True)
    assert [tuple(s) for s in starts] == [(0, 0), (0, 1)] + [(1, i) for i in range(5)]
    assert np.all(np.abs(counts - 1000) < 150)  # ~5 sigma for a binomial(7000, 1/7)


def test_shapes_and_dtypes_pixels():
    buf = ReplayBuffer(100, obs_shape=(3, 8, 8), obs_dtype=np.uint8, action_dim=2)
    rng = np.random.default_rng(0)
    for i in range(12):
        obs = rng.integers(0, 256, (3, 8, 8), dtype=np.uint8)
        buf.add(obs, rng.normal(size=2), 1.0, 1.0, first=i == 0, last=i == 11)
    b = buf.sample(4, 6)
    assert b["obs"].shape == (4, 6, 3, 8, 8) and b["obs"].dtype == np.uint8
    assert b["action"].shape == (4, 6, 2) and b["action"].dtype == np.float32
    assert b["reward"].shape == b["discount"].shape == b["is_first"].shape == (4, 6)
    assert b["reward"].dtype == b["discount"].dtype == np.float32 and b["is_first"].dtype == bool


def test_unfinished_episode_is_not_sampled_until_finished():
    buf = state_buffer()
    for i in range(6):
        buf.add(np.array([0, i]), np.zeros(3), 0.0, 1.0, first=i == 0)
    assert len(buf) == 0
    with pytest.raises(ValueError, match="no stored episode has 4 steps"):
        buf.sample(2, 4)
    # A new first step keeps the unfinished episode as it is.
    buf.add(np.array([1, 0]), np.zeros(3), 0.0, 1.0, first=True)
    assert len(buf) == 6 and buf.num_episodes == 1
    assert np.all(buf.sample(8, 6)["obs"][:, :, 0] == 0)


def test_add_errors():
    buf = state_buffer()
    with pytest.raises(ValueError, match=r"^the first step of an episode must be added with first=True$"):
        buf.add(np.zeros(2), np.zeros(3), 0.0, 1.0)
    with pytest.raises(ValueError, match="obs must have shape"):
        buf.add(np.zeros(3), np.zeros(3), 0.0, 1.0, first=True)
    with pytest.raises(ValueError, match="action must have shape"):
        buf.add(np.zeros(2), np.zeros(2), 0.0, 1.0, first=True)
    pix = ReplayBuffer(10, obs_shape=(3, 2, 2), obs_dtype=np.uint8, action_dim=1)
    with pytest.raises(ValueError, match="uint8"):
        pix.add(np.zeros((3, 2, 2), np.float32), np.zeros(1), 0.0, 1.0, first=True)
    with pytest.raises(ValueError, match="obs_dtype"):
        ReplayBuffer(10, obs_shape=(2,), obs_dtype=np.float64, action_dim=1)


def test_manifest_and_episode_files_restore_contents_and_rng_exactly(tmp_path):
    a = state_buffer(capacity=30, seed=7, directory=tmp_path / "replay")
    fill(a, [10, 12, 9, 6])  # the first episode is evicted
    for i in range(3):  # and one episode left unfinished
        a.add(np.array([9, i]), np.ones(3), 1.0, 1.0, first=i == 0)
    a.sample(5, 4)  # advance the RNG before checkpointing
    manifest = a.manifest()
    assert (manifest["first_id"], manifest["end_id"]) == (1, 4)
    b = ReplayBuffer.open(tmp_path / "replay", manifest)
    assert (len(b), b.num_episodes, b.nbytes) == (len(a), a.num_episodes, a.nbytes)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)
    # Both finish the pending episode identically, then sample the same sequences.
    for buf in (a, b):
        buf.add(np.array([9, 3]), np.ones(3), 1.0, 0.0, last=True)
    for _ in range(5):
        sa, sb = a.sample(16, 4), b.sample(16, 4)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    assert np.any(a.sample(64, 4)["obs"][:, 0, 0] == 9)


def test_episodes_are_written_once_as_they_finish(tmp_path):
    d = tmp_path / "replay"
    buf = state_buffer(directory=d)
    fill(buf, [5])
    buf.add(np.array([1, 0]), np.zeros(3), 0.0, 1.0, first=True)  # unfinished: not written
    assert sorted(os.listdir(d)) == ["ep-00000000.npz"]
    stamp = os.stat(d / "ep-00000000.npz").st_mtime_ns
    buf.add(np.array([1, 1]), np.zeros(3), 0.0, 1.0, last=True)
    buf.flush()
    assert sorted(os.listdir(d)) == ["ep-00000000.npz", "ep-00000001.npz"]
    assert os.stat(d / "ep-00000000.npz").st_mtime_ns == stamp  # not rewritten
    with np.load(d / "ep-00000001.npz") as ep:
        np.testing.assert_array_equal(ep["obs"], [[1, 0], [1, 1]])


def test_manifest_needs_the_episodes_on_disk(tmp_path, monkeypatch):
    message = ("manifest() needs every stored episode on disk: give the buffer a directory "
               "and flush() it first")
    with pytest.raises(ValueError) as info:
        state_buffer().manifest()
    assert str(info.value) == message
    buf = state_buffer(directory=tmp_path)
    monkeypatch.setattr(np, "savez", lambda *a, **k: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError):
        fill(buf, [3])
    with pytest.raises(ValueError) as info:  # the episode is stored, its file is not written
        buf.manifest()
    assert str(info.value) == message


def test_sample_arguments_and_too_short_episodes_are_refused_with_the_reason():
    buf = state_buffer()
    with pytest.raises(ValueError) as info:
        buf.sample(2, 4)
    assert str(info.value) == "no stored episode has 4 steps (episodes: 0, longest: 0)"
    fill(buf, [3, 5])
    with pytest.raises(ValueError) as info:
        buf.sample(2, 6)
    assert str(info.value) == "no stored episode has 6 steps (episodes: 2, longest: 5)"
    for batch_size, seq_len in ((0, 4), (4, 0)):
        with pytest.raises(ValueError) as info:
            buf.sample(batch_size, seq_len)
        assert str(info.value) == f"batch_size and seq_len must be >= 1, got {batch_size}, {seq_len}"
    assert buf.sample(1, 1)["obs"].shape == (1, 1, 2)


def test_capacity_must_hold_a_step():
    with pytest.raises(ValueError) as info:
        state_buffer(capacity=0)
    assert str(info.value) == "capacity must be >= 1, got 0"
    buf = state_buffer(capacity=1)
    fill(buf, [1, 1])
    assert (len(buf), buf.num_episodes) == (1, 1)


def test_the_buffer_keeps_a_copy_of_each_observation():
    """Environments may reuse one array for every observation."""
    buf = state_buffer()
    obs = np.zeros(2, np.float32)
    for i in range(3):
        obs[:] = i
        buf.add(obs, np.zeros(3), 0.0, 1.0, first=i == 0, last=i == 2)
    np.testing.assert_array_equal(buf.sample(1, 3)["obs"][0], [[0, 0], [1, 1], [2, 2]])


def test_the_default_seed_is_0():
    a, b = ReplayBuffer(100, (2,), np.float32, 3), state_buffer(seed=0)
    for buf in (a, b):
        fill(buf, [10, 10])
    np.testing.assert_array_equal(a.sample(32, 3)["obs"], b.sample(32, 3)["obs"])


def test_reseed_and_rng_state_replay_the_sampling_stream():
    """reseed(s) restarts sampling as a buffer made with seed s; set_rng_state(rng_state())
    makes the next draws repeat (what gradvar, evaluate and the frozen-model experiment rely
    on); another seed draws other sequences."""
    a, b = state_buffer(seed=5), state_buffer(seed=0)
    for buf in (a, b):
        fill(buf, [10, 10, 10])
    b.sample(8, 3)
    b.reseed(5)
    first = a.sample(16, 3)["obs"]
    np.testing.assert_array_equal(b.sample(16, 3)["obs"], first)
    saved = a.rng_state()
    second = a.sample(16, 3)["obs"]
    assert not np.array_equal(second, first)
    a.set_rng_state(saved)
    np.testing.assert_array_equal(a.sample(16, 3)["obs"], second)
    b.reseed(6)
    assert not np.array_equal(b.sample(16, 3)["obs"], second)


def test_legacy_single_file_replay_loads(tmp_path):
    """A state_dict() saved with np.savez restores the episodes, the unfinished one and the
    RNG: the restored buffer holds as many steps and samples the same sequences."""
    a = state_buffer(seed=3)
    fill(a, [5, 6])
    for i in range(3):
        a.add(np.array([9, i]), np.ones(3), 1.0, 1.0, first=i == 0)
    a.sample(4, 2)  # the RNG moved on
    assert a.state_dict()["pending_obs"].shape == (3, 2)
    np.savez(tmp_path / "r.npz", **a.state_dict())
    b = state_buffer()
    b.load(tmp_path / "r.npz")
    assert (len(b), b.num_episodes) == (len(a), a.num_episodes) == (11, 2)
    for k, v in a.state_dict().items():
        np.testing.assert_array_equal(b.state_dict()[k], v, err_msg=k)
    sa, sb = a.sample(8, 5), b.sample(8, 5)  # before and after the next episode finishes
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    for buf in (a, b):
        buf.add(np.array([9, 3]), np.ones(3), 1.0, 0.0, last=True)
    assert len(b) == 15
    for _ in range(3):
        sa, sb = a.sample(16, 4), b.sample(16, 4)
        for k in sa:
            np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    other = ReplayBuffer(1000, obs_shape=(2,), obs_dtype=np.float32, action_dim=4)
    with pytest.raises(ValueError) as info:
        other.load(tmp_path / "r.npz")
    assert str(info.value) == ("checkpoint was made by a buffer with (capacity, obs_shape, "
                               "obs_dtype, action_dim) = [1000, [2], '<f4', 3], this one has "
                               "[1000, [2], '<f4', 4]")


def test_an_empty_buffers_state_dict_has_the_dtypes_of_a_full_ones(tmp_path):
    full = state_buffer()
    fill(full, [4])
    full.add(np.zeros(2), np.zeros(3), 0.0, 1.0, first=True)
    empty = state_buffer()
    assert ({k: v.dtype for k, v in empty.state_dict().items()}
            == {k: v.dtype for k, v in full.state_dict().items()})
    assert empty.state_dict()["lengths"].dtype == np.int64
    np.savez(tmp_path / "r.npz", **empty.state_dict())
    full.load(tmp_path / "r.npz")
    assert (len(full), full.num_episodes, full.state_dict()["pending_obs"].shape) == (0, 0, (0, 2))


def test_a_legacy_replay_file_holding_a_pickled_object_is_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    a = state_buffer()
    fill(a, [5])
    np.savez(tmp_path / "r.npz", **{**a.state_dict(), "reward": np.array([RunsCode()] * 5)})
    with pytest.raises(ValueError, match="^Object arrays cannot be loaded when allow_pickle=False$"):
        state_buffer().load(tmp_path / "r.npz")
    assert not (tmp_path / MARKER).exists()


@pytest.mark.parametrize("damage", ["missing", "truncated", "flipped", "wrong_shape", "empty",
                                    "too_long", "pickled"])
def test_a_damaged_episode_file_is_named(tmp_path, monkeypatch, damage):
    monkeypatch.chdir(tmp_path)
    d = tmp_path / "replay"
    buf = state_buffer(capacity=20, directory=d)
    fill(buf, [5, 6, 7])
    manifest = buf.manifest()
    path = d / "ep-00000001.npz"
    data = path.read_bytes()

    def episode(n, obs_shape=(2,), obs=None):
        np.savez(path, obs=np.zeros((n, *obs_shape), np.float32) if obs is None else obs,
                 action=np.zeros((n, 3), np.float32), reward=np.zeros(n, np.float32),
                 discount=np.zeros(n, np.float32))

    if damage == "missing":
        path.unlink()
    elif damage == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif damage == "flipped":  # a byte of the arrays' data: only the zip's CRC shows it
        i = data.index(np.float32(5.0).tobytes())  # episode 1's last reward
        path.write_bytes(data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1:])
    elif damage == "wrong_shape":
        episode(6, obs_shape=(3,))
    elif damage == "empty":  # fields of the right dtypes and shapes, but no step
        episode(0)
    elif damage == "too_long":
        episode(21)
    else:
        episode(6, obs=np.array([RunsCode()] * 6))
    unreadable = re.escape(f"{path}: unreadable, truncated or corrupt ")
    with pytest.raises(CorruptReplay) as info:
        ReplayBuffer.open(d, manifest)
    assert re.fullmatch({
        "missing": re.escape(f"{path}: missing (the checkpoint holds episodes 0.. of this directory)"),
        "truncated": unreadable + r"\(BadZipFile: .+\)",
        "flipped": unreadable + r"\(BadZipFile: Bad CRC-32 .+\)",
        "wrong_shape": re.escape(f"{path}: field obs is float32[6, 3], expected float32[6, 2]"),
        "empty": re.escape(f"{path}: an episode of 0 steps (capacity 20)"),
        "too_long": re.escape(f"{path}: an episode of 21 steps (capacity 20)"),
        "pickled": unreadable + re.escape(
            "(ValueError: Object arrays cannot be loaded when allow_pickle=False)"),
    }[damage], str(info.value)), str(info.value)
    assert not (tmp_path / MARKER).exists()


def test_episodes_of_one_step_and_of_the_whole_capacity_are_read_back(tmp_path):
    d = tmp_path / "replay"
    buf = state_buffer(capacity=10, directory=d)
    fill(buf, [1, 9])
    assert ReplayBuffer.open(d, buf.manifest()).state_dict()["lengths"].tolist() == [1, 9]
    fill(buf, [10], start_id=2)
    b = ReplayBuffer.open(d, buf.manifest())
    assert (len(b), b.num_episodes, b.id_range) == (10, 1, (2, 3))


def test_failed_episode_write_leaves_no_file(tmp_path, monkeypatch):
    d = tmp_path / "replay"
    buf = state_buffer(directory=d)
    fill(buf, [5])

    def crash(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        fill(buf, [7], start_id=1)
    monkeypatch.undo()
    assert os.listdir(d) == ["ep-00000000.npz"]  # no temporary file, no partial episode
    buf.flush()  # the episode is stored; the next flush writes it
    assert sorted(os.listdir(d)) == ["ep-00000000.npz", "ep-00000001.npz"]


def test_capacity_boundaries():
    """A buffer holding exactly its capacity evicts nothing; one step more evicts the
    oldest episode (and only it); an episode of exactly the capacity fits alone; one step
    longer is refused and leaves the buffer as it was."""
    buf = state_buffer(capacity=20)
    fill(buf, [10, 10])
    assert len(buf) == 20 and buf.num_episodes == 2  # exactly C steps
    fill(buf, [1], start_id=2)  # C + 1: the oldest goes, the next one stays
    assert len(buf) == 11 and buf.num_episodes == 2
    assert {float(x) for x in buf.sample(64, 1)["obs"][:, 0, 0]} == {1.0, 2.0}
    fill(buf, [20], start_id=3)  # an episode of exactly C evicts all the others
    assert len(buf) == 20 and buf.num_episodes == 1
    assert set(buf.sample(16, 20)["obs"][:, 0, 0]) == {3.0}
    with pytest.raises(ValueError, match="an episode of 21 steps does not fit in capacity 20"):
        fill(buf, [21], start_id=4)
    assert len(buf) == 20 and buf.num_episodes == 1


def test_eviction_follows_insertion_order():
    buf = state_buffer(capacity=30)
    fill(buf, [5, 10, 15])
    for start_id, kept in ((3, {1.0, 2.0, 3.0}), (4, {2.0, 3.0, 4.0})):
        fill(buf, [5], start_id=start_id)
        assert {float(x) for x in buf.sample(256, 1)["obs"][:, 0, 0]} == kept


def test_prune_deletes_only_episode_files_no_checkpoint_names(tmp_path, monkeypatch):
    """Ids below keep_from, ids from the buffer's end on (written by a run that crashed after
    its last checkpoint) and temporary files go; every other file stays, and a file named
    like an episode without a number stops nothing."""
    d = tmp_path / "replay"
    buf = state_buffer(capacity=20, directory=d)
    fill(buf, [5] * 5)  # episode 0 evicted: the buffer holds ids 1..4
    others = ["ep-notes.npz", "ab-00000000.npz", "ep-00000000.npy", "notes.txt"]
    stale = ["ep-00000005.npz", "ep-10000003.npz", "ep-00000006.npz.tmp", "x.tmp"]
    for name in others + stale:
        (d / name).write_bytes(b"")
    real = os.listdir
    monkeypatch.setattr(os, "listdir", lambda path: ["ep-notes.npz"] + sorted(
        n for n in real(path) if n != "ep-notes.npz"))
    buf.prune(2)
    assert sorted(real(d)) == sorted(others + [f"ep-0000000{i}.npz" for i in (2, 3, 4)])


def test_a_temporary_episode_file_left_by_a_killed_run_is_pruned(tmp_path, monkeypatch):
    d = tmp_path / "replay"
    buf = state_buffer(directory=d)
    fill(buf, [3])
    # the process dies after writing episode 1's temporary file, before renaming or deleting it
    monkeypatch.setattr(os, "replace", lambda *a: (_ for _ in ()).throw(KeyboardInterrupt))
    monkeypatch.setattr(os, "unlink", lambda path: None)
    with pytest.raises(KeyboardInterrupt):
        fill(buf, [4], start_id=1)
    monkeypatch.undo()
    assert len(os.listdir(d)) == 2
    buf.prune(0)
    assert os.listdir(d) == ["ep-00000000.npz"]
