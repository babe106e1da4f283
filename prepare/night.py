"""One night, end to end: EDF + annotation file → (signals [7, T] float16, stages [T // 3750] int8, attrs).

Rules that apply to every dataset (the dataset modules only say where files are and what the
channels are called):
- A slot in `required` (default EEG, EOG, EMG: the AASM staging montage) that is missing, flat,
  all- or mostly NaN (more than signals.MAX_NAN_SHARE) or in unknown units fails the night. Any
  other slot with such a problem is stored as zeros, marked absent in attrs['present'], and the
  reason is kept in attrs['warnings'].
- An EEG, EOG or EMG that is mains hum only (signals.mains_hum) is kept, with a warning.
- Stages come from the first annotation candidate that exists (NSRR XML before Profusion XML);
  none existing fails the night unless the dataset allows unlabelled nights (`edf`).
- NaNs up to that share are interpolated and counted; values beyond float16's range are clipped and counted.
"""
from __future__ import annotations

import datetime as dt
import math
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import yaml

from . import annotations, edf, signals
from .signals import FS, EPOCH_SAMPLES, SLOTS, SlotError, SlotSignal

SCHEMA = "pftsleep-night/1"
DEFAULT_REQUIRED = ("EEG", "EOG", "EMG")
SLOT_THREADS = 2                       # slots read and filtered at once (condition_slots)
FLOAT16_MAX = 65000.0


class PrepareError(ValueError):
    """A night that cannot be prepared; the message says why in one line."""


# what a bad night raises: reported in one line, the batch goes on (anything else is a bug, reported as one)
NIGHT_ERRORS = (edf.EdfError, annotations.AnnotationError, PrepareError, SlotError, OSError)


@dataclass
class Night:
    dataset: str
    night_id: str
    subject: str
    visit: str
    edf: Path
    annotations: list[Path] = field(default_factory=list)   # candidates, first existing wins
    labelled: bool = True                                     # False: a night without annotations is allowed


@dataclass
class Options:
    required: tuple[str, ...] = DEFAULT_REQUIRED
    channel_map: dict | None = None      # --channels map.yaml
    zero_phase: bool = False             # --zero-phase: sosfiltfilt instead of the paper's causal sosfilt
    clean_spo2: bool = False             # --clean-spo2: interpolate SpO2 outside 50-100 %
    max_overhang_epochs: int = 10        # scored epochs past the recording end that are cropped, not fatal
    allow_truncated: bool = False        # a file with fewer data records than its header says: read what is there
                                         # (predict.py, with a warning) instead of failing (prepare: training data)


def make_options(channels: Path | dict | None = None, require: str = ",".join(DEFAULT_REQUIRED),
                 zero_phase: bool = False, clean_spo2: bool = False) -> Options:
    """Options from the command line of `python -m prepare` and predict.py: --channels map.yaml (or, from Python, the
    mapping itself; checked here), --require (a comma list of slots, 'all' or 'none'), --zero-phase, --clean-spo2.
    Errors exit with one line."""
    channel_map = None
    if channels:
        channel_map = channels if isinstance(channels, dict) else read_channel_file(Path(channels))
        if not isinstance(channel_map, dict) or set(channel_map) - set(SLOTS):
            raise SystemExit(f"{channels}: must map slots ({', '.join(SLOTS)}) to labels; "
                             f"got {sorted(set(channel_map) - set(SLOTS)) if isinstance(channel_map, dict) else channel_map!r}")
        wrong = {slot: label for slot, label in channel_map.items() if label is not None and not isinstance(label, str)}
        if wrong:
            raise SystemExit(f"{channels}: each slot maps to one EDF label, 'A - B' or null; got {wrong}")
    require = {"all": ",".join(SLOTS), "none": ""}.get(require, require)
    required = tuple(s.strip().upper() for s in require.split(",") if s.strip())
    if set(required) - set(SLOTS):
        raise SystemExit(f"--require: unknown slots {sorted(set(required) - set(SLOTS))}; slots are {', '.join(SLOTS)}")
    return Options(required=required, channel_map=channel_map, zero_phase=zero_phase, clean_spo2=clean_spo2)


