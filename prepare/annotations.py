"""Sleep-stage annotations of every supported format → one stage per 30-s epoch.

The epoch rule (used by every reader, stated once here):

    Epoch k covers [30k, 30k + 30) seconds from the start of the recording (the EDF header start).
    A stage annotation that starts at `onset` seconds and lasts `dur` seconds covers the epochs
    floor(onset / 30) .. ceil((onset + dur) / 30) - 1; one with duration 0 covers the single epoch
    floor(onset / 30). Where two stage annotations cover the same epoch, the later one in the file wins
    and a note says so. Epochs that no stage annotation covers are -1, as are unscored and movement.

Stage labels we do not know: in the XML and Luna formats, whose vocabularies grow with the scoring software, the
epochs are left unscored and counted in a note ("17 epochs with unknown label 'Stage 7 sleep|7' left unscored"),
and a file where they exceed MAX_UNKNOWN_SHARE of the epochs that carry a stage label fails. In the closed
vocabularies (WSC codes, EDF+ 'Sleep stage …', text hypnograms) one unknown label fails the file: there it means
another coding (an R&K text file's 4 is N4, ours is REM), which would be misread without a trace.

Stage codes: 0 W, 1 N1, 2 N2, 3 N3 (R&K stages 3 and 4), 4 REM, -1 unscored. Readers return a `Hypnogram`
whose `stages` run from epoch 0 to the last epoch any stage annotation covers (trailing unscored epochs
included); `fit_to_recording` then crops or pads it to a recording's epoch count. Format details and the
sources behind them are in docs/formats.md §3.

Every problem is raised as `AnnotationError`, one line that starts with the file's path and says the cause.
"""
from __future__ import annotations

import datetime as dt
import math
import os
import re
import xml.etree.ElementTree as ET
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from durable import write_atomic

from .edf import EdfError, read_annotations, write_annotations
from .signals import EPOCH_S

W, N1, N2, N3, REM, UNSCORED = 0, 1, 2, 3, 4, -1      # stage codes: night stores, probe classes
STAGES = ("W", "N1", "N2", "N3", "REM")               # name of class k: metrics, results.json, p_<name> columns
AASM_LETTERS = ("W", "N1", "N2", "N3", "R")           # letter of class k in a hypnogram (AASM; EDF+ "Sleep stage R")
# Float noise guard for floor/ceil: onsets such as 30629.999999 still mean epoch boundary 1021.
_EPS = 1e-6
# No night is longer than this; a larger epoch index is a corrupt onset, not a hypnogram to allocate.
MAX_EPOCHS = 3 * 24 * 120  # 72 h
FORMATS = ("nsrr-xml", "profusion-xml", "luna-annot", "wsc-stg", "wsc-allscore", "edf+", "text")
# A few epochs with a label we do not know are a scorer's odd code (left unscored, counted in a note); more than this
# share of the epochs that carry a stage label means a vocabulary we do not read, and the file fails.
MAX_UNKNOWN_SHARE = 0.10
UNKNOWN_NOTE = "with unknown label"   # in every note about unknown labels (prepare's batch summary finds them by it)


class AnnotationError(ValueError):
    """An annotation file we cannot turn into epochs; the message names the file and the cause."""


@dataclass
class Hypnogram:
    stages: np.ndarray          # int8 [n]; epoch k covers [30k, 30k+30) s from the recording start; -1 = unscored
    source: str                 # path of the file read
    format: str                 # one of FORMATS
    recording_s: float | None = None   # recording length the file itself claims (NSRR XML), else None
    notes: list[str] = field(default_factory=list)  # things the reader resolved silently (overlaps, shifts)


def runs_of(values) -> list[tuple[int, int, int]]:
    """(first index, length, value) of each run of equal values of a 1-d sequence: stage runs, a hypnogram's bouts."""
    values = np.asarray(values)
    if len(values) == 0:
        return []
    starts = np.concatenate([[0], np.flatnonzero(np.diff(values)) + 1])
    lengths = np.diff(np.concatenate([starts, [len(values)]]))
    return [(int(s), int(n), int(values[s])) for s, n in zip(starts, lengths)]


# ----------------------------------------------------------------------------------------------------------
# Shared helpers


def _epoch_span(onset: float, duration: float) -> tuple[int, int]:
    """[first, stop) epoch indices of one stage annotation (the epoch rule)."""
    first = math.floor(onset / EPOCH_S + _EPS)
    stop = math.ceil((onset + duration) / EPOCH_S - _EPS)
    return first, max(stop, first + 1)


