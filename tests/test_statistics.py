"""Sleep statistics (sleep_statistics.sleep_statistics) on hand-made hypnograms against hand-computed values: every definition,
lights-off/on trimming, a night without sleep, a night starting asleep, unscored epochs, persistent sleep; the
lights-off/on helpers (clock times across midnight, EDF+ annotations); predict.py's --lights-off/--lights-on and
EDF+ lights annotations end to end; the hypnogram figure's clock axis."""
import datetime as dt
import json

import numpy as np
import pandas as pd
import pyedflib
import pytest

import predict
import sleep_statistics
import stage
from prepare.annotations import AASM_LETTERS

W, N1, N2, N3, R, U = 0, 1, 2, 3, 4, -1                 # U: unscored


def transitions(pairs: dict) -> dict:
    """The transitions dict with the given {(from, to): count} and zeros elsewhere."""
    return {a: {b: pairs.get((a, b), 0) for b in AASM_LETTERS} for a in AASM_LETTERS}


# ----------------------------------------------------------------------------------------------------------------------
# Definitions


def test_every_statistic_hand_computed():
    # epoch:   0  1  2   3   4   5  6  7  8   9  10 11  12
    stages = [W, W, N1, N2, N2, W, W, W, N2, R, R, N2, W]
    s = sleep_statistics.sleep_statistics(stages)
    assert (s["lights_off_epoch"], s["lights_on_epoch"], s["n_epochs"]) == (0, 13, 13)
    assert s["TIB_min"] == 6.5 and s["unscored_min"] == 0        # 13 epochs × 0.5
    assert s["SOL_min"] == 1.0                                    # first sleep: epoch 2
    assert s["LPS_min"] is None                                   # no 20 epochs (10 min) of sleep in a row
    assert s["SPT_min"] == 5.0                                    # epochs 2..11 = 10 epochs
    assert s["TST_min"] == 3.5                                    # 7 sleep epochs
    assert s["WASO_min"] == 1.5                                   # epochs 5, 6, 7
    assert s["SE_pct"] == pytest.approx(100 * 3.5 / 6.5)
    assert s["SME_pct"] == pytest.approx(100 * 3.5 / 5.0)
    # YASA's latencies from lights-off: N1 epoch 2, N2 epoch 3, no N3, R epoch 9
    assert (s["Lat_N1_min"], s["Lat_N2_min"], s["Lat_N3_min"], s["Lat_REM_min"]) == (1.0, 1.5, None, 4.5)
    assert s["REM_latency_from_onset_min"] == 3.5                 # AASM: epoch 9 − epoch 2 = Lat_REM − SOL
    assert s["awakenings"] == 1                                   # epochs 5-7; the final W is outside the SPT
    assert s["awakenings_per_h"] == pytest.approx(1 / (3.5 / 60))
    # shifts inside the SPT (2..11): N1→N2, N2→W, W→N2, N2→R, R→N2
    assert s["stage_shifts"] == 5 and s["stage_shifts_per_h"] == pytest.approx(5 / (3.5 / 60))
    assert s["stage_min"] == {"W": 3.0, "N1": 0.5, "N2": 2.0, "N3": 0.0, "R": 1.0}
    assert s["stage_pct_TST"] == pytest.approx({"N1": 100 / 7, "N2": 400 / 7, "N3": 0.0, "R": 200 / 7})
    # all 12 consecutive pairs of the night
    assert s["transitions"] == transitions({("W", "W"): 3, ("W", "N1"): 1, ("W", "N2"): 1, ("N1", "N2"): 1,
                                            ("N2", "N2"): 1, ("N2", "W"): 2, ("N2", "R"): 1, ("R", "R"): 1,
                                            ("R", "N2"): 1})
    assert sum(sum(row.values()) for row in s["transitions"].values()) == 12
    assert json.loads(json.dumps(s)) == s                          # plain JSON types throughout


