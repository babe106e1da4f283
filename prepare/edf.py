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
import math
import os
import re
from dataclasses import dataclass, field

import numpy as np

from durable import write_atomic


class EdfError(ValueError):
    """A file that is not a readable EDF; the message names the file and the cause."""


class AmbiguousLabel(EdfError):
    """Two signals share a label but differ in header or samples: which one is meant cannot be known.
    `detail` is the message without the file name (prepare/night.py puts it after the slot's name)."""

    def __init__(self, path: str, detail: str):
        super().__init__(f"{path}: {detail}")
        self.detail = detail


# EDF+D: a gap between records longer than this is not a night with a disconnection but two recordings (or a corrupt
# onset); filling it would allocate hours of NaN filler per channel (a day at 512 Hz is 350 MB of float64).
MAX_GAP_S = 3600.0
# No night is longer than this (prepare/annotations.py MAX_EPOCHS likewise): an EDF+D laid out longer is corrupt.
MAX_SPAN_S = 72 * 3600.0


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
    """A header number. float() alone accepts 'nan' and 'inf', and int(float()) would cut '12.5' to 12: both are
    refused, so that no field turns into a silently wrong gain, rate or size."""
    try:
        value = float(text)
    except ValueError:
        raise EdfError(f"{path}: header field {name!r} is not a number: {text!r}") from None
    if not math.isfinite(value):
        raise EdfError(f"{path}: header field {name!r} is not a finite number: {text!r}")
    if kind is int and not value.is_integer():
        raise EdfError(f"{path}: header field {name!r} is not a whole number: {text!r}")
    return int(value) if kind is int else value


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
    if n_records < -1:   # -1 is 'unknown' (a recording still being written); any other negative count is corrupt
        raise EdfError(f"{path}: header field 'number of data records' is {n_records} (only -1, 'unknown', "
                       f"may be negative)")
    record_s = _number(_field(fixed[244:252], path, "record duration"), path, "data record duration")
    if record_s < 0:
        raise EdfError(f"{path}: header field 'data record duration' is negative: {record_s:g} s")
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

    # EDF+ allows duration 0 only for annotation-only files (write_annotations writes them); a signal would get 0 Hz
    if record_s == 0 and any(s.label != "EDF Annotations" for s in signals):
        raise EdfError(f"{path}: header field 'data record duration' is 0 s, allowed only in an annotation-only file")

    header = EdfHeader(path=path, start=start, n_records=n_records, record_s=record_s, signals=signals,
                       header_bytes=header_bytes, edf_plus=reserved[:5] if reserved.startswith("EDF+") else "")
    _check_size(header, size, allow_truncated)
    if header.n_records == 0:
        raise EdfError(f"{path}: no data records")
    if header.edf_plus == "EDF+D":
        _lay_out_discontinuous(header)
    return header


def _check_size(header: EdfHeader, size: int, allow_truncated: bool) -> None:
    """The file's size must be header + records × record bytes: a single wrong samples-per-record field shifts
    every channel after it, and nothing else would notice. Sets header.n_records to the records read.

    Tolerated on purpose, each with a warning: a record count of -1 ('unknown', a recording still being written)
    when the data are whole records; fewer records than the header says, or a cut final record, with
    allow_truncated (predict.py; prepare never: training data); and trailing bytes short of one record after the
    promised records (some recorders pad the file to a block size; a partial record holds no whole sample
    of every channel, so ignoring it loses nothing). More whole records than the header says is an error.
    """
    path, n_records, record_bytes = header.path, header.n_records, 2 * header.record_samples
    data = size - header.header_bytes
    whole, extra = divmod(data, record_bytes)

    def disagrees() -> EdfError:
        records = "?" if n_records < 0 else n_records
        expected = "" if n_records < 0 else f" = {header.header_bytes + n_records * record_bytes}"
        return EdfError(f"{path}: size {size} bytes disagrees with its header: {header.header_bytes} header bytes + "
                        f"{records} records × {record_bytes} bytes{expected}; a samples-per-record or record-count "
                        f"field is wrong")

    if n_records == -1:
        if extra:
            raise disagrees()
        header.n_records = whole
        header.warnings.append(f"record count -1 (unknown) in the header: read the {whole} records the file holds")
        return
    if data == n_records * record_bytes:
        return
    # exactly n_records records of another size: a wrong samples-per-record field, not a cut file
    if n_records > 0 and data > 0 and data % n_records == 0:
        raise disagrees()
    if whole > n_records:
        raise disagrees()
    if whole == n_records:
        header.warnings.append(f"ignored {extra} trailing bytes after the last data record (less than one record)")
        return
    if not allow_truncated:
        raise EdfError(f"{path}: truncated: header says {n_records} data records, file holds {whole}")
    header.truncated_records = n_records - whole
    header.warnings.append(f"truncated: read {whole} of {n_records} data records")
    header.n_records = whole


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
    if onsets[0] < -tolerance:
        raise EdfError(f"{path}: EDF+D record 0 starts at {onsets[0]:g} s, before the file's start time")
    if (steps < header.record_s - tolerance).any():
        i = int(np.flatnonzero(steps < header.record_s - tolerance)[0]) + 1
        raise EdfError(f"{path}: EDF+D record {i} starts at {onsets[i]:g} s, before record {i - 1} ends "
                       f"({onsets[i - 1] + header.record_s:g} s): records overlap or are out of order")
    gaps = steps - header.record_s
    _check_gaps(header, onsets, gaps)
    if onsets[0] > tolerance or (gaps > tolerance).any():
        header.record_onsets = onsets
        n_gaps = int((gaps > tolerance).sum()) + int(onsets[0] > tolerance)
        header.warnings.append(f"EDF+D: {n_gaps} gap(s), {gaps[gaps > tolerance].sum() + onsets[0]:g} s in all, "
                               f"filled by interpolation")