def _place(intervals: list[tuple[float, float, int]], path: str) -> tuple[np.ndarray, list[str]]:
    """Stage intervals (onset_s, duration_s, code), in file order → int8 epochs; gaps are -1, later wins."""
    if not intervals:
        raise AnnotationError(f"{path}: no sleep-stage annotations")
    spans = []
    for onset, duration, code in intervals:
        if onset < 0 or duration < 0:
            raise AnnotationError(f"{path}: negative onset or duration in stage annotation "
                                  f"(onset {onset:g} s, duration {duration:g} s)")
        first, stop = _epoch_span(onset, duration)
        if stop > MAX_EPOCHS:
            raise AnnotationError(f"{path}: stage annotation ends at {onset + duration:g} s, "
                                  f"beyond {MAX_EPOCHS * EPOCH_S / 3600:g} h")
        spans.append((first, stop, code))
    stages = np.full(max(span[1] for span in spans), UNSCORED, dtype=np.int8)
    covered = np.zeros(len(stages), dtype=bool)
    overlapped = 0
    for first, stop, code in spans:
        overlapped += int(covered[first:stop].sum())
        stages[first:stop] = code
        covered[first:stop] = True
    notes = [f"{overlapped} epochs covered by more than one stage annotation; the later one was kept"] \
        if overlapped else []
    return stages, notes


def _unknown_labels(unknown: Counter, labelled: int, path: str) -> list[str]:
    """Notes for stage labels we do not know (label -> epochs, read as unscored); more than MAX_UNKNOWN_SHARE of
    the `labelled` epochs (those that carry any stage label) fails the file."""
    total = sum(unknown.values())
    if total > MAX_UNKNOWN_SHARE * labelled:
        counts = ", ".join(f"{label!r} {n}" for label, n in sorted(unknown.items()))
        raise AnnotationError(f"{path}: {total} of {labelled} staged epochs have stage labels we do not know, more "
                              f"than {MAX_UNKNOWN_SHARE:.0%} (epochs per label: {counts})")
    return [f"{n} epochs {UNKNOWN_NOTE} {label!r} left unscored" for label, n in sorted(unknown.items())]


def _unknown_error(path: str, first: str, unknown: Counter, unit: str) -> AnnotationError:
    """One line for a closed vocabulary (see the module docstring): the first unknown label, and all with counts.
    `first` says where the first one is ("line 3: unknown stage code '8'")."""
    counts = ", ".join(f"{label!r} {n}" for label, n in unknown.items())
    return AnnotationError(f"{path}: {first} ({sum(unknown.values())} {unit} with unknown stage labels: {counts})")


def _check_exists(path: str) -> None:
    if not os.path.isfile(path):
        raise AnnotationError(f"{path}: no such file")


def _read_text(path: str, encoding: str = "utf-8") -> list[str]:
    """Lines without their line ends (CRLF or LF); a UTF-8 byte-order mark is dropped."""
    _check_exists(path)
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None
    try:
        text = raw.decode(encoding)
    except UnicodeDecodeError:
        # Exported clinical text often carries a stray Latin-1 byte in a free-text note; all stage
        # vocabulary is ASCII, so Latin-1 (which decodes any byte) loses nothing we use.
        text = raw.decode("latin-1")
    return text.lstrip("\ufeff").splitlines()


_CLOCK = re.compile(r"^(\d{1,2}):(\d{2}):(\d{2})(?:[.,](\d+))?$")


def _clock_seconds(text: str) -> float | None:
    """'HH:MM:SS' or 'HH:MM:SS.cc' → seconds since midnight, or None when it is not a clock time."""
    m = _CLOCK.match(text.strip())
    if not m:
        return None
    h, mi, s = int(m[1]), int(m[2]), int(m[3])
    if h > 23 or mi > 59 or s > 59:
        return None
    frac = float("0." + m[4]) if m[4] else 0.0
    return h * 3600 + mi * 60 + s + frac


def _time_of_day(t: dt.datetime) -> float:
    return t.hour * 3600 + t.minute * 60 + t.second + t.microsecond / 1e6


def _since(clock_s: float, start_s: float) -> float:
    """Seconds from a start time of day to a clock time, wrapping past midnight (nights are < 24 h)."""
    return (clock_s - start_s) % 86400.0


def _fmt_clock(s: float) -> str:
    s = round(s, 2)
    return f"{int(s // 3600):02d}:{int(s % 3600 // 60):02d}:{s % 60:05.2f}"


# ----------------------------------------------------------------------------------------------------------
# XML: NSRR (PSGAnnotation) and Compumedics Profusion (CMPStudyConfig)


def _parse_xml(path: str, root_tag: str) -> ET.Element:
    """The document's root element, checked to be <root_tag> with 30-s epochs (EpochLength, where given)."""
    _check_exists(path)
    try:
        root = ET.parse(path).getroot()
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not well-formed XML ({err})") from None
    except OSError as err:
        raise AnnotationError(f"{path}: cannot read ({err.strerror})") from None
    if root.tag != root_tag:
        raise AnnotationError(f"{path}: XML root is <{root.tag}>, expected <{root_tag}>")
    _check_epoch_length(root, path)
    return root


def _check_epoch_length(root: ET.Element, path: str) -> None:
    text = root.findtext("EpochLength")
    if text is None or not text.strip():
        return
    try:
        length = float(text)
    except ValueError:
        raise AnnotationError(f"{path}: EpochLength is not a number: {text.strip()!r}") from None
    if length != EPOCH_S:
        raise AnnotationError(f"{path}: EpochLength is {length:g} s; only 30-s epochs are supported")


