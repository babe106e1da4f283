"""Sleep statistics of a hypnogram, and lights-off/on: a pure function of the stage sequence (numpy only).

Sleep statistics (AASM terms; minutes unless noted; an epoch is 30 s = 0.5 min; sleep = N1, N2, N3 or R; -1 =
unscored). Everything is counted between lights-off and lights-on (epoch indices; default: the whole recording), the
time in bed; epochs outside are left out. The definitions are YASA's (`Hypnogram.sleep_statistics`, v0.7 source, on the
lights-off..lights-on part of the hypnogram) except where named:
  TIB_min          time in bed: epochs from lights-off to lights-on × 0.5
  unscored_min     unscored (-1) epochs within TIB × 0.5: neither wake nor sleep anywhere below
  SOL_min          sleep onset latency: lights-off to the first sleep epoch (null if no sleep)
  LPS_min          latency to persistent sleep: lights-off to the first epoch of the first run of
                   PERSISTENT_SLEEP_MIN (10) minutes of uninterrupted sleep, the clinical/AASM-trial convention
                   (null if none; YASA's SOL_5min uses 5 minutes)
  SPT_min          sleep period time: first to last sleep epoch inclusive (0 if no sleep)
  TST_min          total sleep time: sleep epochs × 0.5
  WASO_min         wake after sleep onset: W epochs inside the SPT (0 if no sleep; YASA: NaN)
  SE_pct           sleep efficiency: TST / TIB × 100 (null if TIB = 0)
  SME_pct          sleep maintenance efficiency: TST / SPT × 100 (null if no sleep)
  Lat_<stage>_min  Lat_N1_min, Lat_N2_min, Lat_N3_min, Lat_REM_min: lights-off to the first epoch of that stage
                   (YASA's latencies; null if the stage is absent)
  REM_latency_from_onset_min   first R epoch − first sleep epoch, the AASM REM latency (= Lat_REM − SOL;
                   null if no R)
  awakenings       runs of >= MIN_AWAKENING_EPOCHS (2 = 1 min) consecutive W epochs inside the SPT
  awakenings_per_h awakenings per hour of TST (null if TST = 0)
  stage_shifts     changes of stage between consecutive scored epochs inside the SPT (to and from W included;
                   a pair with an unscored epoch is no shift)
  stage_shifts_per_h  stage shifts per hour of TST (null if TST = 0)
  stage_min        minutes per stage W, N1, N2, N3, R within TIB
  stage_pct_TST    N1, N2, N3, R as % of TST (null if TST = 0)
  transitions      {from: {to: count}} over consecutive epoch pairs within TIB, both scored, W N1 N2 N3 R (rows:
                   from; the diagonal counts staying in a stage), as YASA's transition_matrix on scored epochs
lights_epochs turns lights-off/on given as clock times ("23:10", past midnight when earlier than the start), datetimes
or seconds after the start (EDF+ annotations: lights_from_annotations) into those epoch indices; a time outside the
recording (by more than one epoch) is an error, never moved to its start or end.
"""
from __future__ import annotations

import datetime as dt
import math
import re

import numpy as np

from prepare.annotations import AASM_LETTERS, REM, STAGES, W, runs_of
from prepare.signals import EPOCH_S

MIN_AWAKENING_EPOCHS = 2                                   # an awakening is >= 1 min of W inside the SPT
PERSISTENT_SLEEP_MIN = 10                                  # persistent sleep: >= 10 min of uninterrupted sleep (LPS)


def transition_counts(stages) -> np.ndarray:
    """Counts [5, 5] of consecutive epoch pairs, row = stage of the first epoch, column = of the next (W, N1, N2, N3,
    R); pairs with an unscored (-1) epoch are left out."""
    stages = np.asarray(stages, dtype=np.int64)
    before, after = stages[:-1], stages[1:]
    scored = (before >= 0) & (after >= 0)
    n = len(AASM_LETTERS)
    return np.bincount(before[scored] * n + after[scored], minlength=n * n).reshape(n, n)