def _check_gaps(header: EdfHeader, onsets: np.ndarray, gaps: np.ndarray) -> None:
    """Refuse EDF+D layouts that would allocate hours or days of filler (MAX_GAP_S, MAX_SPAN_S).
    onsets [n_records] s; gaps [n_records - 1] s between the end of record i and the start of record i + 1."""
    path = header.path
    if onsets[0] > MAX_GAP_S:
        raise EdfError(f"{path}: EDF+D record 0 starts {onsets[0]:g} s after the file's start time: a gap longer "
                       f"than {MAX_GAP_S / 3600:g} h")
    if (gaps > MAX_GAP_S).any():
        i = int(np.argmax(gaps > MAX_GAP_S))
        raise EdfError(f"{path}: EDF+D gap of {gaps[i]:g} s between record {i} and record {i + 1} "
                       f"(at {onsets[i] + header.record_s:g} s), longer than {MAX_GAP_S / 3600:g} h")
    span = float(onsets[-1]) + header.record_s
    if span > MAX_SPAN_S:
        raise EdfError(f"{path}: EDF+D records span {span / 3600:.1f} h with their gaps, longer than "
                       f"{MAX_SPAN_S / 3600:g} h")


def _records(header: EdfHeader) -> np.ndarray:
    """All data records as int16 [n_records, record_samples], memory-mapped."""
    return np.memmap(header.path, dtype="<i2", mode="r", offset=header.header_bytes,
                     shape=(header.n_records, header.record_samples))


def find_signal(header: EdfHeader, label: str) -> EdfSignalHeader:
    """The signal labelled `label`. A label on several signals is read once when they are identical (same header
    fields and samples); otherwise it is ambiguous, and taking the samples of one and the rate or unit of another
    (as a dict by label would) gives a silently wrong channel: AmbiguousLabel names them all."""
    matches = [(i, s) for i, s in enumerate(header.signals) if s.label == label]
    if not matches:
        raise EdfError(f"{header.path}: no signal labelled {label!r}")
    first = matches[0][1]
    if all(_identical(header, first, other) for _, other in matches[1:]):
        return first
    described = "; ".join(f"signal #{i + 1}: {s.fs:g} Hz, unit {s.dimension!r}, physical {s.phys_min:g}..{s.phys_max:g}"
                          for i, s in matches)
    raise AmbiguousLabel(header.path, f"label {label!r} is on {len(matches)} signals with different content "
                                      f"({described}; numbered from 1 in header order)")


def _identical(header: EdfHeader, a: EdfSignalHeader, b: EdfSignalHeader) -> bool:
    def fields(s):
        return s.dimension, s.phys_min, s.phys_max, s.dig_min, s.dig_max, s.samples_per_record
    if fields(a) != fields(b):
        return False
    records = _records(header)                                                       # [n_records, record_samples]
    n = a.samples_per_record
    return bool(np.array_equal(records[:, a.offset: a.offset + n], records[:, b.offset: b.offset + n]))


