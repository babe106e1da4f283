"""A small, strict EDF/EDF+ reader (numpy only), and the writer of EDF+ annotation files.

Why our own reader rather than pyedflib: pyedflib refuses files with harmless header
inconsistencies (e.g. an EDF+ recording field whose date disagrees with the startdate
field, see tests/data) and its errors do not say which file or field is wrong.
Here every problem is one `EdfError` line naming the file and the field, signals are
read through a memory map (only the channels we use are touched), and EDF+ annotations
(TALs) are parsed directly. pyedflib is still used to *write* the synthetic cohort, so
the tests check this reader against an independent writer.

`write_annotations` writes an annotation-only EDF+C file (one data record of duration 0, as
Sleep-EDF's hypnograms), which this reader, pyedflib, MNE and EDFbrowser read back.

Format: https://www.edfplus.info/specs/edf.html and .../edfplus.html.
"""
from __future__ import annotations

import datetime as dt
import os
import re
from dataclasses import dataclass, field

import numpy as np


class EdfError(ValueError):
    """A file that is not a readable EDF; the message names the file and the cause."""


@dataclass
class EdfSignalHeader:
    label: str
    dimension: str          # physical dimension, e.g. 'uV', 'mV', '%'
    phys_min: float
    phys_max: float
    dig_min: int
    dig_max: int
    samples_per_record: int
    fs: float               # samples per second
    offset: int             # first sample of this signal inside one data record


@dataclass
class EdfHeader:
    path: str
    start: dt.datetime | None   # header startdate + starttime (naive local time)
    n_records: int
    record_s: float
    signals: list[EdfSignalHeader]
    header_bytes: int
    edf_plus: str = ""          # '', 'EDF+C' or 'EDF+D'
    truncated_records: int = 0  # records the header promised but the file lacks (allow_truncated only)
    record_onsets: np.ndarray | None = None   # EDF+D with gaps: each record's start (s from `start`); else None
    warnings: list[str] = field(default_factory=list)

    @property
    def record_samples(self) -> int:
        return sum(s.samples_per_record for s in self.signals)

    @property
    def duration_s(self) -> float:
        """Seconds from the start to the end of the last record (gaps of an EDF+D file included)."""
        if self.record_onsets is not None:
            return float(self.record_onsets[-1]) + self.record_s
        return self.n_records * self.record_s

    def labels(self) -> list[str]:
        return [s.label for s in self.signals]


def _field(raw: bytes, path: str, name: str) -> str:
    """EDF headers are ASCII, but vendors write labels and units in UTF-8 ('EEG C4–M1') or Latin-1 ('µV', one byte
    0xB5): keep them readable rather than fail. UTF-8 first (it rejects Latin-1 text with accents), then Latin-1
    (which accepts any byte). A UTF-8 character cut by the 16-byte label width loses its dangling bytes."""
    try:
        return raw.decode("utf-8").strip()
    except UnicodeDecodeError as err:
        if err.start >= len(raw) - 3 and err.reason == "unexpected end of data":
            return raw[:err.start].decode("utf-8").strip()
        return raw.decode("latin-1").strip()


def _number(text: str, path: str, name: str, kind=float):
    try:
        return kind(float(text)) if kind is int else kind(text)
    except ValueError:
        raise EdfError(f"{path}: header field {name!r} is not a number: {text!r}") from None


def _start_datetime(date: str, time: str, path: str) -> dt.datetime | None:
    """dd.mm.yy + hh.mm.ss; EDF's clipping date: yy >= 85 is 19yy, else 20yy."""
    try:
        day, month, year = (int(p) for p in date.split("."))
        hour, minute, second = (int(p) for p in time.replace(":", ".").split("."))
        year += 1900 if year >= 85 else 2000
        return dt.datetime(year, month, day, hour, minute, second)
    except (ValueError, TypeError):
        # A de-identified or malformed date must not stop a night: times are relative to 0.
        return None


