"""Synthetic polysomnography nights written in each dataset's native NSRR layout.

This is NOT a stand-in for real data. It exists so that the tests, the demo (`make demo`) and the
benchmarks can exercise the whole pipeline (EDF + annotation reading, channel derivation, unit
conversion, filtering, night stores, training, evaluation) without access to NSRR. The physiology is
a caricature chosen to be learnable (alpha in wake, theta in N1, spindles and K-complexes in N2,
high-amplitude delta in N3, rapid eye movements and atonia in REM, stage-dependent heart rate and
breathing, SpO2 dips); a model that scores these nights well says nothing about real sleep.

    python -m prepare.synthetic shhs /tmp/synth --nights 4 --hours 1 --seed 0

writes `polysomnography/...` exactly where a real NSRR download keeps it (FORMATS.md §1-3), so
`python -m prepare shhs /tmp/synth OUT` reads it like the real thing. For every night the true stage
per full 30-s epoch of the EDF (0=W 1=N1 2=N2 3=N3 4=REM, -1 = movement/unscored) is written to
`OUTDIR/.truth/<night_id>.npy` (night_id = the EDF file name without `.edf`).

Everything is drawn from seeded numpy Generators (one per subject, one per night) and the EDF header
fields are fixed, so the same arguments give byte-identical files.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyedflib
from scipy import signal as sps

SLOTS = ("ECG", "EOG", "EMG", "EEG", "SPO2", "THOR", "ABDO")
DATASETS = ("shhs", "mesa", "mros", "apples", "wsc", "edf")
W, N1, N2, N3, REM = 0, 1, 2, 3, 4
MOVEMENT = -1            # in a physiological stage sequence: wake with a body-movement artefact
EPOCH_S = 30

# ---------------------------------------------------------------------------------------------
# Stage sequence
# ---------------------------------------------------------------------------------------------


def stage_sequence(n_epochs: int, rng: np.random.Generator) -> np.ndarray:
    """A plausible night of `n_epochs` 30-s epochs (int8, 0=W 1=N1 2=N2 3=N3 4=REM).

    Wake until sleep onset (5-30 min), ~90-min cycles N1 -> N2 -> N3 -> N2 -> REM with N3 mostly in
    the early cycles and REM growing towards morning, brief awakenings, final wake. Nights shorter
    than 2 h get proportionally shorter latency and cycles so that every stage still appears.
    """
    if n_epochs <= 0:
        return np.zeros(0, np.int8)
    scale = min(1.0, n_epochs / 240)
    latency = max(1, round(rng.uniform(10, 60) * scale))
    final = max(1, round(rng.uniform(4, 20) * scale))
    sleep = n_epochs - latency - final
    if sleep < 12:   # too short for a cycle: one pass through every stage
        order = np.array([W, N1, N2, N3, N2, REM, W])
        return order[np.arange(n_epochs) * len(order) // n_epochs].astype(np.int8)

    n_cycles = max(1, round(sleep / (180 * scale)))
    weights = rng.uniform(0.85, 1.15, n_cycles)
    bounds = np.round(np.cumsum(weights) / weights.sum() * sleep).astype(int)
    lengths = np.diff(np.concatenate([[0], bounds]))
    parts = [np.full(latency, W)]
    for c, length in enumerate(lengths):
        parts.append(_cycle(length, c / (n_cycles - 1) if n_cycles > 1 else 0.0, c == 0, rng))
    parts.append(np.full(final, W))
    night = np.concatenate(parts).astype(np.int8)

    woken = _add_awakenings(night, latency, final, rng)
    # An awakening must not erase the only run of a stage (short nights): keep the plain night then.
    return woken if len(np.unique(woken)) >= len(np.unique(night)) else night


def _cycle(length: int, late: float, first: bool, rng) -> np.ndarray:
    """One NREM-REM cycle; `late` runs from 0 (first cycle) to 1 (last): less N3, more REM."""
    n1 = max(1, round(length * (0.08 if first else 0.03) * rng.uniform(0.6, 1.4)))
    n3 = round(length * 0.40 * (1 - late) ** 1.5 * rng.uniform(0.8, 1.2))
    if first:
        n3 = max(n3, 3)
    rem = max(2, round(length * (0.10 + 0.25 * late) * rng.uniform(0.8, 1.2)))
    n2 = length - n1 - n3 - rem
    if n2 < 2:   # tiny cycle: take the room from N3 first, then from REM
        take = min(2 - n2, max(0, n3 - 1))
        n3, n2 = n3 - take, n2 + take
        take = min(2 - n2, max(0, rem - 1))
        rem, n2 = rem - take, n2 + take
    n2a = round(n2 * rng.uniform(0.5, 0.7))
    deep = np.full(n3, N3)
    deep[rng.random(n3) < 0.06] = N2          # brief lightenings inside slow-wave sleep
    return np.concatenate([np.full(n1, N1), np.full(n2a, N2), deep, np.full(n2 - n2a, N2), np.full(rem, REM)])


def _add_awakenings(night: np.ndarray, latency: int, final: int, rng) -> np.ndarray:
    """Brief awakenings (1-3 epochs of W, then one of N1) out of N2 or REM."""
    night = night.copy()
    lo, hi = latency + 5, len(night) - final - 4
    if hi <= lo:
        return night
    for at in rng.integers(lo, hi, rng.poisson((hi - lo) / 100)):
        if night[at] in (N2, REM):
            n_wake = int(rng.integers(1, 4))
            night[at:at + n_wake] = W
            night[at + n_wake] = N1
    return night


# ---------------------------------------------------------------------------------------------
# Physiology tables (index = stage W, N1, N2, N3, REM). Amplitudes are standard deviations in µV.
# ---------------------------------------------------------------------------------------------

EEG_BACKGROUND = np.array([7.0, 8.0, 9.0, 10.0, 7.0])
EEG_ALPHA = np.array([16.0, 3.5, 1.5, 1.0, 2.5])
EEG_THETA = np.array([3.0, 10.0, 6.0, 5.0, 9.0])
EEG_DELTA = np.array([3.0, 5.0, 12.0, 38.0, 4.5])
SPINDLES_PER_MIN = np.array([0.0, 0.2, 5.0, 1.5, 0.0])
KCOMPLEX_PER_MIN = np.array([0.0, 0.3, 1.6, 0.3, 0.0])
SAWTOOTH_PER_MIN = np.array([0.0, 0.0, 0.0, 0.0, 1.5])
EOG_SLOW = np.array([5.0, 40.0, 8.0, 2.0, 4.0])          # slow rolling eye movements
BLINKS_PER_MIN = np.array([12.0, 1.0, 0.0, 0.0, 0.0])
SACCADES_PER_MIN = np.array([15.0, 1.0, 0.0, 0.0, 25.0])  # REM: rapid eye movements, in bursts
EMG_TONE = np.array([16.0, 7.5, 5.5, 5.0, 2.2])         # REM: see Profile.atonia
TWITCHES_PER_MIN = np.array([0.0, 0.0, 0.0, 0.0, 6.0])
HEART_RATE = np.array([70.0, 64.0, 60.0, 55.0, 63.0])     # bpm, before the subject's offset
HEART_RATE_WANDER = np.array([3.0, 2.0, 1.5, 1.0, 5.0])   # REM: variable
BREATHS_PER_MIN = np.array([15.0, 14.0, 13.5, 13.0, 15.0])
BREATH_IRREGULARITY = np.array([0.10, 0.06, 0.04, 0.015, 0.18])
BREATH_DEPTH = np.array([1.0, 0.9, 0.9, 1.0, 0.8])
BREATH_DEPTH_WANDER = np.array([0.25, 0.15, 0.10, 0.04, 0.30])
DESATS_PER_MIN = np.array([0.03, 0.2, 0.15, 0.05, 0.5])   # more (and deeper) in REM
AROUSALS_PER_MIN = np.array([0.0, 0.1, 0.15, 0.05, 0.1])  # spontaneous, inside sleep epochs

SLOW_FS = 10   # grid for slowly varying quantities (heart rate, breathing phase)


@dataclass(frozen=True)
class Profile:
    """What differs between subjects (shared by a subject's visits)."""
    eeg_gain: float      # amplitude scale of all EEG activity
    alpha_hz: float      # individual alpha frequency
    noise_uv: float      # electrode/amplifier noise
    emg_gain: float
    hr_offset: float     # bpm added to the stage heart rate
    ecg_mv: float        # R-wave amplitude
    resp_offset: float   # breaths/min added to the stage rate
    belt_gain: float     # effort belts, arbitrary units
    spo2_base: float     # awake saturation, %
    spindle_density: float   # relative to SPINDLES_PER_MIN
    slow_waves: float    # N3 delta relative to EEG_DELTA (declines with age)
    alpha: float         # wake alpha relative to EEG_ALPHA (some people have little)
    atonia: float        # REM chin tone as a fraction of N2 tone


def draw_profile(rng: np.random.Generator) -> Profile:
    return Profile(
        eeg_gain=rng.uniform(0.75, 1.3), alpha_hz=rng.uniform(8.5, 11.5), noise_uv=rng.uniform(1.5, 5.0),
        emg_gain=rng.uniform(0.6, 1.5), hr_offset=float(np.clip(rng.normal(0, 4), -8, 8)),
        ecg_mv=rng.uniform(0.7, 1.4),
        resp_offset=rng.uniform(-1.5, 2.0), belt_gain=rng.uniform(0.3, 0.6), spo2_base=rng.uniform(95.0, 97.5),
        spindle_density=rng.uniform(0.5, 1.2), slow_waves=rng.uniform(0.55, 1.1), alpha=rng.uniform(0.6, 1.2),
        atonia=rng.uniform(0.3, 0.65))


# ---------------------------------------------------------------------------------------------
# Signal helpers
# ---------------------------------------------------------------------------------------------


def _unit(x: np.ndarray) -> np.ndarray:
    return x / (x.std() + 1e-12)


def _band_noise(rng, n: int, fs: float, lo: float, hi: float) -> np.ndarray:
    """Unit-variance noise band-limited to [lo, hi] Hz (hi is capped below Nyquist)."""
    hi = min(hi, 0.45 * fs)
    sos = sps.butter(2, [lo, hi], "bandpass", fs=fs, output="sos")
    return _unit(sps.sosfilt(sos, rng.standard_normal(n)))


def _lowpass_noise(rng, n: int, fs: float, fc: float) -> np.ndarray:
    """Unit-variance first-order low-pass noise (a 1/f^2 spectrum above fc)."""
    a = np.exp(-2 * np.pi * fc / fs)
    return _unit(sps.lfilter([1 - a], [1, -a], rng.standard_normal(n)))


def _smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` samples with edge padding (keeps the length)."""
    if width <= 1:
        return x
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    c = np.cumsum(np.concatenate([[0.0], padded]))
    return (c[width:] - c[:-width]) / width


def _place(x: np.ndarray, onsets: np.ndarray, waves: np.ndarray) -> None:
    """Add waveforms waves[k] (all of one length) into x starting at sample onsets[k]."""
    if len(onsets) == 0:
        return
    idx = onsets[:, None] + np.arange(waves.shape[1])[None, :]
    keep = idx < len(x)
    np.add.at(x, idx[keep], waves[keep])


class _Night:
    """Per-second bookkeeping for one night: which stage, envelopes, event onsets."""

    def __init__(self, stages: np.ndarray, duration_s: int, rng, profile: Profile):
        n_ep = -(-duration_s // EPOCH_S)
        stages = np.asarray(stages, int)
        if len(stages) < n_ep:   # a trailing partial epoch continues the last stage
            stages = np.concatenate([stages, np.full(n_ep - len(stages), stages[-1] if len(stages) else W)])
        self.rng, self.profile, self.n_sec = rng, profile, duration_s
        self.moving_ep = stages[:n_ep] == MOVEMENT
        self.stage_ep = np.where(self.moving_ep, W, stages[:n_ep])
        self.epoch_sec = np.arange(duration_s) // EPOCH_S
        self.stage_sec = self._shifted_stages()
        self.arousal_sec = np.zeros(duration_s)
        self.movement_sec = self._movement_mask()
        self.events: list[dict] = []

    def _shifted_stages(self) -> np.ndarray:
        """Stage per second. The body does not change state on the scorer's 30-s grid: each stage
        change happens up to 7 s before or after the epoch boundary, so that even a one-epoch run
        keeps the majority of its epoch (the scorer labels an epoch by its majority)."""
        sec = np.repeat(self.stage_ep, EPOCH_S)[:self.n_sec]
        for b in np.flatnonzero(np.diff(self.stage_ep)) + 1:
            shift = int(self.rng.integers(-7, 8))
            lo, hi = sorted((b * EPOCH_S, b * EPOCH_S + shift))
            sec[lo:hi] = self.stage_ep[b] if shift < 0 else self.stage_ep[b - 1]
        return sec

    def envelope(self, table, jitter: float = 0.35, smooth_s: int = 6, factor=None) -> np.ndarray:
        """Per-second amplitude from a per-stage table, varying per epoch (times an optional per-epoch
        factor for seconds in the epoch's own stage), with soft transitions."""
        per_epoch = self.rng.lognormal(0, jitter, len(self.stage_ep))
        x = np.asarray(table, float)[self.stage_sec] * per_epoch[self.epoch_sec]
        if factor is not None:
            own = self.stage_sec == self.stage_ep[self.epoch_sec]
            x = np.where(own, x * np.asarray(factor)[self.epoch_sec], x)
        return _smooth(x, smooth_s)

    def drift(self, depth: float) -> np.ndarray:
        """Slow multiplicative drift over the night (electrode impedance, posture): per second."""
        return np.exp(depth * _lowpass_noise(self.rng, self.n_sec, 1.0, 1 / 1800))

    def onsets(self, per_min, burstiness: float = 0.0, margin_s: float = 0.0) -> np.ndarray:
        """Event times (s): Poisson at the current stage's rate; burstiness > 0 clusters them in
        some epochs (e.g. phasic REM) and leaves others quiet."""
        lam = np.asarray(per_min, float)[self.stage_sec] / 60
        if burstiness > 0:
            lam = lam * self.rng.gamma(1 / burstiness, burstiness, len(self.stage_ep))[self.epoch_sec]
        counts = self.rng.poisson(lam)
        t = np.repeat(np.arange(len(lam)), counts) + self.rng.random(counts.sum())
        return t[t < self.n_sec - margin_s]

    def at_rate(self, per_second: np.ndarray, fs: int) -> np.ndarray:
        return np.repeat(per_second, fs)

    def _movement_mask(self) -> np.ndarray:
        """Body movements: most of every movement epoch, plus short bursts in a few wake epochs."""
        mask = np.zeros(self.n_sec)
        wake = np.flatnonzero((self.stage_ep == W) & ~self.moving_ep)
        bursts = wake[self.rng.random(len(wake)) < 0.04]
        for ep, length in [(e, self.rng.integers(15, 30)) for e in np.flatnonzero(self.moving_ep)] + \
                          [(e, self.rng.integers(3, 10)) for e in bursts]:
            start = ep * EPOCH_S + int(self.rng.integers(0, EPOCH_S - length + 1))
            mask[start:start + length] = 1.0
        return _smooth(mask, 2)[:self.n_sec]

    def add_movement(self, x: np.ndarray, fs: int, amp: float) -> None:
        """Broadband high-amplitude artefact plus a slow swing where the movement mask is on."""
        m = self.at_rate(self.movement_sec, fs)
        idx = np.flatnonzero(m)
        if len(idx):
            swing = np.sin(2 * np.pi * 0.7 * idx / fs + self.rng.uniform(0, 2 * np.pi))
            x[idx] += m[idx] * amp * (self.rng.standard_normal(len(idx)) + 1.5 * swing)

    def add_pops(self, x: np.ndarray, fs: int, per_hour: float = 1.0) -> None:
        """Electrode pops: a sudden step that decays over a few hundred ms."""
        t = self.rng.random(self.rng.poisson(per_hour * self.n_sec / 3600)) * max(self.n_sec - 1, 0)
        tau = self.rng.uniform(0.1, 0.4, len(t))[:, None]
        amp = self.rng.choice([-1, 1], len(t))[:, None] * self.rng.uniform(150, 400, len(t))[:, None]
        rel = np.arange(int(fs * 1.5))[None, :] / fs
        _place(x, (t * fs).astype(int), amp * np.exp(-rel / tau))


# ---------------------------------------------------------------------------------------------
# Physiology per slot
# ---------------------------------------------------------------------------------------------


def _eeg(night: _Night, fs: int) -> tuple[np.ndarray, np.ndarray]:
    """EEG in µV and its slow part (delta + K-complexes, which leak into the EOG)."""
    rng, p, n = night.rng, night.profile, night.n_sec * fs

    def env(table, **kw):
        return night.at_rate(night.envelope(table, **kw), fs)

    # Alpha: a third of wake epochs are eyes-open (little alpha); drowsy N1 keeps a variable amount.
    factor = np.ones(len(night.stage_ep))
    wake, drowsy = night.stage_ep == W, night.stage_ep == N1
    factor[wake] = np.where(rng.random(wake.sum()) < 0.3, 0.25, 1.0)
    factor[drowsy] = rng.uniform(0.4, 1.8, drowsy.sum())
    alpha = EEG_ALPHA * np.array([p.alpha, 1, 1, 1, 1])
    alpha_env = night.envelope(alpha, factor=factor) + alpha[W] * 0.8 * night.arousal_sec
    background = (0.8 * _lowpass_noise(rng, n, fs, 1.5) + 0.5 * _lowpass_noise(rng, n, fs, 12.0))
    x = env(EEG_BACKGROUND, jitter=0.1) * background
    x += night.at_rate(alpha_env, fs) * _band_noise(rng, n, fs, p.alpha_hz - 1, p.alpha_hz + 1)
    x += env(EEG_THETA) * _band_noise(rng, n, fs, 4, 7)
    # Slow waves build up and fade over about a minute, so N2 next to N3 already carries some delta.
    delta = EEG_DELTA * np.array([1, 1, 1, p.slow_waves, 1])
    slow = env(delta, jitter=0.2, smooth_s=60) * _band_noise(rng, n, fs, 0.5, 2.0)

    # Sleep spindles: 11-15 Hz, 0.5-2 s, waxing and waning.
    t0 = night.onsets(SPINDLES_PER_MIN * p.spindle_density, margin_s=2)
    rel = np.arange(2 * fs)[None, :] / fs
    dur = rng.uniform(0.5, 2.0, len(t0))[:, None]
    shape = np.where(rel < dur, np.sin(np.pi * rel / dur) ** 2, 0.0)
    _place(x, (t0 * fs).astype(int), rng.uniform(20, 40, len(t0))[:, None] * shape *
           np.sin(2 * np.pi * rng.uniform(11, 15, len(t0))[:, None] * rel + rng.uniform(0, 6.3, len(t0))[:, None]))

    # K-complexes: a sharp negative wave followed by a slower positive one (~150-250 µV peak to peak).
    t0 = night.onsets(KCOMPLEX_PER_MIN, margin_s=2)
    rel = np.arange(int(1.5 * fs))[None, :] / fs
    kc = -np.exp(-((rel - 0.25) / 0.07) ** 2) + 0.55 * np.exp(-((rel - 0.6) / 0.16) ** 2)
    _place(slow, (t0 * fs).astype(int), rng.uniform(100, 160, len(t0))[:, None] * kc)

    # REM sawtooth waves: 2-5 Hz bursts lasting 2-4 s.
    t0 = night.onsets(SAWTOOTH_PER_MIN, margin_s=4)
    rel = np.arange(4 * fs)[None, :] / fs
    dur = rng.uniform(2, 4, len(t0))[:, None]
    shape = np.where(rel < dur, np.sin(np.pi * rel / dur), 0.0)
    _place(x, (t0 * fs).astype(int), rng.uniform(20, 40, len(t0))[:, None] * shape *
           sps.sawtooth(2 * np.pi * rng.uniform(2, 5, len(t0))[:, None] * rel, 0.85))

    gain = p.eeg_gain * night.at_rate(night.drift(0.15), fs)
    x = gain * (x + slow)
    slow = gain * slow
    x += p.noise_uv * rng.standard_normal(n)
    night.add_movement(x, fs, 60)
    night.add_pops(x, fs)
    return x, slow


def _eeg_other(night: _Night, eeg: np.ndarray, fs: int, similarity: float) -> np.ndarray:
    """Another EEG derivation: mostly the same brain activity plus its own background and noise."""
    n = len(eeg)
    x = similarity * eeg + 6.0 * _lowpass_noise(night.rng, n, fs, 4.0)
    x += night.profile.noise_uv * night.rng.standard_normal(n)
    night.add_pops(x, fs, 0.5)
    return x


def _eog(night: _Night, fs: int, leak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right EOG (µV). Horizontal movements are mirror images, blinks are in phase."""
    rng, n = night.rng, night.n_sec * fs
    eye = night.at_rate(night.envelope(EOG_SLOW, smooth_s=10), fs) * _band_noise(rng, n, fs, 0.15, 0.6)

    # Saccades (wake) and rapid eye movements (REM, clustered): fast rise, then the amplifier's
    # high-pass lets the deflection decay.
    t0 = night.onsets(SACCADES_PER_MIN, burstiness=1.5, margin_s=3)
    rel = np.arange(3 * fs)[None, :] / fs
    step = (1 - np.exp(-rel / 0.02)) * np.exp(-rel / 0.8)
    amp = rng.choice([-1, 1], len(t0))[:, None] * rng.uniform(60, 200, len(t0))[:, None]
    _place(eye, (t0 * fs).astype(int), amp * step)

    blinks = np.zeros(n)
    t0 = night.onsets(BLINKS_PER_MIN, margin_s=1)
    rel = np.arange(int(0.5 * fs))[None, :] / fs
    _place(blinks, (t0 * fs).astype(int), rng.uniform(80, 200, len(t0))[:, None] * np.exp(-((rel - 0.2) / 0.06) ** 2))

    sides = []
    for sign in (1, -1):
        x = sign * eye + blinks + 0.3 * leak + night.profile.noise_uv * rng.standard_normal(n)
        night.add_movement(x, fs, 100)
        night.add_pops(x, fs, 0.5)
        sides.append(x)
    return sides[0], sides[1]


def _emg(night: _Night, fs: int) -> np.ndarray:
    """Chin EMG (µV): broadband muscle noise; tone falls from W to NREM, REM atonia with twitches."""
    rng, n = night.rng, night.n_sec * fs
    relaxed = np.where(night.stage_ep == W, rng.uniform(0.4, 1.1, len(night.stage_ep)), 1.0)   # quiet wake
    table = np.concatenate([EMG_TONE[:REM], [EMG_TONE[N2] * night.profile.atonia]])
    tone = night.envelope(table, factor=relaxed) + 0.8 * EMG_TONE[W] * night.arousal_sec
    tone *= night.profile.emg_gain * night.drift(0.25)
    x = night.at_rate(tone, fs) * _band_noise(rng, n, fs, 10, 100)
    t0 = night.onsets(TWITCHES_PER_MIN, burstiness=1.0, margin_s=1)
    length = max(2, int(0.25 * fs))
    _place(x, (t0 * fs).astype(int), rng.uniform(10, 30, len(t0))[:, None] * np.hanning(length)[None, :] *
           rng.standard_normal((len(t0), length)))
    x += 0.5 * rng.standard_normal(n)
    night.add_movement(x, fs, 60)
    night.add_pops(x, fs, 0.5)
    return x


def _ecg_template(size: int = 2048) -> np.ndarray:
    """One heart beat as a function of cardiac phase in [0, 1): P, Q, R (1.0 at 0.25), S, T."""
    ph = np.arange(size) / size
    waves = [(0.12, 0.10, 0.025), (-0.10, 0.235, 0.008), (1.0, 0.25, 0.010), (-0.25, 0.266, 0.010), (0.30, 0.50, 0.045)]
    return sum(a * np.exp(-0.5 * ((ph - mu) / sd) ** 2) for a, mu, sd in waves)


def _heart_rate(night: _Night, resp_phase: np.ndarray) -> np.ndarray:
    """Heart rate (bpm) on the SLOW_FS grid: stage level, slow wander, arousal surges, sinus arrhythmia."""
    rng, n = night.rng, night.n_sec * SLOW_FS
    level = night.envelope(HEART_RATE, jitter=0.03, smooth_s=20) + 10 * night.arousal_sec
    wander = night.envelope(HEART_RATE_WANDER, jitter=0.1, smooth_s=20)
    hr = night.at_rate(level + night.profile.hr_offset, SLOW_FS)
    hr += night.at_rate(wander, SLOW_FS) * _lowpass_noise(rng, n, SLOW_FS, 0.03)
    hr += 2.5 * np.sin(resp_phase)
    return np.clip(hr, 40, 120)


def _ecg(night: _Night, fs: int, hr: np.ndarray, resp_phase: np.ndarray) -> np.ndarray:
    """ECG (µV): a beat template read at the running cardiac phase, so the rate follows hr exactly."""
    rng, n = night.rng, night.n_sec * fs
    t, t_slow = np.arange(n) / fs, np.arange(len(hr)) / SLOW_FS
    phase = rng.random() + np.cumsum(np.interp(t, t_slow, hr)) / (60 * fs)
    template = _ecg_template()
    x = 1000 * night.profile.ecg_mv * template[((phase % 1) * len(template)).astype(int)]
    x += 40 * np.sin(np.interp(t, t_slow, resp_phase))                    # respiratory baseline wander
    x += 8 * rng.standard_normal(n)
    night.add_movement(x, fs, 150)
    return x


def _breathing(night: _Night) -> tuple[np.ndarray, np.ndarray]:
    """Breathing phase (rad) and depth on the SLOW_FS grid; hypopneas (from night.events) flatten it."""
    rng, n = night.rng, night.n_sec * SLOW_FS
    rate = night.at_rate(night.envelope(BREATHS_PER_MIN, jitter=0.05, smooth_s=30) + night.profile.resp_offset, SLOW_FS)
    irregular = night.at_rate(night.envelope(BREATH_IRREGULARITY, jitter=0.2, smooth_s=30), SLOW_FS)
    rate = rate * (1 + 1.5 * irregular * _lowpass_noise(rng, n, SLOW_FS, 0.1))
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(np.clip(rate, 4, 40)) / (60 * SLOW_FS)
    depth = night.at_rate(night.envelope(BREATH_DEPTH, jitter=0.1, smooth_s=20), SLOW_FS)
    wander = night.at_rate(night.envelope(BREATH_DEPTH_WANDER, jitter=0.2, smooth_s=20), SLOW_FS)
    depth = depth * (1 + wander * _lowpass_noise(rng, n, SLOW_FS, 0.05))
    flat = np.ones(night.n_sec)
    for e in night.events:
        if e["kind"] == "hypopnea":
            s = int(e["start"])
            flat[s:s + int(e["duration"])] = e["depth"]
    depth *= night.at_rate(_smooth(flat, 3), SLOW_FS)
    return phase, np.clip(depth, 0.05, 3)


def _belts(night: _Night, phase: np.ndarray, depth: np.ndarray, fs: int) -> tuple[np.ndarray, np.ndarray]:
    """Thoracic and abdominal effort (arbitrary units); the abdomen leads the thorax a little."""
    rng, n = night.rng, night.n_sec * fs
    t, t_slow = np.arange(n) / fs, np.arange(len(phase)) / SLOW_FS
    ph, d = np.interp(t, t_slow, phase), np.interp(t, t_slow, depth)
    lead = rng.uniform(0.3, 0.6)
    out = []
    for gain, shift in ((1.0, 0.0), (rng.uniform(0.6, 1.0), lead)):
        x = night.profile.belt_gain * gain * d * (np.sin(ph + shift) + 0.12 * np.sin(2 * (ph + shift) + 0.5))
        x += 0.01 * rng.standard_normal(n)
        night.add_movement(x, fs, 0.3)
        out.append(x)
    return out[0], out[1]


def _respiratory_events(night: _Night) -> None:
    """Desaturations, each after a hypopnea; stored in night.events (they shape SpO2 and the belts)."""
    rng = night.rng
    for t in night.onsets(DESATS_PER_MIN, margin_s=60):
        rem = night.stage_sec[int(t)] == REM
        hyp_dur = float(rng.integers(10, 31))
        hyp_start = max(0.0, float(np.floor(t)) - hyp_dur)
        drop = rng.uniform(3, 6) + (rng.uniform(1, 4) if rem else 0)
        fall, recover = rng.uniform(12, 25), rng.uniform(8, 15)
        night.events.append({"kind": "hypopnea", "start": hyp_start, "duration": hyp_dur,
                             "depth": rng.uniform(0.25, 0.5)})
        night.events.append({"kind": "desaturation", "start": float(np.floor(t)), "duration": round(fall + recover),
                             "drop": drop, "fall": fall})


def _arousals(night: _Night) -> None:
    """Arousals: at the start of every awakening out of sleep, and spontaneous ones inside sleep
    epochs (a few seconds of alpha, chin tone and a faster heart, not long enough to score wake)."""
    rng = night.rng
    ep = night.stage_ep
    starts = [float(e * EPOCH_S) for e in np.flatnonzero((ep[1:] == W) & (ep[:-1] != W)) + 1]
    for t in starts:
        night.events.append({"kind": "arousal", "start": t, "duration": float(rng.integers(5, 15))})
    for t in night.onsets(AROUSALS_PER_MIN, margin_s=15):
        dur = float(rng.integers(3, 12))
        s = int(t)
        night.arousal_sec[s:s + int(dur)] = 1.0
        night.events.append({"kind": "arousal", "start": float(s), "duration": dur})
    night.arousal_sec[:] = _smooth(night.arousal_sec, 2)


def _spo2(night: _Night, fs: int) -> np.ndarray:
    """SpO2 (%): the subject's baseline, slow drift, desaturation dips (drop, then faster recovery)."""
    rng = night.rng
    x = night.profile.spo2_base + 0.4 * _lowpass_noise(rng, night.n_sec, 1, 0.005)
    dip = np.zeros(night.n_sec)
    for e in night.events:
        if e["kind"] == "desaturation":
            s, fall, n = int(e["start"]), e["fall"], int(e["duration"])
            rel = np.arange(n)
            shape = np.where(rel < fall, rel / fall, np.clip(1 - (rel - fall) / max(n - fall, 1), 0, 1))
            seg = dip[s:s + n]
            seg += e["drop"] * shape[:len(seg)]
    x = x - dip + 0.15 * rng.standard_normal(night.n_sec)
    return np.clip(night.at_rate(x, fs), 50, 100)


def _position(night: _Night) -> np.ndarray:
    """Body position code (1 Hz); changes only during awakenings."""
    pos = np.zeros(night.n_sec)
    current = int(night.rng.integers(0, 4))
    wake_starts = np.flatnonzero(np.diff(night.stage_ep) != 0) + 1
    changes = {int(e) * EPOCH_S for e in wake_starts if night.stage_ep[e] == W and night.rng.random() < 0.5}
    for s in range(0, night.n_sec, EPOCH_S):
        if s in changes:
            current = int(night.rng.integers(0, 4))
        pos[s:s + EPOCH_S] = current
    return pos


def _render(stages, duration_s: int, rates: dict, rng, profile: Profile | None = None):
    """All requested signals for one night plus its scored events (hypopneas, desaturations, arousals)."""
    profile = profile or draw_profile(rng)
    night = _Night(stages, duration_s, rng, profile)
    _arousals(night)
    _respiratory_events(night)
    out = {}
    phase, depth = _breathing(night)
    if "EEG" in rates or "EOG" in rates or "EOG_R" in rates:
        fs = int(rates.get("EEG", rates.get("EOG", rates.get("EOG_R"))))
        eeg, slow = _eeg(night, fs)
        if "EEG" in rates:
            out["EEG"] = eeg
        for key, sim in (("EEG2", 0.85), ("EEG3", 0.7)):
            if key in rates:
                out[key] = _eeg_other(night, eeg, fs, sim)
        if "EOG" in rates or "EOG_R" in rates:
            fs_eog = int(rates.get("EOG", rates.get("EOG_R")))
            if fs_eog != fs:
                slow = np.interp(np.arange(duration_s * fs_eog) / fs_eog, np.arange(len(slow)) / fs, slow)
            out["EOG"], out["EOG_R"] = _eog(night, fs_eog, slow)
    if "EMG" in rates:
        out["EMG"] = _emg(night, int(rates["EMG"]))
    if "ECG" in rates or "HR" in rates:
        hr = _heart_rate(night, phase)
        if "ECG" in rates:
            out["ECG"] = _ecg(night, int(rates["ECG"]), hr, phase)
        out["HR"] = night.at_rate(hr.reshape(duration_s, SLOW_FS).mean(axis=1), int(rates.get("HR", 1)))
    if "SPO2" in rates:
        out["SPO2"] = _spo2(night, int(rates["SPO2"]))
    if "THOR" in rates or "ABDO" in rates:
        out["THOR"], out["ABDO"] = _belts(night, phase, depth, int(rates.get("THOR", rates.get("ABDO"))))
    if "POSITION" in rates:
        out["POSITION"] = night.at_rate(_position(night), int(rates["POSITION"]))
    out = {k: out[k] for k in rates if k in out}
    return out, sorted(night.events, key=lambda e: (e["start"], e["kind"]))


def night_signals(stages: np.ndarray, rates: dict[str, float], rng: np.random.Generator,
                  profile: Profile | None = None) -> dict[str, np.ndarray]:
    """Signals for a night with one stage per 30-s epoch (-1 = wake with a movement artefact).

    rates: slot -> sampling rate in Hz (integers); only the slots named are returned. Besides SLOTS,
    'EOG_R' (right eye, mirror image of EOG, at the EOG rate), 'EEG2'/'EEG3' (further EEG
    derivations at the EEG rate), 'HR' (bpm) and 'POSITION' (a code 0-3) are understood.
    Units: µV for ECG/EOG/EMG/EEG, % for SPO2, arbitrary units for THOR/ABDO. Each signal has
    len(stages) * 30 * rate samples.
    """
    signals, _ = _render(stages, len(stages) * EPOCH_S, rates, rng, profile)
    return signals


# ---------------------------------------------------------------------------------------------
# Dataset layouts: (EDF label, source signal, Hz, physical dimension)
# ---------------------------------------------------------------------------------------------

LAYOUTS = {
    "shhs": [("ECG", "ECG", 125, "mV"), ("EOG(L)", "EOG", 50, "uV"), ("EOG(R)", "EOG_R", 50, "uV"),
             ("EMG", "EMG", 125, "uV"), ("EEG", "EEG", 125, "uV"), ("EEG(sec)", "EEG2", 125, "uV"),
             ("SaO2", "SPO2", 1, "%"), ("THOR RES", "THOR", 10, ""), ("ABDO RES", "ABDO", 10, ""),
             ("H.R.", "HR", 1, "bpm"), ("POSITION", "POSITION", 1, "")],
    "mesa": [("EKG", "ECG", 256, "mV"), ("EOG-L", "EOG", 256, "uV"), ("EOG-R", "EOG_R", 256, "uV"),
             ("EMG", "EMG", 256, "uV"), ("EEG1", "EEG2", 256, "uV"), ("EEG2", "EEG3", 256, "uV"),
             ("EEG3", "EEG", 256, "uV"), ("SpO2", "SPO2", 1, "%"), ("Thor", "THOR", 32, ""),
             ("Abdo", "ABDO", 32, ""), ("HR", "HR", 1, "bpm")],
    # MrOS stores electrodes against the recorder reference; the sources are built in _mros_electrodes.
    "mros1": [("ECG L", "ECG_L", 512, "mV"), ("ECG R", "ECG_R", 512, "mV"), ("LOC", "LOC", 256, "uV"),
              ("ROC", "ROC", 256, "uV"), ("A1", "A1", 256, "uV"), ("A2", "A2", 256, "uV"), ("C3", "C3", 256, "uV"),
              ("C4", "C4", 256, "uV"), ("L Chin", "L_CHIN", 256, "uV"), ("R Chin", "R_CHIN", 256, "uV"),
              ("SaO2", "SPO2", 1, "%"), ("Thoracic", "THOR", 16, ""), ("Abdominal", "ABDO", 16, "")],
    "mros2": [("ECG L", "ECG_L", 512, "mV"), ("ECG R", "ECG_R", 512, "mV"), ("E1", "LOC", 256, "uV"),
              ("E2", "ROC", 256, "uV"), ("M1", "A1", 256, "uV"), ("M2", "A2", 256, "uV"), ("C3", "C3", 256, "uV"),
              ("C4", "C4", 256, "uV"), ("L Chin", "L_CHIN", 256, "uV"), ("R Chin", "R_CHIN", 256, "uV"),
              ("SpO2", "SPO2", 1, "%"), ("Chest", "THOR", 32, ""), ("ABD", "ABDO", 32, "")],
    "apples": [("ECG", "ECG", 200, "mV"), ("LOC", "EOG", 200, "uV"), ("ROC", "EOG_R", 200, "uV"),
               ("EMG", "EMG", 200, "uV"), ("C4_M1", "EEG", 200, "uV"), ("C3_M2", "EEG2", 200, "uV"),
               ("O1_M2", "EEG3", 200, "uV"), ("SpO2", "SPO2", 10, "%"), ("thorax", "THOR", 10, ""),
               ("abdomen", "ABDO", 10, "")],
    "wsc_gamma": [("ECG", "ECG", 100, "mV"), ("E1", "EOG", 100, "uV"), ("E2", "EOG_R", 100, "uV"),
                  ("chin", "EMG", 100, "uV"), ("C3_M2", "EEG", 100, "uV"), ("O1_M2", "EEG2", 100, "uV"),
                  ("spo2", "SPO2", 100, "%"), ("thorax", "THOR", 100, ""), ("abdomen", "ABDO", 100, "")],
    "wsc_twin": [("ECG", "ECG", 200, "mV"), ("E1", "EOG", 200, "uV"), ("E2", "EOG_R", 200, "uV"),
                 ("cchin_l", "EMG", 200, "uV"), ("C3_M2", "EEG", 200, "uV"), ("F3_M2", "EEG2", 200, "uV"),
                 ("spo2", "SPO2", 200, "%"), ("thorax", "THOR", 200, ""), ("abdomen", "ABDO", 200, "")],
    "edf": [("ECG", "ECG", 256, "uV"), ("E1-M2", "EOG", 256, "uV"), ("Chin1-Chin2", "EMG", 256, "uV"),
            ("C4-M1", "EEG", 256, "uV"), ("SpO2", "SPO2", 1, "%"), ("Thorax", "THOR", 32, ""),
            ("Abdomen", "ABDO", 32, "")],
}
# What MrOS renders before the electrodes are put against the reference (belt rates differ by visit).
MROS_RATES = {"ECG": 512, "EOG": 256, "EOG_R": 256, "EMG": 256, "EEG": 256, "EEG2": 256, "SPO2": 1}


def _physical_range(source: str, dim: str) -> tuple[float, float]:
    """Declared EDF physical range; signals are clipped to it."""
    if dim == "mV":
        return -2.5, 2.5
    if dim == "uV":
        return (-2500.0, 2500.0) if source.startswith("ECG") else (-500.0, 500.0)
    if dim == "%":
        return 0.0, 100.0
    if dim == "bpm":
        return 0.0, 250.0
    if source == "POSITION":
        return 0.0, 10.0
    return -2.0, 2.0   # effort belts, arbitrary units


def _mros_electrodes(sig: dict, fs: int, rng) -> dict:
    """Every MrOS electrode against a shared recorder reference r(t): C4 = EEG + A1 with A1 = r + own
    noise, so the intended derivation C4 - A1 gives back the EEG exactly (and likewise LOC - A2,
    L Chin - R Chin, ECG L - ECG R)."""
    n = len(sig["EEG"])
    ref = 20 * _lowpass_noise(rng, n, fs, 0.1) + 4 * _lowpass_noise(rng, n, fs, 20)
    a1 = ref + 2 * rng.standard_normal(n)
    a2 = ref + 2 * rng.standard_normal(n)
    chin_ref = ref + 3 * rng.standard_normal(n)
    n_ecg = len(sig["ECG"])
    ecg_ref = np.repeat(ref, n_ecg // n) + 10 * rng.standard_normal(n_ecg)
    out = dict(sig)
    out.update(A1=a1, A2=a2, C4=sig["EEG"] + a1, C3=sig["EEG2"] + a2, LOC=sig["EOG"] + a2, ROC=sig["EOG_R"] + a1,
               L_CHIN=chin_ref + sig["EMG"] / 2, R_CHIN=chin_ref - sig["EMG"] / 2,
               ECG_L=ecg_ref + sig["ECG"] / 2, ECG_R=ecg_ref - sig["ECG"] / 2)
    return out


# ---------------------------------------------------------------------------------------------
# Scoring: what the annotation says per epoch (NSRR/Profusion codes 0-5, 6 movement, 9 unscored)
# ---------------------------------------------------------------------------------------------

STAGE_CODE = np.array([0, 1, 2, 3, 5])                       # W N1 N2 N3 REM -> NSRR code
CODE_TRUTH = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 4, 6: -1, 9: -1}
RK4 = {"shhs", "mros", "wsc", "edf"}                         # scored with R&K (stage 4 exists)


def _choose_movement(stages: np.ndarray, rng) -> np.ndarray:
    """A few wake epochs become movement time (their signals get a large movement artefact)."""
    out = stages.copy()
    wake = np.flatnonzero(stages == W)
    onset = np.flatnonzero(stages != W)
    after = wake[wake > onset[0]] if len(onset) else wake[1:]
    pool = after if len(after) else wake[1:]
    if len(pool):
        out[rng.choice(pool, min(len(pool), int(rng.integers(1, 4))), replace=False)] = MOVEMENT
    return out


def _score(stages: np.ndarray, rng, rk4: bool) -> np.ndarray:
    """Annotation codes per epoch from a physiological sequence (with MOVEMENT epochs)."""
    codes = np.where(stages == MOVEMENT, 6, STAGE_CODE[np.clip(stages, 0, 4)])
    if rk4:   # R&K stage 4: the middle of long slow-wave runs
        for start, length, code in _runs(codes):
            if code == 3 and length >= 6:
                codes[start + 2:start + length - 2] = 4
    if rng.random() < 0.6:   # the scorer stopped before the recording did
        codes[len(codes) - int(rng.integers(1, 3)):] = 9
    n2 = np.flatnonzero(codes == 2)
    if len(n2) > 5 and rng.random() < 0.5:   # one epoch left unscored mid-night (e.g. signal lost)
        codes[rng.choice(n2)] = 9
    return codes


def _runs(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """(first epoch, length, code) of each run of equal codes."""
    if len(codes) == 0:
        return []
    edges = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [len(codes)]]))
    return [(int(s), int(n), int(codes[s])) for s, n in zip(starts, lengths)]


def truth_from_codes(codes: np.ndarray) -> np.ndarray:
    return np.array([CODE_TRUTH[int(c)] for c in codes], np.int8)


# ---------------------------------------------------------------------------------------------
# Annotation writers
# ---------------------------------------------------------------------------------------------

NSRR_CONCEPT = {0: "Wake|0", 1: "Stage 1 sleep|1", 2: "Stage 2 sleep|2", 3: "Stage 3 sleep|3",
                4: "Stage 4 sleep|4", 5: "REM sleep|5", 6: "Movement|6", 9: "Unscored|9"}


def _clock(start: dt.datetime, offset_s: float, centis: bool = False) -> str:
    """24-h clock time of start + offset (wrapping past midnight)."""
    t = start + dt.timedelta(seconds=offset_s)
    return t.strftime("%H:%M:%S") + (f".{t.microsecond // 10000:02d}" if centis else "")


def _scored_events(events: list[dict], end_s: float) -> list[dict]:
    """Events that lie inside the scored epochs."""
    return [e for e in events if e["start"] + e["duration"] <= end_s]


def _xml_event(fields: list[tuple[str, str]]) -> str:
    return "<ScoredEvent>\n" + "".join(f"<{k}>{v}</{k}>\n" if v != "" else f"<{k}/>\n" for k, v in fields) + \
        "</ScoredEvent>\n"


def write_nsrr_xml(path: Path, codes, start: dt.datetime, duration_s: int, events, labels: dict) -> None:
    """NSRR XML (FORMATS §3a): stage runs interleaved by time with respiratory and arousal events."""
    items = [(0.0, 0, _xml_event([("EventType", ""), ("EventConcept", "Recording Start Time"), ("Start", "0"),
                                  ("Duration", f"{float(duration_s)}"),
                                  ("ClockTime", f"{start:%d.%m.%y} {start:%H.%M.%S}")]))]
    for first, length, code in _runs(codes):
        items.append((first * EPOCH_S, 1, _xml_event([
            ("EventType", "Stages|Stages"), ("EventConcept", NSRR_CONCEPT[code]),
            ("Start", f"{float(first * EPOCH_S)}"), ("Duration", f"{float(length * EPOCH_S)}")])))
    for e in _scored_events(events, len(codes) * EPOCH_S):
        common = [("Start", f"{e['start']:.1f}"), ("Duration", f"{float(e['duration']):.1f}")]
        if e["kind"] == "hypopnea":
            fields = [("EventType", "Respiratory|Respiratory"), ("EventConcept", "Hypopnea|Hypopnea"), *common,
                      ("SignalLocation", labels["THOR"])]
        elif e["kind"] == "desaturation":
            base = 96.0
            fields = [("EventType", "Respiratory|Respiratory"),
                      ("EventConcept", "SpO2 desaturation|SpO2 desaturation"), *common,
                      ("SignalLocation", labels["SPO2"]), ("SpO2Nadir", f"{base - e['drop']:.0f}"),
                      ("SpO2Baseline", f"{base:.0f}")]
        else:
            fields = [("EventType", "Arousals|Arousals"), ("EventConcept", "Arousal|Arousal ()"), *common,
                      ("SignalLocation", labels["EEG"])]
        items.append((e["start"], 2, _xml_event(fields)))
    items.sort(key=lambda item: (item[0], item[1]))
    text = ('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<PSGAnnotation>\n'
            "<SoftwareVersion>Compumedics</SoftwareVersion>\n<EpochLength>30</EpochLength>\n<ScoredEvents>\n"
            + "".join(item[2] for item in items) + "</ScoredEvents>\n</PSGAnnotation>\n")
    path.write_text(text, encoding="utf-8", newline="\n")


def write_profusion_xml(path: Path, codes, events, labels: dict) -> None:
    """Compumedics Profusion XML (FORMATS §3b): events plus one SleepStage per epoch."""
    names = {"hypopnea": ("Hypopnea", "THOR"), "desaturation": ("SpO2 desaturation", "SPO2"),
             "arousal": ("Arousal (ASDA)", "EEG")}
    out = ['<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<CMPStudyConfig>\n',
           "<EpochLength>30</EpochLength>\n<ScoredEvents>\n"]
    for e in _scored_events(events, len(codes) * EPOCH_S):
        name, slot = names[e["kind"]]
        fields = [("Name", name), ("Start", f"{e['start']:.1f}"), ("Duration", f"{float(e['duration']):.1f}"),
                  ("Input", labels[slot])]
        if e["kind"] == "desaturation":
            fields[3:3] = [("LowestSpO2", f"{96 - e['drop']:.0f}"), ("Desaturation", f"{e['drop']:.0f}")]
        out.append(_xml_event(fields))
    out.append("</ScoredEvents>\n<SleepStages>\n")
    out += [f"<SleepStage>{int(c)}</SleepStage>\n" for c in codes]
    out.append("</SleepStages>\n</CMPStudyConfig>\n")
    path.write_text("".join(out), encoding="utf-8", newline="\n")


LUNA_CLASS = {0: "W", 1: "N1", 2: "N2", 3: "N3", 4: "N3", 5: "R", 6: "?", 9: "?"}


def write_luna_annot(path: Path, codes, start: dt.datetime, events) -> None:
    """Luna .annot (FORMATS §3c): one row per epoch with clock times, arousal rows interleaved."""
    rows = [(i * EPOCH_S, 0, f"{LUNA_CLASS[int(c)]}\t.\t.\t{_clock(start, i * EPOCH_S)}\t"
                             f"{_clock(start, (i + 1) * EPOCH_S)}\t.")
            for i, c in enumerate(codes)]
    for e in _scored_events(events, len(codes) * EPOCH_S):
        if e["kind"] == "arousal":
            rows.append((e["start"], 1, f"arousal\t.\tC4_M1\t{_clock(start, e['start'])}\t"
                                        f"{_clock(start, e['start'] + e['duration'])}\t."))
    rows.sort(key=lambda r: (r[0], r[1]))
    path.write_text("class\tinstance\tchannel\tstart\tstop\tmeta\n" + "".join(r[2] + "\n" for r in rows),
                    encoding="utf-8", newline="\n")


GAMMA_CODE = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 9: 7}


def write_wsc_stg(path: Path, codes) -> None:
    """WSC Gamma .stg.txt (FORMATS §3d): tab-separated, CRLF, 1-based epochs."""
    lines = ["Epoch\tUser-Defined Stage\tCAST-Defined Stage"]
    lines += [f"{i + 1}\t{GAMMA_CODE[int(c)]}\t{GAMMA_CODE[int(c)]}" for i, c in enumerate(codes)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))


TWIN_STAGE = {0: "W", 1: "N1", 2: "N2", 3: "N3", 4: "N3", 5: "R", 6: "NO STAGE", 9: "NO STAGE"}


def write_wsc_allscore(path: Path, codes, start: dt.datetime, events, rng) -> None:
    """WSC Twin .allscore.txt (FORMATS §3e): clock-time event log, stages only at changes, CRLF, Latin-1."""
    end = len(codes) * EPOCH_S
    rows = [(0.0, 0, "START RECORDING"), (0.0, 1, "LIGHTS OUT")]
    same = np.array([{4: 3, 6: 9}.get(int(c), int(c)) for c in codes])   # codes that read the same
    rows += [(float(first * EPOCH_S), 2, f"STAGE - {TWIN_STAGE[code]}") for first, _, code in _runs(same)]
    for e in _scored_events(events, end):
        t = e["start"] + round(float(rng.uniform(0, 1)), 2)     # scorers click off the second grid
        if e["kind"] == "arousal":
            rows.append((t, 3, f"AROUSAL - SPONTANEOUS - DUR: {e['duration']:.1f} SEC."))
        elif e["kind"] == "desaturation":
            rows.append((t, 3, f"DESATURATION - DUR: {e['duration']:.1f} SEC. - MIN SAO2: {96 - e['drop']:.0f}%"))
        else:
            rows.append((t, 3, f"RESPIRATORY EVENT - HYPOPNEA - DUR: {e['duration']:.1f} SEC."))
    note_t = min(round(float(rng.uniform(60, max(61, end / 2))), 2), float(end))
    rows.append((note_t, 3, "NOTE - électrode réajustée"))   # real files carry Latin-1 free text
    rows.append((float(end), 4, "LIGHTS ON"))
    rows.sort(key=lambda r: (r[0], r[1]))
    text = "".join(f"{_clock(start, t, centis=True)}\t{what}\r\n" for t, _, what in rows)
    path.write_bytes(text.encode("latin-1"))


SLEEP_EDF_TEXT = {0: "Sleep stage W", 1: "Sleep stage 1", 2: "Sleep stage 2", 3: "Sleep stage 3",
                  4: "Sleep stage 4", 5: "Sleep stage R", 6: "Movement time", 9: "Sleep stage ?"}


def write_sleep_edf_hypnogram(path: Path, codes, start: dt.datetime, duration_s: int) -> None:
    """Sleep-EDF style hypnogram: an annotation-only EDF+C with one annotation per stage run."""
    writer = pyedflib.EdfWriter(str(path), 0, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setStartdatetime(start)
        writer.writeAnnotation(0, 0, "Lights off")
        for first, length, code in _runs(np.asarray(codes)):
            writer.writeAnnotation(first * EPOCH_S, length * EPOCH_S, SLEEP_EDF_TEXT[code])
        tail = duration_s - len(codes) * EPOCH_S
        if tail > 0:   # Sleep-EDF closes with '?' over the unscorable rest
            writer.writeAnnotation(len(codes) * EPOCH_S, tail, "Sleep stage ?")
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# EDF writer
# ---------------------------------------------------------------------------------------------

DIG_MIN, DIG_MAX = -32768, 32767


def write_edf(path: Path, channels: list[tuple[str, str, int, np.ndarray, tuple[float, float]]],
              start: dt.datetime, duration_s: int) -> None:
    """Plain EDF with 1-s data records. channels: (label, dimension, Hz, physical values, range).

    We convert to digital values ourselves and hand pyedflib one whole record at a time (its
    writeSamples loops in Python and appends per record, which is slow for 8-h nights).
    """
    headers, digital = [], []
    for label, dim, fs, values, (lo, hi) in channels:
        headers.append({"label": label, "dimension": dim, "sample_frequency": fs, "physical_min": lo,
                        "physical_max": hi, "digital_min": DIG_MIN, "digital_max": DIG_MAX,
                        "transducer": "", "prefilter": ""})
        x = np.clip(np.asarray(values[:duration_s * fs], float), lo, hi)
        d = np.round((x - lo) * ((DIG_MAX - DIG_MIN) / (hi - lo)) + DIG_MIN)
        digital.append(d.astype(np.int16).reshape(duration_s, fs))
    records = np.ascontiguousarray(np.concatenate(digital, axis=1))
    writer = pyedflib.EdfWriter(str(path), len(channels), file_type=pyedflib.FILETYPE_EDF)
    try:
        writer.setSignalHeaders(headers)
        writer.setStartdatetime(start)
        for record in records:
            if writer.blockWriteDigitalShortSamples(record) < 0:
                raise OSError(f"{path}: pyedflib failed to write a data record")
    finally:
        writer.close()


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------


@dataclass
class NightPlan:
    """Where one night goes and what it is called (FORMATS §1)."""
    night_id: str
    subject: str
    subject_index: int
    visit: int
    layout: str
    edf: Path
    annotations: list[Path]


def plan_night(dataset: str, i: int, outdir: Path) -> NightPlan:
    psg = outdir / "polysomnography"
    if dataset == "shhs":
        v, sid = 1 + i % 2, 200001 + i // 2
        nid = f"shhs{v}-{sid}"
        return NightPlan(nid, str(sid), i // 2, v, "shhs", psg / "edfs" / f"shhs{v}" / f"{nid}.edf",
                         [psg / "annotations-events-nsrr" / f"shhs{v}" / f"{nid}-nsrr.xml",
                          psg / "annotations-events-profusion" / f"shhs{v}" / f"{nid}-profusion.xml"])
    if dataset == "mesa":
        nid = f"mesa-sleep-{i + 1:04d}"
        return NightPlan(nid, f"{i + 1:04d}", i, 1, "mesa", psg / "edfs" / f"{nid}.edf",
                         [psg / "annotations-events-nsrr" / f"{nid}-nsrr.xml",
                          psg / "annotations-events-profusion" / f"{nid}-profusion.xml"])
    if dataset == "mros":
        v, sid = 1 + i % 2, f"aa{i // 2 + 1:04d}"
        nid = f"mros-visit{v}-{sid}"
        return NightPlan(nid, sid, i // 2, v, f"mros{v}", psg / "edfs" / f"visit{v}" / f"{nid}.edf",
                         [psg / "annotations-events-nsrr" / f"visit{v}" / f"{nid}-nsrr.xml",
                          psg / "annotations-events-profusion" / f"visit{v}" / f"{nid}-profusion.xml"])
    if dataset == "apples":
        nid = f"apples-{130001 + i}"
        return NightPlan(nid, str(130001 + i), i, 1, "apples", psg / f"{nid}.edf", [psg / f"{nid}.annot"])
    if dataset == "wsc":
        v, sid = 1 + i % 3, 10001 + i
        nid = f"wsc-visit{v}-{sid}-nsrr"
        gamma = i % 2 == 0
        return NightPlan(nid, str(sid), i, v, "wsc_gamma" if gamma else "wsc_twin", psg / f"{nid}.edf",
                         [psg / f"{nid}.stg.txt" if gamma else psg / f"{nid}.allscore.txt"])
    if dataset == "edf":
        nid = f"night-{i + 1:03d}"
        return NightPlan(nid, nid, i, 1, "edf", outdir / f"{nid}.edf", [outdir / f"{nid}-Hypnogram.edf"])
    raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")


@dataclass
class RenderedNight:
    """Night i of a cohort before it is written."""
    plan: NightPlan
    start: dt.datetime
    duration_s: int
    codes: np.ndarray      # annotation code per full epoch (0-5 as NSRR, 6 movement, 9 unscored)
    channels: list         # (label, dimension, Hz, physical values, (min, max)) in EDF order
    events: list[dict]     # hypopneas, desaturations, arousals (s from the start)
    signals: dict          # slot -> µV / % / a.u. before any reference or unit change


def render_night(dataset: str, i: int, hours: float, seed: int, outdir: Path = Path(".")) -> RenderedNight:
    """Everything about night i of write_cohort(dataset, outdir, ..., hours, seed), without writing it."""
    plan = plan_night(dataset, i, Path(outdir))
    ds_key = DATASETS.index(dataset)
    profile = draw_profile(np.random.default_rng([seed, ds_key, plan.subject_index, 1]))
    rng = np.random.default_rng([seed, ds_key, i, 2])
    start = dt.datetime(1985, 1, 1, 21) + dt.timedelta(seconds=int(rng.integers(0, 3 * 3600)))
    # A few seconds past the requested length, so that a trailing partial epoch usually exists.
    duration_s = int(hours * 3600) + int(rng.integers(0, EPOCH_S))
    n_epochs = duration_s // EPOCH_S
    stages = _choose_movement(stage_sequence(n_epochs, rng), rng)
    codes = _score(stages, rng, dataset in RK4)

    layout = LAYOUTS[plan.layout]
    rates = {src: fs for _, src, fs, _ in layout}
    if dataset == "mros":
        rates = {**MROS_RATES, "THOR": rates["THOR"], "ABDO": rates["ABDO"]}   # sources before referencing
    signals, events = _render(stages, duration_s, rates, rng, profile)
    sources = _mros_electrodes(signals, MROS_RATES["EEG"], rng) if dataset == "mros" else signals
    channels = []
    for label, src, fs, dim in layout:
        x = sources[src] / 1000 if dim == "mV" else sources[src]
        channels.append((label, dim, fs, x, _physical_range(src, dim)))
    return RenderedNight(plan, start, duration_s, codes, channels, events, signals)


def _slot_labels(layout: str) -> dict:
    """EDF label carrying each slot (for SignalLocation / Input fields of scored events)."""
    labels = {src: label for label, src, _, _ in LAYOUTS[layout]}
    if layout.startswith("mros"):
        labels.update(EEG=labels["C4"])
    return labels


def write_night(dataset: str, i: int, hours: float, seed: int, outdir: Path) -> dict:
    night = render_night(dataset, i, hours, seed, outdir)
    plan, start, duration_s, codes, events = night.plan, night.start, night.duration_s, night.codes, night.events
    for path in [plan.edf, *plan.annotations]:
        path.parent.mkdir(parents=True, exist_ok=True)
    write_edf(plan.edf, night.channels, start, duration_s)
    labels = _slot_labels(plan.layout)
    if dataset in ("shhs", "mesa", "mros"):
        write_nsrr_xml(plan.annotations[0], codes, start, duration_s, events, labels)
        write_profusion_xml(plan.annotations[1], codes, events, labels)
    elif dataset == "apples":
        write_luna_annot(plan.annotations[0], codes, start, events)
    elif plan.layout == "wsc_gamma":
        write_wsc_stg(plan.annotations[0], codes)
    elif plan.layout == "wsc_twin":
        write_wsc_allscore(plan.annotations[0], codes, start, events, np.random.default_rng([seed, i, 3]))
    else:
        write_sleep_edf_hypnogram(plan.annotations[0], codes, start, duration_s)
    truth = Path(outdir) / ".truth" / f"{plan.night_id}.npy"
    truth.parent.mkdir(parents=True, exist_ok=True)
    np.save(truth, truth_from_codes(codes))
    return {"night_id": plan.night_id, "dataset": dataset, "subject": plan.subject, "visit": plan.visit,
            "edf": plan.edf, "annotations": plan.annotations, "annotation": plan.annotations[0], "start": start,
            "duration_s": duration_s, "truth": truth}


def write_cohort(dataset: str, outdir, nights: int, hours: float, seed: int) -> list[dict]:
    """Write `nights` nights of `dataset` under outdir in its native layout; one dict per night:
    night_id, dataset, subject, visit (int), edf, annotations (list, primary first), annotation
    (the primary one), start (datetime), duration_s, truth (path of the .npy)."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; choose one of {', '.join(DATASETS)}")
    if hours * 3600 < EPOCH_S or nights < 0:
        raise ValueError("need at least one 30-s epoch (hours >= 30 s) and nights >= 0")
    return [write_night(dataset, i, hours, seed, Path(outdir)) for i in range(nights)]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m prepare.synthetic",
        description="Write synthetic PSG nights in a dataset's native NSRR layout (EDF + its annotation "
                    "files), so that `python -m prepare DATASET OUTDIR OUT` reads them like a real "
                    "download. For tests and demos only: NOT a stand-in for real data.",
        epilog="Layouts: shhs polysomnography/edfs/shhs{1,2}/ + NSRR and Profusion XML; mesa "
               "polysomnography/edfs/mesa-sleep-NNNN.edf + XMLs; mros polysomnography/edfs/visit{1,2}/ "
               "(electrodes against a common reference) + XMLs; apples polysomnography/apples-NNNNNN.edf + "
               "Luna .annot; wsc polysomnography/wsc-visitV-ID-nsrr.edf + .stg.txt (even nights, Gamma, "
               "100 Hz) or .allscore.txt (odd nights, Twin, 200 Hz); edf night-NNN.edf + Sleep-EDF style "
               "night-NNN-Hypnogram.edf. True stages per full 30-s epoch (0=W 1=N1 2=N2 3=N3 4=REM, "
               "-1 movement/unscored) go to OUTDIR/.truth/<night_id>.npy. Same arguments, same bytes.")
    parser.add_argument("dataset", choices=DATASETS, help="which native layout to write")
    parser.add_argument("outdir", type=Path, help="dataset root to write into (created if missing)")
    parser.add_argument("--nights", type=int, default=3, help="number of nights (default 3); shhs and mros "
                        "pair nights into subjects with visits 1 and 2")
    parser.add_argument("--hours", type=float, default=1.0, help="recording length per night (default 1); "
                        "0-29 s are added so that a partial last epoch exists; below 2 h the sleep "
                        "cycles are compressed so that every stage appears")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    nights = write_cohort(args.dataset, args.outdir, args.nights, args.hours, args.seed)
    for night in nights:
        print(f"{night['night_id']}: {night['edf']}")
    print(f"wrote {len(nights)} {args.dataset} nights to {args.outdir} in {time.perf_counter() - began:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