def read_channel_file(path: Path):
    try:
        return yaml.safe_load(path.read_text()) or {}
    except OSError as err:
        raise SystemExit(f"{path}: cannot read the --channels file ({err.strerror})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        raise SystemExit(f"{path}: the --channels file is not valid YAML"
                         f"{f' (line {mark.line + 1})' if mark else ''}") from None


def read_stages(night: Night, header: edf.EdfHeader, n_epochs: int, opts: Options) -> tuple[np.ndarray, dict]:
    existing = [Path(p) for p in night.annotations if Path(p).is_file()]
    if not existing:
        if night.labelled:
            looked = ", ".join(str(p) for p in night.annotations) or "nothing"
            raise PrepareError(f"no annotation file (looked for {looked})")
        return np.full(n_epochs, -1, np.int8), {"annotations": None, "annotation_format": None, "notes": ["unlabelled"]}
    hyp = annotations.read_hypnogram(existing[0], edf_start=header.start)
    stages, notes = annotations.fit_to_recording(hyp, n_epochs, opts.max_overhang_epochs)
    return stages.astype(np.int8), {"annotations": str(existing[0]), "annotation_format": hyp.format, "notes": notes}


def read_slot(header: edf.EdfHeader, slot: str, source: tuple[str, str | None], opts: Options) -> SlotSignal:
    """Read one slot (a label or the difference of two), in µV for voltage slots, NaNs filled."""
    try:
        parts = [edf.find_signal(header, label) for label in source if label is not None]
    except edf.AmbiguousLabel as err:
        raise SlotError(f"slot {slot}: {err.detail}") from None
    for part in parts:
        signals.check_source(part, slot)
    if len({p.fs for p in parts}) > 1:
        raise SlotError(f"slot {slot}: cannot derive {signals.describe(source)}: rates differ "
                        f"({', '.join(f'{p.fs:g}' for p in parts)} Hz)")
    values = []
    for part in parts:
        x = edf.read_signal(header, part.label)
        if slot in signals.VOLTAGE_SLOTS:
            x = x * signals.microvolt_factor(part.dimension, slot, part.label)
        values.append(x)
    if len(parts) == 2 and slot not in signals.VOLTAGE_SLOTS and parts[0].dimension != parts[1].dimension:
        raise SlotError(f"slot {slot}: cannot derive {signals.describe(source)}: units differ")
    x = values[0] - values[1] if len(values) == 2 else values[0]
    declared = " - ".join(dict.fromkeys(p.dimension for p in parts))     # 'mV', or 'uV - mV' for a mixed derivation
    return checked_slot(x, parts[0].fs, slot, signals.describe(source), declared)


def checked_slot(x: np.ndarray, fs: float, slot: str, label: str, declared_unit: str) -> SlotSignal:
    """One slot's samples at their own rate, already in µV for a voltage slot: NaNs filled, a flat or implausible
    signal refused (SlotError). Where an EDF's signals (read_slot) and in-memory arrays (prepare_arrays) meet."""
    x, n_nan = signals.fill_nans(x, slot, label)
    signals.check_plausible(x, slot, label)
    unit = "uV" if slot in signals.VOLTAGE_SLOTS else declared_unit
    return SlotSignal(values=x, fs=fs, label=label, unit=unit, nan_samples=n_nan, source_unit=declared_unit)


def prepare_edf(path: Path, opts: Options, table_for) -> tuple[str, np.ndarray, dict, list]:
    """An EDF for staging, read once: table_for(labels) -> (name, alias table) chooses the channels (it may raise);
    -> (that name, signals [7, T], attrs as prepare_night's, the EDF+ annotations (onset_s, duration_s, text), [] for
    a plain EDF or annotations that do not parse: they serve only lights-off/on)."""
    header = edf.read_header(path, allow_truncated=opts.allow_truncated)
    table_name, table = table_for(header.labels())
    night = Night(dataset="edf", night_id=path.stem, subject=path.stem, visit="", edf=path, labelled=False)
    night_signals, _, attrs = prepare_night(night, table, opts, header)
    try:
        events = edf.read_annotations(header)[1] if "EDF Annotations" in header.labels() else []
    except edf.EdfError:
        events = []
    return table_name, night_signals, attrs, events


