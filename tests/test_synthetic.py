"""The synthetic cohort: native layouts, determinism, annotations that encode the truth, real physiology.

Files are read back here with independent code: EDFs with pyedflib, annotation files with deliberately
small parsers (not prepare.annotations), so that these tests check the generator rather than the reader.
The layout is checked against what `python -m prepare` expects (its per-dataset alias tables and unit
rules), not against a copy of the generator's own table.
"""
import datetime as dt
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyedflib
import pytest
from scipy import signal as sps

import synthetic as syn
from prepare import edf
from prepare.__main__ import DATASETS as PREPARE
from prepare.signals import SLOTS, VOLTAGE_SLOTS, check_plausible, microvolt_factor, resolve
from synthetic.__main__ import main as synthetic_main

HOURS = 0.5
PATHS = {   # night index -> (EDF, annotation files), relative to OUTDIR, as NSRR ships them
    "shhs": {1: ("polysomnography/edfs/shhs2/shhs2-200001.edf",
                 ["polysomnography/annotations-events-nsrr/shhs2/shhs2-200001-nsrr.xml",
                  "polysomnography/annotations-events-profusion/shhs2/shhs2-200001-profusion.xml"])},
    "mesa": {1: ("polysomnography/edfs/mesa-sleep-0002.edf",
                 ["polysomnography/annotations-events-nsrr/mesa-sleep-0002-nsrr.xml",
                  "polysomnography/annotations-events-profusion/mesa-sleep-0002-profusion.xml"])},
    "mros": {1: ("polysomnography/edfs/visit2/mros-visit2-aa0001.edf",
                 ["polysomnography/annotations-events-nsrr/visit2/mros-visit2-aa0001-nsrr.xml",
                  "polysomnography/annotations-events-profusion/visit2/mros-visit2-aa0001-profusion.xml"])},
    "apples": {1: ("polysomnography/apples-130002.edf", ["polysomnography/apples-130002.annot"])},
    "wsc": {0: ("polysomnography/wsc-visit1-10001-nsrr.edf", ["polysomnography/wsc-visit1-10001-nsrr.stg.txt"]),
            1: ("polysomnography/wsc-visit2-10002-nsrr.edf", ["polysomnography/wsc-visit2-10002-nsrr.allscore.txt"])},
    "edf": {1: ("night-002.edf", ["night-002-Hypnogram.edf"])},
}


@pytest.fixture(scope="module")
def cohorts(tmp_path_factory):
    """Two half-hour nights per dataset (both visits for SHHS/MrOS, both systems for WSC)."""
    root = tmp_path_factory.mktemp("synthetic")
    return {ds: (root / ds, syn.write_cohort(ds, root / ds, nights=2, hours=HOURS, seed=7)) for ds in syn.DATASETS}


def read_edf(path):
    """What pyedflib reads back: per label (Hz, dimension, declared physical maximum, values), and the header."""
    with pyedflib.EdfReader(str(path)) as r:
        signals = {lab: (r.getSampleFrequency(i), r.getPhysicalDimension(i), r.getPhysicalMaximum(i), r.readSignal(i))
                   for i, lab in enumerate(r.getSignalLabels())}
        return signals, r.getStartdatetime(), r.datarecords_in_file, r.datarecord_duration


# ------------------------------------------------------------------------------------- layout


