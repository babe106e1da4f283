"""EDFs from other vendors, through predict.py and the prepare/ signal path: non-ASCII labels, headers pyedflib refuses,
EDF+D (discontinuous), odd sampling rates, physical dimensions in V or mV, fewer data records than the header says.
Each either works (and gives the same night as a clean file) or fails with one line naming the file and the cause."""
import json

import numpy as np
import pyedflib
import pytest

import predict
from prepare import edf
from prepare.generic import CHANNELS
from prepare.night import Night, Options, prepare_night


def prepared(path, **options):
    night = Night(dataset="edf", night_id="n", subject="n", visit="", edf=path, labelled=False)
    return prepare_night(night, CHANNELS, Options(required=(), **options))


def patch(path, offset: int, raw: bytes, width: int):
    data = bytearray(path.read_bytes())
    data[offset: offset + width] = raw.ljust(width)
    path.write_bytes(bytes(data))


def label_offset(index: int) -> int:
    return 256 + 16 * index


def dimension_offset(index: int, ns: int) -> int:
    return 256 + ns * (16 + 80) + 8 * index


# ----------------------------------------------------------------------------------------------------------------------
# Headers pyedflib refuses


def test_non_ascii_labels_and_units_that_pyedflib_refuses(tmp_path, tiny_probe_run, capsys, psg_writer):
    clean = psg_writer(tmp_path / "clean.edf", 6 * 60)
    vendor = tmp_path / "vendor.edf"
    vendor.write_bytes(clean.read_bytes())
    patch(vendor, label_offset(0), "EEG C4–M1".encode("utf-8"), 16)        # UTF-8 en dash (3 bytes)
    patch(vendor, label_offset(1), "Œil gauche".encode("latin-1", "replace").replace(b"?", b"O") + b"\xe9", 16)
    patch(vendor, dimension_offset(0, 7), b"\xb5V", 8)                    # 'µV' in Latin-1
    patch(vendor, 176, b"23:59:45", 8)                                     # ':' instead of '.' in the start time
    with pytest.raises(OSError, match="not EDF"):
        pyedflib.EdfReader(str(vendor))
    header = edf.read_header(vendor)
    assert header.labels()[:2] == ["EEG C4–M1", "Oil gauche\u00e9"] and header.signals[0].dimension == "µV"
    assert header.start == psg_writer.start
    channel_map = tmp_path / "map.yaml"
    channel_map.write_text("EEG: EEG C4–M1\nEOG: Oil gauche\u00e9\n", encoding="utf-8")
    out = tmp_path / "out"
    assert predict.main([str(vendor), "--run", str(tiny_probe_run), "--channels", str(channel_map), "--out", str(out),
                         "--device", "cpu"]) == 0
    stats = json.loads((out / "vendor.stats.json").read_text())
    assert stats["source_labels"]["EEG"] == "EEG C4–M1" and stats["absent_slots"] == []
    # the same night as the clean file, sample for sample
    import yaml
    ours, _, _ = prepared(vendor, channel_map=yaml.safe_load(channel_map.read_text(encoding="utf-8")))
    reference, _, _ = prepared(clean)
    assert np.array_equal(ours, reference)


def test_a_utf8_character_cut_by_the_label_width_is_dropped(tmp_path, psg_writer):
    path = psg_writer(tmp_path / "cut.edf", 60)
    patch(path, label_offset(0), "EEG-C4-M1-links–".encode("utf-8")[:16], 16)   # the dash's 3 bytes cut after 1
    assert edf.read_header(path).labels()[0] == "EEG-C4-M1-links"


# ----------------------------------------------------------------------------------------------------------------------
# EDF+D