def prepare_night(night: Night, table: dict, opts: Options,
                  header: edf.EdfHeader | None = None) -> tuple[np.ndarray, np.ndarray, dict]:
    """(signals [7, T] float16, stages [T // 3750] int8, attrs) of one night; `header`: its EDF's, if already read."""
    header = header or edf.read_header(night.edf, allow_truncated=opts.allow_truncated)
    n_samples = int(round(header.duration_s * FS))
    n_epochs = n_samples // EPOCH_SAMPLES
    if n_epochs == 0:
        raise PrepareError(f"recording is {header.duration_s:g} s long, shorter than one 30-s epoch")
    stages, ann_info = read_stages(night, header, n_epochs, opts)   # cheap, so a bad file fails fast

    sources = signals.resolve(header.labels(), table, opts.channel_map)

    def read(slot: str) -> SlotSignal:
        if sources[slot] is None:
            mapped_to_null = slot in (opts.channel_map or {})
            raise SlotError(f"slot {slot}: " + ("mapped to null by --channels" if mapped_to_null
                                                 else "none of its labels is in the EDF"))
        return read_slot(header, slot, sources[slot], opts)
    warnings = list(header.warnings)
    night_signals, present, meta = condition_slots(read, n_samples, opts, warnings)

    attrs = {
        "schema": SCHEMA, "dataset": night.dataset, "subject": night.subject, "visit": night.visit,
        "night_id": night.night_id, "fs": FS, "epoch_s": signals.EPOCH_S, "channels": list(SLOTS),
        "present": present, **meta, "filters": signals.filters_description(opts.zero_phase),
        "edf": str(night.edf), "annotations": ann_info["annotations"],
        "annotation_format": ann_info["annotation_format"], "annotation_notes": ann_info["notes"],
        "start_time": header.start.isoformat() if header.start else None,
        "duration_s": header.duration_s, "n_scored": int(np.count_nonzero(stages >= 0)),
        "warnings": warnings,
    }
    return night_signals, stages, attrs


def condition_slots(read, n_samples: int, opts: Options, warnings: list[str]) -> tuple[np.ndarray, list[bool], dict]:
    """The 7 slots, each from read(slot) -> SlotSignal (SlotError: unusable), filtered and resampled as the paper
    does into ([7, n_samples] float16 at 125 Hz, present flags, per-slot meta). An unusable required slot fails the
    night; any other is zeros, marked absent, its reason appended to `warnings`. EDFs and arrays share this. Slots
    are read and filtered SLOT_THREADS at a time (numpy's and scipy's loops release the GIL), then taken in order."""
    night_signals = np.zeros((len(SLOTS), n_samples), np.float16)   # [7, T]
    meta = {key: {} for key in ("source_labels", "source_fs", "source_units", "declared_units", "nan_samples",
                                "clipped_samples")}
    present = []
    with ThreadPoolExecutor(SLOT_THREADS) as pool:
        conditioned = list(pool.map(lambda slot: condition_slot(read, slot, opts), SLOTS))
    for i, (slot, result) in enumerate(zip(SLOTS, conditioned)):
        if isinstance(result, SlotError):
            if slot in opts.required:
                raise PrepareError(f"required {result}") from None
            warnings.append(str(result))
            present.append(False)
            continue
        slot_signal, values, notes = result
        warnings.extend(notes)
        values = _fit_length(values, n_samples)
        clipped = int(np.count_nonzero(np.abs(values) > FLOAT16_MAX))
        night_signals[i] = np.clip(values, -FLOAT16_MAX, FLOAT16_MAX)
        present.append(True)
        meta["source_labels"][slot] = slot_signal.label
        meta["source_fs"][slot] = slot_signal.fs
        meta["source_units"][slot] = slot_signal.unit                  # as stored: uV for voltage slots
        meta["declared_units"][slot] = slot_signal.source_unit          # as the EDF (or the caller) declared it
        meta["nan_samples"][slot] = slot_signal.nan_samples
        meta["clipped_samples"][slot] = clipped
    return night_signals, present, meta