def sleep_statistics(stages, epoch_s: float = EPOCH_S, lights_off: int | None = None,
                     lights_on: int | None = None) -> dict:
    """Statistics of a hypnogram [E] (codes -1 unscored, 0 W, 1 N1, 2 N2, 3 N3, 4 R) over epochs lights_off (the
    first in bed; default 0) to lights_on (the first after; default E), definitions in the module docstring.
    lights_epochs makes the two indices from clock times."""
    stages = np.asarray(stages, dtype=np.int64)
    off = 0 if lights_off is None else int(lights_off)
    on = len(stages) if lights_on is None else int(lights_on)
    if not 0 <= off <= on <= len(stages):
        raise ValueError(f"lights-off epoch {off}, lights-on epoch {on}: need 0 <= lights-off <= lights-on <= "
                         f"{len(stages)} (the recording's epochs)")
    bed = stages[off:on]                                              # [TIB epochs]: all that is counted below
    minutes = epoch_s / 60
    sleep = bed > W                                                   # unscored (-1) is neither sleep nor W
    asleep = np.flatnonzero(sleep)
    tib, tst = len(bed) * minutes, int(sleep.sum()) * minutes

    def latency(mask) -> float | None:                                # lights-off to the first True epoch
        first = np.flatnonzero(mask)
        return int(first[0]) * minutes if len(first) else None

    def per_hour(count: int) -> float | None:                         # per hour of TST
        return count / (tst / 60) if tst else None

    persistent = int(round(PERSISTENT_SLEEP_MIN * 60 / epoch_s))      # 20 epochs of 30 s
    lps = next((start for start, length, value in runs_of(sleep) if value and length >= persistent), None)
    counts = {name: int(np.sum(bed == k)) for k, name in enumerate(AASM_LETTERS)}
    stats = {"epoch_s": epoch_s, "n_epochs": len(stages), "lights_off_epoch": off, "lights_on_epoch": on,
             "TIB_min": tib, "unscored_min": int(np.sum(bed < 0)) * minutes,
             "SOL_min": latency(sleep), "LPS_min": None if lps is None else lps * minutes,
             "SPT_min": 0.0, "TST_min": tst, "WASO_min": 0.0,                # no sleep: no SPT, no wake inside it
             "SE_pct": 100 * tst / tib if tib else None, "SME_pct": None,
             **{f"Lat_{name}_min": latency(bed == k) for k, name in enumerate(STAGES) if k != W},
             "REM_latency_from_onset_min": None,
             "awakenings": 0, "awakenings_per_h": per_hour(0), "stage_shifts": 0, "stage_shifts_per_h": per_hour(0),
             "stage_min": {name: n * minutes for name, n in counts.items()},
             "stage_pct_TST": {name: (100 * n * minutes / tst if tst else None)
                               for name, n in counts.items() if name != AASM_LETTERS[W]},
             "transitions": {a: dict(zip(AASM_LETTERS, row))
                             for a, row in zip(AASM_LETTERS, transition_counts(bed).tolist())},
             "min_awakening_epochs": MIN_AWAKENING_EPOCHS, "persistent_sleep_epochs": persistent}
    if len(asleep) == 0:
        return stats
    onset, last = int(asleep[0]), int(asleep[-1])
    period = bed[onset:last + 1]                                      # the SPT: starts and ends with sleep
    awakenings = sum(value and length >= MIN_AWAKENING_EPOCHS for _, length, value in runs_of(period == W))
    shifts = transition_counts(period)
    stage_shifts = int(shifts.sum() - np.trace(shifts))              # off the diagonal: the stage changed
    stats.update(SPT_min=len(period) * minutes, WASO_min=int(np.sum(period == W)) * minutes,
                 SME_pct=100 * tst / (len(period) * minutes), awakenings=awakenings,
                 awakenings_per_h=per_hour(awakenings), stage_shifts=stage_shifts,
                 stage_shifts_per_h=per_hour(stage_shifts))
    rem = np.flatnonzero(bed == REM)
    if len(rem):
        stats["REM_latency_from_onset_min"] = (int(rem[0]) - onset) * minutes
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# Lights-off and lights-on: from clock times, datetimes or EDF+ annotations to epoch indices


_CLOCK = re.compile(r"(\d{1,2}):(\d{2})(?::(\d{2}(?:\.\d*)?))?")
_LIGHTS = re.compile(r"lights?[\s_-]*(off|out|on)", re.IGNORECASE)   # "Lights off", "LIGHTS OUT", "lights_on", …


def seconds_after_start(when, start_time) -> float:
    """Seconds from the recording start (ISO text or datetime) to `when`: a datetime or ISO date-time text, or a clock
    time "HH:MM[:SS]" read as its first occurrence at or after the start (a night crosses midnight: a clock time
    earlier than the start is on the next day)."""
    if start_time is None:
        raise ValueError(f"{when}: a clock time needs the recording's start time, which is unknown (the EDF header "
                         f"has no valid start date and time)")
    start = dt.datetime.fromisoformat(start_time) if isinstance(start_time, str) else start_time
    if isinstance(when, str) and (clock := _CLOCK.fullmatch(when.strip())):
        hour, minute, second = int(clock[1]), int(clock[2]), float(clock[3] or 0)
        if hour > 23 or minute > 59 or second >= 60:
            raise ValueError(f"{when}: not a clock time HH:MM[:SS]")
        moment = dt.datetime.combine(start.date(), dt.time()) + dt.timedelta(hours=hour, minutes=minute, seconds=second)
        if moment < start:
            moment += dt.timedelta(days=1)
        return (moment - start).total_seconds()
    if isinstance(when, str):
        try:
            when = dt.datetime.fromisoformat(when.strip())
        except ValueError:
            raise ValueError(f"{when}: neither a clock time HH:MM[:SS] nor a date-time like 2024-05-01T23:10") from None
    return (when - start).total_seconds()


