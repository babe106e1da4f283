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

from prepare.annotations import runs_of
from prepare.signals import EPOCH_S


SLEEP_EDF_TEXT = {0: "Sleep stage W", 1: "Sleep stage 1", 2: "Sleep stage 2", 3: "Sleep stage 3",
                  4: "Sleep stage 4", 5: "Sleep stage R", 6: "Movement time", 9: "Sleep stage ?"}


def write_sleep_edf_hypnogram(path: Path, codes, start: dt.datetime, duration_s: int) -> None:
    """Sleep-EDF style hypnogram: an annotation-only EDF+C with one annotation per stage run."""
    writer = pyedflib.EdfWriter(str(path), 0, file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setStartdatetime(start)
        writer.writeAnnotation(0, 0, "Lights off")
        for first, length, code in runs_of(np.asarray(codes)):
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