def test_lights_off_on_trim_the_night():
    # epoch:   0   1   2  3  4   5   6   7  8   9   10 11  12  13      lights-off at 2, lights-on at 12
    stages = [N2, N2, W, W, N1, N2, N2, W, N3, N3, R, W, N2, N2]
    s = sleep_statistics.sleep_statistics(stages, lights_off=2, lights_on=12)
    assert (s["lights_off_epoch"], s["lights_on_epoch"], s["n_epochs"]) == (2, 12, 14)
    assert s["TIB_min"] == 5.0                                    # epochs 2..11
    assert s["SOL_min"] == 1.0                                    # epoch 4 is 2 epochs after lights-off
    assert s["SPT_min"] == 3.5 and s["TST_min"] == 3.0 and s["WASO_min"] == 0.5     # SPT 4..10; W at 7
    assert s["SE_pct"] == pytest.approx(60.0) and s["SME_pct"] == pytest.approx(100 * 3 / 3.5)
    assert (s["Lat_N1_min"], s["Lat_N2_min"], s["Lat_N3_min"], s["Lat_REM_min"]) == (1.0, 1.5, 3.0, 4.0)
    assert s["REM_latency_from_onset_min"] == 3.0
    assert s["awakenings"] == 0                                   # a single W epoch is no awakening
    # the N2 before lights-off and after lights-on count nowhere
    assert s["stage_min"] == {"W": 2.0, "N1": 0.5, "N2": 1.0, "N3": 1.0, "R": 0.5}
    assert sum(sum(row.values()) for row in s["transitions"].values()) == 9
    # the same as the statistics of the trimmed hypnogram
    trimmed = sleep_statistics.sleep_statistics(stages[2:12])
    moved = {"lights_off_epoch", "lights_on_epoch", "n_epochs"}
    assert {k: v for k, v in s.items() if k not in moved} == {k: v for k, v in trimmed.items() if k not in moved}
    # without lights-off/on the night starts asleep
    assert sleep_statistics.sleep_statistics(stages)["SOL_min"] == 0.0
    for off, on in [(3, 2), (-1, 5), (0, 15)]:
        with pytest.raises(ValueError, match="lights-off epoch"):
            sleep_statistics.sleep_statistics(stages, lights_off=off, lights_on=on)
    empty = sleep_statistics.sleep_statistics(stages, lights_off=5, lights_on=5)
    assert empty["TIB_min"] == 0 and empty["SE_pct"] is None and empty["SOL_min"] is None


def test_a_night_without_sleep():
    s = sleep_statistics.sleep_statistics([W, W, U, W])
    assert s["TIB_min"] == 2.0 and s["unscored_min"] == 0.5
    assert s["TST_min"] == 0 and s["SPT_min"] == 0 and s["SE_pct"] == 0
    assert s["WASO_min"] == 0                                     # ours 0 (no sleep period); YASA: NaN
    for key in ("SOL_min", "LPS_min", "SME_pct", "Lat_N1_min", "Lat_N2_min", "Lat_N3_min", "Lat_REM_min",
                "REM_latency_from_onset_min", "awakenings_per_h", "stage_shifts_per_h"):
        assert s[key] is None, key
    assert s["awakenings"] == 0 and s["stage_shifts"] == 0
    assert s["stage_pct_TST"] == {"N1": None, "N2": None, "N3": None, "R": None}
    assert s["transitions"] == transitions({("W", "W"): 1})       # the pairs with the unscored epoch are left out


def test_a_night_starting_asleep():
    # epoch:   0   1   2  3  4  5  6   7  8
    stages = [N2, N2, N3, W, W, W, N2, R, W]
    s = sleep_statistics.sleep_statistics(stages)
    assert s["SOL_min"] == 0.0 and s["Lat_N2_min"] == 0.0 and s["Lat_N3_min"] == 1.0 and s["Lat_N1_min"] is None
    assert s["SPT_min"] == 4.0 and s["TST_min"] == 2.5 and s["WASO_min"] == 1.5      # SPT 0..7
    assert s["Lat_REM_min"] == s["REM_latency_from_onset_min"] == 3.5                   # onset at lights-off
    assert s["awakenings"] == 1 and s["awakenings_per_h"] == pytest.approx(1 / (2.5 / 60))
    assert s["stage_shifts"] == 4                                 # N2→N3, N3→W, W→N2, N2→R
    assert s["stage_shifts_per_h"] == pytest.approx(4 / (2.5 / 60))