@pytest.mark.parametrize("dataset", syn.DATASETS)
def test_native_layout_is_what_prepare_reads(cohorts, dataset):
    outdir, nights = cohorts[dataset]
    for i, (edf_path, annotations) in PATHS[dataset].items():
        assert nights[i]["edf"] == outdir / edf_path
        assert nights[i]["annotations"] == [outdir / a for a in annotations]
    module = PREPARE[dataset]   # the module `python -m prepare DATASET` uses
    found = module.find_nights([outdir] if dataset == "edf" else outdir)
    assert sorted((n.night_id, n.edf) for n in found) == sorted((n["night_id"], n["edf"]) for n in nights)
    for night in nights:
        assert night["edf"].is_file() and all(a.is_file() for a in night["annotations"])
        signals, start, n_records, record_s = read_edf(night["edf"])
        assert record_s == 1 and n_records == night["duration_s"]
        assert start == night["start"] and start.date() == dt.date(1985, 1, 1) and 21 <= start.hour <= 23
        truth = np.load(night["truth"])
        assert truth.dtype == np.int8 and len(truth) == night["duration_s"] // 30
        assert night["truth"] == outdir / ".truth" / f"{night['night_id']}.npy"
        assert night["night_id"] == night["edf"].stem

        # Rates: whole Hz, what the header states (samples per record / record length), read alike by prepare.
        for label, (fs, _, _, x) in signals.items():
            assert fs == int(fs) >= 1 and len(x) == fs * n_records * record_s, label
        assert {s.label: s.fs for s in edf.read_header(night["edf"]).signals} == {k: v[0] for k, v in signals.items()}

        # prepare's alias table finds every slot (MrOS: each one a derivation against the reference), a
        # derivation's two sides share a rate and a unit, voltages are in a unit prepare converts, and the
        # converted signals are plausible (µV amplitude, SpO2 in %).
        sources = resolve(list(signals), module.CHANNELS)
        for slot in SLOTS:
            assert sources[slot] is not None, f"{night['night_id']}: prepare finds no {slot}"
            parts = [label for label in sources[slot] if label is not None]
            if dataset == "mros" and slot in VOLTAGE_SLOTS:
                assert len(parts) == 2, slot
            assert len({signals[p][0] for p in parts}) == 1 and len({signals[p][1] for p in parts}) == 1, slot
            factor = {p: microvolt_factor(signals[p][1], slot, p) if slot in VOLTAGE_SLOTS else 1.0 for p in parts}
            values = [signals[p][3] * factor[p] for p in parts]
            check_plausible(values[0] - values[1] if len(values) == 2 else values[0], slot, " - ".join(parts))
        assert signals[sources["SPO2"][0]][1] == "%"

        for label, (*_, x) in signals.items():   # nothing pinned at the declared range for long (clipping is rare)
            assert np.mean((x <= x.min()) | (x >= x.max())) < 0.01 or label in ("POSITION",), label


def test_subjects_and_visits(cohorts):
    shhs = cohorts["shhs"][1]
    assert [(n["subject"], n["visit"]) for n in shhs] == [("200001", 1), ("200001", 2)]
    mros = cohorts["mros"][1]
    assert [(n["night_id"], n["subject"], n["visit"]) for n in mros] == [
        ("mros-visit1-aa0001", "aa0001", 1), ("mros-visit2-aa0001", "aa0001", 2)]
    assert [n["night_id"] for n in cohorts["wsc"][1]] == ["wsc-visit1-10001-nsrr", "wsc-visit2-10002-nsrr"]


def test_partial_last_epoch_exists_for_some_seeds():
    durations = {syn.render_night("edf", i, 0.05, 0, ".").duration_s % 30 for i in range(6)}
    assert durations != {0}


# ------------------------------------------------------------------------------ determinism


def _all_bytes(root):
    return {p.relative_to(root): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path):
    for ds in ("shhs", "wsc"):
        syn.write_cohort(ds, tmp_path / "a", 2, 0.1, seed=3)
        syn.write_cohort(ds, tmp_path / "b", 2, 0.1, seed=3)
        syn.write_cohort(ds, tmp_path / "c", 2, 0.1, seed=4)
    a, b, c = (_all_bytes(tmp_path / x) for x in "abc")
    assert a == b
    assert a.keys() == c.keys()
    edfs = [k for k in a if k.suffix == ".edf"]
    assert edfs and all(a[k] != c[k] for k in edfs)


# ------------------------------------------------------------------------------ stages


@pytest.mark.parametrize("seed", range(8))
def test_every_stage_in_a_one_hour_night(seed):
    stages = syn.stage_sequence(120, np.random.default_rng(seed))
    assert stages.dtype == np.int8 and len(stages) == 120
    assert set(stages.tolist()) == {0, 1, 2, 3, 4}
    assert stages[0] == 0 and stages[-1] == 0


