"""Channel resolution, units, filtering and resampling: from EDF signals to the 7 slots at 125 Hz.

Every value here that shapes the data comes from the paper's code (docs/formats.md §5, upstream
`ALL_FREQUENCY_FILTERS` / `butterworth`): order-2 Butterworth applied causally (`sosfilt`,
a single forward pass), ECG 0.5-40 Hz band-pass, EEG/EOG/EMG 0.3-30 Hz band-pass, SpO2 0.4 Hz
low-pass, effort belts 0.5 Hz low-pass, a 3-sample median filter against spikes on every
channel, and the order: below 125 Hz resample first, at or above 125 Hz filter at the native
rate, then resample. We resample with polyphase FIR (`scipy.signal.resample_poly`) where the
training code used torchaudio's windowed sinc; both are band-limited interpolators and agree
to well under 1 % in the pass-band (tests/test_signals.py checks amplitude fidelity).
"""
from __future__ import annotations

from dataclasses import dataclass
from fractions import Fraction

import numpy as np
import scipy.signal

SLOTS = ("ECG", "EOG", "EMG", "EEG", "SPO2", "THOR", "ABDO")   # the paper's channel order
FS = 125                      # Hz, every slot in the night store
EPOCH_S = 30
EPOCH_SAMPLES = FS * EPOCH_S  # 3750
VOLTAGE_SLOTS = ("ECG", "EOG", "EMG", "EEG")
MEDIAN_KERNEL = 3
BUTTER_ORDER = 2
BAND = {  # (btype, cut-off Hz); docs/formats.md §5 table 'cut-offs'
    "ECG": ("bandpass", (0.5, 40.0)),
    "EOG": ("bandpass", (0.3, 30.0)),
    "EMG": ("bandpass", (0.3, 30.0)),
    "EEG": ("bandpass", (0.3, 30.0)),
    "SPO2": ("lowpass", 0.4),
    "THOR": ("lowpass", 0.5),
    "ABDO": ("lowpass", 0.5),
}
# Physical dimension → factor to µV. Anything else on a voltage slot is an error, not a guess.
MICROVOLTS_PER = {"nv": 1e-3, "nanovolt": 1e-3, "uv": 1.0, "µv": 1.0, "μv": 1.0, "microv": 1.0, "mv": 1e3,
                  "millivolt": 1e3, "v": 1e6, "volt": 1e6}
# A voltage slot whose robust amplitude (99th percentile of |x - median|, in µV) lies outside this
# range is mislabelled (e.g. an EEG in V written as 'uV', or an ECG in mV written as 'uV').
PLAUSIBLE_UV = (2.0, 1e5)
PLAUSIBLE_RUNS = 64                     # check_plausible's contiguous runs over a long signal
SPO2_RANGE = (50.0, 100.0)    # clean-up: values outside are sensor drop-outs (optional, off in the paper)
# Lowest rate (Hz) at which an electrode slot still carries what staging reads; below it the channel is not present.
# Not 2 × 30 Hz (the band-pass's top): SHHS-1 records EOG at 50 Hz and the published model was trained on it
# (docs/formats.md §2). At 50 Hz the 0.3-25 Hz part of the band survives: all of the EOG's and nearly all of the
# EEG's staging content (alpha, spindles, K-complexes, delta); below it, e.g. Sleep-EDF's 1-Hz chin-EMG
# envelope, the channel is a different quantity under the same name.
MIN_FS = {"EOG": 50.0, "EMG": 50.0, "EEG": 50.0}
# A signal with more NaN (non-finite) samples than this share is unusable, like an all-NaN one: EDF+D gaps and an
# array's NaNs up to it are interpolated (and counted), beyond it most of the slot would be straight lines.
MAX_NAN_SHARE = 0.5
# An electrode slot (MAINS_SLOTS) whose raw power above 0.3 Hz lies for more than MAINS_SHARE within ±MAINS_HALF_WIDTH_HZ
# of 50 or 60 Hz and their harmonics carries mains hum only (an electrode off or unplugged): a warning, computed on
# MAINS_SEGMENTS segments of MAINS_SEGMENT_S spread over the night (cheap on an 8-h night at 512 Hz).
MAINS_SLOTS = ("EOG", "EMG", "EEG")
MAINS_HZ = (50.0, 60.0)
MAINS_SHARE = 0.9
MAINS_HALF_WIDTH_HZ = 1.0
MAINS_SEGMENTS = 16
MAINS_SEGMENT_S = 4.0