def _xml_float(event: ET.Element, tag: str, path: str) -> float:
    text = event.findtext(tag)
    try:
        value = float(text)
    except (TypeError, ValueError):
        value = math.nan
    if not math.isfinite(value):   # float() also takes 'nan' and 'inf', which no epoch index can be made of
        raise AnnotationError(f"{path}: ScoredEvent {event.findtext('EventConcept')!r} has no numeric "
                              f"<{tag}> ({text!r})")
    return value


# NSRR concept names, used only when a concept lacks the '|code' suffix.
_NSRR_NAMES = {"wake": W, "stage 1 sleep": N1, "stage 2 sleep": N2, "stage 3 sleep": N3,
               "stage 4 sleep": N3, "rem sleep": REM, "movement": UNSCORED, "unscored": UNSCORED}
# The number after '|' in NSRR concepts follows the Profusion codes: 6 movement, 9 unscored; any other is unknown.
_PROFUSION_CODES = {0: W, 1: N1, 2: N2, 3: N3, 4: N3, 5: REM, 6: UNSCORED, 9: UNSCORED}


def _nsrr_stage(concept: str) -> int | None:
    """'Stage 2 sleep|2' → 2; movement/unscored → -1; None for a concept we do not recognise."""
    name, _, code = concept.partition("|")
    if code.strip().lstrip("-").isdigit():
        return _PROFUSION_CODES.get(int(code))
    return _NSRR_NAMES.get(name.strip().lower())


def read_nsrr_xml(path) -> Hypnogram:
    """NSRR `*-nsrr.xml`: stage runs (EventType 'Stages|Stages') placed by their Start, round(Duration/30) epochs."""
    path = os.fspath(path)
    root = _parse_xml(path, "PSGAnnotation")
    intervals, unknown, labelled, recording_s = [], Counter(), 0, None
    for event in root.iter("ScoredEvent"):
        concept = (event.findtext("EventConcept") or "").strip()
        if concept == "Recording Start Time":
            recording_s = _xml_float(event, "Duration", path)
            continue
        # Filter on the type, not the position: respiratory, arousal and lights events are interleaved.
        if "Stages" not in (event.findtext("EventType") or ""):
            continue
        code = _nsrr_stage(concept)
        start = _xml_float(event, "Start", path)
        # Runs are n × 30 s; rounding the epoch count absorbs float text such as 569.9999.
        n = round(_xml_float(event, "Duration", path) / EPOCH_S)
        labelled += max(n, 1)                 # a run of 0 epochs still covers one (the epoch rule)
        if code is None:
            unknown[concept] += max(n, 1)
            code = UNSCORED
        intervals.append((start, n * EPOCH_S, code))
    stages, notes = _place(intervals, path)
    notes += _unknown_labels(unknown, labelled, path)
    return Hypnogram(stages, path, "nsrr-xml", recording_s, notes)


def read_profusion_xml(path) -> Hypnogram:
    """Profusion `*-profusion.xml`: one <SleepStage> integer per epoch from the recording start."""
    path = os.fspath(path)
    root = _parse_xml(path, "CMPStudyConfig")
    values = [el.text for el in root.iterfind("SleepStages/SleepStage")]
    if not values:
        raise AnnotationError(f"{path}: no SleepStages/SleepStage elements")
    stages, unknown = np.empty(len(values), dtype=np.int8), Counter()
    for i, text in enumerate(values):
        try:
            code = int((text or "").strip())
        except ValueError:
            raise AnnotationError(f"{path}: SleepStage {i + 1} is not an integer: {text!r}") from None
        if code not in _PROFUSION_CODES:
            unknown[str(code)] += 1
        stages[i] = _PROFUSION_CODES.get(code, UNSCORED)
    return Hypnogram(stages, path, "profusion-xml", notes=_unknown_labels(unknown, len(values), path))


# ----------------------------------------------------------------------------------------------------------
# Luna .annot (APPLES)

_LUNA_STAGES = {"W": W, "WAKE": W, "N1": N1, "NREM1": N1, "N2": N2, "NREM2": N2, "N3": N3, "NREM3": N3,
                "N4": N3, "NREM4": N3, "R": REM, "REM": REM, "?": UNSCORED}
_LUNA_COLUMNS = ["class", "instance", "channel", "start", "stop", "meta"]
# Luna classes are free text (events too: 'arousal', 'apnea'), so only a class shaped like a stage ('N5', 'NREM5',
# 'S7', 'Stage 7') that we do not know counts as an unknown stage; anything else is an event and is ignored.
_LUNA_STAGE_LIKE = re.compile(r"(?i)^(n|nrem|s|stage[ _]?)\d+$")


def _luna_time(text: str, is_stop: bool, start_tod: float | None, path: str, lineno: int) -> float | None:
    """A Luna start/stop field → seconds from the recording start; None for an empty stop ('.', '...')."""
    text = text.strip()
    if is_stop and text in ("", ".", "..."):
        return None
    if text.lower().startswith("e:"):
        try:
            epoch = int(text[2:])
        except ValueError:
            epoch = 0
        if epoch < 1:
            raise AnnotationError(f"{path}: line {lineno}: bad epoch code {text!r} (epochs are 1-based)")
        # e:N as a start is the beginning of epoch N; as a stop it includes epoch N.
        return (epoch if is_stop else epoch - 1) * EPOCH_S
    clock = _clock_seconds(text)
    if clock is not None:
        if start_tod is None:
            raise AnnotationError(f"{path}: line {lineno}: clock time {text!r} needs the EDF start time "
                                  "(edf_start was not given)")
        return _since(clock, start_tod)
    try:
        seconds = float(text)
    except ValueError:
        seconds = math.nan
    if not math.isfinite(seconds):   # float() also takes 'nan' and 'inf'
        raise AnnotationError(f"{path}: line {lineno}: cannot read time {text!r} "
                              "(expected HH:MM:SS, seconds or e:N)")
    return seconds