def test_written_one_hour_night_has_every_stage_and_a_few_unscored(tmp_path):
    truths = [np.load(n["truth"]) for n in syn.write_cohort("apples", tmp_path, 3, 1.0, seed=1)]
    for truth in truths:
        assert {0, 1, 2, 3, 4} <= set(truth.tolist())
        assert 0 < np.sum(truth == -1) <= 8
    assert any(np.sum(t == -1) > 0 for t in truths)


def test_full_night_architecture():
    stages = syn.stage_sequence(960, np.random.default_rng(5))
    share = np.bincount(stages, minlength=5) / len(stages)
    assert 0.35 < share[2] < 0.65 and 0.08 < share[3] < 0.3 and 0.12 < share[4] < 0.3 and share[1] < 0.12
    n3 = np.flatnonzero(stages == 3)
    rem = np.flatnonzero(stages == 4)
    assert np.median(n3) < len(stages) / 2 < np.median(rem)   # N3 early, REM late
    onset = np.flatnonzero(stages != 0)[0]
    assert 10 <= onset <= 60   # sleep latency 5-30 min


# ------------------------------------------------------------------------------ physiology


@pytest.fixture(scope="module")
def physiology():
    rng = np.random.default_rng(11)
    stages = syn.stage_sequence(480, rng)
    rates = {"EEG": 128, "EOG": 64, "EMG": 128, "ECG": 128, "SPO2": 1, "THOR": 10, "ABDO": 10, "HR": 1}
    return stages, syn.night_signals(stages, rates, rng), rates


def _band_power(x, fs, n_epochs, lo, hi):
    epochs = x[:n_epochs * 30 * fs].reshape(n_epochs, 30 * fs)
    f, p = sps.welch(epochs, fs=fs, nperseg=4 * fs, axis=1)
    return p[:, (f >= lo) & (f < hi)].sum(axis=1)


def test_night_signals_shapes_and_ranges(physiology):
    stages, sig, rates = physiology
    assert set(sig) == set(rates)
    for key, fs in rates.items():
        assert sig[key].dtype == np.float64 and len(sig[key]) == len(stages) * 30 * fs
    assert 50 <= sig["SPO2"].min() and sig["SPO2"].max() <= 100 and 94 < np.median(sig["SPO2"]) < 98
    assert 500 < np.percentile(sig["ECG"], 99.9) < 2500   # R waves around 1 mV


def test_eeg_delta_alpha_and_spindles_follow_stage(physiology):
    stages, sig, rates = physiology
    n = len(stages)

    def mean(values):
        return np.array([values[stages == s].mean() for s in range(5)])

    delta = mean(_band_power(sig["EEG"], rates["EEG"], n, 0.5, 2))
    alpha = mean(_band_power(sig["EEG"], rates["EEG"], n, 8, 12))
    sigma = mean(_band_power(sig["EEG"], rates["EEG"], n, 12, 15))
    theta = mean(_band_power(sig["EEG"], rates["EEG"], n, 4, 7))
    assert delta[3] > 3 * delta[0] and delta[3] == delta.max()
    assert alpha.argmax() == 0
    assert sigma[2] > sigma[[1, 4]].max()          # spindles
    assert theta[1] > theta[0] and theta[4] > theta[0]
    # N3: high-amplitude slow waves, > 75 µV peak to peak within most N3 epochs
    fs = rates["EEG"]
    slow = sps.sosfiltfilt(sps.butter(2, [0.5, 2], "bandpass", fs=fs, output="sos"), sig["EEG"])
    ep = slow[:n * 30 * fs].reshape(n, -1)
    assert np.median(np.ptp(ep[stages == 3], axis=1)) > 75


