"""Staging whole nights: probabilities per 30-s epoch for a night of any length, its sleep statistics, its figure.

The Python API for users (evaluate.py and predict.py are built on it):

    import runs, stage
    run = runs.read_run("runs/probe")                      # a probe run folder, trained or imported
    encoder, probe = run.encoder(), run.probe()
    probs = stage.stage_night(encoder, probe, signals, window_samples=3_600_000, stride_samples=1_800_000)
    stats = stage.sleep_statistics(probs.argmax(1))        # signals: [7, T] float32 at 125 Hz, prepare's slot order
    stage.plot_hypnogram("night.png", probs.numpy(), "night 1")

Windows come from data.window_starts (the one windowing rule): windows of `window_samples` every `stride_samples`, the
last one aligned to the night's last full epoch; a night shorter than a window is zero-padded and masked. Where
windows overlap, an epoch's probabilities are the mean over the windows that saw it.

Sleep statistics (AASM-style; minutes unless noted; an epoch is 30 s = 0.5 min; sleep = N1, N2, N3 or R):
  TIB_min          time in bed: all recorded full epochs × 0.5 (lights-off/on are not in an EDF: the recording is TIB)
  SOL_min          sleep onset latency: first sleep epoch − recording start (null if no sleep)
  SPT_min          sleep period time: first to last sleep epoch inclusive
  TST_min          total sleep time: sleep epochs × 0.5
  WASO_min         wake after sleep onset: W epochs inside the SPT
  SE_pct           sleep efficiency: TST / TIB × 100
  REM_latency_min  first R epoch − first sleep epoch (null if no R)
  stage_min        minutes per stage W, N1, N2, N3, R (over the whole recording)
  stage_pct_TST    N1, N2, N3, R as % of TST (null if TST = 0)
  awakenings       runs of >= MIN_AWAKENING_EPOCHS consecutive W epochs inside the SPT (2 epochs = 1 min)
"""
from __future__ import annotations

import datetime as dt

import numpy as np
import torch

from data import window_starts
from prepare.annotations import AASM_LETTERS, REM, STAGES, W
from prepare.signals import EPOCH_S
from runs import write_atomic

MIN_AWAKENING_EPOCHS = 2                                   # an awakening is >= 1 min of W inside the SPT


