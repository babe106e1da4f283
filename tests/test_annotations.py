"""Annotation readers: real third-party hypnograms (tests/data) and small hand-written files per format."""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository root, for `prepare`

from prepare.annotations import (  # noqa: E402
    AnnotationError, Hypnogram, fit_to_recording, read_edf_hypnogram, read_hypnogram, read_luna_annot,
    read_nsrr_xml, read_profusion_xml, read_text, read_wsc_allscore, read_wsc_stg,
)


TESTDATA = Path(__file__).parent / "data"  # third-party hypnograms with their licences (data/README.md)
REAL_FILES = ["sleep-edf_SC4001EC-Hypnogram.edf", "hmc_SN001_sleepscoring.edf",
              "sleep-edf_ST7132JR-Hypnogram.edf", "yasa_data_full_6hrs_100Hz_hypno_30s.txt"]


def _testdata() -> Path:
    # The files are part of the repository: a missing one is a broken checkout, not a reason to skip.
    missing = [name for name in ["expected.json", *REAL_FILES] if not (TESTDATA / name).is_file()]
    if missing:
        pytest.fail(f"hypnogram test data missing from {TESTDATA}: {', '.join(missing)}", pytrace=False)
    return TESTDATA


@pytest.fixture(scope="module")
def testdata() -> tuple[Path, dict]:
    root = _testdata()
    return root, json.loads((root / "expected.json").read_text())


STAGE_NAMES = {"W": 0, "N1": 1, "N2": 2, "N3": 3, "REM": 4, "unscored": -1}


def _trim_trailing_unscored(stages: np.ndarray) -> np.ndarray:
    scored = np.flatnonzero(stages >= 0)
    return stages[: scored[-1] + 1]


# ---------------------------------------------------------------------------------------------------------
# Real files


@pytest.mark.parametrize("name", REAL_FILES)
def test_real_hypnograms_match_expected(testdata, name):
    root, expected = testdata
    exp = expected[name]
    path = root / name
    assert hashlib.sha256(path.read_bytes()).hexdigest() == exp["sha256"]

    hyp = read_hypnogram(path)
    assert hyp.format == ("text" if name.endswith(".txt") else "edf+")
    assert hyp.stages.dtype == np.int8
    assert hyp.source == str(path)
    stages = _trim_trailing_unscored(hyp.stages)
    assert len(stages) == exp["n_epochs"]
    np.testing.assert_array_equal(stages, exp["epochs"])
    if "n_epochs_incl_trailing_unscored" in exp:
        assert len(hyp.stages) == exp["n_epochs_incl_trailing_unscored"]
    counts = {k: int((stages == code).sum()) for k, code in STAGE_NAMES.items()}
    assert counts == exp["stage_counts"]
    sleep = np.flatnonzero(np.isin(stages, [1, 2, 3, 4]))
    assert (sleep[0], sleep[-1]) == (exp["first_sleep_epoch"], exp["last_sleep_epoch"])
    np.testing.assert_array_equal(stages[:20], exp["first_20_epochs"])


def test_hmc_lights_markers_are_not_epochs(testdata):
    root, _ = testdata
    hyp = read_edf_hypnogram(root / "hmc_SN001_sleepscoring.edf")
    assert len(hyp.stages) == 854  # 856 if the two zero-duration 'Lights off/on@@…' events became epochs
    assert hyp.notes == []


def test_sc4001_trailing_unscored_block_is_kept(testdata):
    root, expected = testdata
    hyp = read_hypnogram(root / "sleep-edf_SC4001EC-Hypnogram.edf")
    assert (hyp.stages[2650:] == -1).all() and len(hyp.stages) == 2880
    # Cropped to a recording of 2650 epochs: the unscored overhang is not an error.
    stages, notes = fit_to_recording(hyp, 2650)
    np.testing.assert_array_equal(stages, expected["sleep-edf_SC4001EC-Hypnogram.edf"]["epochs"])
    assert any("cropped 230 epochs" in n for n in notes)