def write_edf_plus(path, fs: int, record_s: float, onsets, kind="EDF+D", seed=0):
    """A raw EDF+ file written byte by byte (independently of prepare/edf.py): one EEG signal in µV and the
    'EDF Annotations' signal whose first TAL in each record gives the record's start (`onsets`, seconds)."""
    rng = np.random.default_rng(seed)
    spr, ann_bytes = int(fs * record_s), 60
    digital = rng.integers(-3000, 3000, (len(onsets), spr)).astype("<i2")        # 1 digit = 0.1 µV below
    records = b""
    for onset, samples in zip(onsets, digital):
        tal = f"+{onset:g}\x14\x14\x00".encode().ljust(ann_bytes, b"\x00")
        records += samples.tobytes() + tal

    def field(text, width):
        return str(text).encode().ljust(width)

    header = (field("0", 8) + field("X X X X", 80) + field("Startdate 03-FEB-2001 X X X", 80) + field("03.02.01", 8)
              + field("23.59.45", 8) + field(256 * 3, 8) + field(kind, 44) + field(len(onsets), 8)
              + field(f"{record_s:g}", 8) + field(2, 4))
    header += field("EEG C4-M1", 16) + field("EDF Annotations", 16) + field("", 80) * 2 + field("uV", 8) + field("", 8)
    header += field(-3276.8, 8) + field(-1, 8) + field(3276.7, 8) + field(1, 8)
    header += field(-32768, 8) * 2 + field(32767, 8) * 2 + field("", 80) * 2
    header += field(spr, 8) + field(ann_bytes // 2, 8) + field("", 32) * 2
    path.write_bytes(header + records)
    return digital.astype(float) * 0.1                                                # [n_records, spr] µV


def test_edf_plus_d_records_are_placed_at_their_start_times(tmp_path, tiny_probe_run):
    path = tmp_path / "disc.edf"
    onsets = [0, 10, 20, 90, 100, 110, 120, 130, 140, 150, 160, 170]            # a 60-s gap after the third record
    values = write_edf_plus(path, fs=100, record_s=10, onsets=onsets)
    header = edf.read_header(path)
    assert header.edf_plus == "EDF+D" and header.duration_s == 180
    assert header.warnings == ["EDF+D: 1 gap(s), 60 s in all, filled by interpolation"]
    eeg = edf.read_signal(header, "EEG C4-M1")
    assert len(eeg) == 18000 and np.isnan(eeg[3000:9000]).all()
    assert np.allclose(eeg[:3000], values[:3].ravel()) and np.allclose(eeg[9000:], values[3:].ravel())
    out = tmp_path / "out"
    assert predict.main([str(path), "--run", str(tiny_probe_run), "--out", str(out), "--allow-missing",   # EEG only
                         "--device", "cpu"]) == 0
    stats = json.loads((out / "disc.stats.json").read_text())
    assert stats["n_epochs"] == 6 and any("EDF+D" in w for w in stats["warnings"])


def test_contiguous_edf_plus_d_reads_as_continuous(tmp_path):
    path = tmp_path / "cont.edf"
    values = write_edf_plus(path, fs=100, record_s=10, onsets=[0, 10, 20, 30])
    header = edf.read_header(path)
    assert header.record_onsets is None and header.warnings == [] and header.duration_s == 40
    assert np.allclose(edf.read_signal(header, "EEG C4-M1"), values.ravel())


def test_overlapping_edf_plus_d_records_are_a_one_line_error(tmp_path, tiny_probe_run, capsys):
    path = tmp_path / "overlap.edf"
    write_edf_plus(path, fs=100, record_s=10, onsets=[0, 10, 15, 30])
    with pytest.raises(edf.EdfError, match=rf"^{path}: EDF\+D record 2 starts at 15 s, before record 1 ends \(20 s\)"):
        edf.read_header(path)
    assert predict.main([str(path), "--run", str(tiny_probe_run), "--device", "cpu"]) == 1
    error, = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {path}: EDF+D record 2") and "overlap" in error


# ----------------------------------------------------------------------------------------------------------------------
# Sampling rates and units


@pytest.mark.parametrize("fs,record_s", [(200, 1), (256, 1), (512, 1), (128, 0.5), (255.5, 2), (50, 1)])
def test_odd_sampling_rates_give_the_same_sine_at_125_hz(tmp_path, fs, record_s, edf_writer):
    seconds = 120
    t = np.arange(int(seconds * fs)) / fs
    eeg = 50 * np.sqrt(2) * np.sin(2 * np.pi * 10 * t)                        # 10 Hz, RMS 50 µV
    eog = 30 * np.sin(2 * np.pi * 2 * t)
    path = edf_writer(tmp_path / "odd.edf", [("C4-M1", fs, "uV", eeg, (-500, 500)), ("E1-M2", fs, "uV", eog, (-500, 500)),
                                            ("Chin1-Chin2", fs, "uV", eog / 3, (-500, 500))], record_s=record_s)
    assert edf.read_header(path).signals[0].fs == fs
    signals, _, attrs = prepared(path)
    assert signals.shape == (7, seconds * 125) and attrs["source_fs"]["EEG"] == fs
    settled = signals[3, 20 * 125: -5 * 125].astype(float)                    # after the filter's start-up
    assert np.sqrt(np.mean(settled ** 2)) == pytest.approx(50, rel=0.03)


@pytest.mark.parametrize("dimension,scale", [("V", 1e-6), ("mV", 1e-3), ("uV", 1.0), ("µV", 1.0)])
def test_physical_dimension_in_volts_or_millivolts_is_converted_to_microvolts(tmp_path, dimension, scale, edf_writer):
    rng = np.random.default_rng(0)
    eeg = rng.normal(0, 40, 100 * 120)                                        # µV
    channels = [("C4-M1", 100, "uV", eeg, (-500, 500)), ("E1-M2", 100, "uV", eeg / 2, (-500, 500)),
                ("Chin1-Chin2", 100, "uV", eeg / 4, (-500, 500))]
    reference = edf_writer(tmp_path / "ref.edf", channels)
    scaled = edf_writer(tmp_path / "scaled.edf",
                       [("C4-M1", 100, "uV", eeg * scale, (-500 * scale, 500 * scale)), *channels[1:]])
    if dimension != "uV":
        patch(scaled, dimension_offset(0, 3), dimension.encode("latin-1"), 8)
    ours, _, attrs = prepared(scaled)
    theirs, _, _ = prepared(reference)
    assert attrs["source_units"]["EEG"] == "uV"
    # same µV signal up to the 8-character rounding of the physical range in the header
    assert np.allclose(ours[3].astype(float), theirs[3].astype(float), atol=0.05, rtol=1e-3)


# ----------------------------------------------------------------------------------------------------------------------
# Fewer data records than the header says


def test_short_file_is_staged_as_far_as_it_goes_or_fails_with_strict(tmp_path, tiny_probe_run, capsys, psg_writer):
    full = psg_writer(tmp_path / "full.edf", 10 * 60)
    raw = full.read_bytes()
    record_bytes = 2 * (100 * 4 + 1 + 10 * 2)                                 # 4 × 100 Hz, SpO2 1 Hz, belts 10 Hz
    short = tmp_path / "short.edf"
    short.write_bytes(raw[: len(raw) - 185 * record_bytes - 7])               # 185 s and a bit of a record missing
    out = tmp_path / "out"
    assert predict.main([str(short), "--run", str(tiny_probe_run), "--out", str(out), "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "warning: " in captured.out and "truncated: read 414 of 600 data records" in captured.out
    stats = json.loads((out / "short.stats.json").read_text())
    assert stats["n_epochs"] == 414 // 30 and "truncated: read 414 of 600 data records" in stats["warnings"]
    assert predict.main([str(short), "--run", str(tiny_probe_run), "--out", str(tmp_path / "strict"), "--strict",
                         "--device", "cpu"]) == 1
    error, = capsys.readouterr().err.strip().splitlines()
    assert error == f"error: {short}: truncated: header says 600 data records, file holds 414"


def test_a_night_without_any_usable_channel_fails(tmp_path, tiny_probe_run, capsys, edf_writer):
    path = edf_writer(tmp_path / "none.edf", [("Pleth", 100, "", np.random.default_rng(0).normal(0, 1, 6000), (-5, 5))])
    assert predict.main([str(path), "--run", str(tiny_probe_run), "--device", "cpu"]) == 1
    error, = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {path}: no usable channel: slot ECG: none of its labels is in the EDF")


def test_edf_plus_d_without_record_times_is_a_one_line_error(tmp_path):
    no_annotations = tmp_path / "no_ann.edf"
    write_edf_plus(no_annotations, fs=100, record_s=10, onsets=[0, 10, 30])
    patch(no_annotations, label_offset(1), b"Pleth", 16)                  # the annotation signal renamed away
    with pytest.raises(edf.EdfError, match=rf"^{no_annotations}: EDF\+D \(discontinuous\) without an 'EDF Annotations'"):
        edf.read_header(no_annotations)
    no_tal = tmp_path / "no_tal.edf"
    write_edf_plus(no_tal, fs=100, record_s=10, onsets=[0, 10, 30])
    record_bytes = 2 * 1000 + 60
    patch(no_tal, 768 + record_bytes + 2000, b"\x00" * 8, 8)               # record 1's time-keeping TAL wiped
    with pytest.raises(edf.EdfError, match=rf"^{no_tal}: EDF\+D record 1 has no time-keeping annotation$"):
        edf.read_header(no_tal)