def read_luna_annot(path, edf_start: dt.datetime | None) -> Hypnogram:
    """Luna `.annot`: stage rows (class W/N1/N2/N3/R/?) placed by their start/stop times; other classes ignored.

    Clock times count from edf_start's time of day, +24 h when earlier (Luna's rule); plain numbers are
    elapsed seconds; `e:N` is the 1-based epoch N.
    """
    path = os.fspath(path)
    lines = _read_text(path)
    start_tod = _time_of_day(edf_start) if edf_start is not None else None
    columns, intervals, unknown = None, [], Counter()
    for lineno, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        fields = line.split("\t")
        if columns is None:
            if fields[0].strip().lower() == "class":
                columns = {name.strip().lower(): i for i, name in enumerate(fields)}
                continue
            columns = {name: i for i, name in enumerate(_LUNA_COLUMNS)}  # headerless: Luna's column order
        label = fields[columns["class"]].strip()
        code = _LUNA_STAGES.get(label.upper())
        if code is None and not _LUNA_STAGE_LIKE.match(label):
            continue  # an event, not a stage
        try:
            start_text = fields[columns["start"]]
            stop_text = fields[columns["stop"]] if "stop" in columns and columns["stop"] < len(fields) else ""
        except (KeyError, IndexError):
            raise AnnotationError(f"{path}: line {lineno}: stage row has no start field") from None
        start = _luna_time(start_text, False, start_tod, path, lineno)
        stop = _luna_time(stop_text, True, start_tod, path, lineno)
        if stop is not None and stop < start:
            raise AnnotationError(f"{path}: line {lineno}: stage row stops before it starts "
                                  f"({start_text.strip()} .. {stop_text.strip()})")
        duration = 0.0 if stop is None else stop - start
        if code is None:
            first, end = _epoch_span(start, duration)
            unknown[label] += end - first
        intervals.append((start, duration, UNSCORED if code is None else code))
    stages, notes = _place(intervals, path)
    labelled = sum(end - first for first, end in (_epoch_span(onset, d) for onset, d, _ in intervals))
    notes += _unknown_labels(unknown, labelled, path)
    return Hypnogram(stages, path, "luna-annot", notes=notes)


# ----------------------------------------------------------------------------------------------------------
# WSC: Gamma `.stg.txt` (one row per epoch) and Twin `.allscore.txt` (stage changes with clock times)

_WSC_CODES = {0: W, 1: N1, 2: N2, 3: N3, 4: N3, 5: REM, 6: UNSCORED, 7: UNSCORED}


def _int_field(text: str) -> int | None:
    """'3' or '3.0' → 3; None when the text is not an integral number."""
    try:
        value = float(text)
    except ValueError:
        return None
    return int(value) if value.is_integer() else None


def _stg_columns(header: list[str], path: str) -> tuple[int, int, str | None]:
    names = [h.strip().lower() for h in header]
    if "epoch" not in names:
        raise AnnotationError(f"{path}: header has no 'Epoch' column: {header}")
    if "user-defined stage" in names:
        return names.index("epoch"), names.index("user-defined stage"), None
    others = [i for i, n in enumerate(names) if "stage" in n]
    if not others:
        raise AnnotationError(f"{path}: header has no 'User-Defined Stage' column: {header}")
    return names.index("epoch"), others[0], f"no 'User-Defined Stage' column; used {header[others[0]].strip()!r}"


def read_wsc_stg(path) -> Hypnogram:
    """WSC `.stg.txt`: rows of 1-based epoch number and stage code; missing epochs are -1."""
    path = os.fspath(path)
    rows = [(n, line.split("\t")) for n, line in enumerate(_read_text(path), 1) if line.strip()]
    if not rows:
        raise AnnotationError(f"{path}: empty file")
    notes, columns = [], None
    if _int_field(rows[0][1][0]) is None:  # a header row names the columns
        epoch_col, stage_col, note = _stg_columns(rows.pop(0)[1], path)
        columns = (epoch_col, stage_col)
        notes += [note] if note else []
    intervals, empty, unknown, first_unknown = [], 0, Counter(), ""
    for lineno, fields in rows:
        if columns:
            epoch_text = fields[columns[0]] if columns[0] < len(fields) else ""
            stage_text = fields[columns[1]] if columns[1] < len(fields) else ""
        else:  # headerless: epoch first, the stage is the first non-empty field after it
            epoch_text = fields[0]
            stage_text = next((f for f in fields[1:] if f.strip()), "")
        epoch = _int_field(epoch_text)
        if epoch is None or epoch < 1:
            raise AnnotationError(f"{path}: line {lineno}: bad epoch number {epoch_text.strip()!r} (1-based)")
        if not stage_text.strip():
            empty += 1
            code = UNSCORED
        else:
            value = _int_field(stage_text)
            if value not in _WSC_CODES:   # counted, then one line for all (closed vocabulary: module docstring)
                first_unknown = first_unknown or f"line {lineno}: unknown stage code {stage_text.strip()!r}"
                unknown[stage_text.strip()] += 1
                continue
            code = _WSC_CODES[value]
        intervals.append(((epoch - 1) * EPOCH_S, EPOCH_S, code))
    if unknown:
        raise _unknown_error(path, first_unknown, unknown, "rows")
    stages, place_notes = _place(intervals, path)
    if empty:
        notes.append(f"{empty} rows with an empty stage field read as unscored")
    return Hypnogram(stages, path, "wsc-stg", notes=notes + place_notes)