def test_edf_hypnogram_shifted_to_recording_start(testdata):
    root, expected = testdata
    path = root / "hmc_SN001_sleepscoring.edf"
    epochs = expected["hmc_SN001_sleepscoring.edf"]["epochs"]
    header_start = dt.datetime(2001, 1, 1, 23, 59, 30)

    same = read_edf_hypnogram(path, header_start)
    np.testing.assert_array_equal(same.stages, epochs)
    assert same.notes == []

    # Recording started 30 s before the scoring file: one unscored epoch in front.
    later = read_edf_hypnogram(path, header_start - dt.timedelta(seconds=30))
    np.testing.assert_array_equal(later.stages, [-1] + epochs)
    assert any("+30 s" in n for n in later.notes)

    # Recording started 30 s after the scoring file (across midnight): the first annotation falls before it.
    earlier = read_edf_hypnogram(path, dt.datetime(2001, 1, 2, 0, 0, 0))
    np.testing.assert_array_equal(earlier.stages, epochs[1:])
    assert any("dropped 1 stage annotations" in n for n in earlier.notes)


def test_edf_hypnogram_rejects_a_day_shift(testdata):
    root, expected = testdata
    path = root / "sleep-edf_ST7132JR-Hypnogram.edf"
    # MNE's start for this file comes from the recording field, a day before the header date.
    mne_start = dt.datetime.fromisoformat(expected["sleep-edf_ST7132JR-Hypnogram.edf"]["start_mne"])
    with pytest.raises(AnnotationError, match="recording starts") as err:
        read_edf_hypnogram(path, mne_start)
    assert str(err.value).startswith(str(path))


# ---------------------------------------------------------------------------------------------------------
# EDF+ written by hand


def _write_edf_plus(path: Path, start: dt.datetime, events: list[tuple[str, str, str]]) -> Path:
    """An annotation-only EDF+C file: one data record of duration 0 holding the TALs (onset, duration, text)."""
    tals = b"+0\x14\x14\x00" + b"".join(
        f"{onset}".encode() + (f"\x15{dur}".encode() if dur else b"") + b"\x14" + text.encode() + b"\x14\x00"
        for onset, dur, text in events)
    samples = (len(tals) + 1) // 2 + 8
    data = tals.ljust(2 * samples, b"\x00")

    def f(value, width):
        return str(value).ljust(width).encode("ascii")

    header = (f("0", 8) + f("X X X X", 80) + f("Startdate X X X X", 80) + f(start.strftime("%d.%m.%y"), 8)
              + f(start.strftime("%H.%M.%S"), 8) + f(512, 8) + f("EDF+C", 44) + f(1, 8) + f(0, 8) + f(1, 4)
              + f("EDF Annotations", 16) + f("", 80) + f("", 8) + f(-1, 8) + f(1, 8) + f(-32768, 8)
              + f(32767, 8) + f("", 80) + f(samples, 8) + f("", 32))
    path.write_bytes(header + data)
    return path


def test_edf_plus_stage_rules(tmp_path):
    path = _write_edf_plus(tmp_path / "h.edf", dt.datetime(2020, 3, 1, 22, 0, 0), [
        ("+0", "60", "Sleep stage W"),
        ("+12.5", "", "Lights off@@EEG F4-A1"),      # a marker, not an epoch
        ("+60", "30", "Sleep stage N1"),
        ("+90", "", "Sleep stage 2"),                # duration 0 covers one epoch
        ("+120", "30", "Movement time"),
        ("+150", "45", "Sleep stage 4"),             # ends mid-epoch: covers epochs 5 and 6
        ("+240", "30", "Sleep stage R"),             # epoch 7 has no annotation
        ("+270", "30", "Sleep stage ?"),
    ])
    hyp = read_hypnogram(path)
    assert hyp.format == "edf+"
    np.testing.assert_array_equal(hyp.stages, [0, 0, 1, 2, -1, 3, 3, -1, 4, -1])