def condition_slot(read, slot: str, opts: Options) -> tuple[SlotSignal, np.ndarray, list[str]] | SlotError:
    """One slot for condition_slots: (its SlotSignal, its samples filtered at 125 Hz, warnings), or its SlotError."""
    try:
        slot_signal = read(slot)
    except SlotError as err:
        return err
    values, notes = slot_signal.values, []
    if slot in signals.MAINS_SLOTS and (hum := signals.mains_hum(values, slot_signal.fs)):  # raw: before filters
        notes.append(f"slot {slot}: signal {slot_signal.label!r} is mains hum only ({hum[0]:g} Hz and its "
                     f"harmonics carry {hum[1]:.0%} of the power above 0.3 Hz): electrode off?")
    if slot == "SPO2" and opts.clean_spo2:
        values, n_cleaned = signals.clean_spo2(values)
        if n_cleaned:
            notes.append(f"slot SPO2: {n_cleaned} samples outside 50-100 % interpolated")
    return slot_signal, signals.condition(values, slot_signal.fs, slot, opts.zero_phase), notes


def prepare_arrays(arrays: dict, opts: Options, start_time=None) -> tuple[np.ndarray, dict]:
    """In-memory signals → what prepare_night makes of an EDF, unlabelled: ([7, T] float16 at 125 Hz, attrs).
    `arrays` maps slots to (samples, fs in Hz, unit); a slot left out or None is absent. Units are EDF physical
    dimensions: nV, uV, mV or V for the voltage slots (converted to µV), % for SPO2. The same checks, filters and
    resampling as an EDF's signals (check_rate, checked_slot, condition_slots). Every slot must cover the same night:
    durations (samples / fs) that differ by more than MAX_DURATION_SPREAD_S fail (a wrong fs is the usual cause);
    within it T is the shortest duration × 125 (a warning above 1 s). start_time: parse_start_time."""
    if not isinstance(arrays, Mapping):
        raise PrepareError(f"signals: expected a dict of slot -> (samples, fs, unit), got {type(arrays).__name__}")
    if unknown := set(arrays) - set(SLOTS):
        raise PrepareError(f"signals: unknown slots {sorted(unknown)}; slots are {', '.join(SLOTS)}")
    start_time = parse_start_time(start_time)
    given = {slot: array_spec(slot, spec) for slot, spec in arrays.items() if spec is not None}
    if not given:
        raise PrepareError("signals: no slot given")
    durations = {slot: len(values) / fs for slot, (values, fs, _) in given.items()}
    duration_s, spread = min(durations.values()), max(durations.values()) - min(durations.values())
    shown = ", ".join(f"{slot} {durations[slot]:.1f} s ({len(values)} samples at fs {fs:g} Hz)"
                      for slot, (values, fs, _) in given.items())
    if spread > MAX_DURATION_SPREAD_S:
        raise PrepareError(f"signals: slots differ in duration (samples / fs): {shown}: every slot must cover the "
                           f"same night, to within one {MAX_DURATION_SPREAD_S:g}-s epoch; is a slot's fs wrong?")
    n_samples = int(round(duration_s * FS))
    if n_samples // EPOCH_SAMPLES == 0:
        raise PrepareError(f"signals are {duration_s:g} s long, shorter than one 30-s epoch")

    def read(slot: str) -> SlotSignal:
        if slot not in given:
            raise SlotError(f"slot {slot}: not given")
        values, fs, unit = given[slot]
        signals.check_rate(fs, slot, slot)
        if slot in signals.VOLTAGE_SLOTS:
            values = values * signals.microvolt_factor(unit, slot, slot)
        return checked_slot(values, fs, slot, slot, unit)
    warnings = []
    if spread > 1.0:
        warnings.append(f"signals: slots differ in duration by {spread:.1f} s ({shown}): staged over the shortest, "
                        f"{duration_s:.1f} s")
    night_signals, present, meta = condition_slots(read, n_samples, opts, warnings)
    for slot, n_nan in meta["nan_samples"].items():              # an EDF's NaNs are its EDF+D gaps, reported as such
        if n_nan:
            warnings.append(f"slot {slot}: {n_nan} NaN samples ({n_nan / len(given[slot][0]):.1%}) interpolated")
    attrs = {"fs": FS, "epoch_s": signals.EPOCH_S, "channels": list(SLOTS), "present": present, **meta,
             "filters": signals.filters_description(opts.zero_phase), "edf": None, "start_time": start_time,
             "duration_s": duration_s, "warnings": warnings}
    return night_signals, attrs


