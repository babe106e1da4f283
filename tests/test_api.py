"""The staging API (stage.stage_edf, stage_signals, embed_edf) against predict.py's CLI: one night staged through the
three doors gives the same probabilities and statistics; NSRR label sets, missing staging slots, source units,
lights-off, and predict.py's checks before any night (writable output, a finished run)."""
import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

import predict
import runs
import sleep_statistics
import stage
from prepare import edf as edf_format
from prepare.generic import CHANNELS
from prepare.night import Night, Options, prepare_night

SECONDS = 12 * 60 + 7                     # 24 full epochs: stitched from the tiny run's 10-epoch windows


def edf_arrays(path, scale_to_volts=False) -> dict:
    """{slot: (samples, fs, unit)} read with prepare/edf.py, as a user would hand them to stage_signals; voltage
    slots in V with scale_to_volts (what MNE's raw.get_data() returns)."""
    header = edf_format.read_header(path)
    labels = {"ECG": "ECG", "EOG": "E1-M2", "EMG": "Chin1-Chin2", "EEG": "C4-M1", "SPO2": "SpO2", "THOR": "Thorax",
              "ABDO": "Abdomen"}
    arrays = {}
    for slot, label in labels.items():
        signal = next(s for s in header.signals if s.label == label)
        values, unit = edf_format.read_signal(header, label), signal.dimension
        if scale_to_volts and slot in ("ECG", "EOG", "EMG", "EEG"):
            values, unit = values * {"uV": 1e-6, "mV": 1e-3}[unit], "V"
        arrays[slot] = (values, signal.fs, unit)
    return arrays


