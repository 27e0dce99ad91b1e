"""rl.replay: windows are slices of the stored episodes, uniform sampling, save/load, eviction."""

import json
from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from rl.replay import Replay


def make_episode(ep: int, length: int, rng, terminal: bool = False) -> dict:
    """Observations encode (episode, step), so a window's origin can be read off its content."""
    t = np.arange(length)
    image = np.broadcast_to((t % 256).astype(np.uint8)[:, None, None, None], (length, 2, 2, 3))
    return {
        "obs": {
            "image": image.copy(),
            "proprio": np.stack([np.full(length, ep), t], 1).astype(np.float32),
        },
        "actions": rng.uniform(-1, 1, (length, 2)).astype(np.float32),
        "rewards": rng.normal(size=length).astype(np.float32),
        "mask": rng.random((length, 2)) < 0.7,
        "discounts": np.r_[np.ones(length - 1), 0.0 if terminal else 1.0].astype(np.float32),
    }


def fill(replay: Replay, episodes: list[dict]) -> None:
    """Add episodes row by row (as a runner does)."""
    for e in episodes:
        L = len(e["rewards"])
        for t in range(L):
            replay.add(
                {k: v[t] for k, v in e["obs"].items()},
                e["actions"][t],
                e["rewards"][t],
                e["mask"][t],
                e["discounts"][t],
                last=t == L - 1,
            )


def test_windows_are_contiguous_slices_of_the_stored_episodes():
    rng = np.random.default_rng(0)
    episodes = [make_episode(i, L, rng) for i, L in enumerate([7, 12, 4, 9])]
    replay = Replay(capacity=1000, seed=1)
    fill(replay, episodes)
    assert replay.num_episodes == 4 and replay.num_rows == 32
    T = 5
    batch = replay.sample_sequences(64, T)
    assert batch.obs["image"].shape == (64, T, 2, 2, 3) and batch.obs["image"].dtype == np.uint8
    assert batch.actions.shape == (64, T, 2) and batch.rewards.shape == (64, T)
    assert batch.mask.shape == (64, T, 2) and batch.mask.dtype == bool
    for b in range(64):
        ep, t0 = batch.obs["proprio"][b, 0].astype(int)  # read off the content
        assert (ep, t0) == (batch.episode[b], batch.start[b])
        assert ep != 2  # episode 2 is shorter than T
        e, window = episodes[ep], slice(t0, t0 + T)
        np.testing.assert_array_equal(batch.obs["proprio"][b], e["obs"]["proprio"][window])
        np.testing.assert_array_equal(batch.obs["image"][b], e["obs"]["image"][window])
        np.testing.assert_array_equal(batch.actions[b], e["actions"][window])
        np.testing.assert_array_equal(batch.rewards[b], e["rewards"][window])
        np.testing.assert_array_equal(batch.mask[b], e["mask"][window])
        np.testing.assert_array_equal(batch.discounts[b], e["discounts"][window])
    assert set(batch.model_batch()) == {"obs", "actions", "rewards", "mask"}
    with pytest.raises(ValueError, match="13 rows"):
        replay.sample_sequences(2, 13)


def chi_square_pvalue(draws: list, cells: list) -> float:
    counts = Counter(draws)
    assert set(counts) <= set(cells)
    observed = np.array([counts[c] for c in cells])
    return stats.chisquare(observed).pvalue


def test_sampling_is_uniform_over_windows_and_transitions():
    rng = np.random.default_rng(0)
    lengths = [5, 9, 14]
    replay = Replay(capacity=1000, seed=3)
    fill(replay, [make_episode(i, L, rng) for i, L in enumerate(lengths)])
    T, n = 4, 19_000
    seq = replay.sample_sequences(n, T)
    windows = [(i, s) for i, L in enumerate(lengths) for s in range(L - T + 1)]  # 19 cells
    draws = list(zip(seq.episode.tolist(), seq.start.tolist(), strict=True))
    p = chi_square_pvalue(draws, windows)
    assert p > 1e-3
    # choosing an episode first and then a start would weigh episode 0's two windows 3.2x
    per_episode = np.bincount(seq.episode, minlength=3) / n
    np.testing.assert_allclose(per_episode, np.array([2, 6, 11]) / 19, atol=0.015)
    tr = replay.sample_transitions(25_000)
    steps = [(int(a), int(b)) for a, b in tr.obs["proprio"]]
    cells = [(i, t) for i, L in enumerate(lengths) for t in range(L - 1)]  # 25 cells
    assert chi_square_pvalue(steps, cells) > 1e-3