@torch.inference_mode()   # no backward can follow: on CPU too, attention takes the fused kernel (model.py)
def stage_night(encoder, probe, signals, window_samples: int, stride_samples: int | None = None,
                batch_size: int = 4, device="cpu") -> torch.Tensor:
    """signals [C, T] (float32 array or tensor) -> stage probabilities per full 30-s epoch [T // 3750, classes]."""
    epoch_samples = probe.cfg.patches_per_epoch * encoder.cfg.patch_len                 # 3750
    signals = torch.as_tensor(signals, dtype=torch.float32)
    C, T = signals.shape
    n_epochs = T // epoch_samples
    window_epochs = window_samples // epoch_samples
    starts = window_starts(0, n_epochs, window_epochs, (stride_samples or window_samples) // epoch_samples)
    total = torch.zeros(n_epochs, probe.cfg.n_classes)                                  # [E, classes]
    seen = torch.zeros(n_epochs, 1)
    for i in range(0, len(starts), batch_size):
        batch_starts = starts[i:i + batch_size]
        windows = torch.zeros(len(batch_starts), C, window_samples)                     # [b, C, L]
        padding = torch.ones(len(batch_starts), window_samples, dtype=torch.bool)       # [b, L]
        for j, start in enumerate(batch_starts):
            n = min(window_epochs, n_epochs - start) * epoch_samples
            windows[j, :, :n] = signals[:, start * epoch_samples: start * epoch_samples + n]
            padding[j, :n] = False
        windows, padding = windows.to(device), padding.to(device)
        # on CPU one channel sequence per encoder pass: half the peak memory, same speed (Encoder.encode)
        embeddings = encoder.embed(windows, padding, sequences_per_pass=1 if windows.device.type == "cpu" else None)
        probs = probe(embeddings, padding).softmax(dim=-1).cpu()                        # [b, E_w, classes]
        for j, start in enumerate(batch_starts):
            n = min(window_epochs, n_epochs - start)
            total[start:start + n] += probs[j, :n]
            seen[start:start + n] += 1
    return total / seen.clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------------
# Sleep statistics: a pure function of the stage sequence


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-d boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def sleep_statistics(stages, epoch_s: float = EPOCH_S) -> dict:
    """Statistics of a hypnogram (codes 0 W, 1 N1, 2 N2, 3 N3, 4 R), definitions in the module docstring."""
    stages = np.asarray(stages, dtype=np.int64)
    minutes = epoch_s / 60
    sleep = stages > W
    asleep = np.flatnonzero(sleep)
    tst = int(sleep.sum()) * minutes
    stats = {"epoch_s": epoch_s, "n_epochs": len(stages), "TIB_min": len(stages) * minutes,
             "SOL_min": None, "SPT_min": 0.0, "TST_min": tst, "WASO_min": 0.0,
             "SE_pct": 100 * tst / (len(stages) * minutes) if len(stages) else None,
             "REM_latency_min": None, "awakenings": 0,
             "stage_min": {name: int(np.sum(stages == k)) * minutes for k, name in enumerate(AASM_LETTERS)},
             "stage_pct_TST": {name: (100 * int(np.sum(stages == k)) * minutes / tst if tst else None)
                               for k, name in enumerate(AASM_LETTERS) if k != W},
             "min_awakening_epochs": MIN_AWAKENING_EPOCHS}
    if len(asleep) == 0:
        return stats
    onset, last = int(asleep[0]), int(asleep[-1])
    period = stages[onset:last + 1]                                   # the SPT: starts and ends with sleep
    stats["SOL_min"] = onset * minutes
    stats["SPT_min"] = len(period) * minutes
    stats["WASO_min"] = int(np.sum(period == W)) * minutes
    stats["awakenings"] = sum(length >= MIN_AWAKENING_EPOCHS for _, length in _runs(period == W))
    rem = np.flatnonzero(stages == REM)
    if len(rem):
        stats["REM_latency_min"] = (int(rem[0]) - onset) * minutes
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# The per-epoch table


def clock_times(start_time: str | None, onsets: np.ndarray) -> list[str]:
    """HH:MM:SS of each onset (seconds) after an ISO start time; empty strings when the recording has none."""
    if not start_time:
        return [""] * len(onsets)
    start = dt.datetime.fromisoformat(start_time)
    return [(start + dt.timedelta(seconds=float(s))).strftime("%H:%M:%S") for s in onsets]


def hypnogram_rows(probs: np.ndarray, start_time: str | None) -> list[dict]:
    """One dict per epoch: epoch, onset_s, clock_time, stage (AASM letter of the most probable class), p_<stage>
    (5 decimals, as text)."""
    onsets = np.arange(len(probs)) * EPOCH_S
    clocks = clock_times(start_time, onsets)
    pred = probs.argmax(axis=1)
    return [{"epoch": i, "onset_s": int(onsets[i]), "clock_time": clocks[i], "stage": AASM_LETTERS[pred[i]],
             **{f"p_{name}": f"{p:.5f}" for name, p in zip(STAGES, probs[i])}} for i in range(len(probs))]


def stage_annotations(stages: np.ndarray) -> list[tuple[float, float, str]]:
    """(onset_s, duration_s, 'Sleep stage X') per run of equal stages, the Sleep-EDF convention for EDF+ hypnograms."""
    change = np.flatnonzero(np.diff(stages)) + 1
    starts, stops = np.concatenate([[0], change]), np.concatenate([change, [len(stages)]])
    return [(int(start) * EPOCH_S, int(stop - start) * EPOCH_S, f"Sleep stage {AASM_LETTERS[stages[start]]}")
            for start, stop in zip(starts, stops)]


# ----------------------------------------------------------------------------------------------------------------------
# The figure (matplotlib imported lazily: staging does not need it)


def pyplot():
    """matplotlib.pyplot with the file-only Agg backend, or None (and a note) when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: matplotlib is not installed: no PNGs (pip install matplotlib)")
        return None


def plot_hypnogram(path, probs: np.ndarray, title: str, truth: np.ndarray | None = None, plt=None) -> None:
    """Hypnogram (W on top, then R, N1, N2, N3) over the hypnodensity (stacked probabilities), written atomically.
    probs [E, 5]; truth [E] stage codes (-1 unscored) drawn in black under the prediction when given."""
    plt = plt or pyplot()
    if plt is None:
        return
    level = np.array([4, 2, 1, 0, 3])                       # stage code -> height: W 4, R 3, N1 2, N2 1, N3 0
    hours = np.arange(len(probs) + 1) * EPOCH_S / 3600      # epoch edges, so that the last epoch has its width

    def steps(values):                                      # [E] -> [E + 1] for a "post" step plot over the edges
        return np.append(values, values[-1:], axis=0)
    pred = level[probs.argmax(axis=1)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5), sharex=True, height_ratios=[1.3, 1])
    if truth is None:
        top.step(hours, steps(pred), where="post", color="black", lw=1)
    else:
        true = np.where(truth >= 0, level[truth.clip(0)], np.nan)                        # gaps where unscored
        top.step(hours, steps(true), where="post", color="black", lw=1.2, label="technologist")
        top.step(hours, steps(pred) + 0.08, where="post", color="tab:red", lw=1, alpha=0.8, label="PFTSleep")
        top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    top.set(yticks=range(5), yticklabels=["N3", "N2", "N1", "R", "W"], title=title)
    bottom.stackplot(hours, steps(probs).T, labels=AASM_LETTERS, step="post")
    bottom.set(ylim=(0, 1), xlim=(0, hours[-1]), ylabel="probability", xlabel="hours from start of recording")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda temp: fig.savefig(temp, dpi=110, format="png"))
    plt.close(fig)
