"""Staging whole nights: probabilities per 30-s epoch for a night of any length, its sleep statistics, its figure.

The Python API for users (evaluate.py and predict.py are built on it):

    import stage
    model = stage.load_model("runs/probe")                 # a probe run folder, trained or imported; load once
    night = stage.stage_edf("night.edf", model)            # through prepare's signal path; or stage_signals(
    night.table, night.probs, night.stats                  #   {"EEG": (samples, fs, "V"), ...}, model)
    night.write("out/night", exports=["luna"])             # predict.py's files, from the same object

and, one level down, on signals already prepared ([7, T] float32 at 125 Hz, prepare's slot order):

    import runs, stage
    run = runs.read_run("runs/probe")
    encoder, probe = run.encoder(), run.probe()
    probs = stage.stage_night(encoder, probe, signals, window_samples=3_600_000, stride_samples=1_800_000)
    stats = sleep_statistics.sleep_statistics(probs.argmax(1))          # import sleep_statistics
    stage.plot_hypnogram("night.png", probs.numpy(), "night 1")

Windows come from data.window_starts (the one windowing rule): windows of `window_samples` every `stride_samples`, the
last one aligned to the night's last full epoch; a night shorter than a window is zero-padded and masked. Where
windows overlap, an epoch's probabilities are the mean over the windows that saw it.

Sleep statistics and lights-off/on are sleep_statistics.py's; the hypnogram files (exports) prepare/annotations.py's.
"""
from __future__ import annotations

import datetime as dt
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

import cpu_kernels
import runs
from data import DataConfig, window_starts
from durable import write_atomic
from prepare import apples, generic, mesa, mros, shhs, wsc
from prepare.annotations import AASM_LETTERS, EXPORTS, STAGES, write_stages
from prepare.night import DEFAULT_REQUIRED, NIGHT_ERRORS, Options, make_options, prepare_arrays, prepare_edf
from prepare.signals import EPOCH_S, EPOCH_SAMPLES, FS, SLOTS, resolve
from sleep_statistics import lights_epochs, lights_from_annotations, sleep_statistics

PROB_COLUMNS = tuple(f"p_{name}" for name in STAGES)       # p_W, p_N1, p_N2, p_N3, p_REM (as evaluate.py's CSVs)
HYPNOGRAM_COLUMNS = ("epoch", "onset_s", "date", "clock_time", "stage", *PROB_COLUMNS)
PROB_DECIMALS = 5


