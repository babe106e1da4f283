"""Bad EDFs: a header that disagrees with the file, ambiguous labels, channels that cannot carry their
slot, EDF+D gaps, non-finite or negative header numbers. Each is one line naming the file and the field, signal or
record; prepare lists the night in failed.csv and still writes the good nights of the batch."""
import re

import numpy as np
import pandas as pd
import pytest

from prepare import edf, generic
from prepare.__main__ import main as prepare_main
from prepare.night import Night, Options, PrepareError, prepare_night
from prepare.signals import SLOTS

PSG_LABELS = ["C4-M1", "E1-M2", "Chin1-Chin2", "ECG", "SpO2", "Thorax", "Abdomen"]   # write_psg's signals, in order
PSG_RECORD_BYTES = 2 * (4 * 100 + 1 + 2 * 10)                                         # 1-s records
FIELDS = {  # per-signal header field -> (offset of its column in units of ns, width), EDF spec
    "label": (0, 16), "dimension": (96, 8), "physical minimum": (104, 8), "physical maximum": (112, 8),
    "digital minimum": (120, 8), "digital maximum": (128, 8), "samples per record": (216, 8)}


def patch(path, offset: int, text: str, width: int):
    data = bytearray(path.read_bytes())
    data[offset: offset + width] = text.encode("latin-1").ljust(width)
    path.write_bytes(bytes(data))


def patch_signal(path, index: int, field: str, text: str, ns: int = 7):
    column, width = FIELDS[field]
    patch(path, 256 + ns * column + index * width, text, width)


def prepared(path, required=("EEG", "EOG", "EMG")):
    night = Night(dataset="edf", night_id=path.stem, subject=path.stem, visit="", edf=path, labelled=False)
    return prepare_night(night, generic.CHANNELS, Options(required=required))


def one_line(message: str) -> str:
    assert "\n" not in message
    return message