def test_edf_plus_errors(tmp_path):
    start = dt.datetime(2020, 3, 1, 22, 0, 0)
    bad = _write_edf_plus(tmp_path / "bad.edf", start, [("+0", "30", "Sleep stage X")])
    with pytest.raises(AnnotationError, match=r"bad\.edf: unknown stage annotation 'Sleep stage X'"):
        read_hypnogram(bad)
    none = _write_edf_plus(tmp_path / "none.edf", start, [("+10", "", "Lights off")])
    with pytest.raises(AnnotationError, match=r"none\.edf: no sleep-stage annotations"):
        read_hypnogram(none)
    negative = _write_edf_plus(tmp_path / "neg.edf", start, [("-30", "30", "Sleep stage W")])
    with pytest.raises(AnnotationError, match=r"neg\.edf: negative onset"):
        read_hypnogram(negative)
    broken = tmp_path / "broken.edf"
    broken.write_bytes(b"0       " + b"x" * 100)
    with pytest.raises(AnnotationError, match=r"broken\.edf: "):
        read_hypnogram(broken)


# ---------------------------------------------------------------------------------------------------------
# NSRR XML

NSRR = """<?xml version="1.0" encoding="UTF-8" standalone="no"?>
<PSGAnnotation>
<SoftwareVersion>Compumedics</SoftwareVersion>
<EpochLength>30</EpochLength>
<ScoredEvents>
<ScoredEvent>
<EventType/>
<EventConcept>Recording Start Time</EventConcept>
<Start>0</Start>
<Duration>600.0</Duration>
<ClockTime>00.00.00 22.00.00</ClockTime>
</ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Wake|0</EventConcept><Start>60.0</Start><Duration>90.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Respiratory|Respiratory</EventType><EventConcept>Hypopnea|Hypopnea</EventConcept><Start>100.5</Start><Duration>12.3</Duration><SignalLocation>Airflow</SignalLocation></ScoredEvent>
<ScoredEvent>
<EventType>Stages|Stages</EventType>
<EventConcept>Stage 1 sleep|1</EventConcept>
<Start>150.0</Start>
<Duration>30.0</Duration>
</ScoredEvent>
<ScoredEvent><EventType>Arousals|Arousals</EventType><EventConcept>Arousal|Arousal ()</EventConcept><Start>170</Start><Duration>5</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 4 sleep|4</EventConcept><Start>240.0</Start><Duration>60.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>REM sleep|5</EventConcept><Start>300</Start><Duration>59.9999</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Movement|6</EventConcept><Start>360.0</Start><Duration>30.0</Duration></ScoredEvent>
<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 2 sleep|2</EventConcept><Start>390.0</Start><Duration>30.0</Duration></ScoredEvent>
</ScoredEvents>
</PSGAnnotation>
"""


def _write(path: Path, text: str, crlf: bool = False, encoding: str = "utf-8") -> Path:
    path.write_bytes((text.replace("\n", "\r\n") if crlf else text).encode(encoding))
    return path


def test_nsrr_xml(tmp_path):
    path = _write(tmp_path / "shhs1-200001-nsrr.xml", NSRR, crlf=True)
    hyp = read_hypnogram(path)
    assert hyp.format == "nsrr-xml"
    assert hyp.recording_s == 600.0
    # late first run (epochs 0-1 unscored), gap at 6-7, stage 4 → N3, movement → -1
    np.testing.assert_array_equal(hyp.stages, [-1, -1, 0, 0, 0, 1, -1, -1, 3, 3, 4, 4, -1, 2])
    assert hyp.notes == []


