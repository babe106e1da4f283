"""Generic signal synthesis for the synthetic nights: coloured noise, smoothing, waveforms added at given onsets, and
the recording artefacts (slow drift, electrode pops, body movement) that any channel can carry.

Nothing here knows about sleep stages (physiology.py decides what happens when); every draw comes from the Generator
passed in, in a fixed order, so a seeded night is the same bytes every time.
"""
from __future__ import annotations

import numpy as np
from scipy import signal as sps


def unit(x: np.ndarray) -> np.ndarray:
    return x / (x.std() + 1e-12)


def band_noise(rng, n: int, fs: float, lo: float, hi: float) -> np.ndarray:
    """Unit-variance noise band-limited to [lo, hi] Hz (hi is capped below Nyquist)."""
    hi = min(hi, 0.45 * fs)
    sos = sps.butter(2, [lo, hi], "bandpass", fs=fs, output="sos")
    return unit(sps.sosfilt(sos, rng.standard_normal(n)))


def lowpass_noise(rng, n: int, fs: float, fc: float) -> np.ndarray:
    """Unit-variance first-order low-pass noise (a 1/f^2 spectrum above fc)."""
    a = np.exp(-2 * np.pi * fc / fs)
    return unit(sps.lfilter([1 - a], [1, -a], rng.standard_normal(n)))


def smooth(x: np.ndarray, width: int) -> np.ndarray:
    """Moving average over `width` samples with edge padding (keeps the length)."""
    if width <= 1:
        return x
    padded = np.pad(x, (width // 2, width - 1 - width // 2), mode="edge")
    c = np.cumsum(np.concatenate([[0.0], padded]))
    return (c[width:] - c[:-width]) / width


def place(x: np.ndarray, onsets: np.ndarray, waves: np.ndarray) -> None:
    """Add waveforms waves[k] (all of one length) into x starting at sample onsets[k]."""
    if len(onsets) == 0:
        return
    idx = onsets[:, None] + np.arange(waves.shape[1])[None, :]
    keep = idx < len(x)
    np.add.at(x, idx[keep], waves[keep])


def slow_drift(rng, n_sec: int, depth: float) -> np.ndarray:
    """Slow multiplicative drift over a night of n_sec seconds (electrode impedance, posture): one value per second."""
    return np.exp(depth * lowpass_noise(rng, n_sec, 1.0, 1 / 1800))


def add_electrode_pops(x: np.ndarray, rng, fs: int, n_sec: int, per_hour: float) -> None:
    """Electrode pops into x (n_sec seconds at fs): a sudden step that decays over a few hundred ms."""
    t = rng.random(rng.poisson(per_hour * n_sec / 3600)) * max(n_sec - 1, 0)
    tau = rng.uniform(0.1, 0.4, len(t))[:, None]
    amp = rng.choice([-1, 1], len(t))[:, None] * rng.uniform(150, 400, len(t))[:, None]
    rel = np.arange(int(fs * 1.5))[None, :] / fs
    place(x, (t * fs).astype(int), amp * np.exp(-rel / tau))


def add_movement(x: np.ndarray, rng, fs: int, mask: np.ndarray, amp: float) -> None:
    """A body-movement artefact into x where the per-sample `mask` (0..1) is on: broadband high-amplitude noise plus a
    slow swing."""
    idx = np.flatnonzero(mask)
    if len(idx):
        swing = np.sin(2 * np.pi * 0.7 * idx / fs + rng.uniform(0, 2 * np.pi))
        x[idx] += mask[idx] * amp * (rng.standard_normal(len(idx)) + 1.5 * swing)