class SlotError(ValueError):
    """A slot that cannot be used (missing, flat, wrong units). Fatal for a required slot only."""


def filters_description(zero_phase: bool = False) -> dict:
    """What the night store records in attrs['filters'] (the data version)."""
    return {
        "butterworth_order": BUTTER_ORDER,
        "butterworth_pass": "sosfiltfilt (zero-phase)" if zero_phase else "sosfilt (causal, single pass)",
        "bands_hz": {slot: [btype, list(cut) if isinstance(cut, tuple) else cut] for slot, (btype, cut) in BAND.items()},
        "median_kernel": MEDIAN_KERNEL,
        "resample": "scipy.signal.resample_poly to 125 Hz (below 125 Hz before filtering, otherwise after)",
        "voltage_units": "uV",
    }


# ---------------------------------------------------------------------------------------------
# channel resolution

def normalise(label: str) -> str:
    """Labels match case-insensitively, ignoring spaces, '_' and '-' ('L Chin' = 'L_Chin' = 'LChin')."""
    return "".join(ch for ch in label.strip().lower() if ch not in " _-")


def _find(labels: list[str], spellings) -> str | None:
    wanted = [spellings] if isinstance(spellings, str) else list(spellings)
    by_norm = {}
    for label in labels:
        by_norm.setdefault(normalise(label), label)
    for spelling in wanted:
        if normalise(spelling) in by_norm:
            return by_norm[normalise(spelling)]
    return None


def resolve(labels: list[str], table: dict, channel_map: dict | None = None) -> dict[str, tuple[str, str | None] | None]:
    """Pick, per slot, the EDF label (or the pair of labels of a derivation) to use.

    `table[slot]` is a preference list; each candidate is a label (str), a tuple of spellings of
    one label, or a derivation `(left, right)` given as a 2-list of labels-or-spelling-tuples,
    written `["C4", ("A1", "M1")]`. `channel_map` (from --channels map.yaml) overrides slots: a
    label that exists verbatim wins, else 'A - B' is a derivation, and None marks a slot absent.
    Returns slot -> (left_label, right_label or None), or None when the slot is absent.
    """
    chosen = {}
    channel_map = channel_map or {}
    for slot in SLOTS:
        if slot in channel_map:
            chosen[slot] = _from_map(labels, slot, channel_map[slot])
            continue
        chosen[slot] = None
        for candidate in table.get(slot, []):
            if isinstance(candidate, list):   # derivation
                left, right = _find(labels, candidate[0]), _find(labels, candidate[1])
                if left and right:
                    chosen[slot] = (left, right)
                    break
            elif (label := _find(labels, candidate)) is not None:
                chosen[slot] = (label, None)
                break
    return chosen


def _from_map(labels: list[str], slot: str, spec) -> tuple[str, str | None] | None:
    if spec is None:
        return None
    spec = str(spec)
    if (label := _find(labels, spec)) is not None:
        return (label, None)
    if " - " in spec:
        left_name, right_name = (part.strip() for part in spec.split(" - ", 1))
        left, right = _find(labels, left_name), _find(labels, right_name)
        missing = [n for n, found in ((left_name, left), (right_name, right)) if found is None]
        if not missing:
            return (left, right)
        raise SlotError(f"slot {slot}: --channels names {spec!r} but the EDF has no {', '.join(map(repr, missing))}")
    raise SlotError(f"slot {slot}: --channels names {spec!r}, which is not an EDF label (derivations are 'A - B')")


def describe(source: tuple[str, str | None] | None) -> str | None:
    if source is None:
        return None
    left, right = source
    return left if right is None else f"{left} - {right}"


# ---------------------------------------------------------------------------------------------
# one channel: units → NaN/flat checks → (resample) → median → Butterworth → (resample)