def test_nsrr_xml_overlap_later_run_wins(tmp_path):
    text = NSRR.replace("<Start>150.0</Start>", "<Start>120.0</Start>")  # N1 now overlaps the last W epoch
    hyp = read_nsrr_xml(_write(tmp_path / "a-nsrr.xml", text))
    np.testing.assert_array_equal(hyp.stages[:6], [-1, -1, 0, 0, 1, -1])
    assert any("later one was kept" in n for n in hyp.notes)


def test_nsrr_xml_errors(tmp_path):
    broken = _write(tmp_path / "broken-nsrr.xml", NSRR[:300])
    with pytest.raises(AnnotationError, match=r"broken-nsrr\.xml: not well-formed XML"):
        read_hypnogram(broken)
    no_stages = _write(tmp_path / "empty-nsrr.xml", "<PSGAnnotation><ScoredEvents/></PSGAnnotation>")
    with pytest.raises(AnnotationError, match=r"empty-nsrr\.xml: no sleep-stage annotations"):
        read_hypnogram(no_stages)
    negative = _write(tmp_path / "neg-nsrr.xml", NSRR.replace("<Start>60.0</Start>", "<Start>-60.0</Start>"))
    with pytest.raises(AnnotationError, match=r"neg-nsrr\.xml: negative onset"):
        read_nsrr_xml(negative)
    with pytest.raises(AnnotationError, match=r"missing-nsrr\.xml: no such file"):
        read_hypnogram(tmp_path / "missing-nsrr.xml")


# ---------------------------------------------------------------------------------------------------------
# Profusion XML

PROFUSION = """<?xml version="1.0" encoding="utf-8"?>
<CMPStudyConfig>
  <EpochLength>30</EpochLength>
  <ScoredEvents><ScoredEvent><Name>Hypopnea</Name><Start>10</Start><Duration>12</Duration></ScoredEvent></ScoredEvents>
  <SleepStages>
    <SleepStage>0</SleepStage><SleepStage>1</SleepStage><SleepStage>2</SleepStage><SleepStage>3</SleepStage>
    <SleepStage>4</SleepStage><SleepStage>5</SleepStage><SleepStage>6</SleepStage><SleepStage>9</SleepStage>
    <SleepStage>0</SleepStage>
  </SleepStages>
</CMPStudyConfig>
"""


def test_profusion_xml(tmp_path):
    hyp = read_hypnogram(_write(tmp_path / "mesa-sleep-0001-profusion.xml", PROFUSION))
    assert hyp.format == "profusion-xml"
    np.testing.assert_array_equal(hyp.stages, [0, 1, 2, 3, 3, 4, -1, -1, 0])


def test_profusion_xml_errors(tmp_path):
    epoch20 = _write(tmp_path / "e20-profusion.xml", PROFUSION.replace(">30<", ">20<"))
    with pytest.raises(AnnotationError, match=r"e20-profusion\.xml: EpochLength is 20 s"):
        read_profusion_xml(epoch20)
    text = _write(tmp_path / "txt-profusion.xml", PROFUSION.replace("<SleepStage>5<", "<SleepStage>R<"))
    with pytest.raises(AnnotationError, match=r"txt-profusion\.xml: SleepStage 6 is not an integer"):
        read_profusion_xml(text)


# ---------------------------------------------------------------------------------------------------------
# Luna .annot

LUNA = """# W | wake
# N2 | NREM stage 2
class\tinstance\tchannel\tstart\tstop\tmeta
W\t.\t.\t23:59:30\t00:00:00\t.
arousal\t.\tC3\t23:59:40\t23:59:45\t.
N1\t.\t.\t00:00:00\t00:00:30\t.
N2\t.\t.\t00:00:30\t00:01:30\t.
R\t.\t.\t00:02:00\t00:02:30\t.
?\t.\t.\t00:02:30\t00:03:00\t.
N3\t.\t.\te:9\te:9\t.
NREM2\t.\t.\t270\t300\t.
"""