def test_emg_eog_heart_and_breathing_follow_stage(physiology):
    stages, sig, rates = physiology
    n = len(stages)

    def rms(key):
        epochs = sig[key][:n * 30 * rates[key]].reshape(n, -1)
        return np.array([epochs[stages == s].std(axis=1).mean() for s in range(5)])

    emg, eog = rms("EMG"), rms("EOG")
    assert emg[4] < emg[[1, 2, 3]].min() and emg[0] == emg.max()        # REM atonia, high tone awake
    assert eog[4] > 2 * eog[2] and eog[1] > 2 * eog[2]                   # REMs and slow rolling vs quiet N2
    hr = sig["HR"][:n * 30].reshape(n, 30).mean(axis=1)
    assert hr[stages == 0].mean() > hr[stages == 3].mean() + 5
    assert 40 <= sig["HR"].min() and sig["HR"].max() <= 120
    # breathing rate from the thorax: 12-16 per minute
    f, p = sps.welch(sig["THOR"], fs=rates["THOR"], nperseg=rates["THOR"] * 120)
    assert 10 / 60 < f[p.argmax()] < 18 / 60
    c = np.corrcoef(sig["THOR"], sig["ABDO"])[0, 1]
    assert 0.5 < c < 0.99                                                 # phase-shifted, not identical


def test_mros_electrodes_share_a_reference_that_the_derivation_cancels(cohorts):
    outdir, nights = cohorts["mros"]
    for i, night in enumerate(nights):
        rendered = syn.render_night("mros", i, HOURS, 7, outdir)
        signals, *_ = read_edf(night["edf"])
        sources = resolve(list(signals), PREPARE["mros"].CHANNELS)   # the derivations prepare takes
        for slot in VOLTAGE_SLOTS:
            (_, dim, hi, a), (_, _, _, b) = (signals[label] for label in sources[slot])
            to_uv, truth = microvolt_factor(dim, slot, sources[slot][0]), rendered.signals[slot]
            inside = (np.abs(a) < 0.999 * hi) & (np.abs(b) < 0.999 * hi)   # not clipped
            assert inside.mean() > 0.99, slot
            derived = (a - b) * to_uv
            assert np.max(np.abs(derived - truth)[inside]) < 0.2, slot      # equal up to 16-bit steps
            assert np.std(a * to_uv - truth) > 5, slot                     # the electrode alone carries r(t)


# ---------------------------------------------------------------------- annotations encode the truth

NSRR = {"Wake|0": 0, "Stage 1 sleep|1": 1, "Stage 2 sleep|2": 2, "Stage 3 sleep|3": 3, "Stage 4 sleep|4": 3,
        "REM sleep|5": 4}
CODES = {0: 0, 1: 1, 2: 2, 3: 3, 4: 3, 5: 4}
WORDS = {"W": 0, "N1": 1, "N2": 2, "N3": 3, "R": 4}


def _nsrr(path, n):
    out = np.full(n, -1, np.int8)
    events = ET.parse(path).getroot().find("ScoredEvents")
    for e in events:
        if e.findtext("EventType") == "Stages|Stages":
            first, length = round(float(e.findtext("Start")) / 30), round(float(e.findtext("Duration")) / 30)
            out[first:first + length] = NSRR.get(e.findtext("EventConcept"), -1)
    return out


def _profusion(path, n):
    codes = [int(s.text) for s in ET.parse(path).getroot().find("SleepStages")]
    return np.array([CODES.get(c, -1) for c in codes], np.int8)


def _since(clock, start):
    h, m, s = clock.split(":")
    t = int(h) * 3600 + int(m) * 60 + float(s)
    t0 = start.hour * 3600 + start.minute * 60 + start.second
    return (t - t0) % 86400


def _luna(path, n, start):
    out = np.full(n, -1, np.int8)
    lines = path.read_text().splitlines()
    assert lines[0].split("\t") == ["class", "instance", "channel", "start", "stop", "meta"]
    for line in lines[1:]:
        cls, _, _, a, b, _ = line.split("\t")
        if cls in WORDS or cls == "?":
            assert _since(b, start) - _since(a, start) == 30
            out[round(_since(a, start) / 30)] = WORDS.get(cls, -1)
    return out