def test_unscored_epochs_are_neither_sleep_nor_wake():
    # epoch:   0  1   2   3  4  5  6   7  8  9  10  11 12
    stages = [W, U, N2, N2, U, W, W, N2, U, U, R, N2, W]
    s = sleep_statistics.sleep_statistics(stages)
    assert s["TIB_min"] == 6.5 and s["unscored_min"] == 2.0      # 4 unscored epochs, still time in bed
    assert s["SOL_min"] == 1.0 and s["SPT_min"] == 5.0           # SPT 2..11
    assert s["TST_min"] == 2.5 and s["WASO_min"] == 1.0          # sleep 2, 3, 7, 10, 11; W 5, 6
    assert s["SE_pct"] == pytest.approx(100 * 2.5 / 6.5) and s["SME_pct"] == pytest.approx(50.0)
    assert s["Lat_REM_min"] == 5.0 and s["REM_latency_from_onset_min"] == 4.0
    assert s["awakenings"] == 1                                   # epochs 5-6
    assert s["stage_shifts"] == 2                                 # W→N2 (6→7), R→N2 (10→11); U pairs skipped
    assert s["stage_min"] == {"W": 2.0, "N1": 0.0, "N2": 2.0, "N3": 0.0, "R": 0.5}
    # a wake run broken by an unscored epoch is two single W epochs: no awakening
    assert sleep_statistics.sleep_statistics([N2, W, U, W, N2])["awakenings"] == 0
    assert sleep_statistics.sleep_statistics([N2, W, W, N2])["awakenings"] == 1


def test_latency_to_persistent_sleep_is_the_first_10_minutes_of_sleep():
    assert sleep_statistics.PERSISTENT_SLEEP_MIN == 10
    # 3 W, 5 N2 (too short), 1 W, then 20 epochs of sleep in mixed stages: persistent sleep from epoch 9
    stages = [W] * 3 + [N2] * 5 + [W] + [N1] * 2 + [N2] * 8 + [N3] * 6 + [R] * 4 + [W] * 2
    s = sleep_statistics.sleep_statistics(stages)
    assert s["SOL_min"] == 1.5 and s["LPS_min"] == 4.5 and s["persistent_sleep_epochs"] == 20
    assert sleep_statistics.sleep_statistics(stages[:-3])["LPS_min"] is None            # 19 epochs only
    broken = stages[:18] + [U] + stages[19:]                                   # an unscored epoch breaks the run
    assert sleep_statistics.sleep_statistics(broken)["LPS_min"] is None
    assert sleep_statistics.sleep_statistics(stages, lights_off=9)["LPS_min"] == 0.0
    assert sleep_statistics.sleep_statistics([N2] * 10, epoch_s=60)["LPS_min"] == 0.0   # 10 epochs of 60 s
    assert sleep_statistics.sleep_statistics([N2] * 9, epoch_s=60)["LPS_min"] is None


def test_transition_counts():
    counts = sleep_statistics.transition_counts([W, N1, N2, N2, U, N3, N3, R, W])
    expected = np.zeros((5, 5), int)
    for a, b in [(W, N1), (N1, N2), (N2, N2), (N3, N3), (N3, R), (R, W)]:
        expected[a, b] += 1
    assert counts.tolist() == expected.tolist()
    assert sleep_statistics.transition_counts([N2]).sum() == 0 and sleep_statistics.transition_counts([]).sum() == 0


# ----------------------------------------------------------------------------------------------------------------------
# Lights-off/on: clock times, datetimes, seconds, annotations


START = "2001-02-03T23:59:45"                          # conftest's PSG start: midnight in the first minute


def test_clock_times_cross_midnight():
    assert sleep_statistics.seconds_after_start("23:59:45", START) == 0
    assert sleep_statistics.seconds_after_start("00:10", START) == 615          # earlier on the clock: the next day
    assert sleep_statistics.seconds_after_start("6:00:15", START) == 6 * 3600 + 30
    assert sleep_statistics.seconds_after_start("23:59", START) == 24 * 3600 - 45   # 45 s before the start: the next day
    assert sleep_statistics.seconds_after_start("2001-02-03T23:50", START) == -585  # a date-time may be before the start
    assert sleep_statistics.seconds_after_start(dt.datetime(2001, 2, 4, 1), dt.datetime.fromisoformat(START)) == 3615
    assert sleep_statistics.seconds_after_start("22:30", "2024-05-01T22:00:00") == 1800      # same evening
    for bad in ("24:00", "12:60", "noon", "23:10:99"):
        with pytest.raises(ValueError):
            sleep_statistics.seconds_after_start(bad, START)
    with pytest.raises(ValueError, match="start time"):
        sleep_statistics.seconds_after_start("23:10", None)