def test_luna_annot(tmp_path):
    path = _write(tmp_path / "apples-100001.annot", LUNA)
    start = dt.datetime(2003, 5, 1, 23, 59, 0)
    hyp = read_hypnogram(path, edf_start=start)
    assert hyp.format == "luna-annot"
    # first row starts 30 s after the EDF (epoch 0 unscored); clock wraps past midnight; gap at epoch 5
    np.testing.assert_array_equal(hyp.stages, [-1, 0, 1, 2, 2, -1, 4, -1, 3, 2])
    # The header row alone identifies the format, whatever the file's name.
    assert read_hypnogram(_write(tmp_path / "staging.txt", LUNA), edf_start=start).format == "luna-annot"


def test_luna_annot_errors(tmp_path):
    path = _write(tmp_path / "n.annot", LUNA)
    with pytest.raises(AnnotationError, match=r"n\.annot: line 4: clock time '23:59:30' needs the EDF start"):
        read_luna_annot(path, None)
    bad = _write(tmp_path / "bad.annot", LUNA.replace("e:9\te:9", "e:0\te:1"))
    with pytest.raises(AnnotationError, match=r"bad\.annot: line 10: bad epoch code 'e:0'"):
        read_luna_annot(bad, dt.datetime(2003, 5, 1, 23, 59, 0))
    events = _write(tmp_path / "ev.annot", "class\tinstance\tchannel\tstart\tstop\tmeta\narousal\t.\t.\t10\t15\t.\n")
    with pytest.raises(AnnotationError, match=r"ev\.annot: no sleep-stage annotations"):
        read_luna_annot(events, None)


# ---------------------------------------------------------------------------------------------------------
# WSC .stg.txt


def test_wsc_stg_with_header(tmp_path):
    text = ("Epoch\tUser-Defined Stage\tCAST-Defined Stage\n"
            "1\t0\t1\n2\t1\t1\n3\t4\t4\n5\t5\t5\n6\t6\t6\n7\t7\t0\n8\t2\t2\n")
    hyp = read_hypnogram(_write(tmp_path / "wsc-visit1-10119-nsrr.stg.txt", text, crlf=True))
    assert hyp.format == "wsc-stg"
    np.testing.assert_array_equal(hyp.stages, [0, 1, 3, -1, 4, -1, -1, 2])  # epoch 4 missing → -1


def test_wsc_stg_columns_by_name(tmp_path):
    text = "epoch\tCAST-Defined Stage\tuser-defined stage\n1\t2\t0\n2\t2\t5\n"
    np.testing.assert_array_equal(read_wsc_stg(_write(tmp_path / "x.stg.txt", text)).stages, [0, 4])


def test_wsc_stg_headerless(tmp_path):
    path = _write(tmp_path / "wsc-visit2-1-nsrr.stg.txt", "1\t\t0\n2\t\t2\n4\t5\n", crlf=True)
    np.testing.assert_array_equal(read_hypnogram(path).stages, [0, 2, -1, 4])


def test_wsc_stg_errors(tmp_path):
    code = _write(tmp_path / "c.stg.txt", "Epoch\tUser-Defined Stage\n1\t0\n2\t8\n")
    with pytest.raises(AnnotationError, match=r"c\.stg\.txt: line 3: unknown stage code '8'"):
        read_wsc_stg(code)
    epoch = _write(tmp_path / "e.stg.txt", "0\t1\n")
    with pytest.raises(AnnotationError, match=r"e\.stg\.txt: line 1: bad epoch number '0'"):
        read_wsc_stg(epoch)
    header = _write(tmp_path / "h.stg.txt", "Epoch\tScore\n1\t0\n")
    with pytest.raises(AnnotationError, match=r"h\.stg\.txt: header has no 'User-Defined Stage' column"):
        read_wsc_stg(header)


# ---------------------------------------------------------------------------------------------------------
# WSC .allscore.txt