_ALLSCORE_STAGES = {"W": W, "N1": N1, "N2": N2, "N3": N3, "N4": N3, "R": REM, "REM": REM,
                    "NO STAGE": UNSCORED, "?": UNSCORED, "MVT": UNSCORED}
_GAP_EVENTS = ("PAUSED", "RECORDING RESUMED", "POWER FAILURE RECOVERY")


def _allscore_lines(path: str) -> list[tuple[int, float | None, str]]:
    """(line number, clock seconds or None, upper-cased text) for every non-empty line."""
    out = []
    for lineno, line in enumerate(_read_text(path, encoding="latin-1"), 1):
        if not line.strip():
            continue
        clock_text, _, text = line.partition("\t")
        out.append((lineno, _clock_seconds(clock_text), text.strip().upper()))
    return out


def read_wsc_allscore(path, edf_start: dt.datetime | None) -> Hypnogram:
    """WSC `.allscore.txt`: a stage holds from its line until the next stage line, LIGHTS ON or the file's end.

    Times count from the START RECORDING line (edf_start when the file has none), wrapping past midnight.
    Lines before START RECORDING are ignored (some files carry afternoon events from before the night).
    The last stage, when no LIGHTS ON closes it, runs to the latest time in the file (at least one epoch).
    """
    path = os.fspath(path)
    lines = _allscore_lines(path)
    for lineno, _, text in lines:
        if text.startswith(_GAP_EVENTS):
            raise AnnotationError(f"{path}: line {lineno}: recording paused: gap in the night ({text})")
    starts = [(i, clock) for i, (_, clock, text) in enumerate(lines) if text.startswith("START RECORDING")]
    if len(starts) > 1:
        raise AnnotationError(f"{path}: {len(starts)} START RECORDING lines (recording restarted)")
    edf_tod = _time_of_day(edf_start) if edf_start is not None else None
    notes = []
    if starts:
        first, ref = starts[0]
        if ref is None:
            raise AnnotationError(f"{path}: line {lines[first][0]}: START RECORDING has no readable time")
        if first:
            notes.append(f"ignored {first} lines before START RECORDING")
        lines = lines[first:]
        if edf_tod is not None and min(_since(ref, edf_tod), _since(edf_tod, ref)) > 1.0:
            raise AnnotationError(f"{path}: START RECORDING at {_fmt_clock(ref)} but the EDF starts at "
                                  f"{_fmt_clock(edf_tod)}")
    elif edf_tod is not None:
        ref = edf_tod
    else:
        raise AnnotationError(f"{path}: no START RECORDING line and no EDF start time given")

    changes, last_time, unknown, first_unknown = [], 0.0, Counter(), ""  # changes: (seconds, code)
    for lineno, clock, text in lines:
        if clock is None:
            if text.startswith("STAGE"):
                raise AnnotationError(f"{path}: line {lineno}: stage line without a readable time")
            continue  # a free-text note without a time says nothing about stages
        t = _since(clock, ref)
        last_time = max(last_time, t)
        if text.startswith("STAGE"):
            label = re.sub(r"^STAGE\s*-?\s*", "", text)
            if label not in _ALLSCORE_STAGES:   # counted, then one line for all (closed vocabulary)
                first_unknown = first_unknown or f"line {lineno}: unknown stage {text!r}"
                unknown[text] += 1
                continue
            if changes and t < changes[-1][0]:
                raise AnnotationError(f"{path}: line {lineno}: stage lines out of time order")
            changes.append((t, _ALLSCORE_STAGES[label]))
        elif text.startswith("LIGHTS ON") and changes:
            changes.append((t, None))  # closes the open stage; None marks 'no stage from here'
    if unknown:
        raise _unknown_error(path, first_unknown, unknown, "lines")
    intervals = []
    for (t, code), nxt in zip(changes, changes[1:] + [(None, None)]):
        if code is None:
            continue
        stop = nxt[0] if nxt[0] is not None else max(last_time, t + EPOCH_S)
        if stop > t:  # a stage replaced at the same instant never held
            intervals.append((t, stop - t, code))
    stages, place_notes = _place(intervals, path)
    if changes and changes[-1][1] is not None:
        notes.append("no LIGHTS ON line: the last stage runs to the last time in the file")
    return Hypnogram(stages, path, "wsc-allscore", notes=notes + place_notes)


