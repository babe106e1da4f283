"""data.py: windows, padding masks, stage alignment, wake trimming, and the memmap reader vs zarr."""
import numpy as np
import pytest
import torch
import zarr

from data import NightDataset, drop_channels, sleep_span, window_starts
from prepare import store

EPOCH = 3750


def make_store(tmp_path, name, n_epochs, extra_samples=0, absent=(), stages=None):
    n = n_epochs * EPOCH + extra_samples
    signals = (np.arange(7)[:, None] * 1000 + (np.arange(n)[None, :] % 997)).astype(np.float16)   # [7, T]
    for c in absent:
        signals[c] = 0
    if stages is None:
        stages = (np.arange(n_epochs) % 6 - 1).astype(np.int8)
    attrs = {"night_id": name, "dataset": "t", "subject": name, "visit": "1", "fs": 125, "epoch_s": 30,
             "duration_s": n / 125, "n_scored": int((stages >= 0).sum()), "channels": list("ABCDEFG"),
             "present": [c not in absent for c in range(7)]}
    path = tmp_path / "t" / f"{name}.zarr"
    store.write_night(path, signals, stages, attrs)
    return path, signals, stages


def test_short_night_is_padded_and_masked(tmp_path):
    path, signals, stages = make_store(tmp_path, "short", 10, extra_samples=100)
    item = NightDataset([path], window_s=20 * 30)[0]
    assert item["signals"].shape == (7, 20 * EPOCH) and item["signals"].dtype == torch.float16   # the store's: exact
    assert torch.equal(item["signals"][:, : 10 * EPOCH], torch.from_numpy(signals[:, : 10 * EPOCH]))
    assert not item["signals"][:, 10 * EPOCH:].any()                 # the partial trailing epoch is not used
    assert item["padding_mask"].sum() == 10 * EPOCH and not item["padding_mask"][: 10 * EPOCH].any()
    assert item["stages"].tolist() == stages.tolist() + [-1] * 10


def test_long_night_windows_cover_everything(tmp_path):
    path, signals, stages = make_store(tmp_path, "long", 25)
    dataset = NightDataset([path], window_s=10 * 30)
    assert [w[1] for w in dataset.windows] == [0, 10, 15]           # last window aligned to the end
    covered = np.zeros(25, bool)
    for item in dataset:
        start = item["start"] // EPOCH
        assert not item["padding_mask"].any()
        assert item["stages"].tolist() == stages[start: start + 10].tolist()
        assert torch.equal(item["signals"], torch.from_numpy(signals[:, item["start"]: item["start"] + 10 * EPOCH]))
        covered[start: start + 10] = True
    assert covered.all()
    assert [w[1] for w in NightDataset([path], window_s=10 * 30, stride_s=5 * 30).windows] == [0, 5, 10, 15]


def test_window_starts_and_sleep_span():
    assert window_starts(0, 8, 10, 10) == [0]
    assert window_starts(3, 33, 10, 10) == [3, 13, 23]
    stages = np.array([0] * 100 + [2, 3, 4] + [0] * 100 + [-1] * 5)
    assert sleep_span(stages, None) == (0, 208)
    assert sleep_span(stages, 30) == (40, 163)                     # 60 epochs of wake kept on each side
    assert sleep_span(np.zeros(50, int), 30) == (0, 50)             # no sleep: kept whole


def test_trimmed_windows_start_near_sleep_onset(tmp_path):
    stages = np.array([0] * 200 + [2] * 50 + [0] * 200, np.int8)
    path, _, _ = make_store(tmp_path, "trim", len(stages), stages=stages)
    dataset = NightDataset([path], window_s=400 * 30, crop_wake_min=10)
    item = dataset[0]
    assert item["start"] == 180 * EPOCH
    assert item["stages"][:90].tolist() == [0] * 20 + [2] * 50 + [0] * 20 and (item["stages"][90:] == -1).all()
    assert item["padding_mask"].sum() == (400 - 90) * EPOCH


def test_memmap_equals_zarr_and_absent_channel_is_zero(tmp_path):
    path, signals, stages = make_store(tmp_path, "abs", 4, absent=(4,))
    channels, read_stages, attrs = store.read_night(path)
    reference = zarr.open_group(path, mode="r")
    assert np.array_equal(np.stack([np.asarray(c) for c in channels]), reference["signals"][:])
    assert np.array_equal(read_stages, reference["stages"][:]) and attrs["present"][4] is False
    assert not np.asarray(channels[4]).any()


def test_other_chunking_falls_back_to_zarr(tmp_path):
    path, signals, _ = make_store(tmp_path, "re", 4)
    group = zarr.open_group(path, mode="a")
    del group["signals"]
    group.create_array("signals", shape=signals.shape, chunks=(1, EPOCH), dtype="float16")[:] = signals
    item = NightDataset([path], window_s=4 * 30)[0]
    assert item["signals"].dtype == torch.float16 and torch.equal(item["signals"], torch.from_numpy(signals))