def _stg(path, n):
    raw = path.read_bytes()
    assert b"\r\n" in raw
    rows = [line.split("\t") for line in raw.decode().splitlines()]
    col = rows[0].index("User-Defined Stage")
    out = np.full(n, -1, np.int8)
    for row in rows[1:]:
        out[int(row[0]) - 1] = CODES.get(int(row[col]), -1)
    return out


def _allscore(path, n, start):
    raw = path.read_bytes()
    assert b"\r\n" in raw
    lines = [line.split("\t") for line in raw.decode("latin-1").splitlines()]
    assert lines[0] == [f"{start:%H:%M:%S}.00", "START RECORDING"]
    out = np.full(n, -1, np.int8)
    changes = [(round(_since(t, start) / 30), text) for t, text in lines
               if text.startswith("STAGE - ") or text == "LIGHTS ON"]
    for (first, text), (nxt, _) in zip(changes, changes[1:]):
        out[first:nxt] = WORDS.get(text.removeprefix("STAGE - "), -1)
    return out


def _hypnogram_edf(path, n):
    with pyedflib.EdfReader(str(path)) as r:
        onsets, durations, texts = r.readAnnotations()
    assert "Lights off" in texts
    words = {"W": 0, "1": 1, "2": 2, "3": 3, "4": 3, "R": 4}
    out = np.full(n, -1, np.int8)
    for onset, dur, text in zip(onsets, durations, texts):
        if text.startswith("Sleep stage ") or text == "Movement time":
            first = round(onset / 30)
            out[first:first + round(dur / 30)] = words.get(text.removeprefix("Sleep stage "), -1)
    return out[:n]


@pytest.mark.parametrize("dataset", syn.DATASETS)
def test_annotations_encode_the_truth(cohorts, dataset):
    _, nights = cohorts[dataset]
    for night in nights:
        truth = np.load(night["truth"])
        n, start = len(truth), night["start"]
        for path in night["annotations"]:
            name = path.name
            if name.endswith("-nsrr.xml"):
                got = _nsrr(path, n)
                root = ET.parse(path).getroot()
                first = root.find("ScoredEvents")[0]
                assert first.findtext("EventConcept") == "Recording Start Time"
                assert float(first.findtext("Duration")) == night["duration_s"]
                assert first.findtext("ClockTime") == f"01.01.85 {start:%H.%M.%S}"
                types = {e.findtext("EventType") for e in root.find("ScoredEvents")}
                assert "Stages|Stages" in types
                assert types <= {"", "Stages|Stages", "Respiratory|Respiratory", "Arousals|Arousals"}
            elif name.endswith("-profusion.xml"):
                got = _profusion(path, n)
            elif name.endswith(".annot"):
                got = _luna(path, n, start)
            elif name.endswith(".stg.txt"):
                got = _stg(path, n)
            elif name.endswith(".allscore.txt"):
                got = _allscore(path, n, start)
            else:
                got = _hypnogram_edf(path, n)
            np.testing.assert_array_equal(got, truth, err_msg=str(path))


def test_cli(tmp_path):
    root = Path(syn.__file__).parents[1]
    help_text = subprocess.run([sys.executable, "-m", "synthetic", "--help"], capture_output=True,
                               text=True, cwd=root, check=True).stdout
    for word in ("shhs", "mesa", "mros", "apples", "wsc", "edf", "--nights", "--hours", "--seed", ".truth", "NOT"):
        assert word in help_text
    assert synthetic_main(["edf", str(tmp_path), "--nights", "1", "--hours", "0.05", "--seed", "2"]) == 0
    assert (tmp_path / "night-001.edf").is_file() and (tmp_path / ".truth" / "night-001.npy").is_file()
    torch = subprocess.run([sys.executable, "-c", "import sys, synthetic.__main__; print('torch' in sys.modules)"],
                           capture_output=True, text=True, cwd=root, check=True).stdout
    assert torch.strip() == "False"   # the generator runs without torch installed