# ----------------------------------------------------------------------------------------------------------
# EDF+ hypnograms (Sleep-EDF, HMC)

_EDF_STAGES = {"W": W, "1": N1, "2": N2, "3": N3, "4": N3, "R": REM, "?": UNSCORED,
               "N1": N1, "N2": N2, "N3": N3, "N4": N3, "REM": REM}
# Differences larger than this are a wrong date, not a late-started scoring file.
_MAX_SHIFT_S = 12 * 3600


_UNKNOWN_STAGE = -2   # _edf_stage: a 'Sleep stage …' annotation whose stage we do not know


# Text that reads like a stage but is not the vocabulary above ("Sleep_stage_2", "Stage 2 sleep", "SLEEP-S2"): the word
# "stage", or "sleep" followed by a stage's code. Not "Sleep spindle" or "Sleep apnea", which are events.
_STAGE_LIKE = re.compile(r"(?i)(?<![a-z])stage(?![a-z])|(?<![a-z])sleep[\s_-]*(s[0-4]|n[1-4]|r|rem|w|wake)(?![a-z0-9])")


def _edf_stage(description: str) -> int | None:
    """'Sleep stage 2' → 2, 'Movement time' → -1, 'Sleep stage X' and other text that reads like a stage
    (_STAGE_LIKE) → _UNKNOWN_STAGE; None for events that are not stages."""
    text = description.split("@@")[0].strip()  # HMC appends '@@<channel>' to some events
    if text.lower() == "movement time":
        return UNSCORED
    m = re.match(r"(?i)^sleep stage\s+(\S+)$", text)
    if not m:
        return _UNKNOWN_STAGE if _STAGE_LIKE.search(text) else None
    return _EDF_STAGES.get(m[1].upper(), _UNKNOWN_STAGE)


def read_edf_hypnogram(path, edf_start: dt.datetime | None = None) -> Hypnogram:
    """EDF+ annotation file with `Sleep stage …` / `Movement time` annotations; other events are ignored.

    Onsets count from the hypnogram file's own header start. When edf_start (the recording's start) is
    given and differs, onsets are shifted by the difference, rounded to whole seconds; a shift of 12 h or
    more is rejected (a wrong date, not a late scoring file). Stage epochs that land before the recording
    start are dropped with a note.
    """
    path = os.fspath(path)
    _check_exists(path)
    try:
        header, events = read_annotations(path)
    except EdfError as err:
        raise AnnotationError(str(err)) from None
    shift, notes = 0.0, []
    if edf_start is not None:
        edf_start = edf_start.replace(tzinfo=None)  # EDF header times are naive local times
    if edf_start is not None and header.start is not None and header.start != edf_start:
        shift = float(round((header.start - edf_start).total_seconds()))
        if abs(shift) >= _MAX_SHIFT_S:
            raise AnnotationError(f"{path}: hypnogram starts {header.start} but the recording starts "
                                  f"{edf_start} ({shift:+g} s apart)")
        notes.append(f"onsets shifted by {shift:+g} s (hypnogram start {header.start}, recording start "
                     f"{edf_start})")
        if shift % EPOCH_S:
            notes.append("the shift is not a multiple of 30 s: stage annotations straddle epochs")
    intervals, unknown = [], Counter()
    for onset, duration, description in events:
        code = _edf_stage(description)
        if code is None:
            continue
        if code == _UNKNOWN_STAGE:   # counted, then one line for all (closed vocabulary: module docstring)
            unknown[description] += 1
            continue
        if onset < 0:
            raise AnnotationError(f"{path}: negative onset {onset:g} s for {description!r}")
        intervals.append((onset + shift, duration, code))
    if unknown:
        raise _unknown_error(path, f"unknown stage annotation {next(iter(unknown))!r}", unknown, "annotations")
    if shift < 0:  # the scoring began before the recording: keep only what the recording covers
        kept = [(max(onset, 0.0), onset + duration - max(onset, 0.0), code)
                for onset, duration, code in intervals if onset >= 0 or onset + duration > 0]
        dropped = len(intervals) - len(kept)
        intervals = kept
        if dropped:
            notes.append(f"dropped {dropped} stage annotations before the recording start")
    stages, place_notes = _place(intervals, path)
    return Hypnogram(stages, path, "edf+", notes=notes + place_notes)


# ----------------------------------------------------------------------------------------------------------
# Plain text / CSV: one stage per line

_TEXT_LABELS = {"W": W, "WAKE": W, "N1": N1, "S1": N1, "NREM1": N1, "N2": N2, "S2": N2, "NREM2": N2,
                "N3": N3, "S3": N3, "NREM3": N3, "N4": N3, "S4": N3, "NREM4": N3, "R": REM, "REM": REM,
                "?": UNSCORED, "UNSCORED": UNSCORED, "UNKNOWN": UNSCORED, "MOVEMENT": UNSCORED, "MT": UNSCORED}
_STAGE_COLUMNS = ("stage", "stages", "sleep_stage", "sleep stage")


