"""Physiology: the stage sequence and the stage-dependent signals of one synthetic night.

Owns `stage_sequence` (a plausible hypnogram), the per-stage tables, the per-subject `Profile`, and
`render` / `night_signals` (each slot's signal plus the scored events: hypopneas, desaturations,
arousals). It knows nothing of files or datasets (cohort.py, writers.py); generic noise and the
recording artefacts come from noise.py. A caricature chosen to be learnable (alpha in wake, theta
in N1, spindles and K-complexes in N2, delta in N3, rapid eye movements and atonia in REM,
stage-dependent heart rate and breathing, SpO2 dips): a model that scores these nights well says
nothing about real sleep. Draws come from the Generator passed in.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import signal as sps

from prepare.signals import EPOCH_S

from .noise import add_electrode_pops, add_movement, band_noise, lowpass_noise, place, slow_drift, smooth

W, N1, N2, N3, REM = 0, 1, 2, 3, 4
MOVEMENT = -1            # in a physiological stage sequence: wake with a body-movement artefact

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
        return smooth(x, smooth_s)

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
        return smooth(mask, 2)[:self.n_sec]

    def add_artefacts(self, x: np.ndarray, fs: int, movement: float, pops_per_hour: float = 0.0) -> None:
        """Body movements of amplitude `movement` where the movement mask is on, then electrode pops."""
        add_movement(x, self.rng, fs, self.at_rate(self.movement_sec, fs), movement)
        if pops_per_hour:
            add_electrode_pops(x, self.rng, fs, self.n_sec, pops_per_hour)


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
    background = (0.8 * lowpass_noise(rng, n, fs, 1.5) + 0.5 * lowpass_noise(rng, n, fs, 12.0))
    x = env(EEG_BACKGROUND, jitter=0.1) * background
    x += night.at_rate(alpha_env, fs) * band_noise(rng, n, fs, p.alpha_hz - 1, p.alpha_hz + 1)
    x += env(EEG_THETA) * band_noise(rng, n, fs, 4, 7)
    # Slow waves build up and fade over about a minute, so N2 next to N3 already carries some delta.
    delta = EEG_DELTA * np.array([1, 1, 1, p.slow_waves, 1])
    slow = env(delta, jitter=0.2, smooth_s=60) * band_noise(rng, n, fs, 0.5, 2.0)

    # Sleep spindles: 11-15 Hz, 0.5-2 s, waxing and waning.
    t0 = night.onsets(SPINDLES_PER_MIN * p.spindle_density, margin_s=2)
    rel = np.arange(2 * fs)[None, :] / fs
    dur = rng.uniform(0.5, 2.0, len(t0))[:, None]
    shape = np.where(rel < dur, np.sin(np.pi * rel / dur) ** 2, 0.0)
    place(x, (t0 * fs).astype(int), rng.uniform(20, 40, len(t0))[:, None] * shape *
           np.sin(2 * np.pi * rng.uniform(11, 15, len(t0))[:, None] * rel + rng.uniform(0, 6.3, len(t0))[:, None]))

    # K-complexes: a sharp negative wave followed by a slower positive one (~150-250 µV peak to peak).
    t0 = night.onsets(KCOMPLEX_PER_MIN, margin_s=2)
    rel = np.arange(int(1.5 * fs))[None, :] / fs
    kc = -np.exp(-((rel - 0.25) / 0.07) ** 2) + 0.55 * np.exp(-((rel - 0.6) / 0.16) ** 2)
    place(slow, (t0 * fs).astype(int), rng.uniform(100, 160, len(t0))[:, None] * kc)

    # REM sawtooth waves: 2-5 Hz bursts lasting 2-4 s.
    t0 = night.onsets(SAWTOOTH_PER_MIN, margin_s=4)
    rel = np.arange(4 * fs)[None, :] / fs
    dur = rng.uniform(2, 4, len(t0))[:, None]
    shape = np.where(rel < dur, np.sin(np.pi * rel / dur), 0.0)
    place(x, (t0 * fs).astype(int), rng.uniform(20, 40, len(t0))[:, None] * shape *
           sps.sawtooth(2 * np.pi * rng.uniform(2, 5, len(t0))[:, None] * rel, 0.85))

    gain = p.eeg_gain * night.at_rate(slow_drift(rng, night.n_sec, 0.15), fs)
    x = gain * (x + slow)
    slow = gain * slow
    x += p.noise_uv * rng.standard_normal(n)
    night.add_artefacts(x, fs, 60, pops_per_hour=1.0)
    return x, slow


def _eeg_other(night: _Night, eeg: np.ndarray, fs: int, similarity: float) -> np.ndarray:
    """Another EEG derivation: mostly the same brain activity plus its own background and noise."""
    n = len(eeg)
    x = similarity * eeg + 6.0 * lowpass_noise(night.rng, n, fs, 4.0)
    x += night.profile.noise_uv * night.rng.standard_normal(n)
    add_electrode_pops(x, night.rng, fs, night.n_sec, 0.5)
    return x


def _eog(night: _Night, fs: int, leak: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Left and right EOG (µV). Horizontal movements are mirror images, blinks are in phase."""
    rng, n = night.rng, night.n_sec * fs
    eye = night.at_rate(night.envelope(EOG_SLOW, smooth_s=10), fs) * band_noise(rng, n, fs, 0.15, 0.6)

    # Saccades (wake) and rapid eye movements (REM, clustered): fast rise, then the amplifier's
    # high-pass lets the deflection decay.
    t0 = night.onsets(SACCADES_PER_MIN, burstiness=1.5, margin_s=3)
    rel = np.arange(3 * fs)[None, :] / fs
    step = (1 - np.exp(-rel / 0.02)) * np.exp(-rel / 0.8)
    amp = rng.choice([-1, 1], len(t0))[:, None] * rng.uniform(60, 200, len(t0))[:, None]
    place(eye, (t0 * fs).astype(int), amp * step)

    blinks = np.zeros(n)
    t0 = night.onsets(BLINKS_PER_MIN, margin_s=1)
    rel = np.arange(int(0.5 * fs))[None, :] / fs
    place(blinks, (t0 * fs).astype(int), rng.uniform(80, 200, len(t0))[:, None] * np.exp(-((rel - 0.2) / 0.06) ** 2))

    sides = []
    for sign in (1, -1):
        x = sign * eye + blinks + 0.3 * leak + night.profile.noise_uv * rng.standard_normal(n)
        night.add_artefacts(x, fs, 100, pops_per_hour=0.5)
        sides.append(x)
    return sides[0], sides[1]