# in-memory slots (prepare_arrays) may differ in duration by up to one epoch (an EDF's last record, rounding);
# beyond that a slot does not cover the night the others do, or its fs is wrong
MAX_DURATION_SPREAD_S = float(signals.EPOCH_S)
START_TIME_FORMS = "a datetime or ISO date-time text such as '2001-02-03T23:59:45' (or None: no clock times)"


def array_spec(slot: str, spec) -> tuple[np.ndarray, float, str]:
    """One in-memory slot (samples, fs in Hz, unit) checked: (float64 samples, fs, unit); PrepareError naming the
    slot and the field otherwise."""
    if not (isinstance(spec, (tuple, list)) and len(spec) == 3):
        raise PrepareError(f"signals[{slot!r}]: expected (samples, fs, unit), got {type(spec).__name__}")
    samples, fs, unit = spec
    try:
        rate = math.nan if isinstance(fs, (str, bytes, bool)) or np.ndim(fs) != 0 else float(fs)
    except (TypeError, ValueError):
        rate = math.nan
    if not (math.isfinite(rate) and rate > 0):
        raise PrepareError(f"signals[{slot!r}]: fs must be the sampling rate in Hz, a finite number above 0, got "
                           f"{fs!r}")
    try:
        values = np.asarray(samples, dtype=np.float64)
    except (TypeError, ValueError):
        raise PrepareError(f"signals[{slot!r}]: samples must be numbers, got {type(samples).__name__}") from None
    if values.ndim != 1 or len(values) == 0:
        raise PrepareError(f"signals[{slot!r}]: expected a non-empty 1-d array of samples, got shape {values.shape}")
    return values, rate, str(unit)


def parse_start_time(start_time) -> str | None:
    """A recording's start for clock times -> ISO text (naive), or None: a datetime (its wall clock; a time zone is
    dropped, as an EDF's start has none) or ISO date-time text. A date without a time of day (date, '2001-02-03')
    is refused: it would start the night at midnight. PrepareError naming start_time otherwise."""
    if start_time is None:
        return None
    if isinstance(start_time, dt.datetime):
        return start_time.replace(tzinfo=None).isoformat()
    text = start_time.strip() if isinstance(start_time, str) else None
    if isinstance(start_time, dt.date) or text is not None and _is_iso_date(text):
        raise PrepareError(f"start_time: {start_time!s} is a date without a time of day: give {START_TIME_FORMS}")
    try:
        return dt.datetime.fromisoformat(text).replace(tzinfo=None).isoformat()
    except (TypeError, ValueError):
        raise PrepareError(f"start_time: expected {START_TIME_FORMS}, got {start_time!r} "
                           f"({type(start_time).__name__})") from None


def _is_iso_date(text: str) -> bool:
    try:
        dt.date.fromisoformat(text)
    except ValueError:
        return False
    return True


def unknown_label_report(out: Path, nights: list[Night]) -> list[str]:
    """'night_id: note' for each note about unknown stage labels in the stores of `nights` under `out` (the
    batch summary of `python -m prepare`: such epochs are left unscored, which a user should hear about)."""
    from . import store   # store is only for the command line; prepare_night itself never reads stores
    lines = []
    for night in nights:
        path = store.store_path(out, night.dataset, night.night_id)
        notes = (store.read_attrs(path).get("annotation_notes") or []) if path.exists() else []
        lines += [f"{night.night_id}: {note}" for note in notes if annotations.UNKNOWN_NOTE in note]
    return lines


def _fit_length(values: np.ndarray, n_samples: int) -> np.ndarray:
    """Resampling can leave a sample more or less than duration × 125; trim or hold the last value."""
    if len(values) >= n_samples:
        return values[:n_samples]
    return np.concatenate([values, np.full(n_samples - len(values), values[-1])])