def test_cli_stage_edf_and_stage_signals_agree(tmp_path, tiny_probe_run, psg_writer):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    cli = tmp_path / "cli"
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(cli), "--device", "cpu"]) == 0
    table = pd.read_csv(cli / "night.hypnogram.csv")
    cli_stats = json.loads((cli / "night.stats.json").read_text())

    by_path = stage.stage_edf(edf, tiny_probe_run)
    by_run = stage.stage_edf(edf, runs.read_run(tiny_probe_run))                  # a runs.Run works as well
    arrays = edf_arrays(edf)
    by_arrays = stage.stage_signals(arrays, stage.load_model(tiny_probe_run), start_time=psg_writer.start)
    assert by_path.probs.shape == (SECONDS // 30, 5) and by_path.probs.dtype == np.float32
    for other in (by_run, by_arrays):
        assert np.array_equal(other.probs, by_path.probs)
        assert other.stats == by_path.stats
        assert other.table.equals(by_path.table)
    assert cli_stats == {**cli_stats, **by_path.stats} and cli_stats == json.loads(json.dumps(by_path.record()))
    assert np.allclose(table[list(stage.PROB_COLUMNS)].to_numpy(), by_path.probs, atol=1e-5)
    assert table["stage"].tolist() == by_path.table["stage"].tolist()
    # the in-memory path is the EDF path after reading: the same prepared [7, T] float16 signals, bit for bit
    from prepare.night import prepare_arrays
    night = Night(dataset="edf", night_id="n", subject="n", visit="", edf=edf, labelled=False)
    from_edf, _, _ = prepare_night(night, CHANNELS, Options())
    from_arrays, attrs = prepare_arrays(arrays, Options())
    assert np.array_equal(from_edf, from_arrays) and attrs["declared_units"]["ECG"] == "mV"


def test_volts_from_mne_stage_like_the_edf(tmp_path, tiny_probe_run, psg_writer):
    """The README's MNE recipe: raw.get_data() is in volts, and unit "V" says so."""
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    in_volts = stage.stage_signals(edf_arrays(edf, scale_to_volts=True), tiny_probe_run)
    assert np.allclose(in_volts.probs, stage.stage_edf(edf, tiny_probe_run).probs, atol=1e-3)
    assert in_volts.source_units["EEG"] == "V" and in_volts.start_time is None
    assert in_volts.table["clock_time"].eq("").all() and in_volts.table["date"].eq("").all()


def test_stage_signals_refuses_bad_input_in_one_line(tiny_probe_run, psg_writer, tmp_path):
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", SECONDS))
    with pytest.raises(stage.StagingError, match=r"unknown slots \['C3'\]"):
        stage.stage_signals({**arrays, "C3": arrays["EEG"]}, tiny_probe_run)
    with pytest.raises(stage.StagingError, match=r"^signals: no EEG .*allow_missing=True$"):
        stage.stage_signals({**arrays, "EEG": None}, tiny_probe_run)
    with pytest.raises(stage.StagingError, match=r"signals\['EOG'\]: expected \(samples, fs, unit\)"):
        stage.stage_signals({**arrays, "EOG": arrays["EOG"][0]}, tiny_probe_run)
    with pytest.raises(stage.StagingError, match=r"slot EEG: .* 'furlong', not a voltage"):
        stage.stage_signals({**arrays, "EEG": (arrays["EEG"][0], 100, "furlong")}, tiny_probe_run)
    staged = stage.stage_signals({**arrays, "EEG": None}, tiny_probe_run, allow_missing=True)
    assert staged.absent == ["EEG"] and "EEG 0.30 (0.53)" in staged.warnings[-1]


def one_line(call) -> str:
    """The StagingError's message of call(); it must be one line."""
    with pytest.raises(stage.StagingError) as failed:
        call()
    assert "\n" not in str(failed.value)
    return str(failed.value)


def test_stage_signals_refuses_slots_of_different_durations(tiny_probe_run, psg_writer, tmp_path):
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", SECONDS))
    eeg, fs, unit = arrays["EEG"]
    # a 100-Hz EEG passed as 50 Hz: 727 s of samples read as 1454 s, where the other slots say 727 s
    message = one_line(lambda: stage.stage_signals({**arrays, "EEG": (eeg, 50, unit)}, tiny_probe_run))
    assert message.startswith("signals: slots differ in duration (samples / fs): ECG 727.0 s (72700 samples at fs "
                              "100 Hz), EOG 727.0 s (72700 samples at fs 100 Hz), ")
    assert "EEG 1454.0 s (72700 samples at fs 50 Hz)" in message and "SPO2 727.0 s (727 samples at fs 1 Hz)" in message
    assert message.endswith(": every slot must cover the same night, to within one 30-s epoch; is a slot's fs wrong?")
    # a slot 31 s short is refused; 10 s short (within one epoch) stages over the shortest, with a warning
    with pytest.raises(stage.StagingError, match=r"EOG 696\.0 s \(69600 samples at fs 100 Hz\)"):
        stage.stage_signals({**arrays, "EOG": (arrays["EOG"][0][:-3100], 100, "uV")}, tiny_probe_run)
    short = stage.stage_signals({**arrays, "EOG": (arrays["EOG"][0][:-1000], 100, "uV")}, tiny_probe_run)
    assert len(short.probs) == (SECONDS - 10) // 30 == 23
    assert short.warnings == ["signals: slots differ in duration by 10.0 s (ECG 727.0 s (72700 samples at fs 100 Hz), "
                              "EOG 717.0 s (71700 samples at fs 100 Hz), EMG 727.0 s (72700 samples at fs 100 Hz), "
                              "EEG 727.0 s (72700 samples at fs 100 Hz), SPO2 727.0 s (727 samples at fs 1 Hz), "
                              "THOR 727.0 s (7270 samples at fs 10 Hz), ABDO 727.0 s (7270 samples at fs 10 Hz)): "
                              "staged over the shortest, 717.0 s"]
    # half a second short (a record's rounding): no warning, the night as it is
    whole = stage.stage_signals(arrays, tiny_probe_run)
    rounded = stage.stage_signals({**arrays, "EOG": (arrays["EOG"][0][:-50], 100, "uV")}, tiny_probe_run)
    assert rounded.warnings == [] and rounded.probs.shape == whole.probs.shape


def test_stage_signals_refuses_a_mostly_nan_slot(tiny_probe_run, psg_writer, tmp_path):
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", SECONDS))
    eeg, thor = arrays["EEG"][0].copy(), arrays["THOR"][0].copy()
    eeg[: int(0.8 * len(eeg))] = np.nan
    thor[: int(0.8 * len(thor))] = np.nan
    assert one_line(lambda: stage.stage_signals({**arrays, "EEG": (eeg, 100, "uV")}, tiny_probe_run)) == (
        "required slot EEG: signal 'EEG' is 80% NaN (58160 of 72700 samples), more than the 50% that is interpolated")
    # an optional slot is fed as zeros, with the same reason in the absent-slot warning
    staged = stage.stage_signals({**arrays, "THOR": (thor, 10, "uV")}, tiny_probe_run)
    assert staged.absent == ["THOR"] and "slot THOR: signal 'THOR' is 80% NaN (5816 of 7270 samples)" in staged.warnings[-1]
    # a few NaNs are interpolated, and said
    eeg = arrays["EEG"][0].copy()
    eeg[1000:8270] = np.nan
    staged = stage.stage_signals({**arrays, "EEG": (eeg, 100, "uV")}, tiny_probe_run)
    assert staged.absent == [] and staged.warnings == ["slot EEG: 7270 NaN samples (10.0%) interpolated"]


@pytest.mark.parametrize("fs", [float("inf"), float("nan"), 0, -100.0, "100", None, True, [100]])
def test_stage_signals_refuses_a_bad_rate(tiny_probe_run, psg_writer, tmp_path, fs):
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", 60))
    message = one_line(lambda: stage.stage_signals({**arrays, "EEG": (arrays["EEG"][0], fs, "uV")}, tiny_probe_run))
    assert message == f"signals['EEG']: fs must be the sampling rate in Hz, a finite number above 0, got {fs!r}"


def test_stage_signals_start_time(tiny_probe_run, psg_writer, tmp_path):
    import datetime as dt
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", 60))
    forms = "a datetime or ISO date-time text such as '2001-02-03T23:59:45' (or None: no clock times)"
    for bad, shown in ((1234, "1234 (int)"), ("tonight", "'tonight' (str)"), ("23:59:45", "'23:59:45' (str)"),
                       ("", "'' (str)"), (np.datetime64("2001-02-03T23:59:45"),
                                          f"{np.datetime64('2001-02-03T23:59:45')!r} (datetime64)")):
        assert one_line(lambda: stage.stage_signals(arrays, tiny_probe_run, start_time=bad)) == (
            f"start_time: expected {forms}, got {shown}")
    for date in (dt.date(2001, 2, 3), "2001-02-03", "20010203"):           # midnight would be a silently wrong clock
        assert one_line(lambda: stage.stage_signals(arrays, tiny_probe_run, start_time=date)) == (
            f"start_time: {date} is a date without a time of day: give {forms}")
    by_datetime = stage.stage_signals(arrays, tiny_probe_run, start_time=dt.datetime(2001, 2, 3, 23, 59, 45))
    assert by_datetime.table["clock_time"].tolist() == ["23:59:45", "00:00:15"]
    for text in ("2001-02-03T23:59:45", "2001-02-03 23:59:45", "2001-02-03T23:59:45+01:00"):   # wall clock: zone dropped
        staged = stage.stage_signals(arrays, tiny_probe_run, start_time=text)
        assert staged.start_time == "2001-02-03T23:59:45" and staged.table.equals(by_datetime.table)


def test_stage_signals_none_slots_are_not_given(tiny_probe_run, psg_writer, tmp_path):
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", 60))
    assert one_line(lambda: stage.stage_signals(dict.fromkeys(arrays), tiny_probe_run)) == (
        "signals: no EEG, EOG, EMG (given: nothing); stage without them with allow_missing=True")
    assert one_line(lambda: stage.stage_signals({**arrays, "EOG": None, "EMG": None}, tiny_probe_run)) == (
        "signals: no EOG, EMG (given: ECG, EEG, SPO2, THOR, ABDO); stage without them with allow_missing=True")
    assert one_line(lambda: stage.stage_signals([arrays["EEG"]], tiny_probe_run)) == (
        "signals: expected a dict of slot -> (samples, fs, unit), got list")


def test_nanovolts_stage_like_microvolts(tiny_probe_run, psg_writer, tmp_path):
    arrays = edf_arrays(psg_writer(tmp_path / "night.edf", SECONDS))
    in_nv = {slot: (values * 1e3, fs, "nV") if slot in ("EOG", "EMG", "EEG") else (values, fs, unit)
             for slot, (values, fs, unit) in arrays.items()}                    # the µV slots, in nV
    staged = stage.stage_signals(in_nv, tiny_probe_run)
    assert staged.source_units == {**staged.source_units, "EOG": "nV", "EMG": "nV", "EEG": "nV", "ECG": "mV"}
    assert staged.absent == [] and staged.warnings == []
    assert np.allclose(staged.probs, stage.stage_signals(arrays, tiny_probe_run).probs, atol=1e-5)
    from prepare.night import prepare_arrays
    assert np.array_equal(prepare_arrays(in_nv, Options())[0], prepare_arrays(arrays, Options())[0])


def test_a_pretraining_run_is_refused_in_one_line(tmp_path, psg_writer):
    import dataclasses
    from model import ModelConfig, Pretrainer
    model_cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=50)
    run = runs.write_run(tmp_path / "pretrain", {"model": dataclasses.asdict(model_cfg), "pretrain": {},
                                                 "data": {"window_s": 300.0}, "train": {}},
                         Pretrainer(model_cfg).state_dict())
    edf = psg_writer(tmp_path / "night.edf", 60)
    expected = (f"{run} is a pretraining run (an encoder, no probe: section in its config.yaml): staging and embed_edf "
                f"need a probe run, e.g. one trained on it with train_probe.py --encoder {run}")
    assert one_line(lambda: stage.embed_edf(edf, run)) == expected
    assert one_line(lambda: stage.embed_edf(edf, runs.read_run(run))) == expected
    assert one_line(lambda: stage.stage_signals(edf_arrays(edf), run)) == expected