def test_lights_epochs_round_to_whole_epochs_inside():
    assert sleep_statistics.lights_epochs(1000) == (0, 1000)
    # 00:10 is 615 s = 20.5 epochs after the start: lights-off rounds up to 21; 06:00:15 is 721 epochs exactly
    assert sleep_statistics.lights_epochs(1000, "00:10", "06:00:15", START) == (21, 721)
    assert sleep_statistics.lights_epochs(1000, 45.0, 100.0) == (2, 3)                # seconds (annotation onsets)
    assert sleep_statistics.lights_epochs(100, 40.0, 50.0) == (2, 2)                  # inside one epoch: no whole epoch
    # within one epoch outside the recording (an annotation in the last, partial epoch): its start or end
    assert sleep_statistics.lights_epochs(100, "2001-02-03T23:59:30", "00:50:15", START) == (0, 100)
    assert sleep_statistics.lights_epochs(100, None, 3030.0) == (0, 100)
    with pytest.raises(ValueError, match="not after lights-off"):
        sleep_statistics.lights_epochs(1000, "01:00", "00:30", START)
    with pytest.raises(ValueError, match="next day"):
        sleep_statistics.lights_epochs(1000, "23:59", None, START)                     # read as 24 h later: past the end
    with pytest.raises(ValueError, match="start time"):
        sleep_statistics.lights_epochs(1000, "23:10")


@pytest.mark.parametrize("off, on, message", [
    # a clock time earlier than the start is the next morning; past the recording's end it is an error, not its end
    (None, "06:00", "lights-on 06:00 is 6.00 h after the recording start, after its end: the recording runs from "
                    "2001-02-03 23:59:45 to 2001-02-04 00:49:45 (0.83 h of whole epochs); a clock time is read as its "
                    "first occurrence at or after the start (the next day when earlier on the clock)"),
    ("23:59", None, "lights-off 23:59 is 23.99 h after the recording start, after its end: the recording runs from "
                    "2001-02-03 23:59:45 to 2001-02-04 00:49:45"),
    # a date-time before the start is not moved to it
    ("2001-02-03T23:50", None, "lights-off 2001-02-03T23:50 is 9.8 min before the recording start: the recording "
                               "runs from 2001-02-03 23:59:45 to 2001-02-04 00:49:45"),
    (None, 3031.0, "lights-on 3031 s is 0.84 h after the recording start, after its end"),         # seconds: as well
    (3000.0, None, "lights-off 3000 s is 0.83 h after the recording start, at its end"),
])
def test_lights_outside_the_recording_are_errors_never_clamped(off, on, message):
    with pytest.raises(ValueError) as error:
        sleep_statistics.lights_epochs(100, off, on, START)                            # 50 min from 23:59:45
    assert str(error.value).startswith(message) and "\n" not in str(error.value)


def test_lights_on_next_morning_inside_the_night():
    # a recording from 22:00 for 8.5 h (1020 epochs): lights-on 06:15 is the next morning, 990 epochs in
    assert sleep_statistics.lights_epochs(1020, "22:10", "06:15", "2024-05-01T22:00:00") == (20, 990)
    assert sleep_statistics.lights_epochs(1020, "22:10", "06:30", "2024-05-01T22:00:00") == (20, 1020)   # its end
    with pytest.raises(ValueError, match="lights-on 06:45 is 8.75 h after the recording start, after its end"):
        sleep_statistics.lights_epochs(1020, "22:10", "06:45", "2024-05-01T22:00:00")