def _emg(night: _Night, fs: int) -> np.ndarray:
    """Chin EMG (µV): broadband muscle noise; tone falls from W to NREM, REM atonia with twitches."""
    rng, n = night.rng, night.n_sec * fs
    relaxed = np.where(night.stage_ep == W, rng.uniform(0.4, 1.1, len(night.stage_ep)), 1.0)   # quiet wake
    table = np.concatenate([EMG_TONE[:REM], [EMG_TONE[N2] * night.profile.atonia]])
    tone = night.envelope(table, factor=relaxed) + 0.8 * EMG_TONE[W] * night.arousal_sec
    tone *= night.profile.emg_gain * slow_drift(rng, night.n_sec, 0.25)
    x = night.at_rate(tone, fs) * band_noise(rng, n, fs, 10, 100)
    t0 = night.onsets(TWITCHES_PER_MIN, burstiness=1.0, margin_s=1)
    length = max(2, int(0.25 * fs))
    place(x, (t0 * fs).astype(int), rng.uniform(10, 30, len(t0))[:, None] * np.hanning(length)[None, :] *
           rng.standard_normal((len(t0), length)))
    x += 0.5 * rng.standard_normal(n)
    night.add_artefacts(x, fs, 60, pops_per_hour=0.5)
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
    hr += night.at_rate(wander, SLOW_FS) * lowpass_noise(rng, n, SLOW_FS, 0.03)
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
    night.add_artefacts(x, fs, 150)
    return x


def _breathing(night: _Night) -> tuple[np.ndarray, np.ndarray]:
    """Breathing phase (rad) and depth on the SLOW_FS grid; hypopneas (from night.events) flatten it."""
    rng, n = night.rng, night.n_sec * SLOW_FS
    rate = night.at_rate(night.envelope(BREATHS_PER_MIN, jitter=0.05, smooth_s=30) + night.profile.resp_offset, SLOW_FS)
    irregular = night.at_rate(night.envelope(BREATH_IRREGULARITY, jitter=0.2, smooth_s=30), SLOW_FS)
    rate = rate * (1 + 1.5 * irregular * lowpass_noise(rng, n, SLOW_FS, 0.1))
    phase = rng.uniform(0, 2 * np.pi) + 2 * np.pi * np.cumsum(np.clip(rate, 4, 40)) / (60 * SLOW_FS)
    depth = night.at_rate(night.envelope(BREATH_DEPTH, jitter=0.1, smooth_s=20), SLOW_FS)
    wander = night.at_rate(night.envelope(BREATH_DEPTH_WANDER, jitter=0.2, smooth_s=20), SLOW_FS)
    depth = depth * (1 + wander * lowpass_noise(rng, n, SLOW_FS, 0.05))
    flat = np.ones(night.n_sec)
    for e in night.events:
        if e["kind"] == "hypopnea":
            s = int(e["start"])
            flat[s:s + int(e["duration"])] = e["depth"]
    depth *= night.at_rate(smooth(flat, 3), SLOW_FS)
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
        night.add_artefacts(x, fs, 0.3)
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
    night.arousal_sec[:] = smooth(night.arousal_sec, 2)


def _spo2(night: _Night, fs: int) -> np.ndarray:
    """SpO2 (%): the subject's baseline, slow drift, desaturation dips (drop, then faster recovery)."""
    rng = night.rng
    x = night.profile.spo2_base + 0.4 * lowpass_noise(rng, night.n_sec, 1, 0.005)
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


def render(stages, duration_s: int, rates: dict, rng, profile: Profile | None = None):
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

    rates: slot -> sampling rate in Hz (integers); only the slots named are returned. Besides the
    slots of prepare.signals.SLOTS, 'EOG_R' (right eye, mirror image of EOG, at the EOG rate),
    'EEG2'/'EEG3' (further EEG derivations at the EEG rate), 'HR' (bpm) and 'POSITION' (a code 0-3)
    are understood.
    Units: µV for ECG/EOG/EMG/EEG, % for SPO2, arbitrary units for THOR/ABDO. Each signal has
    len(stages) * 30 * rate samples.
    """
    signals, _ = render(stages, len(stages) * EPOCH_S, rates, rng, profile)
    return signals