def write_raw_edf_plus(path, onsets, record_s=10, fs=100, seed=0):
    """An EDF+D file written byte by byte: one EEG in µV and the 'EDF Annotations' signal whose first TAL in each
    record is the record's start (`onsets`, s)."""
    rng = np.random.default_rng(seed)
    spr, ann_bytes = int(fs * record_s), 40
    records = b"".join(rng.integers(-3000, 3000, spr).astype("<i2").tobytes()
                       + f"{onset:+g}\x14\x14\x00".encode().ljust(ann_bytes, b"\x00") for onset in onsets)

    def field(text, width):
        return str(text).encode().ljust(width)
    header = (field("0", 8) + field("X X X X", 80) + field("Startdate 03-FEB-2001 X X X", 80) + field("03.02.01", 8)
              + field("23.59.45", 8) + field(256 * 3, 8) + field("EDF+D", 44) + field(len(onsets), 8)
              + field(record_s, 8) + field(2, 4))
    header += field("C4-M1", 16) + field("EDF Annotations", 16) + field("", 80) * 2 + field("uV", 8) + field("", 8)
    header += field(-3276.8, 8) + field(-1, 8) + field(3276.7, 8) + field(1, 8)
    header += field(-32768, 8) * 2 + field(32767, 8) * 2 + field("", 80) * 2
    header += field(spr, 8) + field(ann_bytes // 2, 8) + field("", 32) * 2
    path.write_bytes(header + records)
    return path


# ----------------------------------------------------------------------------------------------------------------------
# 1. The file's size must agree with its header


@pytest.mark.parametrize("samples", ["11", "9"])
def test_a_wrong_samples_per_record_field_is_an_error(tmp_path, psg_writer, samples):
    path = psg_writer(tmp_path / "spr.edf", 60)
    patch_signal(path, PSG_LABELS.index("Thorax"), "samples per record", samples)
    record_bytes = PSG_RECORD_BYTES + 2 * (int(samples) - 10)
    expected = (rf"^{path}: size {256 * 8 + 60 * PSG_RECORD_BYTES} bytes disagrees with its header: 2048 header bytes "
                rf"\+ 60 records × {record_bytes} bytes = {2048 + 60 * record_bytes}; a samples-per-record or "
                rf"record-count field is wrong$")
    for allow_truncated in (False, True):   # a wrong field is never mistaken for a cut file, not even by predict.py
        with pytest.raises(edf.EdfError, match=expected):
            edf.read_header(path, allow_truncated=allow_truncated)


def test_more_whole_records_than_the_header_says_is_an_error(tmp_path, psg_writer):
    path = psg_writer(tmp_path / "long.edf", 60)
    path.write_bytes(path.read_bytes() + b"\x00" * (2 * PSG_RECORD_BYTES + 6))
    with pytest.raises(edf.EdfError, match=rf"^{path}: size \d+ bytes disagrees with its header: .* = \d+; a samples"):
        edf.read_header(path)


def test_trailing_bytes_short_of_one_record_are_ignored_with_a_warning(tmp_path, psg_writer):
    path = psg_writer(tmp_path / "padded.edf", 60)
    clean = edf.read_header(path)
    path.write_bytes(path.read_bytes() + b"\x00" * 100)
    header = edf.read_header(path)
    assert header.n_records == 60 and header.warnings == ["ignored 100 trailing bytes after the last data record "
                                                          "(less than one record)"]
    assert np.array_equal(edf.read_signal(header, "C4-M1"), edf.read_signal(clean, "C4-M1"))


def test_record_count_minus_one_must_divide_the_data(tmp_path, psg_writer):
    path = psg_writer(tmp_path / "unknown.edf", 60)
    patch(path, 236, "-1", 8)
    header = edf.read_header(path)
    assert header.n_records == 60 and "record count -1" in header.warnings[0]
    path.write_bytes(path.read_bytes() + b"\x00" * 6)
    with pytest.raises(edf.EdfError, match=rf"^{path}: size \d+ bytes disagrees with its header: 2048 header bytes "
                                           rf"\+ \? records × {PSG_RECORD_BYTES} bytes; a samples-per-record"):
        edf.read_header(path)


def test_a_cut_file_is_still_truncated_not_a_size_error(tmp_path, psg_writer):
    path = psg_writer(tmp_path / "cut.edf", 60)
    path.write_bytes(path.read_bytes()[:-(3 * PSG_RECORD_BYTES + 7)])
    with pytest.raises(edf.EdfError, match=rf"^{path}: truncated: header says 60 data records, file holds 56$"):
        edf.read_header(path)
    assert edf.read_header(path, allow_truncated=True).warnings == ["truncated: read 56 of 60 data records"]


# ----------------------------------------------------------------------------------------------------------------------
# 2. A label on two signals with different content is ambiguous


def _duplicated(tmp_path, edf_writer, label, second_fs, same=False):
    """A valid night whose `label` appears twice: the second copy at second_fs (identical when `same`)."""
    rng = np.random.default_rng(1)
    seconds = 120
    channels = [("C4-M1", 100, "uV", rng.normal(0, 40, 100 * seconds), (-500, 500)),
                ("E1-M2", 100, "uV", rng.normal(0, 20, 100 * seconds), (-500, 500)),
                ("Chin1-Chin2", 100, "uV", rng.normal(0, 10, 100 * seconds), (-500, 500)),
                ("Thorax", 10, "", rng.normal(0, 1, 10 * seconds), (-10, 10))]
    original = next(c for c in channels if c[0] == label)
    copy = original if same else (label, second_fs, "uV", rng.normal(0, 30, second_fs * seconds), (-500, 500))
    return edf_writer(tmp_path / f"dup-{label}.edf", channels + [copy])


def test_an_ambiguous_required_label_fails_the_night_naming_both_signals(tmp_path, edf_writer):
    path = _duplicated(tmp_path, edf_writer, "C4-M1", 200)
    with pytest.raises(PrepareError) as err:
        prepared(path)
    assert one_line(str(err.value)) == (
        "required slot EEG: label 'C4-M1' is on 2 signals with different content (signal #1: 100 Hz, unit 'uV', "
        "physical -500..500; signal #5: 200 Hz, unit 'uV', physical -500..500; numbered from 1 in header order)")
    with pytest.raises(edf.AmbiguousLabel, match=rf"^{path}: label 'C4-M1' is on 2 signals"):
        edf.read_signal(edf.read_header(path), "C4-M1")


def test_an_ambiguous_optional_label_becomes_absent_with_a_warning(tmp_path, edf_writer):
    path = _duplicated(tmp_path, edf_writer, "Thorax", 20)
    _, _, attrs = prepared(path)
    assert not attrs["present"][SLOTS.index("THOR")]
    assert any(w.startswith("slot THOR: label 'Thorax' is on 2 signals with different content (signal #4: 10 Hz")
               for w in attrs["warnings"])


def test_identical_duplicates_are_read_once(tmp_path, edf_writer):
    path = _duplicated(tmp_path, edf_writer, "C4-M1", 100, same=True)
    signals, _, attrs = prepared(path)
    assert attrs["present"][SLOTS.index("EEG")] and attrs["source_fs"]["EEG"] == 100
    assert signals[SLOTS.index("EEG")].astype(float).std() > 5


# ----------------------------------------------------------------------------------------------------------------------
# 3. A channel that cannot carry its slot is not present


@pytest.mark.parametrize("field,text,reason", [
    ("samples per record", "25", "slot EEG: signal 'C4-M1' is sampled at 25 Hz, below the 50 Hz its 0.3-30 Hz band "
                                 "needs"),
    ("digital minimum", "32767", "slot EEG: signal 'C4-M1' has digital minimum 32767 >= digital maximum 32767"),
    ("digital maximum", "-32768", "slot EEG: signal 'C4-M1' has digital minimum -32768 >= digital maximum -32768"),
    ("physical maximum", "-500", "slot EEG: signal 'C4-M1' has physical minimum = physical maximum (-500)"),
])
def test_a_channel_that_cannot_carry_its_slot(tmp_path, psg_writer, field, text, reason):
    path = psg_writer(tmp_path / "bad.edf", 60)
    patch_signal(path, 0, field, text)
    if field == "samples per record":   # ECG takes the other 75 samples: the record size stays what the file holds
        patch_signal(path, PSG_LABELS.index("ECG"), field, "175")
    with pytest.raises(PrepareError) as err:                          # required slot: the night fails
        prepared(path)
    assert one_line(str(err.value)) == f"required {reason}"
    _, _, attrs = prepared(path, required=("EOG", "EMG"))            # optional: absent, the reason in the warnings
    assert not attrs["present"][SLOTS.index("EEG")] and reason in attrs["warnings"]


def test_a_50_hz_eog_still_carries_its_slot(tmp_path, edf_writer):
    """SHHS-1 records EOG at 50 Hz, and the published model was trained on it: the rate limit is 50 Hz, not 60."""
    rng = np.random.default_rng(2)
    path = edf_writer(tmp_path / "shhs-like.edf", [
        ("C4-M1", 125, "uV", rng.normal(0, 40, 125 * 60), (-500, 500)),
        ("E1-M2", 50, "uV", rng.normal(0, 20, 50 * 60), (-500, 500)),
        ("Chin1-Chin2", 125, "uV", rng.normal(0, 10, 125 * 60), (-500, 500))])
    _, _, attrs = prepared(path)
    assert attrs["present"][SLOTS.index("EOG")] and attrs["source_fs"]["EOG"] == 50


# ----------------------------------------------------------------------------------------------------------------------
# 4. EDF+D: long gaps and records going backwards


def test_an_edf_plus_d_gap_longer_than_the_limit_is_an_error(tmp_path):
    path = write_raw_edf_plus(tmp_path / "gap.edf", [0, 10, 20 + edf.MAX_GAP_S + 1, 40 + edf.MAX_GAP_S])
    with pytest.raises(edf.EdfError, match=rf"^{path}: EDF\+D gap of 3601 s between record 1 and record 2 "
                                           rf"\(at 20 s\), longer than 1 h$"):
        edf.read_header(path)
    late = write_raw_edf_plus(tmp_path / "late.edf", [edf.MAX_GAP_S + 5, edf.MAX_GAP_S + 15])
    with pytest.raises(edf.EdfError, match=rf"^{late}: EDF\+D record 0 starts 3605 s after the file's start time"):
        edf.read_header(late)
    ok = write_raw_edf_plus(tmp_path / "ok.edf", [0, 10, 20 + edf.MAX_GAP_S])   # exactly the limit: filled
    assert edf.read_header(ok).duration_s == 30 + edf.MAX_GAP_S


@pytest.mark.parametrize("onsets,message", [
    ([0, 10, 5, 30], r"EDF\+D record 2 starts at 5 s, before record 1 ends \(20 s\): records overlap or are out of "
                     r"order"),
    ([-10, 0, 10], r"EDF\+D record 0 starts at -10 s, before the file's start time"),
])
def test_an_edf_plus_d_record_going_backwards_is_an_error(tmp_path, onsets, message):
    path = write_raw_edf_plus(tmp_path / "back.edf", onsets)
    with pytest.raises(edf.EdfError, match=rf"^{path}: {message}$"):
        edf.read_header(path)


# ----------------------------------------------------------------------------------------------------------------------
# 5. Non-finite or negative header numbers


@pytest.mark.parametrize("where,text,message", [
    ((244, 8), "nan", "header field 'data record duration' is not a finite number: 'nan'"),
    ((244, 8), "inf", "header field 'data record duration' is not a finite number: 'inf'"),
    ((244, 8), "-1", "header field 'data record duration' is negative: -1 s"),
    ((244, 8), "0", "header field 'data record duration' is 0 s, allowed only in an annotation-only file"),
    ((236, 8), "-5", "header field 'number of data records' is -5 (only -1, 'unknown', may be negative)"),
    ((236, 8), "Infinity", "header field 'number of data records' is not a finite number: 'Infinity'"),
    (("physical minimum", 0), "NaN", "header field \"physical minimum of 'C4-M1'\" is not a finite number: 'NaN'"),
    (("physical maximum", 3), "-inf", "header field \"physical maximum of 'ECG'\" is not a finite number: '-inf'"),
    (("digital maximum", 1), "nan", "header field \"digital maximum of 'E1-M2'\" is not a finite number: 'nan'"),
    (("samples per record", 5), "10.5", "header field \"samples per record of 'Thorax'\" is not a whole number: "
                                        "'10.5'"),
    (("samples per record", 5), "-10", "signal 'Thorax' has -10 samples per record"),
])
def test_non_finite_or_negative_header_numbers_are_one_line(tmp_path, psg_writer, where, text, message):
    path = psg_writer(tmp_path / "odd.edf", 60)
    if isinstance(where[0], str):
        patch_signal(path, where[1], where[0], text)
    else:
        patch(path, where[0], text, where[1])
    with pytest.raises(edf.EdfError) as err:
        edf.read_header(path)
    assert one_line(str(err.value)) == f"{path}: {message}"


# ----------------------------------------------------------------------------------------------------------------------
# A batch with bad EDFs: the good nights land, each bad one is one line in failed.csv


def test_prepare_batch_lists_each_bad_edf_and_writes_the_good_ones(tmp_path, psg_writer, edf_writer, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    for name in ("good-1", "good-2", "spr", "not-finite", "ambiguous", "slow"):
        psg_writer(src / f"{name}.edf", 120)
    patch_signal(src / "spr.edf", 5, "samples per record", "12")
    patch(src / "not-finite.edf", 244, "nan", 8)
    _duplicated(tmp_path, edf_writer, "C4-M1", 200).replace(src / "ambiguous.edf")
    patch_signal(src / "slow.edf", 2, "samples per record", "40")
    patch_signal(src / "slow.edf", 3, "samples per record", "160")       # same record size: only the rate is wrong
    write_raw_edf_plus(src / "gap.edf", [0, 10, 7200])
    assert prepare_main(["edf", str(src), str(out)]) == 0
    printed = capsys.readouterr().out
    failed = pd.read_csv(out / "failed.csv", dtype=str).set_index("night_id")["reason"].to_dict()
    expected = {
        "spr": rf"^{re.escape(str(src / 'spr.edf'))}: size \d+ bytes disagrees with its header",
        "not-finite": rf"^{re.escape(str(src / 'not-finite.edf'))}: header field 'data record duration' is not a "
                      r"finite number",
        "ambiguous": r"^required slot EEG: label 'C4-M1' is on 2 signals with different content",
        "slow": r"^required slot EMG: signal 'Chin1-Chin2' is sampled at 40 Hz, below the 50 Hz",
        "gap": rf"^{re.escape(str(src / 'gap.edf'))}: EDF\+D gap of 7180 s between record 1 and record 2",
    }
    assert set(failed) == set(expected)
    for night_id, pattern in expected.items():
        assert re.match(pattern, failed[night_id]) and "\n" not in failed[night_id], (night_id, failed[night_id])
        assert f"failed {night_id}: " in printed
    assert sorted(p.name for p in (out / "edf").iterdir()) == ["good-1.zarr", "good-2.zarr"]   # no temporaries
    assert "2 written, 0 skipped (already done), 5 failed" in printed
