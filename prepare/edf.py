"""A small, strict EDF/EDF+ reader (numpy only).

Why our own reader rather than pyedflib: pyedflib refuses files with harmless header
inconsistencies (e.g. an EDF+ recording field whose date disagrees with the startdate
field, see shared/testdata) and its errors do not say which file or field is wrong.
Here every problem is one `EdfError` line naming the file and the field, signals are
read through a memory map (only the channels we use are touched), and EDF+ annotations
(TALs) are parsed directly. pyedflib is still used to *write* the synthetic cohort, so
the tests check this reader against an independent writer.

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
    warnings: list[str] = field(default_factory=list)

    @property
    def record_samples(self) -> int:
        return sum(s.samples_per_record for s in self.signals)

    @property
    def duration_s(self) -> float:
        return self.n_records * self.record_s

    def labels(self) -> list[str]:
        return [s.label for s in self.signals]


def _field(raw: bytes, path: str, name: str) -> str:
    try:
        return raw.decode("ascii").strip()
    except UnicodeDecodeError:
        # Some vendors write Latin-1 labels (e.g. 'µV'); keep them readable rather than fail.
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
    return header


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
    return (digital.astype(np.float64) - sig.dig_min) * gain + sig.phys_min


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