LIGHTS_TOLERANCE_S = EPOCH_S    # a lights time at most this far outside the recording is its start or end (an
                                # annotation in the last, partial epoch); one farther outside is an error


def lights_epochs(n_epochs: int, lights_off=None, lights_on=None, start_time=None,
                  epoch_s: float = EPOCH_S) -> tuple[int, int]:
    """(lights_off, lights_on) epoch indices for sleep_statistics from times given as seconds after the recording
    start (an EDF+ annotation's onset), clock times "HH:MM[:SS]" (the first such time at or after the start: the next
    day when earlier on the clock) or datetimes (seconds_after_start; these need start_time). Only whole epochs in
    between are in bed: lights-off rounds up to the next epoch start, lights-on down; None is the start or the end of
    the recording. A time is never moved into the recording: one more than LIGHTS_TOLERANCE_S (one epoch) before its
    start or after its end, a lights-off at or after its end, or a lights-on not after lights-off is a ValueError
    (one line naming the value, the recording's start and end)."""
    def seconds(when) -> float:
        return float(when) if isinstance(when, (int, float, np.number)) else seconds_after_start(when, start_time)
    end_s = n_epochs * epoch_s
    off_s = 0.0 if lights_off is None else seconds(lights_off)
    on_s = end_s if lights_on is None else seconds(lights_on)
    for name, value, at in (("lights-off", lights_off, off_s), ("lights-on", lights_on, on_s)):
        if value is not None and (at < -LIGHTS_TOLERANCE_S or at > end_s + LIGHTS_TOLERANCE_S
                                  or (name == "lights-off" and at >= end_s)):
            raise ValueError(_outside(name, value, at, end_s, start_time))
    if on_s <= off_s:
        raise ValueError(f"lights-on {lights_on} ({on_s / 60:.1f} min after the recording start) is not after "
                         f"lights-off {lights_off} ({off_s / 60:.1f} min)")
    off = min(max(math.ceil(off_s / epoch_s - 1e-9), 0), n_epochs)
    on = max(min(math.floor(on_s / epoch_s + 1e-9), n_epochs), off)  # both inside one epoch: no whole epoch in bed
    return off, on


def _outside(name: str, value, at_s: float, end_s: float, start_time) -> str:
    """One line: lights time `value` (`at_s` s after the start) is outside the recording [0, end_s]."""
    start = dt.datetime.fromisoformat(start_time) if isinstance(start_time, str) else start_time
    span = (f"the recording runs from {start:%Y-%m-%d %H:%M:%S} to {start + dt.timedelta(seconds=end_s):%Y-%m-%d %H:%M:%S}"
            if start else "the recording has no start time")
    span += f" ({end_s / 3600:.2f} h of whole epochs)"
    given = f"{value:g} s" if isinstance(value, (int, float, np.number)) else value
    if at_s < 0:
        return f"{name} {given} is {-at_s / 60:.1f} min before the recording start: {span}"
    clock = isinstance(value, str) and _CLOCK.fullmatch(value.strip())
    hint = ("; a clock time is read as its first occurrence at or after the start (the next day when earlier on the "
            "clock)" if clock else "")
    return (f"{name} {given} is {at_s / 3600:.2f} h after the recording start, "
            f"{'at' if at_s == end_s else 'after'} its end: {span}{hint}")


def lights_from_annotations(annotations) -> tuple[float | None, float | None]:
    """Onsets (s) of the first lights-off and of the last lights-on after it among EDF+ annotations (onset_s,
    duration_s, text), in any case and spacing ("Lights off", "LIGHTS OUT", "lights_on"); None where there is none."""
    marks = [(onset, match[1].lower()) for onset, _, text in annotations
             if (match := _LIGHTS.fullmatch(text.strip()))]
    offs = [onset for onset, what in marks if what != "on"]
    off = min(offs) if offs else None
    ons = [onset for onset, what in marks if what == "on" and (off is None or onset > off)]
    return off, max(ons) if ons else None
