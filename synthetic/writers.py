"""Writing files: the EDF writer and the annotation writers, with the stage-code tables they need.

Formats (docs/formats.md §3): NSRR XML, Compumedics Profusion XML, Luna .annot, WSC Gamma .stg.txt,
WSC Twin .allscore.txt and a Sleep-EDF style EDF+ hypnogram. Every writer takes annotation codes
per 30-s epoch as NSRR writes them (0-5, 6 movement, 9 unscored) and events in seconds from the
start; `write_edf` takes physical values and fixed header fields, so the same input gives the same
bytes. Which file goes where, and what the codes are, is decided in cohort.py.
"""
from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pyedflib

from prepare.signals import EPOCH_S


def runs(codes: np.ndarray) -> list[tuple[int, int, int]]:
    """(first epoch, length, code) of each run of equal codes."""
    if len(codes) == 0:
        return []
    edges = np.flatnonzero(np.diff(codes)) + 1
    starts = np.concatenate([[0], edges])
    lengths = np.diff(np.concatenate([starts, [len(codes)]]))
    return [(int(s), int(n), int(codes[s])) for s, n in zip(starts, lengths)]


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
    """NSRR XML (docs/formats.md §3a): stage runs interleaved by time with respiratory and arousal events."""
    items = [(0.0, 0, _xml_event([("EventType", ""), ("EventConcept", "Recording Start Time"), ("Start", "0"),
                                  ("Duration", f"{float(duration_s)}"),
                                  ("ClockTime", f"{start:%d.%m.%y} {start:%H.%M.%S}")]))]
    for first, length, code in runs(codes):
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
    """Compumedics Profusion XML (docs/formats.md §3b): events plus one SleepStage per epoch."""
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
    """Luna .annot (docs/formats.md §3c): one row per epoch with clock times, arousal rows interleaved."""
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
    """WSC Gamma .stg.txt (docs/formats.md §3d): tab-separated, CRLF, 1-based epochs."""
    lines = ["Epoch\tUser-Defined Stage\tCAST-Defined Stage"]
    lines += [f"{i + 1}\t{GAMMA_CODE[int(c)]}\t{GAMMA_CODE[int(c)]}" for i, c in enumerate(codes)]
    path.write_bytes(("\r\n".join(lines) + "\r\n").encode("ascii"))


TWIN_STAGE = {0: "W", 1: "N1", 2: "N2", 3: "N3", 4: "N3", 5: "R", 6: "NO STAGE", 9: "NO STAGE"}


def write_wsc_allscore(path: Path, codes, start: dt.datetime, events, rng) -> None:
    """WSC Twin .allscore.txt (docs/formats.md §3e): clock-time event log, stages only at changes, CRLF, Latin-1."""
    end = len(codes) * EPOCH_S
    rows = [(0.0, 0, "START RECORDING"), (0.0, 1, "LIGHTS OUT")]
    same = np.array([{4: 3, 6: 9}.get(int(c), int(c)) for c in codes])   # codes that read the same
    rows += [(float(first * EPOCH_S), 2, f"STAGE - {TWIN_STAGE[code]}") for first, _, code in runs(same)]
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
        for first, length, code in runs(np.asarray(codes)):
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