def test_transitions_pair_consecutive_rows_with_the_next_discount():
    rng = np.random.default_rng(1)
    episodes = [make_episode(0, 6, rng, terminal=True), make_episode(1, 5, rng)]
    replay = Replay(capacity=100, seed=0)
    fill(replay, episodes)
    tr = replay.sample_transitions(200)
    for b in range(200):
        ep, t = tr.obs["proprio"][b].astype(int)
        e = episodes[ep]
        assert t < len(e["rewards"]) - 1
        np.testing.assert_array_equal(tr.next_obs["proprio"][b], e["obs"]["proprio"][t + 1])
        np.testing.assert_array_equal(tr.next_obs["image"][b], e["obs"]["image"][t + 1])
        assert tr.actions[b].tolist() == e["actions"][t].tolist()
        assert tr.rewards[b] == e["rewards"][t]
        assert tr.discounts[b] == e["discounts"][t + 1]
        np.testing.assert_array_equal(tr.mask[b], e["mask"][t])
        np.testing.assert_array_equal(tr.next_mask[b], e["mask"][t + 1])
    # the terminal transition (episode 0, t = 4) carries discount 0
    terminal = (tr.obs["proprio"][:, 0] == 0) & (tr.obs["proprio"][:, 1] == 4)
    assert terminal.any() and np.all(tr.discounts[terminal] == 0.0)
    assert np.all(tr.discounts[~terminal] == 1.0)


def test_ongoing_episode_is_sampled_only_when_asked():
    rng = np.random.default_rng(2)
    done, ongoing = make_episode(0, 4, rng), make_episode(1, 10, rng)
    replay = Replay(capacity=100)
    fill(replay, [done])
    for t in range(6):  # 6 rows of episode 1, not finished
        replay.add(
            {k: v[t] for k, v in ongoing["obs"].items()},
            ongoing["actions"][t],
            ongoing["rewards"][t],
            ongoing["mask"][t],
        )
    with pytest.raises(ValueError, match="5 rows"):
        replay.sample_sequences(4, 5)
    seq = replay.sample_sequences(50, 5, include_ongoing=True)
    assert np.all(seq.episode == 1) and set(seq.start.tolist()) <= {0, 1}
    np.testing.assert_array_equal(seq.actions[0], ongoing["actions"][seq.start[0] :][:5])
    with pytest.raises(ValueError, match="in progress"):
        replay.add_episode(**done)


def test_save_load_restores_everything(tmp_path):
    rng = np.random.default_rng(4)
    episodes = [make_episode(i, L, rng) for i, L in enumerate([8, 11, 9])]
    replay = Replay(capacity=25, seed=5)  # evicts episode 0 after the save
    fill(replay, episodes[:2])
    partial = episodes[2]
    for t in range(4):
        obs_t = {k: v[t] for k, v in partial["obs"].items()}
        replay.add(obs_t, partial["actions"][t], partial["rewards"][t], partial["mask"][t])
    replay.sample_sequences(3, 4)  # advance the generator
    path = replay.save(tmp_path / "buffer")
    assert path.name == "buffer.npz" and sorted(p.name for p in tmp_path.iterdir()) == [
        "buffer.json",
        "buffer.npz",
    ]  # no temporary files left behind
    assert json.loads((tmp_path / "buffer.json").read_text())["ongoing_length"] == 4
    loaded = Replay.load(path)
    assert loaded.metadata() == replay.metadata()

    def same(a, b):
        for x, y in zip(a, b, strict=True):
            if isinstance(x, dict):
                assert x.keys() == y.keys()
                for k in x:
                    np.testing.assert_array_equal(x[k], y[k])
            else:
                np.testing.assert_array_equal(x, y)

    for r in (replay, loaded):  # finish the episode identically in both
        for t in range(4, 9):
            obs_t = {k: v[t] for k, v in partial["obs"].items()}
            r.add(obs_t, partial["actions"][t], partial["rewards"][t], partial["mask"][t])
    same(
        replay.sample_sequences(16, 6, include_ongoing=True),
        loaded.sample_sequences(16, 6, include_ongoing=True),
    )
    same(replay.sample_transitions(16), loaded.sample_transitions(16))
    for r in (replay, loaded):
        r.add({k: v[0] for k, v in partial["obs"].items()}, [0, 0], 0.0, [True, True], last=True)
    assert replay.episode_ids == loaded.episode_ids == [1, 2]  # episode 0 evicted in both
    same(replay.sample_sequences(16, 6), loaded.sample_sequences(16, 6))
    # an empty replay round-trips too
    empty = Replay.load(Replay(capacity=5, seed=9).save(tmp_path / "empty.npz"))
    assert empty.num_rows == 0 and empty.capacity == 5