def test_embed_edf_is_the_mean_of_each_epochs_patches(tmp_path, tiny_probe_run, psg_writer):
    edf = psg_writer(tmp_path / "night.edf", 5 * 60)                          # exactly one window: no averaging
    embedded = stage.embed_edf(edf, tiny_probe_run)
    run = runs.read_run(tiny_probe_run)
    night = Night(dataset="edf", night_id="n", subject="n", visit="", edf=edf, labelled=False)
    signals = torch.as_tensor(prepare_night(night, CHANNELS, Options())[0].astype(np.float32))
    with torch.inference_mode():
        patches = run.encoder().embed(signals[None])                          # [1, 7, 50, 16]
    expected = patches.reshape(1, 7, 10, 5, 16).mean(3)[0].transpose(0, 1)  # [10, 7, 16]
    assert embedded.shape == (10, 7, 16) and embedded.dtype == np.float32
    assert np.allclose(embedded, expected.numpy(), atol=1e-5)
    longer = stage.stage_edf(psg_writer(tmp_path / "long.edf", SECONDS), tiny_probe_run, embeddings=True)
    assert longer.embeddings.shape == (SECONDS // 30, 7, 16) and np.isfinite(longer.embeddings).all()


# ----------------------------------------------------------------------------------------------------------------------
# NSRR label sets, missing staging slots, --channels null, source units


def mesa_edf(path, edf_writer):
    """A small EDF with MESA's labels (docs/formats.md §2): EEG3 is C4-M1, no label the built-in table knows as EEG."""
    rng = np.random.default_rng(3)

    def noise(label, fs, unit, scale, offset=0.0):
        return label, fs, unit, offset + rng.normal(0, scale, fs * SECONDS), (offset - 12 * scale, offset + 12 * scale)
    channels = [noise("EKG", 100, "mV", 0.5), noise("EOG-L", 100, "uV", 40), noise("EOG-R", 100, "uV", 40),
                noise("EMG", 100, "uV", 10), noise("EEG1", 100, "uV", 40), noise("EEG2", 100, "uV", 40),
                noise("EEG3", 100, "uV", 40), noise("SpO2", 1, "%", 0.3, 95.0), noise("Thor", 10, "", 1),
                noise("Abdo", 10, "", 1)]
    return edf_writer(path, channels)


def test_an_nsrr_edf_just_works(tmp_path, tiny_probe_run, edf_writer, capsys):
    edf = mesa_edf(tmp_path / "mesa-sleep-0001.edf", edf_writer)
    staged = stage.stage_edf(edf, tiny_probe_run)
    assert staged.channel_table == "mesa" and staged.absent == [] and staged.warnings == []
    assert staged.source_labels["EEG"] == "EEG3" and staged.source_labels["EOG"] == "EOG-L"
    assert staged.source_units == {"ECG": "mV", "EOG": "uV", "EMG": "uV", "EEG": "uV", "SPO2": "%", "THOR": "",
                                   "ABDO": ""}
    # the built-in table alone does not know EEG3: the night fails, naming what it saw and what to do
    with pytest.raises(stage.StagingError) as failed:
        stage.stage_edf(edf, tiny_probe_run, dataset="edf")
    message = str(failed.value)
    assert "\n" not in message and message.startswith("no EEG among the EDF's labels (EKG, EOG-L, EOG-R, EMG, EEG1")
    assert "--channels" in message and "--allow-missing" in message
    out = tmp_path / "out"
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(out), "--dataset", "mesa"]) == 0
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(out), "--dataset", "edf"]) == 1
    error, = capsys.readouterr().err.strip().splitlines()
    assert error.startswith(f"error: {edf}: no EEG among the EDF's labels (")
    # --allow-missing stages it, and says what a missing EEG costs (docs/benchmarks.md "Channel dropout")
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(out), "--dataset", "edf",
                         "--allow-missing"]) == 0
    warning, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert "absent slots EEG (fed as zeros)" in warning and "EEG 0.30 (0.53)" in warning and "0.80" in warning
    stats = json.loads((out / "mesa-sleep-0001.stats.json").read_text())
    assert stats["absent_slots"] == ["EEG"] and stats["channel_table"] == "edf"