def _text_stage(token: str) -> int | None:
    """A stage token: our integer coding (-1..4; bare digits are ours, so 4 is REM) or a label."""
    token = token.strip().strip("\"'").upper()
    token = re.sub(r"^SLEEP STAGE\s+", "", token)
    value = _int_field(token)
    if value is not None:
        return value if -1 <= value <= 4 else None
    return _TEXT_LABELS.get(token)


def _split_row(line: str) -> list[str]:
    for sep in ("\t", ",", ";"):
        if sep in line:
            return line.split(sep)
    return [line]


def read_text(path) -> Hypnogram:
    """One stage per non-comment line: a token, or a CSV/TSV row (column 'stage' if named, else the last field)."""
    path = os.fspath(path)
    rows = [(n, _split_row(line)) for n, line in enumerate(_read_text(path), 1)
            if line.strip() and not line.lstrip().startswith("#")]
    if not rows:
        raise AnnotationError(f"{path}: no stage lines")
    column = -1
    names = [f.strip().strip("\"'").lower() for f in rows[0][1]]
    header = next((i for i, name in enumerate(names) if name in _STAGE_COLUMNS), None)
    if header is not None:
        column = header
        rows.pop(0)
    stages, unknown, first_unknown = np.empty(len(rows), dtype=np.int8), Counter(), ""
    for i, (lineno, fields) in enumerate(rows):
        token = fields[column] if column < len(fields) else ""
        code = _text_stage(token)
        if code is None:   # counted, then one line for all (closed vocabulary: module docstring)
            first_unknown = first_unknown or f"line {lineno}: unknown stage {token.strip()!r}"
            unknown[token.strip()] += 1
            continue
        stages[i] = code
    if unknown:
        raise _unknown_error(path, first_unknown, unknown, "lines")
    if not len(stages):
        raise AnnotationError(f"{path}: no stage lines")
    return Hypnogram(stages, path, "text")


# ----------------------------------------------------------------------------------------------------------
# Dispatch and alignment


def _xml_root_tag(path: str) -> str | None:
    try:
        for _, element in ET.iterparse(path, events=("start",)):
            return element.tag
    except ET.ParseError as err:
        raise AnnotationError(f"{path}: not well-formed XML ({err})") from None
    return None


def detect_format(path) -> str:
    """Format name of an annotation file, from its first bytes and its name."""
    path = os.fspath(path)
    _check_exists(path)
    with open(path, "rb") as f:
        head = f.read(512)
    name = os.path.basename(path).lower()
    if head[:8] == b"0       ":
        return "edf+"
    if head.lstrip(b"\xef\xbb\xbf \t\r\n").startswith(b"<"):
        tag = _xml_root_tag(path)
        if tag == "PSGAnnotation":
            return "nsrr-xml"
        if tag == "CMPStudyConfig":
            return "profusion-xml"
        raise AnnotationError(f"{path}: unknown XML annotation format (root <{tag}>)")
    first_row = next((line for line in head.decode("latin-1").splitlines()
                      if line.strip() and not line.startswith("#")), "")
    if name.endswith(".annot") or first_row.split("\t")[0].strip().lower() == "class":
        return "luna-annot"
    if name.endswith(".stg.txt"):
        return "wsc-stg"
    if name.endswith(".allscore.txt"):
        return "wsc-allscore"
    return "text"


def read_hypnogram(path, edf_start: dt.datetime | None = None, fmt: str | None = None) -> Hypnogram:
    """Read any supported annotation file; fmt None detects the format (see detect_format)."""
    fmt = fmt or detect_format(path)
    readers = {
        "nsrr-xml": lambda: read_nsrr_xml(path),
        "profusion-xml": lambda: read_profusion_xml(path),
        "luna-annot": lambda: read_luna_annot(path, edf_start),
        "wsc-stg": lambda: read_wsc_stg(path),
        "wsc-allscore": lambda: read_wsc_allscore(path, edf_start),
        "edf+": lambda: read_edf_hypnogram(path, edf_start),
        "text": lambda: read_text(path),
    }
    if fmt not in readers:
        raise AnnotationError(f"{os.fspath(path)}: unknown annotation format {fmt!r} (known: {', '.join(FORMATS)})")
    return readers[fmt]()


