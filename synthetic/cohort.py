"""The synthetic cohort: each dataset's native layout, night planning and rendering, `write_cohort`.

Owns what makes a night look like a real NSRR download (docs/formats.md §1-3): `LAYOUTS` (EDF label,
source signal, rate and physical dimension per channel), the MrOS electrodes against a common
reference, the declared physical ranges, where each night's files go (`plan_night`), how the true
stages become annotation codes (R&K stage 4, movement, unscored epochs), and the truth files: for
every night the true stage per full 30-s epoch of the EDF (0=W 1=N1 2=N2 3=N3 4=REM, -1 =
movement/unscored) is written to `OUTDIR/.truth/<night_id>.npy` (night_id = the EDF file name
without `.edf`).

Everything is drawn from seeded numpy Generators (one per subject, one per night) and the EDF header
fields are fixed, so the same arguments give byte-identical files.
"""
from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prepare.annotations import (runs_of, write_luna_annot, write_nsrr_xml, write_profusion_xml, write_wsc_allscore,
                                 write_wsc_stg)
from prepare.signals import EPOCH_S

from .noise import lowpass_noise
from .physiology import MOVEMENT, W, draw_profile, render, stage_sequence
from .writers import write_edf, write_sleep_edf_hypnogram

DATASETS = ("shhs", "mesa", "mros", "apples", "wsc", "edf")

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
    ref = 20 * lowpass_noise(rng, n, fs, 0.1) + 4 * lowpass_noise(rng, n, fs, 20)
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
        for start, length, code in runs_of(codes):
            if code == 3 and length >= 6:
                codes[start + 2:start + length - 2] = 4
    if rng.random() < 0.6:   # the scorer stopped before the recording did
        codes[len(codes) - int(rng.integers(1, 3)):] = 9
    n2 = np.flatnonzero(codes == 2)
    if len(n2) > 5 and rng.random() < 0.5:   # one epoch left unscored mid-night (e.g. signal lost)
        codes[rng.choice(n2)] = 9
    return codes


def truth_from_codes(codes: np.ndarray) -> np.ndarray:
    return np.array([CODE_TRUTH[int(c)] for c in codes], np.int8)


# ---------------------------------------------------------------------------------------------
# Cohort
# ---------------------------------------------------------------------------------------------


@dataclass
class NightPlan:
    """Where one night goes and what it is called (docs/formats.md §1)."""
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
    signals, events = render(stages, duration_s, rates, rng, profile)
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