MROS = ["ECG L", "ECG R", "C3", "C4", "L Chin", "R Chin"]
NSRR_LABELS = {   # docs/formats.md §2 (MESA: a current file's full list): labels, the sources expected, the table
    "shhs": (["ECG", "EOG(L)", "EOG(R)", "EMG", "EEG", "EEG(sec)", "SaO2", "THOR RES", "ABDO RES", "H.R.", "POSITION"],
             {"EEG": "EEG", "EOG": "EOG(L)"}, "edf"),
    "mesa": ("EKG EOG-L EOG-R EMG EEG1 EEG2 EEG3 Pres Flow Snore Thor Abdo Leg Therm Pos EKG_Off EOG-L_Off EOG-R_Off "
             "EMG_Off EEG1_Off EEG2_Off EEG3_Off Pleth OxStatus SpO2 HR DHR".split(), {"EEG": "EEG3", "EOG": "EOG-L"},
             "mesa"),
    "mros1": (MROS + ["LOC", "ROC", "A1", "A2", "SaO2", "Thoracic", "Abdominal"],
              {"EEG": "C4 - A1", "EOG": "LOC - A2", "EMG": "L Chin - R Chin"}, "mros"),
    "mros2": (MROS + ["E1", "E2", "M1", "M2", "SpO2", "Chest", "ABD"], {"EEG": "C4 - M1", "EOG": "E1 - M2"}, "mros"),
    "apples": ("ECG LOC ROC EMG C4_M1 C3_M2 O1_M2 SpO2 thorax abdomen".split(), {"EEG": "C4_M1", "EOG": "LOC"},
               "apples"),
    "wsc": ("ECG E1 E2 cchin_l C3_M2 F3_M2 spo2 thorax abdomen".split(), {"EEG": "C3_M2", "EMG": "cchin_l"}, "wsc"),
}