def test_lights_from_annotations():
    annotations = [(0.0, 0.0, "Recording starts"), (30.0, 30.0, "Sleep stage W"), (95.5, 0.0, "LIGHTS OFF"),
                   (120.0, 0.0, "Lights Off"), (3000.0, 0.0, "lights_on"), (7000.0, 0.0, " Lights  On ")]
    assert sleep_statistics.lights_from_annotations(annotations) == (95.5, 7000.0)   # first lights-off, last lights-on
    assert sleep_statistics.lights_from_annotations([(10.0, 0, "lights-out"), (5.0, 0, "Light on")]) == (10.0, None)
    assert sleep_statistics.lights_from_annotations([(9.0, 0, "lightson")]) == (None, 9.0)
    assert sleep_statistics.lights_from_annotations([(9.0, 0, "Lights off in room 2")]) == (None, None)   # not a mark
    assert sleep_statistics.lights_from_annotations([]) == (None, None)


# ----------------------------------------------------------------------------------------------------------------------
# The figure


def test_clock_ticks_and_the_figure(tmp_path):
    start = dt.datetime.fromisoformat(START)
    ticks, labels = stage.clock_ticks(start, 7.5)
    assert labels == ["00:00", "01:00", "02:00", "03:00", "04:00", "05:00", "06:00", "07:00"]
    assert ticks[0] == pytest.approx(15 / 3600)                             # midnight is 15 s after the start
    assert stage.clock_ticks(start, 0.4)[1] == ["00:00", "00:05", "00:10", "00:15", "00:20"]
    probs = np.random.default_rng(0).dirichlet(np.ones(5), 60).astype(np.float32)
    stage.plot_hypnogram(tmp_path / "h.png", probs, "night", start_time=START, lights_off=4, lights_on=50)
    stage.plot_hypnogram(tmp_path / "t.png", probs, "night", truth=probs.argmax(1), lights_off=4)
    assert (tmp_path / "h.png").stat().st_size > 0 and (tmp_path / "t.png").stat().st_size > 0


# ----------------------------------------------------------------------------------------------------------------------
# predict.py: --lights-off/--lights-on and EDF+ lights annotations


def write_psg_plus(path, seconds, start, annotations):
    """A small 7-slot EDF+ PSG (noise) with (onset_s, text) annotations, written by pyedflib."""
    rng = np.random.default_rng(0)
    channels = [("C4-M1", 100, "uV", 40), ("E1-M2", 100, "uV", 40), ("Chin1-Chin2", 100, "uV", 10),
                ("ECG", 100, "mV", 0.5), ("SpO2", 1, "%", 1), ("Thorax", 10, "uV", 100), ("Abdomen", 10, "uV", 100)]
    writer = pyedflib.EdfWriter(str(path), len(channels), file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setSignalHeaders([{"label": label, "dimension": unit, "sample_frequency": fs,
                                  "physical_min": 0 if label == "SpO2" else -1000,
                                  "physical_max": 100 if label == "SpO2" else 1000, "digital_min": -32768,
                                  "digital_max": 32767, "transducer": "", "prefilter": ""}
                                 for label, fs, unit, _ in channels])
        writer.setStartdatetime(start)
        for onset, text in annotations:
            writer.writeAnnotation(onset, -1, text)
        writer.writeSamples([np.clip(95 + rng.normal(0, 1, seconds * fs), 0, 100) if label == "SpO2"
                             else rng.normal(0, scale, seconds * fs) for label, fs, _, scale in channels])
    finally:
        writer.close()
    return path


def predicted(folder, stem):
    stats = json.loads((folder / f"{stem}.stats.json").read_text())
    table = pd.read_csv(folder / f"{stem}.hypnogram.csv")
    return stats, np.array([AASM_LETTERS.index(s) for s in table["stage"]])


def test_predict_lights_from_options(tmp_path, tiny_probe_run, psg_writer):
    edf = psg_writer(tmp_path / "n.edf", 25 * 60)                      # 50 epochs from 23:59:45, a plain EDF
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu",
                         "--lights-off", "00:05", "--lights-on", "00:20"]) == 0
    stats, codes = predicted(tmp_path, "n")
    # 00:05 is 315 s = 10.5 epochs after the start (rounded up: 11), 00:20 is 40.5 (rounded down: 40)
    assert (stats["lights_off_epoch"], stats["lights_on_epoch"], stats["TIB_min"]) == (11, 40, 14.5)
    assert stats == {**stats, **sleep_statistics.sleep_statistics(codes, lights_off=11, lights_on=40)}
    assert (tmp_path / "n.png").stat().st_size > 0
    # without them: the whole recording
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu",
                         "--out", str(tmp_path / "all")]) == 0
    stats, _ = predicted(tmp_path / "all", "n")
    assert (stats["lights_off_epoch"], stats["lights_on_epoch"], stats["TIB_min"]) == (0, 50, 25.0)