def test_manifest_selection(tmp_path):
    for name in ("a", "b", "c"):
        make_store(tmp_path, name, 3)
    rows = store.write_manifest(tmp_path)
    assert [r["night_id"] for r in rows] == ["a", "b", "c"]
    manifest = store.read_manifest(tmp_path)
    assert list(manifest.columns) == store.MANIFEST_COLUMNS
    split = rows[0]["split"]
    assert set(store.read_manifest(tmp_path, split=split)["night_id"]) == {r["night_id"] for r in rows if r["split"] == split}
    dataset = NightDataset.from_manifest(tmp_path, window_s=90)
    assert len(dataset) == 3


def test_items_say_which_channels_are_present(tmp_path):
    path, _, _ = make_store(tmp_path, "partial", 10, absent=(4, 6))
    item = NightDataset([path], window_s=10 * 30)[0]
    assert item["present"].tolist() == [True, True, True, True, False, True, False]
    assert not item["signals"][4].any() and not item["signals"][6].any()


def test_channel_dropout_rate_and_never_the_last_channel():
    torch.manual_seed(0)
    present = torch.ones(20000, 7, dtype=torch.bool)
    present[:, 4] = False                                            # absent in the store: never comes back
    kept = drop_channels(present, 0.3)
    assert not kept[:, 4].any()
    assert (present & ~kept)[:, [0, 1, 2, 3, 5, 6]].float().mean().item() == pytest.approx(0.3, abs=0.01)
    assert kept.any(dim=1).all()
    assert drop_channels(present, 0.0) is present
    assert torch.equal(drop_channels(present, 1.0), present)         # all would go: the window keeps them all
    one = torch.zeros(1000, 7, dtype=torch.bool)
    one[:, 2] = True
    assert torch.equal(drop_channels(one, 0.9), one)                 # a single present channel always stays


def test_first_window_only_and_redrawn_split_fractions(tmp_path):
    long_night = make_store(tmp_path, "long", 250)[0]
    every = NightDataset([long_night], window_s=100 * 30)
    first = NightDataset([long_night], window_s=100 * 30, first_window_only=True)
    assert len(every) == 3 and [w[1] for w in first.windows] == [0]          # hours 0..window only, as upstream
    rows = [{"dataset": "shhs", "subject": str(i)} for i in range(400)]
    shares = [store.split_of(r["dataset"], r["subject"], (("train", 0.49), ("val", 0.21), ("test", 0.30)))
              for r in rows]
    counts = {name: shares.count(name) / len(rows) for name in ("train", "val", "test")}
    assert counts["train"] == pytest.approx(0.49, abs=0.06) and counts["test"] == pytest.approx(0.30, abs=0.06)
    # the same subject hash: a subject in the 80/10/10 test split (u >= 0.9) stays in test with 0.49/0.21/0.30
    assert all(s == "test" for r, s in zip(rows, shares) if store.split_of(r["dataset"], r["subject"]) == "test")


@pytest.mark.parametrize("rule, masked", [
    ("none", []),
    ("unscored", [7]),
    # the paper's reading: wake beyond the second class's 3 epochs, from the evening first: 8 - 3 = 5 epochs
    ("paper", [0, 1, 2, 3, 4, 7]),
    # upstream's: the window's trailing padding is its "morning wake" (4 epochs), so the whole evening run goes
    ("upstream", [0, 1, 2, 3, 4, 5, 7]),
])
def test_mask_epochs_marks_unscored_and_trimmed_epochs_as_padding(tmp_path, rule, masked):
    W, N2 = 0, 2
    stages = np.array([W] * 6 + [N2, -1, N2, N2, W, W], np.int8)                       # 12 epochs in a 16-epoch window
    path = make_store(tmp_path, "n", 12, stages=stages)[0]
    item = NightDataset([path], window_s=16 * 30, mask_epochs=rule)[0]
    expected = torch.zeros(16, dtype=torch.bool)
    expected[masked + [12, 13, 14, 15]] = True                                          # past the night's end: always
    assert torch.equal(item["padded_epochs"], expected)
    assert torch.equal(item["padding_mask"], expected.repeat_interleave(EPOCH))
    assert item["stages"].tolist() == stages.tolist() + [-1] * 4                        # the labels stay the truth
    assert torch.equal(item["signals"][:, :EPOCH], torch.from_numpy(signals_of(path)[:, :EPOCH]))   # signals stay


def signals_of(path):
    return np.stack([np.asarray(c[:EPOCH]) for c in store.read_night(path)[0]])                  # [7, EPOCH] float16


def test_mask_epochs_leaves_a_night_without_stages_alone(tmp_path):
    path = make_store(tmp_path, "unscored", 10, stages=np.full(10, -1, np.int8))[0]
    item = NightDataset([path], window_s=12 * 30, mask_epochs="upstream")[0]
    assert item["padded_epochs"].tolist() == [False] * 10 + [True] * 2
    with pytest.raises(ValueError, match="data.mask_epochs must be one of none, unscored, paper, upstream"):
        NightDataset([path], window_s=12 * 30, mask_epochs="off")