def read_header(path: str | os.PathLike, allow_truncated: bool = False) -> EdfHeader:
    path = os.fspath(path)
    try:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            fixed = f.read(256)
            if len(fixed) < 256:
                raise EdfError(f"{path}: not an EDF file (only {len(fixed)} bytes)")
            if fixed[:8].strip() != b"0":
                raise EdfError(f"{path}: not an EDF file (version field {fixed[:8]!r})")
            ns = _number(_field(fixed[252:256], path, "ns"), path, "number of signals", int)
            if ns <= 0 or ns > 4096:
                raise EdfError(f"{path}: header says {ns} signals")
            per_signal = f.read(ns * 256)
    except OSError as err:
        raise EdfError(f"{path}: cannot read ({err.strerror})") from None
    if len(per_signal) < ns * 256:
        raise EdfError(f"{path}: header truncated ({256 + len(per_signal)} of {256 * (ns + 1)} bytes)")

    header_bytes = _number(_field(fixed[184:192], path, "bytes"), path, "header bytes", int)
    if header_bytes != 256 * (ns + 1):
        raise EdfError(f"{path}: header size field says {header_bytes} bytes, expected {256 * (ns + 1)}")
    reserved = _field(fixed[192:236], path, "reserved")
    n_records = _number(_field(fixed[236:244], path, "records"), path, "number of data records", int)
    record_s = _number(_field(fixed[244:252], path, "record duration"), path, "data record duration")
    start = _start_datetime(_field(fixed[168:176], path, "startdate"), _field(fixed[176:184], path, "starttime"), path)

    def column(offset: int, width: int, name: str) -> list[str]:
        base = offset * ns
        return [_field(per_signal[base + i * width: base + (i + 1) * width], path, name) for i in range(ns)]

    labels = column(0, 16, "label")
    dims = column(16 + 80, 8, "physical dimension")
    pmin = column(16 + 80 + 8, 8, "physical minimum")
    pmax = column(16 + 80 + 16, 8, "physical maximum")
    dmin = column(16 + 80 + 24, 8, "digital minimum")
    dmax = column(16 + 80 + 32, 8, "digital maximum")
    spr = column(16 + 80 + 40 + 80, 8, "samples per record")

    signals, offset = [], 0
    for i in range(ns):
        n = _number(spr[i], path, f"samples per record of {labels[i]!r}", int)
        if n <= 0:
            raise EdfError(f"{path}: signal {labels[i]!r} has {n} samples per record")
        fs = n / record_s if record_s > 0 else 0.0
        signals.append(EdfSignalHeader(
            label=labels[i], dimension=dims[i],
            phys_min=_number(pmin[i], path, f"physical minimum of {labels[i]!r}"),
            phys_max=_number(pmax[i], path, f"physical maximum of {labels[i]!r}"),
            dig_min=_number(dmin[i], path, f"digital minimum of {labels[i]!r}", int),
            dig_max=_number(dmax[i], path, f"digital maximum of {labels[i]!r}", int),
            samples_per_record=n, fs=fs, offset=offset))
        offset += n

    header = EdfHeader(path=path, start=start, n_records=n_records, record_s=record_s, signals=signals,
                       header_bytes=header_bytes, edf_plus=reserved[:5] if reserved.startswith("EDF+") else "")
    record_bytes = 2 * header.record_samples
    available = (size - header_bytes) // record_bytes
    if n_records < 0:  # -1: 'unknown', allowed while a recording is being written
        header.n_records = available
    elif available < n_records:
        if not allow_truncated:
            raise EdfError(f"{path}: truncated: header says {n_records} data records, file holds {available}")
        header.truncated_records = n_records - available
        header.warnings.append(f"truncated: read {available} of {n_records} data records")
        header.n_records = available
    if header.n_records == 0:
        raise EdfError(f"{path}: no data records")
    if header.edf_plus == "EDF+D":
        _lay_out_discontinuous(header)
    return header


def _lay_out_discontinuous(header: EdfHeader) -> None:
    """EDF+D: records carry their own start time (the first TAL of each record's annotation signal). Contiguous
    records are read as EDF+C; otherwise `record_onsets` places each record on the time axis and read_signal leaves
    the gaps as NaN (prepare/ interpolates them and says so). Overlapping or unordered records are an error."""
    path = header.path
    ann = [s for s in header.signals if s.label == "EDF Annotations"]
    if not ann:
        raise EdfError(f"{path}: EDF+D (discontinuous) without an 'EDF Annotations' signal to time its records")
    records = _records(header)
    a = ann[0]
    onsets = np.empty(header.n_records)
    for i in range(header.n_records):
        raw = records[i, a.offset: a.offset + a.samples_per_record].tobytes()
        match = re.match(rb"([+-]\d+(?:\.\d*)?)\x14\x14", raw)
        if match is None:
            raise EdfError(f"{path}: EDF+D record {i} has no time-keeping annotation")
        onsets[i] = float(match.group(1))
    steps = np.diff(onsets)
    tolerance = 1e-6 * max(1.0, header.record_s)
    if (steps < header.record_s - tolerance).any():
        i = int(np.flatnonzero(steps < header.record_s - tolerance)[0]) + 1
        raise EdfError(f"{path}: EDF+D record {i} starts at {onsets[i]:g} s, before record {i - 1} ends "
                       f"({onsets[i - 1] + header.record_s:g} s): records overlap or are out of order")
    gaps = steps - header.record_s
    if onsets[0] > tolerance or (gaps > tolerance).any():
        header.record_onsets = onsets
        n_gaps = int((gaps > tolerance).sum()) + int(onsets[0] > tolerance)
        header.warnings.append(f"EDF+D: {n_gaps} gap(s), {gaps[gaps > tolerance].sum() + onsets[0]:g} s in all, "
                               f"filled by interpolation")


