"""Bad annotations: a malformed EDF+ TAL is one line naming the file, data record and byte; stage labels
we do not know are counted and reported (a few: left unscored with a note; too many, or any in a closed vocabulary:
the file fails), and events that are not stages are never counted as unknown stages."""
import re

import numpy as np
import pandas as pd
import pytest

from prepare import annotations, store
from prepare.__main__ import main as prepare_main
from prepare.annotations import AnnotationError, read_hypnogram


def write_annotation_edf(path, records: list[bytes]):
    """An annotation-only EDF+C file written byte by byte, one data record (duration 0) per item of `records`,
    each padded with 0x00 to the longest (an even number of bytes)."""
    size = max(len(r) for r in records)
    size += size % 2

    def field(text, width):
        return str(text).encode().ljust(width)
    header = (field("0", 8) + field("X X X X", 80) + field("Startdate 01-MAR-2020 X X X", 80) + field("01.03.20", 8)
              + field("22.00.00", 8) + field(512, 8) + field("EDF+C", 44) + field(len(records), 8) + field(0, 8)
              + field(1, 4))
    header += (field("EDF Annotations", 16) + field("", 80) + field("", 8) + field(-1, 8) + field(1, 8)
               + field(-32768, 8) + field(32767, 8) + field("", 80) + field(size // 2, 8) + field("", 32))
    path.write_bytes(header + b"".join(r.ljust(size, b"\x00") for r in records))
    return path


# ----------------------------------------------------------------------------------------------------------------------
# 6. Malformed EDF+ TALs

FIRST = b"+0\x14\x14\x00" + b"+0\x1530\x14Sleep stage W\x14\x00"          # record 0: well formed
KEEPER = b"+30\x14\x14\x00"                                                # record 1's time-keeping TAL: 6 bytes


@pytest.mark.parametrize("bad,message", [
    (b"+30\x1530\x14Sleep stage 1\x14+60\x1530\x14Sleep stage 2\x14\x00",      # lost 0x00 between two TALs
     r"annotation text b'\+60\\x1530' looks like the next annotation's onset \(its 0x00 terminator is missing\)"),
    (b"+30\x1530\x14Sleep stage 1\x14+60\x14Sleep stage 2\x14\x00",            # the same, next TAL without duration
     r"annotation text b'\+60' looks like the next annotation's onset \(its 0x00 terminator is missing\)"),
    (b"+30\x1530\x14Sleep stage 1\x00",                                        # lost 0x14 after the text
     r"annotation text b'Sleep stage 1' not closed by 0x14"),
    (b"+30\x1630\x14Sleep stage 1\x14\x00",                                    # 0x16 instead of the 0x15 separator
     r"annotation onset b'\+30\\x1630' is not a number"),
    (b"+30\x00",                                                               # no separator at all
     r"annotation b'\+30' has no 0x14 after its onset"),
    (b"30\x1530\x14Sleep stage 1\x14\x00",                                     # onset without sign
     r"annotation onset b'30' has no sign \(\+ or -\)"),
    (b"+30\x15thirty\x14Sleep stage 1\x14\x00",                                # duration not a number
     r"annotation duration b'thirty' is not a number"),
    (b"+30\x1530\x14Sleep stage N1\x14",                                       # fills the record, never terminated
     r"annotation not terminated by 0x00 before the record ends"),
])
def test_a_malformed_tal_names_the_file_record_and_byte(tmp_path, bad, message):
    path = write_annotation_edf(tmp_path / "h.edf", [FIRST, KEEPER + bad])
    with pytest.raises(AnnotationError) as err:
        read_hypnogram(path)
    assert "\n" not in str(err.value)
    assert re.fullmatch(rf"{re.escape(str(path))}: data record 1, byte 6: {message}", str(err.value)), str(err.value)


def test_well_formed_tals_across_records_are_all_read(tmp_path):
    second = KEEPER + b"+30\x1530\x14Sleep stage 1\x14\x00\x00\x00+60\x1560\x14Sleep stage 2\x14Lights on\x14\x00"
    path = write_annotation_edf(tmp_path / "h.edf", [FIRST, second, b"+120\x14\x14\x00"])
    assert list(read_hypnogram(path).stages) == [0, 1, 2, 2]


# ----------------------------------------------------------------------------------------------------------------------
# 7. Stage labels we do not know


def nsrr_xml(path, stages: list[tuple[str, int]], events=()):
    """An NSRR XML of stage runs (concept, epochs) from 0 s, plus non-stage (type, concept) events."""
    rows, start = [], 0
    for concept, n in stages:
        rows.append(f"<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>{concept}</EventConcept>"
                    f"<Start>{start}</Start><Duration>{30 * n}.0</Duration></ScoredEvent>")
        start += 30 * n
    for kind, concept in events:
        rows.append(f"<ScoredEvent><EventType>{kind}</EventType><EventConcept>{concept}</EventConcept>"
                    f"<Start>95.5</Start><Duration>12</Duration></ScoredEvent>")
    path.write_text("<?xml version='1.0' encoding='UTF-8'?>\n<PSGAnnotation><EpochLength>30</EpochLength>"
                    f"<ScoredEvents>{''.join(rows)}</ScoredEvents></PSGAnnotation>\n")
    return path


OTHER_EVENTS = [("Arousals|Arousals", "Arousal (ASDA)|Arousal (ASDA)"),
                ("Respiratory|Respiratory", "Hypopnea|Hypopnea"), ("Lights|Lights", "Lights off|Lights off"),
                ("Respiratory|Respiratory", "SpO2 desaturation|SpO2 desaturation")]


def test_nsrr_unknown_stage_epochs_are_left_unscored_and_counted(tmp_path):
    path = nsrr_xml(tmp_path / "n.xml", [("Wake|0", 100), ("Stage 7 sleep|7", 17), ("Stage 2 sleep|2", 160),
                                         ("Movement|6", 3), ("Unscored|9", 5), ("Stage N5", 2), ("REM sleep|5", 13)],
                    OTHER_EVENTS)
    hyp = read_hypnogram(path)
    assert hyp.notes == ["17 epochs with unknown label 'Stage 7 sleep|7' left unscored",
                         "2 epochs with unknown label 'Stage N5' left unscored"]
    assert (hyp.stages[100:117] == -1).all() and (hyp.stages[117:277] == 2).all() and len(hyp.stages) == 300


def test_non_stage_events_are_never_unknown_stages(tmp_path):
    path = nsrr_xml(tmp_path / "n.xml", [("Wake|0", 10), ("Stage 2 sleep|2", 10)], OTHER_EVENTS * 20)
    assert read_hypnogram(path).notes == []


def test_too_many_unknown_stage_epochs_fail_the_file(tmp_path):
    share = annotations.MAX_UNKNOWN_SHARE
    assert share == 0.10
    path = nsrr_xml(tmp_path / "n.xml", [("Wake|0", 80), ("Stage 7 sleep|7", 11), ("Stage 2 sleep|2", 9)])
    with pytest.raises(AnnotationError) as err:
        read_hypnogram(path)
    assert str(err.value) == (f"{path}: 11 of 100 staged epochs have stage labels we do not know, more than 10% "
                              f"(epochs per label: 'Stage 7 sleep|7' 11)")
    exactly = nsrr_xml(tmp_path / "ten.xml", [("Wake|0", 80), ("Stage 7 sleep|7", 10), ("Stage 2 sleep|2", 10)])
    assert read_hypnogram(exactly).notes == ["10 epochs with unknown label 'Stage 7 sleep|7' left unscored"]


def test_profusion_unknown_codes_are_counted(tmp_path):
    def profusion(name, codes):
        stages = "".join(f"<SleepStage>{c}</SleepStage>" for c in codes)
        path = tmp_path / name
        path.write_text(f"<CMPStudyConfig><EpochLength>30</EpochLength><SleepStages>{stages}</SleepStages>"
                        f"</CMPStudyConfig>")
        return path
    hyp = read_hypnogram(profusion("p.xml", [0] * 40 + [7] * 3 + [2] * 40 + [6, 9] + [5] * 15))
    assert hyp.notes == ["3 epochs with unknown label '7' left unscored"] and (hyp.stages[40:43] == -1).all()
    with pytest.raises(AnnotationError, match=r"p2\.xml: 12 of 100 staged epochs have stage labels we do not know, "
                                              r"more than 10% \(epochs per label: '7' 4, '8' 8\)$"):
        read_hypnogram(profusion("p2.xml", [0] * 50 + [7] * 4 + [8] * 8 + [2] * 38))


def test_luna_stage_like_unknown_classes_are_counted_and_events_ignored(tmp_path):
    rows = ["class\tinstance\tchannel\tstart\tstop\tmeta"]
    rows += [f"{stage}\t.\t.\te:{e}\te:{e}\t." for e, stage in enumerate(["W"] * 20 + ["N5"] * 2 + ["N2"] * 18, 1)]
    rows += ["arousal\t.\tC4\t300\t310\t.", "desat\t.\tSpO2\t400\t420\t.", "L\t.\t.\te:1\te:1\t."]
    path = tmp_path / "a.annot"
    path.write_text("\n".join(rows) + "\n")
    hyp = read_hypnogram(path)
    assert hyp.notes == ["2 epochs with unknown label 'N5' left unscored"]
    assert list(hyp.stages[19:23]) == [0, -1, -1, 2]


@pytest.mark.parametrize("name,content,message", [   # closed vocabularies: one unknown label fails, all are counted
    ("c.stg.txt", "Epoch\tUser-Defined Stage\n1\t0\n2\t8\n3\t2\n4\t8\n5\t11\n",
     r"line 3: unknown stage code '8' \(3 rows with unknown stage labels: '8' 2, '11' 1\)"),
    ("t.txt", "W\nN2\nS7\nN2\nS7\n",
     r"line 3: unknown stage 'S7' \(2 lines with unknown stage labels: 'S7' 2\)"),
])
def test_closed_vocabularies_name_the_file_label_and_count(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: {message}$"):
        read_hypnogram(path)


def test_edf_plus_unknown_stages_are_counted_and_markers_ignored(tmp_path):
    tals = b"".join(f"+{30 * i}\x1530\x14{text}\x14\x00".encode() for i, text in enumerate(
        ["Sleep stage W", "Sleep stage X", "Lights off@@EEG F4-A1", "Sleep stage 2", "Sleep stage X", "Sleep stage 5"]))
    path = write_annotation_edf(tmp_path / "h.edf", [b"+0\x14\x14\x00" + tals])
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: unknown stage annotation 'Sleep stage X' "
                                              rf"\(3 annotations with unknown stage labels: 'Sleep stage X' 2, "
                                              rf"'Sleep stage 5' 1\)$"):
        read_hypnogram(path)


@pytest.mark.parametrize("label", ["Sleep_stage_2", "Stage 2 sleep", "SLEEP-S2", "Sleep-REM"])
def test_edf_plus_text_that_reads_like_a_stage_is_an_unknown_stage_not_an_event(tmp_path, label):
    """Outside the vocabulary ('Sleep stage …'), text that reads like a stage is counted as an unknown stage label and
    fails the closed vocabulary, never ignored (its epochs would be unscored with no word); events stay events."""
    tals = b"".join(f"+{30 * i}\x1530\x14{text}\x14\x00".encode() for i, text in enumerate(
        ["Sleep stage W", label, "Sleep spindle", "Sleep apnea", "Sleep stage 2", label]))
    path = write_annotation_edf(tmp_path / "h.edf", [b"+0\x14\x14\x00" + tals])
    with pytest.raises(AnnotationError, match=rf"^{re.escape(str(path))}: unknown stage annotation {re.escape(repr(label))} "
                                              rf"\(2 annotations with unknown stage labels: {re.escape(repr(label))} 2\)$"):
        read_hypnogram(path)


# ----------------------------------------------------------------------------------------------------------------------
# A batch: notes reach the store and the summary; a night over the share fails alone


def test_prepare_batch_reports_unknown_labels_and_fails_only_the_night_over_the_share(tmp_path, psg_writer, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    hypnograms = {"clean": [("Wake|0", 20), ("Stage 2 sleep|2", 20)],
                  "noted": [("Wake|0", 20), ("Stage 7 sleep|7", 2), ("Stage 2 sleep|2", 18)],
                  "over": [("Wake|0", 20), ("Stage 7 sleep|7", 5), ("Stage 2 sleep|2", 15)]}
    edfs, xmls = [], []
    for name, stages in hypnograms.items():
        edfs.append(psg_writer(src / f"{name}.edf", 40 * 30))
        xmls.append(nsrr_xml(src / f"{name}-stages.xml", stages, OTHER_EVENTS))
    assert prepare_main(["edf", *map(str, edfs), str(out), "--annotations", *map(str, xmls)]) == 0
    printed = capsys.readouterr().out
    failed = pd.read_csv(out / "failed.csv", dtype=str).set_index("night_id")["reason"].to_dict()
    assert failed == {"over": f"{src / 'over-stages.xml'}: 5 of 40 staged epochs have stage labels we do not know, "
                              f"more than 10% (epochs per label: 'Stage 7 sleep|7' 5)"}
    assert "2 written, 0 skipped (already done), 1 failed" in printed
    assert "  note noted: 2 epochs with unknown label 'Stage 7 sleep|7' left unscored\n" in printed
    assert "note clean" not in printed
    attrs = store.read_attrs(out / "edf" / "noted.zarr")
    assert "2 epochs with unknown label 'Stage 7 sleep|7' left unscored" in attrs["annotation_notes"]
    stages = np.asarray(store.read_night(out / "edf" / "noted.zarr")[1])
    assert (stages[20:22] == -1).all() and (stages[22:] == 2).all()