ALLSCORE = (
    "23:58:00.00\tSTART RECORDING\n"
    "23:58:10.00\tLIGHTS OUT\n"
    "23:58:30.00\tSTAGE - W\n"
    "23:59:00.00\tPatient r\xe9veill\xe9, t\xe9l\xe9phone\n"   # a Latin-1 free-text note
    "23:59:30.00\tSTAGE - N1\n"
    "23:59:41.37\tAROUSAL - SPONTANEOUS\n"
    "00:00:00.00\tSTAGE - N2\n"
    "00:01:00.00\tSTAGE - R\n"
    "00:01:30.00\tSTAGE - NO STAGE\n"
    "00:02:00.00\tSTAGE - N3\n"
    "00:03:00.00\tLIGHTS ON\n"
    "00:04:00.00\tDESATURATION - 91%\n"
)
ALLSCORE_STAGES = [-1, 0, 0, 1, 2, 2, 4, -1, 3, 3]


def _allscore(tmp_path: Path, text: str, name: str = "wsc-visit1-20001-nsrr.allscore.txt") -> Path:
    return _write(tmp_path / name, text, crlf=True, encoding="latin-1")


def test_wsc_allscore(tmp_path):
    path = _allscore(tmp_path, ALLSCORE)
    hyp = read_hypnogram(path, edf_start=dt.datetime(2000, 1, 1, 23, 58, 0))
    assert hyp.format == "wsc-allscore"
    np.testing.assert_array_equal(hyp.stages, ALLSCORE_STAGES)
    # Without an EDF start the START RECORDING line is the reference.
    np.testing.assert_array_equal(read_wsc_allscore(path, None).stages, ALLSCORE_STAGES)


def test_wsc_allscore_without_start_line_or_lights_on(tmp_path):
    text = ALLSCORE.replace("23:58:00.00\tSTART RECORDING\n", "").replace("LIGHTS ON", "NEW MONTAGE")
    path = _allscore(tmp_path, text)
    hyp = read_wsc_allscore(path, dt.datetime(2000, 1, 1, 23, 58, 0))
    # N3 now lasts until the last time in the file (00:04:00): epochs 8..11
    np.testing.assert_array_equal(hyp.stages, ALLSCORE_STAGES[:8] + [3, 3, 3, 3])
    assert any("no LIGHTS ON" in n for n in hyp.notes)
    with pytest.raises(AnnotationError, match=r"allscore\.txt: no START RECORDING line and no EDF start"):
        read_wsc_allscore(path, None)


def test_wsc_allscore_errors(tmp_path):
    path = _allscore(tmp_path, ALLSCORE)
    with pytest.raises(AnnotationError, match=r"allscore\.txt: START RECORDING at 23:58:00.00 but the EDF "
                                              r"starts at 23:50:00.00") as err:
        read_wsc_allscore(path, dt.datetime(2000, 1, 1, 23, 50, 0))
    assert str(err.value).startswith(str(path))
    # Within a second is the same start.
    read_wsc_allscore(path, dt.datetime(2000, 1, 1, 23, 58, 0, 500000))

    paused = _allscore(tmp_path, ALLSCORE.replace("00:01:00.00\tSTAGE - R\n",
                                                  "00:00:40.00\tPAUSED\n00:00:50.00\tRECORDING RESUMED\n"),
                       name="p.allscore.txt")
    with pytest.raises(AnnotationError, match=r"p\.allscore\.txt: line \d+: recording paused: gap in the night"):
        read_wsc_allscore(paused, None)
    power = _allscore(tmp_path, ALLSCORE + "00:05:00.00\tPOWER FAILURE RECOVERY\n", name="f.allscore.txt")
    with pytest.raises(AnnotationError, match="recording paused"):
        read_wsc_allscore(power, None)
    unknown = _allscore(tmp_path, ALLSCORE.replace("STAGE - R", "STAGE - Q"), name="u.allscore.txt")
    with pytest.raises(AnnotationError, match=r"u\.allscore\.txt: line 8: unknown stage 'STAGE - Q'"):
        read_wsc_allscore(unknown, None)