def staging_windows(n_epochs: int, window_epochs: int, stride_epochs: int | None = None) -> list[tuple[int, int]]:
    """(first epoch, epochs) of each window that stages a night of n_epochs. stride_epochs None (the default): the
    fewest windows that cover the night, of equal length (within an epoch), back to back: a night up to 8 h is one
    window, a 9.5-h night two of 4.75 h. Each epoch is seen once, with at least half a window of context, and the night
    costs what its length does (stage_night computes a short window over its own length). With a stride:
    data.window_starts' windows (one every stride, the last aligned to the night's end), each the whole window or the
    whole night, averaged where they overlap. What each costs and scores: docs/design.md "Staging windows"."""
    if stride_epochs is None:
        k = -(-n_epochs // window_epochs)                                              # ceil: how many windows
        edges = [i * n_epochs // k for i in range(k + 1)] if n_epochs else []
        return list(zip(edges, (end - first for first, end in zip(edges, edges[1:]))))
    return [(first, min(window_epochs, n_epochs - first))
            for first in window_starts(0, n_epochs, window_epochs, stride_epochs)] if n_epochs else []


@torch.inference_mode()
def stage_night(encoder, probe, signals, window_samples: int, stride_samples: int | None = None,
                batch_size: int = 4, device="cpu", embeddings: bool = False, reference: bool = False):
    """signals [C, T] (float32 array or tensor) -> stage probabilities per full 30-s epoch [T // 3750, classes];
    with embeddings=True, (probabilities, embeddings [E, C, D]): the encoder's output per epoch and channel, the mean
    of the epoch's 5 patch embeddings, averaged like the probabilities over the windows that saw the epoch.
    Windows: staging_windows. A window shorter than `window_samples` is what the model saw in training, a window
    zero-padded to that length and masked, but its padded patches are never computed: the encoder and probe run over
    its own length (Encoder.patchify(window=): exact in eval mode), a batch holding windows of one length. On the
    CPU the encoder and probe run cpu_kernels' kernels (the same function, less time and memory). reference=True:
    model.py's own paths over whole padded windows, as in training (the check that the rest is exact)."""
    kernels = cpu_kernels if torch.device(device).type == "cpu" and not reference else None
    patches_per_epoch = probe.cfg.patches_per_epoch
    epoch_samples = patches_per_epoch * encoder.cfg.patch_len                           # 3750
    signals = torch.as_tensor(signals, dtype=torch.float32)
    C, T = signals.shape
    n_epochs = T // epoch_samples
    stride_epochs = None if stride_samples is None else max(1, stride_samples // epoch_samples)
    windows = staging_windows(n_epochs, window_samples // epoch_samples, stride_epochs)
    total = torch.zeros(n_epochs, probe.cfg.n_classes)                                  # [E, classes]
    total_embedded = torch.zeros(n_epochs, C, encoder.cfg.d_model) if embeddings else None    # [E, C, D]
    seen = torch.zeros(n_epochs, 1)
    batches = []                                      # up to batch_size windows of one length: none padded to another
    for window in windows:
        if batches and len(batches[-1]) < batch_size and batches[-1][-1][1] == window[1]:
            batches[-1].append(window)
        else:
            batches.append([window])
    try:
        for batch in batches:
            L = window_samples if reference else batch[0][1] * epoch_samples
            x = torch.zeros(len(batch), C, L)                                               # [b, C, L]
            padding = torch.ones(len(batch), L, dtype=torch.bool)                           # [b, L]
            for j, (first, n) in enumerate(batch):
                x[j, :, :n * epoch_samples] = signals[:, first * epoch_samples:(first + n) * epoch_samples]
                padding[j, :n * epoch_samples] = False
            x, padding = x.to(device), (padding.to(device) if padding.any() else None)
            patches, key_padding = encoder.patchify(x, padding, window_samples)             # [b, C, N, P], [b, N]
            tokens = encoder.tokens(patches)                                                # [b, C, N, D]
            del x, patches                                      # a night's samples are not held while the encoder runs
            embedded = encoder.contextualise(tokens, key_padding, kernels)                  # [b, C, N, D]
            cpu_kernels.release()                                 # attention's kept scores, before the probe runs
            probs = probe(embedded, padding, kernels).softmax(dim=-1).cpu()                 # [b, E_w, classes]
            if embeddings:                            # [b, C, N, D] -> the mean of each epoch's patches [b, E_w, C, D]
                b, _, N, D = embedded.shape
                embedded = embedded.reshape(b, C, N // patches_per_epoch, patches_per_epoch, D).mean(3)
                embedded = embedded.transpose(1, 2).float().cpu()
            for j, (first, n) in enumerate(batch):
                total[first:first + n] += probs[j, :n]
                seen[first:first + n] += 1
                if embeddings:
                    total_embedded[first:first + n] += embedded[j, :n]
    finally:
        cpu_kernels.release()                                # also when staging fails
    if embeddings:
        return total / seen.clamp_min(1), total_embedded / seen[:, :, None].clamp_min(1)
    return total / seen.clamp_min(1)


# ----------------------------------------------------------------------------------------------------------------------
# The per-epoch table


def clock_times(start_time: str | None, onsets: np.ndarray) -> list[str]:
    """HH:MM:SS of each onset (seconds) after an ISO start time; empty strings when the recording has none."""
    if not start_time:
        return [""] * len(onsets)
    start = dt.datetime.fromisoformat(start_time)
    return [(start + dt.timedelta(seconds=float(s))).strftime("%H:%M:%S") for s in onsets]


def epoch_table(probs: np.ndarray, start_time: str | None) -> pd.DataFrame:
    """One row per epoch: epoch, onset_s, date (YYYY-MM-DD) and clock_time (HH:MM:SS) of its onset (empty when the
    recording has no start time), stage (AASM letter of the most probable class), p_W … p_REM (floats)."""
    onsets = np.arange(len(probs)) * EPOCH_S
    start = dt.datetime.fromisoformat(start_time) if start_time else None
    dates = [(start + dt.timedelta(seconds=float(s))).strftime("%Y-%m-%d") if start else "" for s in onsets]
    return pd.DataFrame({"epoch": np.arange(len(probs)), "onset_s": onsets.astype(np.int64), "date": dates,
                         "clock_time": clock_times(start_time, onsets),
                         "stage": [AASM_LETTERS[k] for k in probs.argmax(axis=1)],
                         **{f"p_{name}": probs[:, k].astype(np.float64) for k, name in enumerate(STAGES)}})


def rounded_probs(probs: np.ndarray, decimals: int = PROB_DECIMALS) -> np.ndarray:
    """probs [E, K] as whole units of 10^-decimals [E, K] int64 that sum to exactly 10^decimals in every row: floor
    each, then hand the missing units to the largest remainders, so a CSV row sums to 1 after rounding (YASA's
    Hypnogram, for one, checks that every row of `proba` sums to 1)."""
    scale = 10 ** decimals
    scaled = probs / probs.sum(axis=1, keepdims=True) * scale
    units = np.floor(scaled).astype(np.int64)
    missing = scale - units.sum(axis=1, keepdims=True)                      # [E, 1]: 0 … K - 1 units
    rank = np.argsort(np.argsort(units - scaled, axis=1), axis=1)           # 0 = the largest remainder
    return units + (rank < missing)


def write_hypnogram_csv(path, table: pd.DataFrame, decimals: int = PROB_DECIMALS) -> None:
    """The per-epoch table as CSV (written atomically), its probabilities with `decimals` digits summing to 1."""
    text = table.copy()
    units = rounded_probs(table[list(PROB_COLUMNS)].to_numpy(), decimals)
    for k, column in enumerate(PROB_COLUMNS):
        text[column] = [f"{u // 10 ** decimals}.{u % 10 ** decimals:0{decimals}d}" for u in units[:, k]]
    write_atomic(path, lambda temp: text[list(HYPNOGRAM_COLUMNS)].to_csv(temp, index=False))


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


def clock_ticks(start: dt.datetime, hours_total: float) -> tuple[np.ndarray, list[str]]:
    """Ticks on whole clock steps (5 min to 6 h, at most 12 of them) as hours from `start`, and their HH:MM labels."""
    step = next((m for m in (5, 10, 15, 30, 60, 120, 180, 240) if hours_total * 60 / m <= 12), 360)     # minutes
    minute_of_day = start.hour * 60 + start.minute + (start.second + start.microsecond / 1e6) / 60
    ticks = np.arange((-minute_of_day) % step, hours_total * 60 + 1e-6, step) / 60
    return ticks, [(start + dt.timedelta(seconds=round(h * 3600))).strftime("%H:%M") for h in ticks]


def plot_hypnogram(path, probs: np.ndarray, title: str, truth: np.ndarray | None = None, plt=None,
                   start_time=None, lights_off: int | None = None, lights_on: int | None = None) -> None:
    """Hypnogram (W on top, then R, N1, N2, N3) over the hypnodensity (stacked probabilities), written atomically.
    probs [E, 5]; truth [E] stage codes (-1 unscored) drawn in black under the prediction when given. lights_off /
    lights_on (epoch indices, as sleep_statistics takes them): the time outside is shaded, as it is not counted.
    start_time (ISO text or datetime): a clock-time x axis; without it, hours from the start of the recording."""
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
    outside = [(0, lights_off), (lights_on, len(probs))]    # epochs before lights-off and from lights-on
    outside = [(a, b) for a, b in outside if a is not None and b is not None and b > a]
    for i, (a, b) in enumerate(outside):
        for ax in (top, bottom):                            # above the stackplot, translucent: still readable
            ax.axvspan(hours[a], hours[b], color="0.45", alpha=0.45, lw=0, zorder=3,
                       label="lights on (not in TIB)" if ax is top and i == 0 else None)
    if truth is not None or outside:
        top.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    top.set(yticks=range(5), yticklabels=["N3", "N2", "N1", "R", "W"], title=title)
    bottom.stackplot(hours, steps(probs).T, labels=AASM_LETTERS, step="post")
    bottom.set(ylim=(0, 1), xlim=(0, hours[-1]), ylabel="probability", xlabel="hours from start of recording")
    if start_time:
        start = dt.datetime.fromisoformat(start_time) if isinstance(start_time, str) else start_time
        bottom.set_xticks(*clock_ticks(start, hours[-1]))
        bottom.set_xlabel(f"clock time (recording started {start:%Y-%m-%d %H:%M:%S})")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda temp: fig.savefig(temp, dpi=110, format="png"))
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------------------------
# Staging an EDF, or signals already in memory: the API behind predict.py (one code path, so the two cannot diverge)

# Alias tables by name: the built-in one (any EDF) and the five NSRR datasets' (their own labels, e.g. MESA's EEG3)
CHANNEL_TABLES = {"edf": generic.CHANNELS, "shhs": shhs.CHANNELS, "mesa": mesa.CHANNELS, "mros": mros.CHANNELS,
                  "apples": apples.CHANNELS, "wsc": wsc.CHANNELS}
STAGING_SLOTS = DEFAULT_REQUIRED                           # EEG, EOG, EMG: what AASM staging reads
# κ with one slot absent (fed as zeros) on the synthetic benchmark, bench/channel_dropout.py (docs/benchmarks.md "Channel
# dropout"): (trained without channel dropout, encoder + probe trained with train.channel_dropout 0.2); "none": all
ABSENT_KAPPA = {"none": (0.803, 0.701), "ECG": (0.731, 0.707), "EOG": (0.640, 0.472), "EMG": (0.799, 0.692),
                "EEG": (0.296, 0.532), "SPO2": (0.782, 0.657), "THOR": (0.640, 0.781), "ABDO": (0.602, 0.757)}


class StagingError(ValueError):
    """A night that cannot be staged; the message is the one-line cause."""


@dataclass
class Model:
    """A probe run ready to stage nights: encoder and probe in eval mode on `device`, the run's window (s) and its
    config (a dict, as runs.read_run read it)."""
    encoder: torch.nn.Module
    probe: torch.nn.Module
    window_s: float
    path: Path
    device: str = "cpu"
    config: dict = field(default_factory=dict)


def load_model(run, device: str = "auto", latest: bool = False) -> Model:
    """A Model from a run folder, a runs.Run or a Model (returned as it is): load it once to stage many nights; what
    the API, evaluate.py and predict.py load a probe run with. device: "auto" (CUDA when present, else the CPU),
    "cpu", "cuda" or "cuda:N". latest=True accepts a run without a final checkpoint, i.e. its ckpt.pt
    (runs.read_run). StagingError (one line) for a folder that is not a usable probe run."""
    if isinstance(run, Model):
        return run
    _refuse_encoder_only(run)      # a pretraining run: that cause in one line, before any weights are read
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    where = run.path if isinstance(run, runs.Run) else run
    try:
        run = run if isinstance(run, runs.Run) else runs.read_run(run, latest=latest)
        if "probe" not in run.config or "model" not in run.config:
            raise KeyError("no probe: section in config.yaml")
        encoder, probe = run.encoder().to(device), run.probe().to(device)
    except (OSError, runs.CorruptCheckpoint, runs.RunFormatError) as err:   # no folder; no final checkpoint (its
        # line names --latest); a config.yaml that is not YAML, or a newer version's run: each its own cause
        raise StagingError(str(err).splitlines()[0]) from None
    except (ValueError, KeyError, TypeError, RuntimeError) as err:   # weights or config that do not fit a probe run
        raise StagingError(f"{where} is not a probe run (needs config.yaml with model: and probe: sections, and "
                           f"ckpt_final.pt): {str(err).splitlines()[0]}") from None
    window_s = float((run.config.get("data") or {}).get("window_s", DataConfig.window_s))   # imported: the paper's
    return Model(encoder, probe, window_s, Path(run.path), str(device), run.config)


@dataclass
class NightResult:
    """One staged night (stage_edf, stage_signals). `write` makes predict.py's files from it."""
    probs: np.ndarray               # [E, 5] float32: W, N1, N2, N3, REM per full 30-s epoch
    table: pd.DataFrame             # one row per epoch: HYPNOGRAM_COLUMNS (epoch_table)
    stats: dict                     # sleep_statistics of the most probable stages, lights-off to lights-on
    warnings: list[str]
    absent: list[str]               # slots fed to the model as zeros
    start_time: str | None          # ISO start of the recording (None: the EDF header has none)
    source: str | None              # the EDF (None: in-memory signals)
    run: str
    channel_table: str | None       # the alias table that named the EDF's channels (CHANNEL_TABLES)
    source_labels: dict             # slot -> EDF label or derivation 'A - B'
    source_units: dict              # slot -> the unit the EDF (or the caller) declared, before conversion to µV
    window_s: float
    stride_s: float | None          # None: stage.staging_windows' default (no overlap)
    embeddings: np.ndarray | None = None    # [E, 7, D] float32, with embeddings=True

    @property
    def stages(self) -> np.ndarray:
        """[E] the most probable class: 0 W, 1 N1, 2 N2, 3 N3, 4 R."""
        return self.probs.argmax(axis=1)

    def record(self) -> dict:
        """<stem>.stats.json: the statistics, and what they were computed from."""
        return {"edf": self.source, "run": self.run, "start_time": self.start_time, "window_s": self.window_s,
                "stride_s": self.stride_s, **self.stats, "absent_slots": self.absent,
                "channel_table": self.channel_table, "source_labels": self.source_labels,
                "source_units": self.source_units, "warnings": self.warnings}

    def write(self, stem, exports=(), embeddings: bool = False, plot: bool = True, plt=None) -> list[Path]:
        """predict.py's files for this night; returns their paths. <stem>.hypnogram.csv, <stem>.stats.json,
        <stem>.stages.<ext> per export format (EXPORTS), <stem>.embeddings.npy (float16 [E, 7, D]) with
        embeddings=True, <stem>.png with plot=True (and matplotlib installed). All or none: each is written under a
        hidden temporary name beside it and renamed once all are complete. StagingError (one line naming the path)
        when a target is a folder or cannot be written; none of the night's files is then left (nor a temporary)."""
        stem = Path(stem)
        if embeddings and self.embeddings is None:
            raise ValueError("no embeddings to write: stage the night with embeddings=True")
        plt = (plt or pyplot()) if plot else None
        title = Path(self.source).name if self.source else stem.name
        writers = {".hypnogram.csv": lambda path: write_hypnogram_csv(path, self.table),
                   ".stats.json": lambda path: write_atomic(
                       path, lambda temp: temp.write_text(json.dumps(self.record(), indent=2) + "\n"))}
        for fmt in dict.fromkeys(exports):
            writers[EXPORTS[fmt]] = lambda path, fmt=fmt: write_stages(path, fmt, self.stages, self.start_time)
        if embeddings:
            writers[".embeddings.npy"] = lambda path: write_atomic(
                path, lambda temp: _save_npy(temp, self.embeddings.astype(np.float16)))
        if plt is not None:
            writers[".png"] = lambda path: plot_hypnogram(
                path, self.probs, title, plt=plt, start_time=self.start_time,
                lights_off=self.stats.get("lights_off_epoch"), lights_on=self.stats.get("lights_on_epoch"))
        targets = {stem.with_name(stem.name + suffix): write for suffix, write in writers.items()}
        for target in targets:
            if target.is_dir():
                raise StagingError(f"{target} is a folder: the night's {target.name} cannot be written there "
                                   f"(move or rename the folder); none of the night's files was written")
        parts = {target: target.with_name(f".{target.name}.part-{os.getpid()}") for target in targets}
        renamed, target = [], stem.parent
        try:
            stem.parent.mkdir(parents=True, exist_ok=True)
            for target, write in targets.items():
                write(parts[target])
            for target, part in parts.items():
                os.replace(part, target)
                renamed.append(target)
        except OSError as err:
            for path in renamed:                  # all or none: a night is never left with some of its files
                path.unlink(missing_ok=True)
            cause = "is a folder" if target.is_dir() else f"cannot be written ({err.strerror or err})"
            raise StagingError(f"{target} {cause}; none of the night's files was written") from None
        finally:
            for part in parts.values():
                part.unlink(missing_ok=True)
        return list(targets)


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:                               # a file object: np.save would append .npy to the name
        np.save(f, array)


def channel_table(labels: list[str], dataset: str | None = None) -> tuple[str, dict]:
    """(name, alias table) for an EDF's labels: `dataset`'s when given (edf = the built-in table), else the table that
    resolves the most staging slots, then the most slots, then with the most preferred candidates (a table's first
    choice is its dataset's own label); ties go to the built-in table. Only MESA's table knows that MESA's EEG3 is
    C4-M1, and SHHS's would take MESA's EEG2 (Cz-Oz) as its second choice."""
    if dataset is not None:
        if dataset not in CHANNEL_TABLES:
            raise StagingError(f"unknown dataset {dataset!r}: one of {', '.join(CHANNEL_TABLES)}")
        return dataset, CHANNEL_TABLES[dataset]

    def fit(name: str) -> tuple[int, int, int]:
        table = CHANNEL_TABLES[name]
        ranks = {slot: next((rank for rank, candidate in enumerate(table.get(slot, []))
                             if resolve(labels, {slot: [candidate]})[slot] is not None), None) for slot in SLOTS}
        found = [slot for slot, rank in ranks.items() if rank is not None]
        return (sum(slot in found for slot in STAGING_SLOTS), len(found), -sum(ranks[slot] for slot in found))
    name = max(CHANNEL_TABLES, key=fit)                       # the first of equals: "edf"
    return name, CHANNEL_TABLES[name]


def staging_options(channels=None, allow_missing: bool = False, require_all: bool = False, strict: bool = False,
                    zero_phase: bool = False) -> Options:
    """prepare's Options for staging: the staging slots required (all slots with require_all, none with
    allow_missing), a short file read as far as it goes unless strict. channels: a YAML file or a dict, slot ->
    label, 'A - B' derivation or None (absent)."""
    require = "all" if require_all else "none" if allow_missing else ",".join(STAGING_SLOTS)
    try:
        opts = make_options(channels, require=require, zero_phase=zero_phase)
    except SystemExit as err:                                 # a bad channel map: the one line, as an exception
        raise StagingError(str(err)) from None
    opts.allow_truncated = not strict
    return opts


def _missing_slots(labels: list[str], table: dict, opts: Options) -> None:
    """Fail early, naming the EDF's labels, when a required slot has no label (a StagingError that says what to do)."""
    sources = resolve(labels, table, opts.channel_map)
    mapped = opts.channel_map or {}
    shown = ", ".join(label for label in labels if label != "EDF Annotations")
    hint = "name them with --channels map.yaml (Python: channels=), e.g. {EEG: C4-M1, EOG: E1 - M2}"
    if all(source is None for source in sources.values()):
        reasons = [f"slot {slot}: " + ("mapped to null by --channels" if slot in mapped else
                                       "none of its labels is in the EDF") for slot in SLOTS]
        raise StagingError(f"no usable channel: {'; '.join(reasons)}; the EDF's labels: {shown}: {hint}")
    missing = [slot for slot in opts.required if sources[slot] is None and slot not in mapped]
    if missing:
        allow = "" if set(opts.required) - set(STAGING_SLOTS) else ", or stage without them: --allow-missing"
        raise StagingError(f"no {', '.join(missing)} among the EDF's labels ({shown}): {hint}, or --dataset "
                           f"({', '.join(CHANNEL_TABLES)}){allow}")


@dataclass
class PreparedNight:
    """An EDF read and conditioned for the model (read_edf_night), not yet staged: what predict.py's reader
    processes hand to the one that stages."""
    path: Path
    signals: np.ndarray             # [7, T] float16 at 125 Hz, SLOTS order (absent slots zeros)
    attrs: dict                     # prepare_night's: present, warnings, start_time, source labels and units
    table_name: str                 # the alias table that named the channels (CHANNEL_TABLES)
    lights: tuple                   # (lights-off, lights-on) s after the start from the EDF+ annotations, or None


def read_edf_night(path, channels=None, dataset: str | None = None, allow_missing: bool = False, *,
                   require_all: bool = False, strict: bool = False, zero_phase: bool = False) -> PreparedNight:
    """Read, check and filter one EDF for staging, through the signal path of `python -m prepare edf` (arguments
    as stage_edf). Raises StagingError (one line) for a night that cannot be staged."""
    path = Path(path)
    opts = staging_options(channels, allow_missing, require_all, strict, zero_phase)

    def table_for(labels: list[str]) -> tuple[str, dict]:
        name, table = channel_table(labels, dataset)
        _missing_slots(labels, table, opts)
        return name, table
    try:
        table_name, signals, attrs, events = prepare_edf(path, opts, table_for)
    except NIGHT_ERRORS as err:
        # the file is named once, by the caller: drop the reader's own "path: " prefix
        raise StagingError(str(err).replace("\n", " ").removeprefix(f"{path}: ")) from None
    return PreparedNight(path, signals, attrs, table_name, lights_from_annotations(events))


def stage_edf(path, run, channels=None, lights_off=None, lights_on=None, dataset: str | None = None,
              allow_missing: bool = False, *, require_all: bool = False, strict: bool = False,
              zero_phase: bool = False, stride_s: float | None = None, batch_size: int = 4, device: str = "auto",
              embeddings: bool = False, latest: bool = False) -> NightResult:
    """Stage one EDF with a probe run (a folder, runs.Run or load_model's Model), through the signal path of
    `python -m prepare edf`. Channels: `channels` (YAML file or dict), else the alias table of `dataset` or the one
    that fits the labels (channel_table). Missing EEG, EOG or EMG fail the night unless allow_missing (zeros, with
    a warning that quotes the cost); require_all fails on any missing slot. lights_off / lights_on: seconds after
    the start, clock times "HH:MM[:SS]" or datetimes; each not given comes from the EDF+ annotations' "Lights
    off/on", else it is the start or end of the recording. Raises StagingError (one line) for a night that cannot
    be staged."""
    model = load_model(run, device, latest)
    night = read_edf_night(path, channels, dataset, allow_missing, require_all=require_all, strict=strict,
                           zero_phase=zero_phase)
    return stage_prepared(night, model, lights_off, lights_on, stride_s=stride_s, batch_size=batch_size,
                          embeddings=embeddings)


def stage_prepared(night: PreparedNight, model: Model, lights_off=None, lights_on=None, *,
                   stride_s: float | None = None, batch_size: int = 4, embeddings: bool = False) -> NightResult:
    """Stage a night read by read_edf_night (lights-off/on given here beat the EDF's own annotations)."""
    file_off, file_on = night.lights
    off, on = (file_off if lights_off is None else lights_off), (file_on if lights_on is None else lights_on)
    try:                                                      # before staging: a lights time outside the night
        lights_epochs(night.signals.shape[1] // EPOCH_SAMPLES, off, on, night.attrs["start_time"])
    except ValueError as err:
        from_file = [f"{name} at {found:g} s" for name, given, found in
                     (("lights-off", lights_off, file_off), ("lights-on", lights_on, file_on))
                     if given is None and found is not None]
        raise StagingError(str(err) + (f" (from the EDF+ annotations: {', '.join(from_file)})" if from_file else "")
                           ) from None
    return _stage(model, night.signals, night.attrs, off, on, stride_s, batch_size, embeddings, str(night.path),
                  night.table_name)


def stage_signals(signals: dict, run, start_time=None, lights_off=None, lights_on=None, allow_missing: bool = False,
                  *, require_all: bool = False, zero_phase: bool = False, stride_s: float | None = None,
                  batch_size: int = 4, device: str = "auto", embeddings: bool = False,
                  latest: bool = False) -> NightResult:
    """Stage a night held in memory: `signals` maps slots (SLOTS: ECG, EOG, EMG, EEG, SPO2, THOR, ABDO) to
    (samples, fs in Hz, unit), unit as an EDF would declare it (V, mV, uV or nV for ECG/EOG/EMG/EEG; % for SPO2). The
    same units, checks, filters and resampling as stage_edf (prepare.night.prepare_arrays); start_time (datetime or
    ISO text with a time of day; a date alone is refused) gives clock times. Every slot must cover the same night
    (durations samples / fs within one 30-s epoch). Other arguments as stage_edf. Raises StagingError (one line,
    naming the slot and field) for signals that cannot be staged."""
    opts = staging_options(None, allow_missing, require_all, False, zero_phase)
    if not isinstance(signals, Mapping):
        raise StagingError(f"signals: expected a dict of slot -> (samples, fs, unit), got {type(signals).__name__}")
    given = [slot for slot, spec in signals.items() if spec is not None]      # a slot given as None is not given
    if missing := [slot for slot in opts.required if signals.get(slot) is None]:
        raise StagingError(f"signals: no {', '.join(missing)} (given: {', '.join(given) or 'nothing'})"
                           + ("" if require_all else "; stage without them with allow_missing=True"))
    model = load_model(run, device, latest)
    try:
        prepared, attrs = prepare_arrays(signals, opts, start_time)
    except NIGHT_ERRORS as err:
        raise StagingError(str(err).replace("\n", " ")) from None
    return _stage(model, prepared, attrs, lights_off, lights_on, stride_s, batch_size, embeddings, None, None)


def embed_edf(path, run, **options) -> np.ndarray:
    """Per-epoch embeddings of an EDF [E, 7, D] float32: for each full 30-s epoch and slot (SLOTS order), the mean of
    the encoder's 5 patch embeddings (6 s each), averaged over the windows that saw the epoch. Options as stage_edf.
    The run must be a probe run (its windows are staged): a pretraining run is a StagingError that says so."""
    return stage_edf(path, run, embeddings=True, **options).embeddings


def _refuse_encoder_only(run) -> None:
    """A run folder (or runs.Run) with an encoder and no probe (train_pretrain.py's, or an encoder-only import)
    stages nothing: one line that names that cause, read from its config.yaml before any weights. Anything else
    wrong with the run (a config.yaml this version cannot read, a newer version's fields) is load_model's line."""
    if isinstance(run, Model):
        return
    try:
        config = run.config if isinstance(run, runs.Run) else runs.read_config(run)
        if not isinstance(run, runs.Run):                 # a runs.Run's config was checked when it was read
            runs.check_config(Path(run) / runs.CONFIG, config)
    except (OSError, ValueError, TypeError):
        return
    where = run.path if isinstance(run, runs.Run) else run
    if isinstance(config, dict) and "model" in config and "probe" not in config:
        raise StagingError(f"{where} is a pretraining run (an encoder, no probe: section in its config.yaml): staging "
                           f"and embed_edf need a probe run, e.g. one trained on it with train_probe.py --encoder "
                           f"{where}")


def absent_warning(absent: list[str], reasons: list[str]) -> str:
    """One line: the slots fed as zeros, why, and what that cost on the synthetic benchmark."""
    costs = ", ".join(f"{slot} {ABSENT_KAPPA[slot][0]:.2f} ({ABSENT_KAPPA[slot][1]:.2f})" for slot in absent)
    every, every_dropout = ABSENT_KAPPA["none"]
    return (f"absent slots {', '.join(absent)} (fed as zeros): {'; '.join(reasons)}. What a missing slot costs, κ on "
            f"the synthetic benchmark (docs/benchmarks.md 'Channel dropout'): {costs}, against {every:.2f} ({every_dropout:.2f}) "
            f"with every slot; in brackets a model trained with train.channel_dropout 0.2")


def _stage(model: Model, signals: np.ndarray, attrs: dict, lights_off, lights_on, stride_s, batch_size: int,
           embeddings: bool, source: str | None, table_name: str | None) -> NightResult:
    """Prepared signals [7, T] float16 and their attrs (prepare_night / prepare_arrays) -> NightResult."""
    absent = [slot for slot, ok in zip(SLOTS, attrs["present"]) if not ok]
    if len(absent) == len(SLOTS):
        raise StagingError(f"no usable channel: {'; '.join(attrs['warnings'])}")
    window = int(round(model.window_s / EPOCH_S)) * EPOCH_SAMPLES
    stride = None if stride_s is None else max(int(round(stride_s / EPOCH_S)) * EPOCH_SAMPLES, EPOCH_SAMPLES)
    staged = stage_night(model.encoder, model.probe, signals.astype(np.float32), window, stride, batch_size,
                         model.device, embeddings=embeddings)
    probs, embedded = (staged[0].numpy(), staged[1].numpy()) if embeddings else (staged.numpy(), None)   # [E, 5]
    try:
        off, on = lights_epochs(len(probs), lights_off, lights_on, attrs["start_time"])
    except ValueError as err:
        raise StagingError(str(err)) from None
    slot_warnings = {slot: [w for w in attrs["warnings"] if w.startswith(f"slot {slot}:")] for slot in absent}
    warnings = [w for w in attrs["warnings"] if not any(w in found for found in slot_warnings.values())]
    if absent:
        warnings.append(absent_warning(absent, [w for slot in absent for w in slot_warnings[slot]]))
    return NightResult(probs=probs, table=epoch_table(probs, attrs["start_time"]),
                       stats=sleep_statistics(probs.argmax(axis=1), lights_off=off, lights_on=on),
                       warnings=warnings, absent=absent, start_time=attrs["start_time"], source=source,
                       run=str(model.path), channel_table=table_name, source_labels=attrs["source_labels"],
                       source_units=attrs["declared_units"], window_s=model.window_s,
                       stride_s=None if stride is None else stride / FS,
                       embeddings=embedded)