@pytest.mark.parametrize("dataset", NSRR_LABELS)
def test_each_nsrr_label_set_resolves_every_slot(dataset):
    from prepare.signals import SLOTS, describe, resolve
    labels, expected, table_name = NSRR_LABELS[dataset]
    name, table = stage.channel_table(labels)
    sources = {slot: describe(source) for slot, source in resolve(labels, table).items()}
    assert name == table_name and all(sources[slot] for slot in SLOTS), sources
    assert sources == {**sources, **expected}


def test_slot_mapped_to_null_and_edf_units(tmp_path, tiny_probe_run, psg_writer, capsys):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    channel_map = tmp_path / "map.yaml"
    channel_map.write_text("THOR: null\n")
    out = tmp_path / "out"
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(out), "--channels",
                         str(channel_map)]) == 0
    warning, = [line for line in capsys.readouterr().out.splitlines() if line.startswith("warning:")]
    assert "slot THOR: mapped to null by --channels" in warning
    stats = json.loads((out / "night.stats.json").read_text())
    assert stats["absent_slots"] == ["THOR"]
    assert stats["source_units"]["ECG"] == "mV" and stats["source_units"]["EEG"] == "uV"   # the EDF's, not as stored
    with pytest.raises(stage.StagingError, match="required slot EEG: mapped to null by --channels"):
        stage.stage_edf(edf, tiny_probe_run, channels={"EEG": None})


