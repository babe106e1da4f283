"""predict.py: sleep statistics on hand-made hypnograms, and the CLI end to end on small EDFs with a tiny random run
(stitched and padded nights, missing channels, --require-all, truncated files, the batch summary)."""
import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
import torch

import cpu_kernels
import predict
import runs
import sleep_statistics
import stage
from prepare import annotations
from prepare import edf as edf_format
from prepare.annotations import AASM_LETTERS

WINDOW_EPOCHS = 10                                  # conftest's tiny_probe_run


# ----------------------------------------------------------------------------------------------------------------------
# Sleep statistics


def test_statistics_hand_computed():
    # W W N1 N2 N2 W W W N2 R R N2 W : 13 epochs
    stages = [0, 0, 1, 2, 2, 0, 0, 0, 2, 4, 4, 2, 0]
    s = sleep_statistics.sleep_statistics(stages)
    assert s["TIB_min"] == 6.5                         # 13 × 0.5
    assert s["SOL_min"] == 1.0                         # first sleep at epoch 2
    assert s["SPT_min"] == 5.0                         # epochs 2..11 inclusive = 10 epochs
    assert s["TST_min"] == 3.5                         # 7 sleep epochs
    assert s["WASO_min"] == 1.5                        # epochs 5, 6, 7
    assert s["SE_pct"] == pytest.approx(100 * 3.5 / 6.5)
    assert s["REM_latency_from_onset_min"] == 3.5      # epoch 9 − epoch 2 = 7 epochs
    assert s["awakenings"] == 1                        # the 3-epoch run; the trailing W is outside the SPT
    assert s["stage_min"] == {"W": 3.0, "N1": 0.5, "N2": 2.0, "N3": 0.0, "R": 1.0}
    assert s["stage_pct_TST"] == pytest.approx({"N1": 100 / 7, "N2": 400 / 7, "N3": 0.0, "R": 200 / 7})


def test_statistics_awakening_minimum_and_edge_cases():
    # single W epochs inside the SPT are WASO but not awakenings (minimum 2 epochs = 1 min)
    s = sleep_statistics.sleep_statistics([2, 0, 2, 0, 0, 2, 0, 2])
    assert sleep_statistics.MIN_AWAKENING_EPOCHS == 2
    assert s["awakenings"] == 1 and s["WASO_min"] == 2.0 and s["SOL_min"] == 0.0
    assert s["REM_latency_from_onset_min"] is None
    awake = sleep_statistics.sleep_statistics([0, 0, 0, 0])
    assert awake["TST_min"] == 0 and awake["SE_pct"] == 0 and awake["SOL_min"] is None and awake["SPT_min"] == 0
    assert awake["stage_pct_TST"]["N2"] is None and awake["awakenings"] == 0
    assert sleep_statistics.sleep_statistics([3, 3], epoch_s=60)["TST_min"] == 2.0


# ----------------------------------------------------------------------------------------------------------------------
# The CLI end to end


@pytest.mark.parametrize("seconds", [25 * 60 + 17, 3 * 60 + 40])       # longer than the window (stitched), shorter
def test_end_to_end_outputs(tmp_path, tiny_probe_run, psg_writer, seconds, capsys):
    edf = psg_writer(tmp_path / "night a.edf", seconds)
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu"]) == 0
    table = pd.read_csv(tmp_path / "night a.hypnogram.csv", dtype={"clock_time": str})
    n_epochs = seconds // 30
    assert list(table.columns) == list(stage.HYPNOGRAM_COLUMNS) and len(table) == n_epochs
    assert table["epoch"].tolist() == list(range(n_epochs)) and table["onset_s"].tolist() == list(range(0, 30 * n_epochs, 30))
    probs = table[[c for c in stage.HYPNOGRAM_COLUMNS if c.startswith('p_')]].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert set(table["stage"]) <= set(AASM_LETTERS)
    assert (table["stage"] == [AASM_LETTERS[k] for k in probs.argmax(axis=1)]).all()
    expected = [(psg_writer.start + dt.timedelta(seconds=30 * i)).strftime("%H:%M:%S") for i in range(n_epochs)]
    assert table["clock_time"].tolist() == expected and expected[1] == "00:00:15"
    stats = json.loads((tmp_path / "night a.stats.json").read_text())
    for key in ("TIB_min", "SPT_min", "TST_min", "SE_pct", "SOL_min", "WASO_min", "REM_latency_from_onset_min",
                "stage_min", "stage_pct_TST", "awakenings", "absent_slots"):
        assert key in stats
    assert stats["TIB_min"] == n_epochs / 2 and stats["absent_slots"] == []
    assert stats == {**stats, **sleep_statistics.sleep_statistics(probs.argmax(axis=1))}
    assert (tmp_path / "night a.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp*"))                               # no temporaries left behind


