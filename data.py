"""Windows over night stores: signals, their padding mask and their 30-s stages.

Night stores are read by prepare/store.py (`read_night`: each channel a memory-mapped raw file, so
DataLoader workers share the page cache and a window costs little more than copying its bytes).
A cohort is 10-20 thousand nights and a night's memmaps are 7 file descriptors and 7 memory maps, so each
process keeps at most `max_open_nights` nights open (least recently used closed first): under `ulimit -n
1024` and vm.max_map_count 65530 at any cohort size. Every night's stages and present channels are read
once (`read_stages`, nothing kept open). Windows hand their signals as float16, the store's own type (exact),
which halves what DataLoader workers pass through shared memory; the training scripts cast on the device.

Windows: `window_s` (8 h: the abstract's) cut from each night at `stride_s` (default: the window, so
no overlap) in whole epochs. A night shorter than the window gives one window, zero-padded at the
end and marked in `padding_mask`; a longer night gives windows that cover it all, the last one
aligned to the night's last full epoch (so it overlaps its neighbour instead of being mostly padding).
`window_starts` is the one windowing rule: training, evaluation and staging (stage.py) all use it.

Cropping long wake (`data.crop_wake_min`, off by default): before windowing, a night is cut to
start at most that many minutes before its first sleep epoch (N1/N2/N3/REM) and end at most that
many minutes after its last one; a night with no sleep epoch is kept whole. (Not to be confused
with train_probe.py's `train.loss_trim_wake`, which keeps the night and only leaves some wake
epochs out of the probe's loss.)

Masking epochs (`data.mask_epochs`, "none" by default; upstream's code, docs/upstream.md §11 item 6): the
unscored epochs of a window (no stage, movement, artefact) and, under "paper" or "upstream", the wake that
rule trims (`WAKE_TRIMS`, the same rules as train_probe.py's loss trim) are marked padding: the encoder drops
their patches as attention keys and the pretraining loss ignores them. The signals stay (RevIN still sees them,
as upstream's). A night with no scored epoch at all is never masked (upstream masks only where a hypnogram
exists). Only training and validation windows are masked: evaluate.py and predict.py stage every epoch.

Channel dropout (`drop_channels`, the `train.channel_dropout` switch of both training scripts): a
channel the night store marks absent is zeros, and so is a channel missing from a user's EDF at
prediction time (predict.py). Training with some present channels dropped the same way lets the
model see such windows; tests/test_data.py and bench/channel_dropout.py measure the effect.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from prepare.annotations import STAGES
from prepare.signals import EPOCH_SAMPLES, SLOTS
from prepare.store import read_manifest, read_night, read_stages

N_CHANNELS = len(SLOTS)
N_CLASSES = len(STAGES)
EPOCH_MASKS = ("none", "unscored", "paper", "upstream")   # data.mask_epochs: "unscored" masks with no wake trim
LABEL_LAGS = ("none", "upstream")                          # data.label_lag
# upstream's hypnogram reader reads the CSV header as a first epoch "1" for these datasets (docs/upstream.md §11)
LAGGED_DATASETS = ("mros", "wsc", "apples")


@dataclass
class DataConfig:
    root: str = "data/nights"            # a `python -m prepare` output folder (holds manifest.csv)
    datasets: list | None = None         # nights to use: dataset names, or 'name:visit' (e.g. [shhs, wsc, 'mros:1']); null = all
    train_split: str = "train"           # manifest split used for training
    val_split: str = "val"               # manifest split used for validation
    window_s: float = 28800.0            # window length in seconds (8 h: the abstract's)
    stride_s: float | None = None        # hop between the windows of a long night (null = window_s)
    first_window_only: bool = False      # one window per night, its first (upstream: hours 0-8 only); else cover it all
    split_fractions: list | None = None  # [train, val, test] shares re-drawn by subject hash (null = manifest's 80/10/10)
    mesa_holdout: int | None = None      # MESA split as upstream's: N shuffled nights test, rest 90/10 train/val (upstream: 100)
    resplit_seed: int | None = None      # re-draw non-test nights 70/30 train/val by subject, this seed (upstream probe: 126)
    crop_wake_min: float | None = None   # crop each night to at most this many minutes of wake before sleep onset / after final wake
    mask_epochs: str = "none"            # encoder padding: "none" | "unscored" | "paper" | "upstream" (+ that wake trim; §11.6)
    num_workers: int = 2                 # DataLoader worker processes per training process
    max_open_nights: int = 16            # night stores each loader process keeps memory-mapped (7 files and maps each)
    complete_only: bool = False          # leave out nights lacking a channel or with NaN filled (upstream: dp:141-175)
    label_lag: str = "none"              # "none" | "upstream": MrOS, WSC, APPLES stages one epoch late, epoch 0 N1 (sl:250)

    def __post_init__(self):
        if self.mask_epochs not in EPOCH_MASKS:
            raise SystemExit(f"config: data.mask_epochs must be one of {', '.join(EPOCH_MASKS)} (got {self.mask_epochs!r})")
        if self.max_open_nights < 1:
            raise SystemExit(f"config: data.max_open_nights must be at least 1 (got {self.max_open_nights})")
        if self.label_lag not in LABEL_LAGS:
            raise SystemExit(f"config: data.label_lag must be none or upstream (got {self.label_lag!r})")


def sleep_span(stages: np.ndarray, crop_wake_min: float | None) -> tuple[int, int]:
    """[first, last) epochs to keep after trimming long wake at both ends."""
    if crop_wake_min is None:
        return 0, len(stages)
    asleep = np.flatnonzero(stages >= 1)
    if len(asleep) == 0:
        return 0, len(stages)
    keep = int(round(crop_wake_min * 60 / 30))
    return max(0, asleep[0] - keep), min(len(stages), asleep[-1] + 1 + keep)


def window_starts(first: int, last: int, window_epochs: int, stride_epochs: int) -> list[int]:
    """Start epochs of the windows over epochs [first, last)."""
    if last - first <= window_epochs:
        return [first]
    starts = list(range(first, last - window_epochs, stride_epochs))
    return starts + [last - window_epochs]


def unscore_excess_wake(stages: torch.Tensor) -> torch.Tensor:
    """Wake trim `paper`, our reading of the paper's text (after L-SeqSleepNet): when wake is the most frequent
    stage of a window, the wake before sleep onset and after the final awakening is dropped from the loss (set to -1),
    earliest first, until no more of it is left than epochs of the second most frequent stage. stages [E] -> [E]."""
    counts = torch.bincount(stages[stages >= 0], minlength=N_CLASSES)
    second = counts[1:].max()
    if counts[0] <= second:
        return stages
    asleep = torch.nonzero(stages >= 1).flatten()
    if len(asleep) == 0:
        return stages
    evening = int(((stages[: asleep[0]] == 0)).sum())             # wake (and unscored) before sleep onset
    morning = int(((stages[asleep[-1] + 1:] == 0)).sum())
    excess = evening + morning - int(second)
    if excess <= 0:
        return stages
    stages = stages.clone()
    from_evening = min(excess, evening)
    before_onset = torch.nonzero(stages[: asleep[0]] == 0).flatten()
    stages[before_onset[:from_evening]] = -1
    after_last = torch.nonzero(stages[asleep[-1] + 1:] == 0).flatten() + asleep[-1] + 1
    if excess > from_evening:
        stages[after_last[len(after_last) - (excess - from_evening):]] = -1
    return stages


def unscore_excess_wake_upstream(stages: torch.Tensor) -> torch.Tensor:
    """Wake trim `upstream`, upstream's slumber.trim_wake_epochs_from_hypnogram as it runs (docs/upstream.md §11
    item 5): when wake outnumbers every sleep stage, "evening wake" is the first run only if epoch 0 is wake, and
    "morning wake" is the last run after the final wake/non-wake change, WHATEVER its stage (a night that ends asleep
    loses sleep epochs); the excess over the second largest class goes from the start, then from the end. A window
    with no sleep is left alone (upstream raises there). stages [E] -> [E]."""
    counts = torch.bincount(stages[stages >= 0], minlength=N_CLASSES)
    second = int(counts[1:].max())
    if counts[0] <= second or second == 0:
        return stages
    changes = torch.nonzero(torch.diff((stages == 0).int())).flatten()                 # last index before a change
    evening = int(changes[0]) + 1 if stages[0] == 0 else 0
    morning = len(stages) - (int(changes[-1]) + 1)
    excess = evening + morning - second
    if excess <= 0:
        return stages
    stages = stages.clone()
    stages[:min(excess, evening)] = -1
    if excess > evening:
        stages[len(stages) - (excess - evening):] = -1
    return stages


def upstream_label_lag(stages: np.ndarray) -> np.ndarray:
    """data.label_lag upstream, what upstream's reader made of MrOS, WSC and APPLES hypnograms (sl:250 reads the CSV's
    header as a first row "1"): epoch 0 is N1 and epoch k the true epoch k − 1, the last true epoch falling off the
    night's end. (WSC's epoch k was the last 10-s label of the true epoch k − 1; with 30-s stages we take that epoch's
    stage.) stages [E] int8 -> [E]."""
    lagged = np.empty_like(stages)
    lagged[0], lagged[1:] = 1, stages[:-1]
    return lagged


def complete(attrs: dict) -> bool:
    """data.complete_only: the night has all 7 channels and no NaN was filled in any (upstream drops a night lacking
    a channel of its alias lists, dp:141-148, and a window with any NaN, dp:166-175: with one window per night, the
    night; we count NaN over the whole night, upstream over its window)."""
    return all(attrs.get("present", [True] * N_CHANNELS)) and not any((attrs.get("nan_samples") or {}).values())


WAKE_TRIMS = {"paper": unscore_excess_wake, "upstream": unscore_excess_wake_upstream, "none": lambda stages: stages}


class NightDataset(torch.utils.data.Dataset):
    """Windows over night stores.

    Item: {"signals": float16 [7, L], "padding_mask": bool [L] (True = padded), "padded_epochs": bool
    [L / 3750] (the same mask per epoch), "stages": int64 [L / 3750] (-1 for padded or unscored epochs),
    "present": bool [7] (False = the store marks the channel absent; its signal is zeros), "night": index into
    `self.stores`, "start": first sample of the window in the night}. L = window_s × 125.
    Each process keeps the memmaps of at most `max_open_nights` nights (an LRU); stages and present channels of every
    night are read once, here. complete_only leaves out nights lacking a channel or with NaN filled (`left_out`);
    label_lag "upstream" lags MrOS, WSC and APPLES stages as upstream's reader did (upstream_label_lag).
    """

    def __init__(self, stores, window_s: float = 8 * 3600, stride_s: float | None = None,
                 crop_wake_min: float | None = None, first_window_only: bool = False, mask_epochs: str = "none",
                 max_open_nights: int = 16, complete_only: bool = False, label_lag: str = "none"):
        if mask_epochs not in EPOCH_MASKS:
            raise ValueError(f"data.mask_epochs must be one of {', '.join(EPOCH_MASKS)} (got {mask_epochs!r})")
        if max_open_nights < 1:
            raise ValueError(f"max_open_nights must be at least 1 (got {max_open_nights})")
        self.mask_epochs, self.max_open_nights = mask_epochs, max_open_nights
        if label_lag not in LABEL_LAGS:
            raise ValueError(f"data.label_lag must be none or upstream (got {label_lag!r})")
        read = [(Path(store), *read_stages(store)) for store in stores]          # (store, stages, attrs) per night
        kept = [not complete_only or complete(attrs) for _, _, attrs in read]
        self.left_out = [night[0] for night, keep in zip(read, kept) if not keep]                # in order
        read = [night for night, keep in zip(read, kept) if keep]
        self.stores = [store for store, _, _ in read]
        self.window_epochs = int(round(window_s / 30))
        self.window_samples = self.window_epochs * EPOCH_SAMPLES
        stride_epochs = int(round((stride_s or window_s) / 30))
        if self.window_epochs <= 0 or stride_epochs <= 0:
            raise ValueError(f"window_s ({window_s}) and stride_s ({stride_s}) must be at least 30 s")
        self.windows = []        # (night index, start epoch, end epoch of usable data)
        self.night_stages = []   # per night: int8 [n_epochs]
        self.night_present = []  # per night: bool [7]
        for night, (store, stages, attrs) in enumerate(read):
            if label_lag == "upstream" and attrs.get("dataset") in LAGGED_DATASETS:
                stages = upstream_label_lag(stages)
            self.night_stages.append(stages)
            self.night_present.append(torch.tensor(attrs.get("present", [True] * N_CHANNELS), dtype=torch.bool))
            first, last = sleep_span(stages, crop_wake_min)
            starts = window_starts(first, last, self.window_epochs, stride_epochs)
            for start in starts[:1] if first_window_only else starts:
                self.windows.append((night, start, last))
        self._open = OrderedDict()   # night index -> its 7 channels (memmaps), least recently used first; per process

    @classmethod
    def from_manifest(cls, root, split=None, datasets=None, split_fractions=None, *, mesa_holdout=None,
                      resplit_seed=None, labelled_only: bool = False, **kwargs) -> "NightDataset":
        """The nights of a split (read_manifest's selection); labelled_only: only nights with scored epochs (the
        probe's)."""
        manifest = read_manifest(root, split, datasets, split_fractions, mesa_holdout=mesa_holdout,
                                 resplit_seed=resplit_seed)
        if labelled_only:
            manifest = manifest[manifest["n_scored"] > 0]
        return cls([Path(root) / p for p in manifest["path"]], **kwargs)

    @classmethod
    def from_config(cls, cfg: DataConfig, split: str, **kwargs) -> "NightDataset":
        return cls.from_manifest(cfg.root, split, cfg.datasets, cfg.split_fractions, mesa_holdout=cfg.mesa_holdout,
                                 resplit_seed=cfg.resplit_seed, window_s=cfg.window_s,
                                 stride_s=cfg.stride_s, crop_wake_min=cfg.crop_wake_min,
                                 first_window_only=cfg.first_window_only, mask_epochs=cfg.mask_epochs,
                                 max_open_nights=cfg.max_open_nights, complete_only=cfg.complete_only,
                                 label_lag=cfg.label_lag, **kwargs)

    def __len__(self) -> int:
        return len(self.windows)

    def __getstate__(self) -> dict:
        # a spawned worker opens its own nights (a pickled memmap would be a copy of the whole night)
        return {**self.__dict__, "_open": OrderedDict()}

    def _channels(self, night: int) -> list:
        """The night's 7 channels [T] float16 (memmaps). Before opening one night more than max_open_nights, the least
        recently used is dropped: nothing else holds its memmaps (windows are copies), so its files and maps close."""
        if night in self._open:
            self._open.move_to_end(night)
            return self._open[night]
        while len(self._open) >= self.max_open_nights:
            self._open.popitem(last=False)
        self._open[night] = read_night(self.stores[night])[0]
        return self._open[night]

    def present_of(self, index: int) -> torch.Tensor:
        """Which of the 7 channels the window's night holds [7] bool (an absent one is stored as zeros)."""
        return self.night_present[self.windows[index][0]]

    def stages_of(self, index: int) -> torch.Tensor:
        """The window's stages [L / 3750] int64 (-1 where padded or unscored), without reading its signals."""
        night, start_epoch, last_epoch = self.windows[index]
        n_epochs = min(self.window_epochs, last_epoch - start_epoch)
        window_stages = torch.full((self.window_epochs,), -1, dtype=torch.int64)
        night_stages = self.night_stages[night][start_epoch: start_epoch + n_epochs]                  # [n_epochs] int8
        window_stages[:n_epochs] = torch.from_numpy(night_stages.astype(np.int64))
        return window_stages

    def padded_epochs(self, index: int, stages: torch.Tensor | None = None) -> torch.Tensor:
        """The window's epochs the encoder treats as padding [L / 3750] bool: those past the night's end and, under
        data.mask_epochs, its unscored and trimmed ones. `stages`: the window's, when the caller has them already."""
        night, start_epoch, last_epoch = self.windows[index]
        stages = self.stages_of(index) if stages is None else stages                    # [E]
        padded = torch.arange(self.window_epochs) >= min(self.window_epochs, last_epoch - start_epoch)
        if self.mask_epochs == "none" or not (self.night_stages[night] >= 0).any():
            return padded
        trim = WAKE_TRIMS["none" if self.mask_epochs == "unscored" else self.mask_epochs]
        return padded | (trim(stages) < 0)

    def __getitem__(self, index: int) -> dict:
        night, start_epoch, last_epoch = self.windows[index]
        n_epochs = min(self.window_epochs, last_epoch - start_epoch)
        start, n = start_epoch * EPOCH_SAMPLES, n_epochs * EPOCH_SAMPLES
        signals = np.zeros((N_CHANNELS, self.window_samples), np.float16)    # [7, L] the store's type: exact
        for c, channel in enumerate(self._channels(night)):
            signals[c, :n] = channel[start: start + n]
        window_stages = self.stages_of(index)                                # [E]
        padded_epochs = self.padded_epochs(index, window_stages)             # [E]
        return {"signals": torch.from_numpy(signals), "padding_mask": padded_epochs.repeat_interleave(EPOCH_SAMPLES),
                "padded_epochs": padded_epochs, "stages": window_stages, "present": self.night_present[night],
                "night": night, "start": start}


def drop_channels(present: torch.Tensor, p: float) -> torch.Tensor:
    """Channel dropout: present [B, C] bool -> the channels kept [B, C], each present one dropped with probability
    p (torch's global RNG, so a resumed run draws the same). A window never loses its last present channel: where
    every present one would go, it keeps them all."""
    if p <= 0:
        return present
    kept = present & (torch.rand(present.shape, device=present.device) >= p)            # [B, C]
    return torch.where(kept.any(dim=1, keepdim=True), kept, present)


def padding_to(padding_mask: torch.Tensor, device) -> torch.Tensor | None:
    """A batch's padding mask [B, L] from the loader, on `device`; None when nothing in it is padded: attention then
    runs without a mask, which FlashAttention needs. Decided on the CPU copy: no device synchronisation."""
    return padding_mask.to(device, non_blocking=True) if padding_mask.any() else None
