"""Replay buffer: eviction, sequence sampling, checkpoint exactness, atomic save."""

import os

import numpy as np
import pytest

from tpx_ext.dreamer.replay import ReplayBuffer


def fill(buf, lengths, start_id=0):
    """Episodes whose obs encode (episode id, step), so samples can be traced back."""
    for e, n in enumerate(lengths, start_id):
        for i in range(n):
            obs = np.array([e, i], np.float32)
            action = np.full(buf.action_dim, e + i / 100, np.float32)
            buf.add(obs, action, reward=float(i), discount=0.5, first=i == 0, last=i == n - 1)


def state_buffer(capacity=1000, seed=0):
    return ReplayBuffer(capacity, obs_shape=(2,), obs_dtype=np.float32, action_dim=3, seed=seed)


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
    assert np.all(b["reward"] == step)
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
    with pytest.raises(ValueError, match="first=True"):
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


def test_checkpoint_restores_contents_and_rng_exactly(tmp_path):
    a = state_buffer(capacity=30, seed=7)
    fill(a, [10, 12, 9, 6])  # the first episode is evicted
    for i in range(3):  # and one episode left unfinished
        a.add(np.array([9, i]), np.ones(3), 1.0, 1.0, first=i == 0)
    a.sample(5, 4)  # advance the RNG before checkpointing
    path = tmp_path / "replay.npz"
    a.save(path)
    b = state_buffer(capacity=30, seed=123)
    b.load(path)
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


def test_load_rejects_other_configuration(tmp_path):
    a = state_buffer()
    fill(a, [5])
    a.save(tmp_path / "r.npz")
    other = ReplayBuffer(1000, obs_shape=(2,), obs_dtype=np.float32, action_dim=4)
    with pytest.raises(ValueError, match="checkpoint was made by a buffer"):
        other.load(tmp_path / "r.npz")


def test_failed_save_leaves_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "r.npz"
    buf = state_buffer()
    fill(buf, [5])
    buf.save(path)
    before = path.read_bytes()
    fill(buf, [7], start_id=1)

    def crash(f, **arrays):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(OSError, match="disk full"):
        buf.save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["r.npz"]  # no temporary file left behind
    restored = state_buffer()
    restored.load(path)
    assert restored.num_episodes == 1 and len(restored) == 5


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


@pytest.mark.parametrize("failing", ["replay", "checkpoint"])
def test_a_failed_checkpoint_write_leaves_the_previous_checkpoint_complete(tmp_path, monkeypatch, failing):
    """The replay file is written before the checkpoint that names it, and old replay files
    are deleted only after: whichever write fails, the previous checkpoint still loads, with
    the replay it names."""
    from tpx_ext.dreamer import checkpoint

    run_dir = str(tmp_path)
    old, new = state_buffer(), state_buffer()
    fill(old, [10])
    fill(new, [10, 10])
    checkpoint.save(run_dir, {"config": {}, "agent": {}, "counters": {"env_steps": 100}}, old, 100)

    def disk_full(*args, **kwargs):
        raise OSError("no space left on device")

    target = (ReplayBuffer, "save") if failing == "replay" else (checkpoint, "atomic_torch_save")
    monkeypatch.setattr(*target, disk_full)
    with pytest.raises(OSError, match="no space left"):
        checkpoint.save(run_dir, {"config": {}, "agent": {}, "counters": {"env_steps": 200}}, new, 200)
    monkeypatch.undo()
    restored = state_buffer()
    state = checkpoint.load(run_dir, restored)
    assert state["counters"]["env_steps"] == 100 and state["replay_file"] == "replay-0000000100.npz"
    assert len(restored) == 10 and restored.num_episodes == 1