def test_windows_back_to_back_by_default_and_averaged_with_a_stride(tmp_path, tiny_probe_run, psg_writer):
    """By default a night is cut into the fewest equal windows, back to back (stage.staging_windows); --stride-s gives
    windows every stride, the last aligned to the end, averaged where they overlap. A 27-min night, 5-min windows:
    six of 9 epochs by default, the same probabilities as stage_night with those windows; other ones with a stride."""
    edf = psg_writer(tmp_path / "n.edf", 27 * 60)
    probs, strides = {}, {}
    for name, extra in (("default", []), ("window", ["--stride-s", "300"]), ("half", ["--stride-s", "150"])):
        assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(tmp_path / name), "--device", "cpu",
                             *extra]) == 0
        probs[name] = pd.read_csv(tmp_path / name / "n.hypnogram.csv")[list(stage.PROB_COLUMNS)].to_numpy()
        strides[name] = json.loads((tmp_path / name / "n.stats.json").read_text())["stride_s"]
    assert all(len(p) == 54 for p in probs.values())
    model = stage.load_model(tiny_probe_run, "cpu")
    signals = stage.read_edf_night(edf).signals.astype(np.float32)
    by_hand = stage.stage_night(model.encoder, model.probe, signals, WINDOW_EPOCHS * 3750).numpy()
    assert np.allclose(probs["default"], by_hand, atol=2e-5)                          # CSV rounding: 1e-5
    assert not np.allclose(probs["default"], probs["window"], atol=1e-3)
    assert not np.allclose(probs["default"], probs["half"], atol=1e-3)
    assert strides == {"default": None, "window": 300.0, "half": 150.0}


def test_staging_windows_by_hand():
    assert stage.staging_windows(1140, 960) == [(0, 570), (570, 570)]           # 9.5 h with the 8-h window
    assert stage.staging_windows(960, 960) == [(0, 960)]
    assert stage.staging_windows(961, 960) == [(0, 480), (480, 481)]
    assert stage.staging_windows(23, 10) == [(0, 7), (7, 8), (15, 8)]
    assert stage.staging_windows(100, 960) == [(0, 100)]
    assert stage.staging_windows(0, 960) == [] == stage.staging_windows(0, 960, 480)
    assert stage.staging_windows(1140, 960, 480) == [(0, 960), (180, 960)]      # data.window_starts', aligned last
    assert stage.staging_windows(100, 960, 480) == [(0, 100)]


def test_a_night_costs_its_length_not_whole_windows(tiny_probe_run, monkeypatch):
    """The encoder sees a short window's own patches only (23 epochs, 10-epoch windows: 7, 8 and 8 epochs), the
    reference path whole zero-padded windows; the probabilities agree (exact in eval mode)."""
    run = runs.read_run(tiny_probe_run)
    encoder, probe = run.encoder(), run.probe()
    signals = torch.randn(7, 23 * 3750, generator=torch.Generator().manual_seed(0)) * 30
    lengths, real = [], encoder.contextualise
    monkeypatch.setattr(encoder, "contextualise", lambda tokens, *a: lengths.append(tokens.shape[2]) or real(tokens, *a))
    fast = stage.stage_night(encoder, probe, signals, WINDOW_EPOCHS * 3750, batch_size=1)
    assert lengths == [35, 40, 40]                                                   # patches: 5 an epoch
    lengths.clear()
    reference = stage.stage_night(encoder, probe, signals, WINDOW_EPOCHS * 3750, batch_size=1, reference=True)
    assert lengths == [50, 50, 50]
    assert fast.shape == (23, 5) and (fast - reference).abs().max().item() <= 1e-5