def test_eviction_drops_oldest_completed_episodes():
    rng = np.random.default_rng(5)
    replay = Replay(capacity=20)
    fill(replay, [make_episode(i, 8, rng) for i in range(3)])
    assert replay.episode_ids == [1, 2] and replay.num_rows == 16
    assert set(replay.sample_sequences(100, 3).episode.tolist()) == {1, 2}
    big = make_episode(3, 30, rng)  # larger than the capacity: kept alone
    fill(replay, [big])
    assert replay.episode_ids == [3] and replay.num_rows == 30


@settings(max_examples=25, deadline=None)
@given(
    lengths=st.lists(st.integers(1, 12), min_size=1, max_size=8),
    capacity=st.integers(1, 40),
)
def test_eviction_keeps_the_newest_episodes_that_fit(lengths, capacity):
    replay = Replay(capacity=capacity)
    for i, L in enumerate(lengths):
        replay.add_episode(
            np.full((L, 1), i, np.float32), np.zeros((L, 1)), np.zeros(L), discounts=np.ones(L)
        )
    kept = replay.episode_ids
    # the newest suffix of episodes, as many as fit (at least the newest one)
    expected, total = [], 0
    for i in reversed(range(len(lengths))):
        if expected and total + lengths[i] > capacity:
            break
        expected.insert(0, i)
        total += lengths[i]
    assert kept == expected and replay.num_rows == total
    for j, i in enumerate(kept):
        np.testing.assert_array_equal(replay.episode(j)["obs"][:, 0], i)


def test_bad_rows_raise():
    replay = Replay(capacity=10)
    replay.add(np.zeros(3, np.float32), [0.0], 0.0)
    with pytest.raises(ValueError, match="shape"):
        replay.add(np.zeros(4, np.float32), [0.0], 0.0)
    with pytest.raises(ValueError, match="non-finite"):
        replay.add(np.zeros(3, np.float32), [np.nan], 0.0)
    with pytest.raises(ValueError, match="fields"):
        replay.add({"a": np.zeros(3)}, [0.0], 0.0)
    with pytest.raises(ValueError, match="capacity"):
        Replay(capacity=0)
    with pytest.raises(ValueError, match="transition"):
        Replay(capacity=3).sample_transitions(1)


def masked_episode(ep: int, length: int, rng, H: int = 3, W: int = 11) -> dict:
    """An episode of images with per-pixel masks (as the occlusion variant gives them);
    ``proprio`` encodes (episode, step) as in :func:`make_episode`."""
    t = np.arange(length)
    return {
        "obs": {
            "image": rng.integers(0, 256, (length, H, W, 3), dtype=np.uint8),
            "proprio": np.stack([np.full(length, ep), t], 1).astype(np.float32),
        },
        "actions": rng.uniform(-1, 1, (length, 1)).astype(np.float32),
        "rewards": rng.normal(size=length).astype(np.float32),
        "mask": np.ones((length, 2), bool),
        "pixel_mask": rng.random((length, H, W)) < 0.6,
    }


def fill_masked(replay: Replay, episodes: list[dict], last: bool = True) -> None:
    for e in episodes:
        L = len(e["rewards"])
        for t in range(L):
            obs_t = {k: v[t] for k, v in e["obs"].items()}
            replay.add(obs_t, e["actions"][t], e["rewards"][t], e["mask"][t],
                       last=last and t == L - 1, pixel_mask=e["pixel_mask"][t])  # fmt: skip