def check_source(sig, slot: str) -> None:
    """A signal (prepare.edf.EdfSignalHeader) that cannot carry `slot`: too slow for its band, or an empty or
    inverted digital range / empty physical range (the gain would be infinite or a guess)."""
    check_rate(sig.fs, slot, sig.label)
    if sig.dig_min >= sig.dig_max:
        raise SlotError(f"slot {slot}: signal {sig.label!r} has digital minimum {sig.dig_min} >= digital maximum "
                        f"{sig.dig_max}")
    if sig.phys_min == sig.phys_max:
        raise SlotError(f"slot {slot}: signal {sig.label!r} has physical minimum = physical maximum ({sig.phys_min:g})")


def check_rate(fs: float, slot: str, label: str) -> None:
    """An electrode slot sampled too slowly for its band (MIN_FS) cannot carry it: an EDF's signal or an array."""
    if fs < MIN_FS.get(slot, 0.0):
        raise SlotError(f"slot {slot}: signal {label!r} is sampled at {fs:g} Hz, below the "
                        f"{MIN_FS[slot]:g} Hz its {BAND[slot][1][0]:g}-{BAND[slot][1][1]:g} Hz band needs")


def mains_hum(signal: np.ndarray, fs: float) -> tuple[float, float] | None:
    """(mains frequency, its share of the power above 0.3 Hz) when a raw signal is mains hum only: more than
    MAINS_SHARE of that power within ±MAINS_HALF_WIDTH_HZ of 50 or 60 Hz and their harmonics up to Nyquist; else
    None. Periodograms (Hann) of MAINS_SEGMENTS segments of MAINS_SEGMENT_S spread evenly over the night, averaged:
    a few thousand samples whatever the night's length. A rate that cannot show 50 Hz, or a night shorter than one
    segment, is not judged."""
    n = int(fs * MAINS_SEGMENT_S)
    if len(signal) < n or fs / 2 < MAINS_HZ[0] - MAINS_HALF_WIDTH_HZ:
        return None
    starts = np.linspace(0, len(signal) - n, min(MAINS_SEGMENTS, len(signal) // n)).astype(int)
    freqs, power = scipy.signal.periodogram(np.stack([signal[s:s + n] for s in starts]), fs, window="hann",
                                            detrend="linear", axis=-1)
    power = power.mean(axis=0)
    band = freqs >= 0.3
    total = power[band].sum()
    if not total > 0:
        return None
    shares = {}
    for mains in MAINS_HZ:
        harmonics = np.arange(mains, fs / 2 + MAINS_HALF_WIDTH_HZ, mains)
        near = band & (np.abs(freqs[:, None] - harmonics[None, :]) <= MAINS_HALF_WIDTH_HZ).any(axis=1)
        shares[mains] = float(power[near].sum() / total) if len(harmonics) else 0.0
    mains = max(shares, key=shares.get)
    return (mains, shares[mains]) if shares[mains] > MAINS_SHARE else None


def microvolt_factor(dimension: str, slot: str, label: str) -> float:
    key = dimension.strip().lower().replace(" ", "")
    if key not in MICROVOLTS_PER:
        raise SlotError(f"slot {slot}: signal {label!r} has physical dimension {dimension!r}, not a voltage "
                        f"(nV, uV, mV, V)")
    return MICROVOLTS_PER[key]


def check_plausible(signal: np.ndarray, slot: str, label: str) -> None:
    """Catch wrong units that the header does not admit to (V written as 'uV' and the like). On a long signal the
    amplitude is taken over PLAUSIBLE_RUNS contiguous runs spread over it, 1/16 of its samples (a night's 99th
    percentile moves far less than the unit factors this tells apart, 1000; contiguous, as a stride could alias)."""
    if slot in VOLTAGE_SLOTS:
        run = len(signal) // (16 * PLAUSIBLE_RUNS)
        sample = signal if run < 125 else np.concatenate(
            [signal[first:first + run] for first in np.linspace(0, len(signal) - run, PLAUSIBLE_RUNS).astype(int)])
        amplitude = np.percentile(np.abs(sample - np.median(sample)), 99)
        low, high = PLAUSIBLE_UV
        if not low <= amplitude <= high:
            raise SlotError(f"slot {slot}: signal {label!r} has amplitude {amplitude:.3g} uV after unit conversion, "
                            f"outside {low:g}..{high:g} uV: wrong physical dimension?")
    elif slot == "SPO2":
        median = float(np.median(signal))
        if not 1.0 < median <= 100.5:
            raise SlotError(f"slot SPO2: signal {label!r} has median {median:.3g}, not a percentage (fraction 0..1?)")


def fill_nans(signal: np.ndarray, slot: str, label: str) -> tuple[np.ndarray, int]:
    """Linear interpolation over NaNs (edges held); an all-NaN, mostly-NaN (more than MAX_NAN_SHARE) or flat
    signal is unusable: interpolating most of a night would stage straight lines."""
    bad = ~np.isfinite(signal)
    n_bad = int(bad.sum())
    if n_bad == len(signal):
        raise SlotError(f"slot {slot}: signal {label!r} is all NaN")
    if n_bad > MAX_NAN_SHARE * len(signal):
        raise SlotError(f"slot {slot}: signal {label!r} is {n_bad / len(signal):.0%} NaN ({n_bad} of {len(signal)} "
                        f"samples), more than the {MAX_NAN_SHARE:.0%} that is interpolated")
    if n_bad:
        index = np.arange(len(signal))
        signal = signal.copy()
        signal[bad] = np.interp(index[bad], index[~bad], signal[~bad])
    if np.ptp(signal) == 0:
        raise SlotError(f"slot {slot}: signal {label!r} is flat (constant {signal[0]:g})")
    return signal, n_bad


def clean_spo2(signal: np.ndarray) -> tuple[np.ndarray, int]:
    """Optional (--clean-spo2): values outside 50-100 % are drop-outs, interpolated linearly."""
    low, high = SPO2_RANGE
    bad = (signal < low) | (signal > high)
    if bad.all() or not bad.any():
        return signal, 0
    signal = signal.copy()
    index = np.arange(len(signal))
    signal[bad] = np.interp(index[bad], index[~bad], signal[~bad])
    return signal, int(bad.sum())


def median3(signal: np.ndarray) -> np.ndarray:
    """3-sample running median with edge samples repeated (= scipy.ndimage.median_filter(x, 3,
    mode='nearest')), written with min/max so that it runs at memory speed on 512-Hz nights."""
    padded = np.concatenate([signal[:1], signal, signal[-1:]])
    a, b, c = padded[:-2], padded[1:-1], padded[2:]
    return np.maximum(np.minimum(a, b), np.minimum(np.maximum(a, b), c))


def butterworth(signal: np.ndarray, slot: str, fs: float, zero_phase: bool = False) -> np.ndarray:
    btype, cut = BAND[slot]   # always applied at >= 125 Hz, so 40 Hz is below Nyquist
    sos = scipy.signal.butter(BUTTER_ORDER, cut, btype, fs=fs, output="sos")
    if zero_phase:
        return scipy.signal.sosfiltfilt(sos, signal)
    return scipy.signal.sosfilt(sos, signal)


def resample(signal: np.ndarray, fs_in: float, fs_out: int = FS) -> np.ndarray:
    if fs_in == fs_out:
        return signal
    ratio = Fraction(fs_out) / Fraction(fs_in).limit_denominator(10_000)
    return scipy.signal.resample_poly(signal, ratio.numerator, ratio.denominator)


def condition(signal: np.ndarray, fs: float, slot: str, zero_phase: bool = False) -> np.ndarray:
    """Median + Butterworth + resampling in the paper's order; returns float64 at 125 Hz."""
    if fs < FS:
        return butterworth(median3(resample(signal, fs)), slot, FS, zero_phase)
    return resample(butterworth(median3(signal), slot, fs, zero_phase), fs)


@dataclass
class SlotSignal:
    """One resolved slot, read from the EDF but not yet filtered."""
    values: np.ndarray      # float64, native rate, µV for voltage slots
    fs: float
    label: str              # 'C4' or 'C4 - A1'
    unit: str               # of `values`: 'uV' for voltage slots
    nan_samples: int = 0
    source_unit: str = ""   # what the source declared before conversion (EDF physical dimension, or an array's unit)