def fit_to_recording(hyp: Hypnogram, n_epochs: int, max_overhang_epochs: int = 10) -> tuple[np.ndarray, list[str]]:
    """Crop or pad a hypnogram to a recording of n_epochs full 30-s epochs (epoch k = recording epoch k).

    Leading -1 (late-starting scoring) is kept; a short hypnogram is padded with -1; epochs past the
    recording end are cropped, but scoring that reaches more than max_overhang_epochs past the end means
    the file belongs to another (longer) recording and is rejected. Returns (int8 stages, notes); the
    notes start with the reader's own notes.
    """
    path = hyp.source
    if n_epochs <= 0:
        raise AnnotationError(f"{path}: the recording has no full 30-s epoch ({n_epochs})")
    if hyp.recording_s is not None:
        claimed = int(hyp.recording_s // EPOCH_S)
        if abs(claimed - n_epochs) > max_overhang_epochs:
            raise AnnotationError(f"{path}: annotation file says the recording lasts {hyp.recording_s:g} s "
                                  f"({claimed} epochs) but the recording has {n_epochs} epochs")
    stages, notes = np.asarray(hyp.stages, dtype=np.int8), list(hyp.notes)
    if len(stages) > n_epochs:
        scored = np.flatnonzero(stages[n_epochs:] >= 0)
        reach = int(scored[-1]) + 1 if len(scored) else 0  # how far scoring runs past the end
        if reach > max_overhang_epochs:
            raise AnnotationError(f"{path}: annotations run {reach} scored epochs past the recording end "
                                  f"({n_epochs} epochs)")
        notes.append(f"cropped {len(stages) - n_epochs} epochs past the recording end "
                     f"({len(scored)} of them scored)")
        stages = stages[:n_epochs]
    elif len(stages) < n_epochs:
        notes.append(f"padded {n_epochs - len(stages)} unscored epochs after the annotations end "
                     f"(annotations cover {len(stages)} of {n_epochs} epochs)")
        stages = np.concatenate([stages, np.full(n_epochs - len(stages), UNSCORED, dtype=np.int8)])
    if not (stages >= 0).any():
        raise AnnotationError(f"{path}: no scored epochs within the recording ({n_epochs} epochs)")
    return stages.copy(), notes


# ----------------------------------------------------------------------------------------------------------
# Writers: the synthetic cohort's vendor files, and predicted stages as hypnogram files (predict.py --export,
# NightResult.write) that the readers above, and the tools named, read back

EXPORTS = {"edf": ".stages.edf", "luna": ".stages.annot", "xml": ".stages.xml", "txt": ".stages.txt"}
STAGE_TO_NSRR = (0, 1, 2, 3, 5)                     # class k (W N1 N2 N3 R) -> NSRR_CONCEPT's code


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
    """NSRR XML file of nsrr_xml (as NSRR's Compumedics exports)."""
    path.write_text(nsrr_xml(codes, start, duration_s, events, labels), encoding="utf-8", newline="\n")


def nsrr_xml(codes, start: dt.datetime | None, duration_s: float, events=(), labels: dict | None = None,
             software: str = "Compumedics") -> str:
    """NSRR XML (docs/formats.md §3a) of stage codes [E] (NSRR_CONCEPT's: 0-4 W N1-N4, 5 R, 6 movement, 9 unscored):
    stage runs interleaved by time with respiratory and arousal events (the synthetic cohort's dicts)."""
    clock = [("ClockTime", f"{start:%d.%m.%y} {start:%H.%M.%S}")] if start is not None else []
    items = [(0.0, 0, _xml_event([("EventType", ""), ("EventConcept", "Recording Start Time"), ("Start", "0"),
                                  ("Duration", f"{float(duration_s)}"), *clock]))]
    for first, length, code in runs_of(codes):
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
    return ('<?xml version="1.0" encoding="UTF-8" standalone="no"?>\n<PSGAnnotation>\n'
            f"<SoftwareVersion>{software}</SoftwareVersion>\n<EpochLength>30</EpochLength>\n<ScoredEvents>\n"
            + "".join(item[2] for item in items) + "</ScoredEvents>\n</PSGAnnotation>\n")


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
    rows += [(float(first * EPOCH_S), 2, f"STAGE - {TWIN_STAGE[code]}") for first, _, code in runs_of(same)]
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


def stage_annotations(stages: np.ndarray) -> list[tuple[float, float, str]]:
    """(onset_s, duration_s, 'Sleep stage X') per run of equal stages, the Sleep-EDF convention for EDF+ hypnograms."""
    return [(first * EPOCH_S, length * EPOCH_S, f"Sleep stage {AASM_LETTERS[code]}")
            for first, length, code in runs_of(stages)]


def write_stages(path, fmt: str, stages: np.ndarray, start_time: str | None = None) -> None:
    """stages [E] (0 W … 4 R) as `fmt`, written atomically: edf (EDF+ 'Sleep stage X', one annotation per run:
    EDFbrowser, MNE, pyedflib), luna (Luna .annot: one row per epoch, start/stop in seconds from the recording
    start), xml (NSRR XML: one 'Stages|Stages' event per run), txt (one stage letter per line: W N1 N2 N3 R)."""
    if fmt == "edf":
        start = dt.datetime.fromisoformat(start_time) if start_time else None
        write_annotations(path, stage_annotations(stages), start, "predict.py")
        return
    letters = [AASM_LETTERS[k] for k in stages]
    if fmt == "txt":
        text = "".join(f"{letter}\n" for letter in letters)
    elif fmt == "luna":
        text = "class\tinstance\tchannel\tstart\tstop\tmeta\n" + "".join(
            f"{letter}\t.\t.\t{i * EPOCH_S:.3f}\t{(i + 1) * EPOCH_S:.3f}\t.\n" for i, letter in enumerate(letters))
    elif fmt == "xml":
        start = dt.datetime.fromisoformat(start_time) if start_time else None
        text = nsrr_xml([STAGE_TO_NSRR[k] for k in stages], start, len(stages) * EPOCH_S, software="pftsleep predict.py")
    else:
        raise ValueError(f"unknown export format {fmt!r}: one of {', '.join(EXPORTS)}")
    write_atomic(path, lambda temp: temp.write_text(text, encoding="utf-8"))