def _records(header: EdfHeader) -> np.ndarray:
    """All data records as int16 [n_records, record_samples], memory-mapped."""
    return np.memmap(header.path, dtype="<i2", mode="r", offset=header.header_bytes,
                     shape=(header.n_records, header.record_samples))


def read_signal(header: EdfHeader, label: str) -> np.ndarray:
    """One signal in physical units, float64 [n_records * samples_per_record]."""
    matches = [s for s in header.signals if s.label == label]
    if not matches:
        raise EdfError(f"{header.path}: no signal labelled {label!r}")
    sig = matches[0]
    if sig.dig_max == sig.dig_min or sig.phys_max == sig.phys_min:
        raise EdfError(f"{header.path}: signal {label!r} has an empty digital or physical range "
                       f"(digital {sig.dig_min}..{sig.dig_max}, physical {sig.phys_min}..{sig.phys_max})")
    digital = _records(header)[:, sig.offset: sig.offset + sig.samples_per_record].reshape(-1)
    gain = (sig.phys_max - sig.phys_min) / (sig.dig_max - sig.dig_min)
    physical = (digital.astype(np.float64) - sig.dig_min) * gain + sig.phys_min
    if header.record_onsets is None:
        return physical
    # EDF+D with gaps: each record at its own start, NaN in between   [round(duration × fs)]
    n = sig.samples_per_record
    laid_out = np.full(int(round(header.duration_s * sig.fs)), np.nan)
    first = np.round(header.record_onsets * sig.fs).astype(np.int64)                     # [n_records]
    laid_out[(first[:, None] + np.arange(n)[None, :]).reshape(-1)] = physical
    return laid_out


# One TAL: +onset [\x15 duration] \x14 text \x14 [text \x14 ...] \x00
_TAL = re.compile(rb"([+-]\d+(?:\.\d*)?)(?:\x15(\d+(?:\.\d*)?))?\x14((?:[^\x00]*?\x14)*)\x00")


def read_annotations(path: str | os.PathLike) -> tuple[EdfHeader, list[tuple[float, float, str]]]:
    """EDF+ annotations as (onset_s, duration_s, description), onset relative to the file start.

    Each record's first TAL is the time-keeping one (empty text) and is skipped. A missing
    duration is returned as 0.0. Descriptions are UTF-8 (EDF+ spec), Latin-1 as fallback.
    """
    header = read_header(path)
    ann = [s for s in header.signals if s.label == "EDF Annotations"]
    if not ann:
        raise EdfError(f"{header.path}: no 'EDF Annotations' signal (not an EDF+ annotation file)")
    records = _records(header)
    raw = b"".join(np.ascontiguousarray(records[:, s.offset: s.offset + s.samples_per_record]).tobytes()
                   for s in ann)
    events = []
    for onset, duration, texts in _TAL.findall(raw):
        for text in texts.split(b"\x14"):
            if not text:
                continue
            try:
                desc = text.decode("utf-8")
            except UnicodeDecodeError:
                desc = text.decode("latin-1")
            events.append((float(onset), float(duration) if duration else 0.0, desc))
    return header, events


def annotation_record(annotations: list[tuple[float, float, str]]) -> bytes:
    """EDF+ TALs: the record's time-keeping TAL, then '+onset\x15duration\x14text\x14\x00' per (onset_s,
    duration_s, text), padded with zeros to whole 2-byte samples."""
    tals = [b"+0\x14\x14\x00"]
    for onset, duration, text in annotations:
        tals.append(f"+{onset:g}\x15{duration:g}\x14{text}\x14\x00".encode("ascii"))
    record = b"".join(tals)
    return record + b"\x00" * (len(record) % 2)


def write_annotations(path, annotations: list[tuple[float, float, str]], start: dt.datetime | None,
                      recorder: str) -> None:
    """An annotation-only EDF+C file of (onset_s, duration_s, text) annotations, written atomically. `start` None
    writes EDF's epoch date (1985-01-01 00:00:00); `recorder` goes into the recording field."""
    from runs import write_atomic      # the repository's one atomic write (runs.py), only for writing
    start = start or dt.datetime(1985, 1, 1)
    record = annotation_record(annotations)

    def field(text, width: int) -> bytes:
        return str(text).encode("ascii").ljust(width)[:width]

    recording = f"Startdate {start.strftime('%d-%b-%Y').upper()} X X {recorder}"
    header = b"".join([field("0", 8), field("X X X X", 80), field(recording, 80), field(start.strftime("%d.%m.%y"), 8),
                       field(start.strftime("%H.%M.%S"), 8), field(512, 8), field("EDF+C", 44), field(1, 8),
                       field(0, 8), field(1, 4)])
    header += b"".join([field("EDF Annotations", 16), field("", 80), field("", 8), field(-1, 8), field(1, 8),
                        field(-32768, 8), field(32767, 8), field("", 80), field(len(record) // 2, 8), field("", 32)])
    write_atomic(path, lambda temp: temp.write_bytes(header + record))