def test_pixel_masks_are_stored_per_step_packed_and_sampled_with_their_windows():
    rng = np.random.default_rng(7)
    episodes = [masked_episode(i, L, rng) for i, L in enumerate([6, 9, 7])]
    replay = Replay(capacity=1000, seed=3)
    fill_masked(replay, episodes)
    # packed bits: 3 rows of ceil(11 / 8) = 2 bytes per step (a bool per pixel would be 33)
    stored = replay._episodes[1]["pixel_mask"]
    assert stored.shape == (9, 3, 2) and stored.dtype == np.uint8
    np.testing.assert_array_equal(replay.episode(1)["pixel_mask"], episodes[1]["pixel_mask"])
    T = 4
    batch = replay.sample_sequences(40, T)
    assert batch.pixel_mask.shape == (40, T, 3, 11) and batch.pixel_mask.dtype == bool
    for b in range(40):
        ep, t0 = batch.obs["proprio"][b, 0].astype(int)
        window = slice(t0, t0 + T)
        np.testing.assert_array_equal(batch.pixel_mask[b], episodes[ep]["pixel_mask"][window])
        np.testing.assert_array_equal(batch.obs["image"][b], episodes[ep]["obs"]["image"][window])
    model_batch = batch.model_batch(np.float32)
    assert set(model_batch) == {"obs", "actions", "rewards", "mask", "pixel_mask"}
    assert set(model_batch["pixel_mask"]) == {"image"}  # the image modality's masks
    np.testing.assert_array_equal(model_batch["pixel_mask"]["image"], batch.pixel_mask)
    # an image-only replay hands the masks as one array
    alone = Replay(capacity=100)
    e = episodes[0]
    alone.add_episode(e["obs"]["image"], e["actions"], e["rewards"], pixel_mask=e["pixel_mask"])
    seqs = alone.sample_sequences(2, 6)
    np.testing.assert_array_equal(seqs.model_batch()["pixel_mask"][0], e["pixel_mask"])
    # without masks there is no such field
    plain = Replay(capacity=100)
    plain.add_episode(e["obs"]["image"], e["actions"], e["rewards"])
    assert plain.sample_sequences(1, 6).pixel_mask is None
    assert "pixel_mask" not in plain.sample_sequences(1, 6).model_batch()


def test_pixel_masks_survive_save_and_load_with_the_ongoing_episode(tmp_path):
    rng = np.random.default_rng(8)
    episodes = [masked_episode(i, L, rng) for i, L in enumerate([8, 10, 9])]
    replay = Replay(capacity=1000, seed=4)
    fill_masked(replay, episodes[:2])
    fill_masked(replay, episodes[2:], last=False)  # episode 2 still running
    loaded = Replay.load(replay.save(tmp_path / "buffer"))
    assert loaded.metadata() == replay.metadata() and loaded.metadata()["pixel_width"] == 11
    first = replay.sample_sequences(12, 5, include_ongoing=True)
    a = loaded.sample_sequences(12, 5, include_ongoing=True)  # the same draws
    np.testing.assert_array_equal(a.pixel_mask, first.pixel_mask)
    np.testing.assert_array_equal(a.episode, first.episode)
    for b in range(12):
        ep, t0 = a.obs["proprio"][b, 0].astype(int)
        np.testing.assert_array_equal(a.pixel_mask[b], episodes[ep]["pixel_mask"][t0 : t0 + 5])
    assert 2 in a.episode  # the ongoing episode's masks came back too


def test_bad_pixel_masks_raise():
    rng = np.random.default_rng(9)
    e = masked_episode(0, 3, rng)
    obs0 = {k: v[0] for k, v in e["obs"].items()}
    replay = Replay(capacity=10)
    with pytest.raises(ValueError, match=r"expected \(H, W\)"):
        replay.add(obs0, [0.0], 0.0, pixel_mask=np.ones((3, 10), bool))
    with pytest.raises(ValueError, match="0/1"):
        replay.add(obs0, [0.0], 0.0, pixel_mask=np.full((3, 11), 0.5))
    with pytest.raises(ValueError, match=r"expected \(H, W\)"):  # no image to mask
        Replay(capacity=10).add(np.zeros(3, np.float32), [0.0], 0.0, pixel_mask=np.ones(3))
    replay.add(obs0, [0.0], 0.0, pixel_mask=e["pixel_mask"][0])
    with pytest.raises(ValueError, match="fields"):  # every row has a mask, or none
        replay.add(obs0, [0.0], 0.0)
