"""Reading night stores: windows of signals, their padding mask and their 30-s stages.

A night store (prepare/store.py) keeps each channel as one uncompressed little-endian float16
chunk, so a channel is one raw file that we open with `np.memmap`: DataLoader workers share the
page cache, and a window costs little more than copying its bytes (bench/loader.py measures it
against zarr's own reader and against compressed, hourly chunks). Stores written any other way
(other chunking, compression) are read through zarr instead, more slowly but correctly.

Windows: `window_s` (8 h in the paper) cut from each night at `stride_s` (default: the window, so
no overlap) in whole epochs. A night shorter than the window gives one window, zero-padded at the
end and marked in `padding_mask`; a longer night gives windows that cover it all, the last one
aligned to the night's last full epoch (so it overlaps its neighbour instead of being mostly padding).

Wake trimming (`trim_wake_min`, off by default): before windowing, a night is cut to start at most
that many minutes before its first sleep epoch (N1/N2/N3/REM) and end at most that many minutes
after its last one; a night with no sleep epoch is kept whole.

Channel dropout (`drop_channels`, the `train.channel_dropout` switch of both training scripts): a
channel the night store marks absent is zeros, and so is a channel missing from a user's EDF at
prediction time (predict.py). Training with some present channels dropped the same way lets the
model see such windows; tests/test_data.py and bench/channel_dropout.py measure the effect.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from prepare.signals import EPOCH_SAMPLES, SLOTS

N_CHANNELS = len(SLOTS)


@dataclass
class DataConfig:
    root: str = "data/nights"            # a `python -m prepare` output folder (holds manifest.csv)
    datasets: list | None = None         # nights to use: dataset names, or 'name:visit' (e.g. [shhs, wsc, 'mros:1']); null = all
    train_split: str = "train"           # manifest split used for training
    val_split: str = "val"               # manifest split used for validation
    window_s: float = 28800.0            # window length in seconds (8 h in the paper)
    stride_s: float | None = None        # hop between the windows of a long night (null = window_s)
    trim_wake_min: float | None = None   # keep at most this many minutes of wake before sleep onset / after final wake
    num_workers: int = 2                 # DataLoader worker processes per training process


def read_manifest(root: str | Path, split: str | None = None, datasets=None) -> pd.DataFrame:
    """Rows of `<root>/manifest.csv`, optionally one split and a selection of datasets ('shhs') or dataset visits
    ('mros:1'), so that the paper's splits (train on SHHS, WSC, MrOS visit 1; test on MESA, APPLES, MrOS visit 2) are
    configs, not code."""
    manifest = pd.read_csv(Path(root) / "manifest.csv", dtype={"subject": str, "visit": str, "night_id": str})
    if split is not None:
        manifest = manifest[manifest["split"] == split]
    if datasets:
        keep = pd.Series(False, index=manifest.index)
        for selector in datasets:
            name, _, visit = str(selector).partition(":")
            keep |= (manifest["dataset"] == name) & ((manifest["visit"] == visit) if visit else True)
        manifest = manifest[keep]
    return manifest.reset_index(drop=True)


def _is_raw(array_dir: Path) -> tuple[bool, list[int]]:
    """(whether each chunk spans the whole last axis as raw little-endian bytes, the array's shape)."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    raw = (meta["chunk_grid"]["configuration"]["chunk_shape"][-1] == meta["shape"][-1]
           and [c["name"] for c in meta["codecs"]] == ["bytes"]
           and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little")
    return raw, meta["shape"]


def open_night(store: str | Path) -> tuple[list, np.ndarray, dict]:
    """(channels, stages, attrs): `channels` is 7 array-likes [T] float16 (memmaps where possible)."""
    import zarr   # only for stores written with other chunking or compression (the slow path)
    store = Path(store)
    attrs = json.loads((store / "zarr.json").read_text())["attributes"]
    raw, (_, n_samples) = _is_raw(store / "signals")
    if raw:
        # zarr skips chunks equal to the fill value: an absent channel may have no file at all.
        chunks = [store / "signals" / "c" / str(c) / "0" for c in range(N_CHANNELS)]
        channels = [np.memmap(chunk, dtype="<f2", mode="r", shape=(n_samples,)) if chunk.exists()
                    else np.zeros(n_samples, np.float16) for chunk in chunks]
    else:
        channels = list(zarr.open_array(store / "signals", mode="r")[:])
    stages_chunk = store / "stages" / "c" / "0"
    if _is_raw(store / "stages")[0] and stages_chunk.exists():
        stages = np.fromfile(stages_chunk, dtype=np.int8)
    else:
        stages = zarr.open_array(store / "stages", mode="r")[:]
    return channels, stages, attrs


def sleep_span(stages: np.ndarray, trim_wake_min: float | None) -> tuple[int, int]:
    """[first, last) epochs to keep after trimming long wake at both ends."""
    if trim_wake_min is None:
        return 0, len(stages)
    asleep = np.flatnonzero(stages >= 1)
    if len(asleep) == 0:
        return 0, len(stages)
    keep = int(round(trim_wake_min * 60 / 30))
    return max(0, asleep[0] - keep), min(len(stages), asleep[-1] + 1 + keep)


def window_starts(first: int, last: int, window_epochs: int, stride_epochs: int) -> list[int]:
    """Start epochs of the windows over epochs [first, last)."""
    if last - first <= window_epochs:
        return [first]
    starts = list(range(first, last - window_epochs, stride_epochs))
    return starts + [last - window_epochs]


class NightDataset(torch.utils.data.Dataset):
    """Windows over night stores.

    Item: {"signals": float32 [7, L], "padding_mask": bool [L] (True = padded), "stages": int64
    [L / 3750] (-1 for padded or unscored epochs), "present": bool [7] (False = the store marks the
    channel absent; its signal is zeros), "night": index into `self.stores`, "start": first sample
    of the window in the night}. L = window_s × 125.
    """

    def __init__(self, stores, window_s: float = 8 * 3600, stride_s: float | None = None,
                 trim_wake_min: float | None = None):
        self.stores = [Path(s) for s in stores]
        self.window_epochs = int(round(window_s / 30))
        self.window_samples = self.window_epochs * EPOCH_SAMPLES
        stride_epochs = int(round((stride_s or window_s) / 30))
        if self.window_epochs <= 0 or stride_epochs <= 0:
            raise ValueError(f"window_s ({window_s}) and stride_s ({stride_s}) must be at least 30 s")
        self.windows = []   # (night index, start epoch, end epoch of usable data)
        for night, store in enumerate(self.stores):
            _, stages, _ = open_night(store)
            first, last = sleep_span(stages, trim_wake_min)
            for start in window_starts(first, last, self.window_epochs, stride_epochs):
                self.windows.append((night, start, last))
        self._open = {}     # night index -> (channels, stages, present), opened lazily in each worker

    @classmethod
    def from_manifest(cls, root, split=None, datasets=None, **kwargs) -> "NightDataset":
        manifest = read_manifest(root, split, datasets)
        return cls([Path(root) / p for p in manifest["path"]], **kwargs)

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str, **kwargs) -> "NightDataset":
        return cls.from_manifest(cfg.root, split, cfg.datasets, window_s=cfg.window_s, stride_s=cfg.stride_s,
                                 trim_wake_min=cfg.trim_wake_min, **kwargs)

    def __len__(self) -> int:
        return len(self.windows)

    def _night(self, night: int):
        if night not in self._open:
            channels, stages, attrs = open_night(self.stores[night])
            present = torch.tensor(attrs.get("present", [True] * N_CHANNELS), dtype=torch.bool)
            self._open[night] = channels, stages, present
        return self._open[night]

    def present_of(self, index: int) -> torch.Tensor:
        """Which of the 7 channels the window's night holds [7] bool (an absent one is stored as zeros)."""
        return self._night(self.windows[index][0])[2]

    def stages_of(self, index: int) -> torch.Tensor:
        """The window's stages [L / 3750] int64 (-1 where padded or unscored), without reading its signals."""
        night, start_epoch, last_epoch = self.windows[index]
        n_epochs = min(self.window_epochs, last_epoch - start_epoch)
        window_stages = torch.full((self.window_epochs,), -1, dtype=torch.int64)
        window_stages[:n_epochs] = torch.from_numpy(self._night(night)[1][start_epoch: start_epoch + n_epochs].astype(np.int64))
        return window_stages

    def __getitem__(self, index: int) -> dict:
        night, start_epoch, last_epoch = self.windows[index]
        channels, stages, present = self._night(night)
        n_epochs = min(self.window_epochs, last_epoch - start_epoch)
        start, n = start_epoch * EPOCH_SAMPLES, n_epochs * EPOCH_SAMPLES
        signals = np.zeros((N_CHANNELS, self.window_samples), np.float32)    # [7, L]
        for c, channel in enumerate(channels):
            signals[c, :n] = channel[start: start + n]
        padding_mask = np.ones(self.window_samples, bool)                    # [L]
        padding_mask[:n] = False
        return {"signals": torch.from_numpy(signals), "padding_mask": torch.from_numpy(padding_mask),
                "stages": self.stages_of(index), "present": present, "night": night, "start": start}


def drop_channels(present: torch.Tensor, p: float) -> torch.Tensor:
    """Channel dropout: present [B, C] bool -> the channels kept [B, C], each present one dropped with probability
    p (torch's global RNG, so a resumed run draws the same). A window never loses its last present channel: where
    every present one would go, it keeps them all."""
    if p <= 0:
        return present
    kept = present & (torch.rand(present.shape, device=present.device) >= p)            # [B, C]
    return torch.where(kept.any(dim=1, keepdim=True), kept, present)