def test_missing_channel_warns_and_require_all_fails_the_night_only(tmp_path, tiny_probe_run, psg_writer, capsys):
    partial = psg_writer(tmp_path / "partial.edf", 6 * 60, drop=("Thorax",))
    full = psg_writer(tmp_path / "full.edf", 6 * 60, seed=1)
    out = tmp_path / "out"
    assert predict.main([str(partial), "--run", str(tiny_probe_run), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    warning = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "THOR" in warning[0] and "partial.edf" in warning[0]
    assert (out / "partial.hypnogram.csv").exists()
    assert json.loads((out / "partial.stats.json").read_text())["absent_slots"] == ["THOR"]

    out2 = tmp_path / "out2"
    code = predict.main([str(partial), str(full), "--run", str(tiny_probe_run), "--out", str(out2), "--require-all",
                         "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "partial.edf" in errors[0] and "THOR" in errors[0]
    assert not (out2 / "partial.hypnogram.csv").exists() and (out2 / "full.hypnogram.csv").exists()
    assert "1 of 2 nights staged" in captured.out and f"failed {partial}" in captured.out


def test_truncated_edf_is_one_line_error_and_all_failed_exits_1(tmp_path, tiny_probe_run, psg_writer, capsys):
    good = psg_writer(tmp_path / "good.edf", 4 * 60)
    raw = good.read_bytes()
    header_cut = tmp_path / "header_cut.edf"
    header_cut.write_bytes(raw[:400])                      # the per-signal header is cut short
    data_cut = tmp_path / "data_cut.edf"
    data_cut.write_bytes(raw[: len(raw) // 2])             # half the data records are missing
    assert predict.main([str(header_cut), str(data_cut), "--run", str(tiny_probe_run), "--strict", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {header_cut}: ") and "truncated" in errors[0]
    assert errors[1].startswith(f"error: {data_cut}: ")
    assert "0 of 2 nights staged" in captured.out
    assert not list(tmp_path.glob("*.hypnogram.csv"))


def test_staging_on_cpu_takes_cpu_kernels_unless_asked_for_the_reference(tiny_probe_run, monkeypatch):
    """stage_night on the CPU runs cpu_kernels (attention by blocks of queries, the GRU's directions side by side);
    reference=True runs model.py's own paths; the same function."""
    run = runs.read_run(tiny_probe_run)
    encoder, probe = run.encoder(), run.probe()
    signals = torch.randn(7, 23 * 3750)
    calls = []
    for name in ("attention", "bidirectional_gru"):
        real = getattr(cpu_kernels, name)
        monkeypatch.setattr(cpu_kernels, name, lambda *args, real=real, name=name: calls.append(name) or real(*args))
    fast = stage.stage_night(encoder, probe, signals, WINDOW_EPOCHS * 3750, 5 * 3750)
    assert {"attention", "bidirectional_gru"} <= set(calls)
    calls.clear()
    reference = stage.stage_night(encoder, probe, signals, WINDOW_EPOCHS * 3750, 5 * 3750, reference=True)
    assert not calls
    assert torch.allclose(fast, reference, atol=1e-5)


def test_cpu_kernels_stage_the_paper_config_as_the_reference(tmp_path):
    """The paper's widths (7 × 512, 3 layers of 4 heads, d_ff 2048, a 1024-wide 2-layer BiGRU) on a 1-h window and a
    night of 1 h 10 min (two windows, the second padded): probabilities within 1e-5 of model.py's reference paths."""
    from model import ModelConfig, ProbeConfig
    run = runs.write_random_run(tmp_path / "paper", ModelConfig(max_patches=600), ProbeConfig(), {"window_s": 3600.0})
    model = stage.load_model(run, "cpu")
    signals = torch.randn(7, 140 * 3750, generator=torch.Generator().manual_seed(0))
    fast = stage.stage_night(model.encoder, model.probe, signals, 120 * 3750, batch_size=2)
    reference = stage.stage_night(model.encoder, model.probe, signals, 120 * 3750, batch_size=2, reference=True)
    assert fast.shape == (140, 5) and (fast - reference).abs().max().item() <= 1e-5


def test_edf_annotation_export_reads_back_as_the_hypnogram(tmp_path, tiny_probe_run, psg_writer):
    import pyedflib
    from prepare.annotations import read_hypnogram
    edf = psg_writer(tmp_path / "n.edf", 25 * 60 + 17)
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--edf-annotations", "--device", "cpu"]) == 0
    table = pd.read_csv(tmp_path / "n.hypnogram.csv")
    codes = [AASM_LETTERS.index(stage) for stage in table["stage"]]
    exported = tmp_path / "n.stages.edf"
    assert read_hypnogram(exported, edf_start=psg_writer.start).stages.tolist() == codes     # our reader, and pyedflib's:
    with pyedflib.EdfReader(str(exported)) as reader:
        onsets, durations, texts = reader.readAnnotations()
        assert reader.getStartdatetime() == psg_writer.start
    per_epoch = []
    for onset, duration, text in zip(onsets, durations, texts):
        assert onset == 30 * len(per_epoch) and text.startswith("Sleep stage ")
        per_epoch += [text.removeprefix("Sleep stage ")] * int(duration // 30)
    assert per_epoch == table["stage"].tolist()


def test_stage_annotation_record_by_hand():
    record = edf_format.annotation_record(annotations.stage_annotations(np.array([0, 0, 1, 4])))
    assert record == (b"+0\x14\x14\x00" b"+0\x1560\x14Sleep stage W\x14\x00" b"+60\x1530\x14Sleep stage N1\x14\x00"
                      b"+90\x1530\x14Sleep stage R\x14\x00" b"\x00")


def test_a_folder_with_reader_workers_gives_what_one_process_gives(tmp_path, tiny_probe_run, psg_writer, capsys):
    """predict.py FOLDER --workers 2: the nights are read in reader processes (a bad one among them), staged in
    order, with the same files and summary as reading them in turn."""
    folder = tmp_path / "edfs"
    folder.mkdir()
    for i in range(3):
        psg_writer(folder / f"night-{i}.EDF" if i == 2 else folder / f"night-{i}.edf", 6 * 60, seed=i)
    (folder / "broken.edf").write_bytes(b"0" * 300)
    (folder / "notes.txt").write_text("not an EDF")
    outputs = {}
    for workers in ("0", "2"):
        out = tmp_path / f"out-{workers}"
        assert predict.main([str(folder), "--run", str(tiny_probe_run), "--out", str(out), "--workers", workers,
                             "--device", "cpu"]) == 0
        outputs[workers] = {p.name: p.read_bytes() for p in out.iterdir() if p.suffix in (".csv", ".json")}
    printed = capsys.readouterr()
    assert printed.err.count("error: ") == 2 and f"{folder / 'broken.edf'}" in printed.err
    assert "3 of 4 nights staged" in printed.out
    summary = outputs["2"]["summary.csv"].decode().splitlines()
    assert [line.split(",")[0] for line in summary[1:]] == ["broken", "night-0", "night-1", "night-2"]
    assert outputs["0"] == outputs["2"]


# ----------------------------------------------------------------------------------------------------------------------
# Outputs: one name per night, all of a night's files or none


def test_edfs_of_the_same_name_into_one_folder_are_refused_up_front(tmp_path, tiny_probe_run, psg_writer, capsys,
                                                                     one_line_exit):
    a, b = psg_writer(tmp_path / "a" / "night.edf", 4 * 60), psg_writer(tmp_path / "b" / "night.edf", 4 * 60, seed=1)
    out = tmp_path / "out"
    for given in ([a, b], [a.parent, b.parent]):                  # explicit files, or their folders
        message = one_line_exit(lambda: predict.main([*map(str, given), "--run", str(tiny_probe_run), "--out", str(out),
                                                      "--device", "cpu"]))
        assert message == (f"predict.py: EDFs of the same name: {a} and {b} would both write {out / 'night'}.*: "
                           f"stage them into separate --out folders, or rename one")
        assert not out.exists()
    loud = psg_writer(tmp_path / "a" / "NIGHT.EDF", 4 * 60)       # beside night.edf: one file on a case-blind disk
    message = one_line_exit(lambda: predict.main([str(a.parent), "--run", str(tiny_probe_run), "--device", "cpu"]))
    assert f"{loud} and {a} would both write" in message
    # without --out each night is written beside its EDF: no clash; the same file given twice is staged once
    loud.unlink()
    assert predict.main([str(a), str(a.parent), str(b), "--run", str(tiny_probe_run), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert f"note: {a} is given twice: staged once" in printed and "2 of 2 nights staged" in printed
    assert (a.parent / "night.hypnogram.csv").exists() and (b.parent / "night.hypnogram.csv").exists()


def test_an_export_target_that_is_a_folder_fails_the_night_and_leaves_none_of_its_files(tmp_path, tiny_probe_run,
                                                                                         psg_writer, capsys):
    blocked, fine = psg_writer(tmp_path / "blocked.edf", 4 * 60), psg_writer(tmp_path / "fine.edf", 4 * 60, seed=1)
    out = tmp_path / "out"
    (out / "blocked.stages.xml").mkdir(parents=True)
    assert predict.main([str(blocked), str(fine), "--run", str(tiny_probe_run), "--out", str(out), "--export",
                         "luna,xml", "--device", "cpu"]) == 0
    [error] = capsys.readouterr().err.strip().splitlines()
    assert error == (f"error: {blocked}: {out / 'blocked.stages.xml'} is a folder: the night's blocked.stages.xml "
                     f"cannot be written there (move or rename the folder); none of the night's files was written")
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(("blocked", ".blocked"))) == ["blocked.stages.xml"]
    assert (out / "fine.stages.xml").is_file() and (out / "fine.stats.json").is_file()
    summary = pd.read_csv(out / "summary.csv").set_index("night")
    assert summary.loc["blocked", "status"] == "failed" and "is a folder" in summary.loc["blocked", "reason"]
    assert summary.loc["fine", "status"] == "ok"


def test_a_write_that_fails_midway_leaves_none_of_the_nights_files(tmp_path, tiny_probe_run, psg_writer, monkeypatch):
    import errno
    night = stage.stage_edf(psg_writer(tmp_path / "n.edf", 4 * 60), tiny_probe_run, device="cpu")
    out = tmp_path / "out"
    (out / "n.stats.json").parent.mkdir()
    (out / "n.stats.json").write_text("an earlier run's")            # is replaced only with a whole new night

    def full_disk(path, *args):
        path.write_text("half")
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(stage, "write_stages", full_disk)
    with pytest.raises(stage.StagingError) as error:
        night.write(out / "n", exports=["txt"], plot=False)
    assert str(error.value) == (f"{out / 'n.stages.txt'} cannot be written (No space left on device); none of the "
                                f"night's files was written")
    assert [p.name for p in out.iterdir()] == ["n.stats.json"] and (out / "n.stats.json").read_text() == "an earlier run's"
    monkeypatch.undo()
    written = night.write(out / "n", exports=["txt"], plot=False)
    assert sorted(p.name for p in out.iterdir()) == sorted(p.name for p in written)
    assert json.loads((out / "n.stats.json").read_text())["edf"] == str(tmp_path / "n.edf")


def test_a_summary_csv_that_is_a_folder_is_refused_before_any_night(tmp_path, tiny_probe_run, psg_writer,
                                                                   one_line_exit):
    edf = psg_writer(tmp_path / "n.edf", 4 * 60)
    (tmp_path / "summary.csv").mkdir()
    message = one_line_exit(lambda: predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu"]))
    assert message == f"predict.py: {tmp_path / 'summary.csv'} is a folder: the batch's summary.csv cannot be written " \
                      f"there (move or rename the folder)"
    assert not (tmp_path / "n.hypnogram.csv").exists()