# ---------------------------------------------------------------------------------------------------------
# Plain text / CSV


def test_text_labels_and_comments(tmp_path):
    path = _write(tmp_path / "hypno.txt", "# scored by hand\n\nW\nN1\n2\nN3\nN4\nR\nREM\n?\n-1\n4\n  # end\n")
    hyp = read_hypnogram(path)
    assert hyp.format == "text"
    np.testing.assert_array_equal(hyp.stages, [0, 1, 2, 3, 3, 4, 4, -1, -1, 4])


def test_text_csv(tmp_path):
    with_header = _write(tmp_path / "h.csv", "epoch,stage,onset\n1,W,0\n2,N2,30\n3,3,60\n", crlf=True)
    np.testing.assert_array_equal(read_text(with_header).stages, [0, 2, 3])
    last_field = _write(tmp_path / "h.tsv", "1\t0\tW\n2\t30\tR\n")
    np.testing.assert_array_equal(read_hypnogram(last_field).stages, [0, 4])


def test_text_errors(tmp_path):
    with pytest.raises(AnnotationError, match=r"x\.txt: line 3: unknown stage 'X'"):
        read_text(_write(tmp_path / "x.txt", "# c\nW\nX\n"))
    with pytest.raises(AnnotationError, match=r"five\.txt: line 1: unknown stage '5'"):
        read_text(_write(tmp_path / "five.txt", "5\n"))  # 5 is not in our coding
    with pytest.raises(AnnotationError, match=r"c\.txt: no stage lines"):
        read_text(_write(tmp_path / "c.txt", "# only a comment\n"))
    with pytest.raises(AnnotationError, match=r"unknown annotation format 'foo'"):
        read_hypnogram(_write(tmp_path / "y.txt", "W\n"), fmt="foo")


# ---------------------------------------------------------------------------------------------------------
# fit_to_recording


def _hyp(stages, recording_s=None) -> Hypnogram:
    return Hypnogram(np.array(stages, dtype=np.int8), "night-7.xml", "nsrr-xml", recording_s)


def test_fit_late_start_keeps_leading_unscored():
    stages, notes = fit_to_recording(_hyp([-1, -1, 0, 1, 2]), 5)
    np.testing.assert_array_equal(stages, [-1, -1, 0, 1, 2])
    assert stages.dtype == np.int8 and notes == []


def test_fit_early_end_is_padded():
    stages, notes = fit_to_recording(_hyp([0, 1, 2]), 5)
    np.testing.assert_array_equal(stages, [0, 1, 2, -1, -1])
    assert any("padded 2" in n for n in notes)


def test_fit_small_overhang_is_cropped():
    stages, notes = fit_to_recording(_hyp([0] * 10 + [2] * 3 + [-1] * 50), 10)
    np.testing.assert_array_equal(stages, [0] * 10)
    assert any("cropped 53 epochs" in n and "3 of them scored" in n for n in notes)


def test_fit_big_overhang_is_an_error():
    with pytest.raises(AnnotationError, match=r"^night-7\.xml: annotations run 11 scored epochs past the "
                                              r"recording end \(10 epochs\)"):
        fit_to_recording(_hyp([0] * 10 + [2] * 11), 10)


def test_fit_recording_length_mismatch():
    with pytest.raises(AnnotationError, match=r"^night-7\.xml: .*600 s \(20 epochs\).*40 epochs"):
        fit_to_recording(_hyp([0] * 20, recording_s=600.0), 40)
    stages, _ = fit_to_recording(_hyp([0] * 20, recording_s=600.0), 25)  # within max_overhang_epochs
    assert len(stages) == 25


def test_fit_no_scored_epochs():
    with pytest.raises(AnnotationError, match=r"^night-7\.xml: no scored epochs"):
        fit_to_recording(_hyp([-1] * 5 + [0]), 5)