def read_signal(header: EdfHeader, label: str) -> np.ndarray:
    """One signal in physical units, float64 [n_records * samples_per_record]."""
    sig = find_signal(header, label)
    if sig.dig_max <= sig.dig_min or sig.phys_max == sig.phys_min:
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


# One TAL (time-stamped annotation list): +onset [\x15 duration] \x14 text \x14 [text \x14 ...] \x00
_ONSET = re.compile(rb"[+-]\d+(?:\.\d*)?")
_DURATION = re.compile(rb"\d+(?:\.\d*)?")


def read_annotations(path: str | os.PathLike | EdfHeader) -> tuple[EdfHeader, list[tuple[float, float, str]]]:
    """EDF+ annotations as (onset_s, duration_s, description), onset relative to the file start.

    Each record's first TAL is the time-keeping one (empty text) and is skipped. A missing
    duration is returned as 0.0. Descriptions are UTF-8 (EDF+ spec), Latin-1 as fallback.
    A malformed TAL is an EdfError naming the data record and the byte in it, never a skipped or
    merged annotation. `path` may be a header already read (its file is not parsed again).
    """
    header = path if isinstance(path, EdfHeader) else read_header(path)
    ann = [s for s in header.signals if s.label == "EDF Annotations"]
    if not ann:
        raise EdfError(f"{header.path}: no 'EDF Annotations' signal (not an EDF+ annotation file)")
    records = _records(header)                                                  # [n_records, record_samples]
    events = []
    for r in range(header.n_records):
        for s in ann:   # TALs never span records or signals (EDF+ spec), so each is parsed on its own
            raw = records[r, s.offset: s.offset + s.samples_per_record].tobytes()
            events += _parse_tals(raw, f"{header.path}: data record {r}", 2 * s.offset)
    return header, events


def _parse_tals(raw: bytes, where: str, base: int) -> list[tuple[float, float, str]]:
    """The TALs of one record's annotation signal; the rest of it is 0x00 padding. `where` names the file and
    record, `base` is the signal's first byte in the record (for the byte offsets in errors)."""
    events, p = [], 0
    while p < len(raw):
        if raw[p] == 0:   # padding (also tolerated between TALs)
            p += 1
            continue
        end = raw.find(b"\x00", p)
        if end < 0:
            raise EdfError(f"{where}, byte {base + p}: annotation not terminated by 0x00 before the record ends")
        events += _parse_tal(raw[p:end], f"{where}, byte {base + p}")
        p = end + 1
    return events


def _parse_tal(tal: bytes, where: str) -> list[tuple[float, float, str]]:
    """One TAL without its 0x00: b'+onset[\x15duration]\x14text\x14...'."""
    stamp, separator, texts = tal.partition(b"\x14")
    onset, has_duration, duration = stamp.partition(b"\x15")
    if not separator:
        raise EdfError(f"{where}: annotation {tal[:40]!r} has no 0x14 after its onset")
    if onset[:1] not in (b"+", b"-"):
        raise EdfError(f"{where}: annotation onset {onset[:40]!r} has no sign (+ or -)")
    if not _ONSET.fullmatch(onset):
        raise EdfError(f"{where}: annotation onset {onset[:40]!r} is not a number")
    if has_duration and not _DURATION.fullmatch(duration):
        raise EdfError(f"{where}: annotation duration {duration[:40]!r} is not a number")
    if texts and not texts.endswith(b"\x14"):
        raise EdfError(f"{where}: annotation text {texts[:40]!r} not closed by 0x14")
    events = []
    for text in texts[:-1].split(b"\x14") if texts else []:
        # 0x15 never occurs in a text, and a text that is an onset is the next TAL whose 0x00 was lost: merging
        # it into this one would shift or drop a stage
        if b"\x15" in text or _ONSET.fullmatch(text):
            raise EdfError(f"{where}: annotation text {text[:40]!r} looks like the next annotation's onset "
                           f"(its 0x00 terminator is missing)")
        if not text:
            continue
        try:
            desc = text.decode("utf-8")
        except UnicodeDecodeError:
            desc = text.decode("latin-1")
        events.append((float(onset), float(duration) if has_duration else 0.0, desc))
    return events


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