def test_predict_lights_from_edf_plus_annotations(tmp_path, tiny_probe_run, psg_writer):
    edf = write_psg_plus(tmp_path / "plus.edf", 25 * 60, psg_writer.start,
                         [(0, "Montage check"), (120, "LIGHTS OFF"), (1200, "Lights_On")])
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu"]) == 0
    stats, codes = predicted(tmp_path, "plus")
    assert (stats["lights_off_epoch"], stats["lights_on_epoch"]) == (4, 40)       # 120 s and 1200 s
    assert stats == {**stats, **sleep_statistics.sleep_statistics(codes, lights_off=4, lights_on=40)}
    # the options beat the annotations: 00:01 is 75 s = 2.5 epochs after the start, 00:15 is 30.5
    out = tmp_path / "option"
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu", "--out", str(out),
                         "--lights-off", "00:01", "--lights-on", "00:15"]) == 0
    stats, _ = predicted(out, "plus")
    assert (stats["lights_off_epoch"], stats["lights_on_epoch"]) == (3, 30)


def test_predict_bad_lights_are_one_line_errors(tmp_path, tiny_probe_run, psg_writer, capsys):
    edf = psg_writer(tmp_path / "n.edf", 5 * 60)
    # 23:59 is 45 s before the start: read as the next day, after the recording's end (known once the night is read)
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu", "--lights-off", "23:59"]) == 1
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith(f"error: {edf}: ")
    assert "lights-off 23:59 is 23.99 h after the recording start" in errors[0]
    # 25:00 is no clock time at all: refused before any night is read
    with pytest.raises(SystemExit):
        predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu", "--lights-off", "25:00"])
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("predict.py: error: --lights-off: 25:00: not a clock "
                                                                "time HH:MM[:SS]")
    assert not (tmp_path / "n.stats.json").exists()


def test_predict_lights_on_past_the_end_fails_the_night_in_one_line(tmp_path, tiny_probe_run, psg_writer, capsys):
    """A recording from 23:59:45 for 25 min: --lights-on 06:30 is the next morning, after the recording's end. That
    night fails naming the value, the start and the end (it is not moved to the end); the other night is staged."""
    short = psg_writer(tmp_path / "short.edf", 25 * 60)
    out = tmp_path / "out"
    assert predict.main([str(short), "--run", str(tiny_probe_run), "--device", "cpu", "--out", str(out),
                         "--lights-on", "06:30"]) == 1
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error == (f"error: {short}: lights-on 06:30 is 6.50 h after the recording start, after its end: the "
                     f"recording runs from 2001-02-03 23:59:45 to 2001-02-04 00:24:45 (0.42 h of whole epochs); a "
                     f"clock time is read as its first occurrence at or after the start (the next day when earlier "
                     f"on the clock)")
    assert sorted(p.name for p in out.iterdir()) == ["summary.csv"]


def test_predict_lights_annotation_past_the_end_names_its_source(tmp_path, tiny_probe_run, psg_writer, capsys):
    edf = write_psg_plus(tmp_path / "plus.edf", 25 * 60, psg_writer.start, [(120, "Lights off"), (1000, "Lights on")])
    data = bytearray(edf.read_bytes())              # move the lights-on annotation to 5000 s, past the 1500-s night
    at = data.index(b"+1000\x14")
    data[at:at + 6] = b"+5000\x14"
    edf.write_bytes(bytes(data))
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu"]) == 1
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {edf}: lights-on 5000 s is 1.39 h after the recording start, after its end")
    assert error.endswith("(from the EDF+ annotations: lights-off at 120 s, lights-on at 5000 s)")
    assert not (tmp_path / "plus.stats.json").exists()