def test_lights_off_and_on(tmp_path, tiny_probe_run, psg_writer):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)                          # starts 23:59:45
    whole = stage.stage_edf(edf, tiny_probe_run)
    lit = stage.stage_edf(edf, tiny_probe_run, lights_off="00:00:45", lights_on=600)
    assert np.array_equal(lit.probs, whole.probs)
    assert (lit.stats["lights_off_epoch"], lit.stats["lights_on_epoch"]) == (2, 20) and lit.stats["TIB_min"] == 9.0
    assert lit.stats == sleep_statistics.sleep_statistics(whole.stages, lights_off=2, lights_on=20)
    out = tmp_path / "out"
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(out), "--lights-off", "00:00:45",
                         "--lights-on", "600"]) == 0
    assert json.loads((out / "night.stats.json").read_text())["TIB_min"] == 9.0


# ----------------------------------------------------------------------------------------------------------------------
# predict.py's checks before any night is computed


def test_unwritable_output_fails_before_any_night(tmp_path, tiny_probe_run, psg_writer, monkeypatch):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    monkeypatch.setattr(stage, "stage_night", lambda *a, **k: pytest.fail("a night was computed"))
    monkeypatch.setattr(stage, "load_model", lambda *a, **k: pytest.fail("the run was loaded"))
    with pytest.raises(SystemExit, match=f"^predict.py: cannot write to the output folder {blocker / 'out'}: "):
        predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(blocker / "out")])


def test_a_killed_run_is_refused_unless_latest(tmp_path, tiny_probe_run, psg_writer):
    killed = tmp_path / "killed"
    killed.mkdir()
    shutil.copy(tiny_probe_run / runs.CONFIG, killed / runs.CONFIG)
    shutil.copy(tiny_probe_run / runs.FINAL, killed / runs.LATEST)           # only ckpt.pt: training never finished
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    with pytest.raises(SystemExit, match=r"^predict.py: .*no final checkpoint.*--latest"):
        predict.main([str(edf), "--run", str(killed), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "night.hypnogram.csv").exists()
    assert predict.main([str(edf), "--run", str(killed), "--out", str(tmp_path / "out"), "--latest"]) == 0
