"""predict.py: sleep statistics on hand-made hypnograms, and the CLI end to end on small EDFs with a tiny random run
(stitched and padded nights, missing channels, --require-all, truncated files, the batch summary)."""
import datetime as dt
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import model
import predict
from conftest import write_edf
from model import Encoder, ModelConfig, ProbeConfig, ProbeHead

@pytest.fixture(autouse=True)
def restore_attention_choice(monkeypatch):
    """predict.main switches CPU attention to the fused kernel for the process; undo it for the other test files."""
    monkeypatch.setitem(model.PAD_V_FOR_FUSED, "cpu", model.PAD_V_FOR_FUSED["cpu"])


START = dt.datetime(2001, 2, 3, 23, 59, 45)       # crosses midnight within the first minute
WINDOW_EPOCHS = 10


# ----------------------------------------------------------------------------------------------------------------------
# Sleep statistics


def test_statistics_hand_computed():
    # W W N1 N2 N2 W W W N2 R R N2 W : 13 epochs
    stages = [0, 0, 1, 2, 2, 0, 0, 0, 2, 4, 4, 2, 0]
    s = predict.sleep_statistics(stages)
    assert s["TIB_min"] == 6.5                         # 13 × 0.5
    assert s["SOL_min"] == 1.0                         # first sleep at epoch 2
    assert s["SPT_min"] == 5.0                         # epochs 2..11 inclusive = 10 epochs
    assert s["TST_min"] == 3.5                         # 7 sleep epochs
    assert s["WASO_min"] == 1.5                        # epochs 5, 6, 7
    assert s["SE_pct"] == pytest.approx(100 * 3.5 / 6.5)
    assert s["REM_latency_min"] == 3.5                 # epoch 9 − epoch 2 = 7 epochs
    assert s["awakenings"] == 1                        # the 3-epoch run; the trailing W is outside the SPT
    assert s["stage_min"] == {"W": 3.0, "N1": 0.5, "N2": 2.0, "N3": 0.0, "R": 1.0}
    assert s["stage_pct_TST"] == pytest.approx({"N1": 100 / 7, "N2": 400 / 7, "N3": 0.0, "R": 200 / 7})


def test_statistics_awakening_minimum_and_edge_cases():
    # single W epochs inside the SPT are WASO but not awakenings (minimum 2 epochs = 1 min)
    s = predict.sleep_statistics([2, 0, 2, 0, 0, 2, 0, 2])
    assert predict.MIN_AWAKENING_EPOCHS == 2
    assert s["awakenings"] == 1 and s["WASO_min"] == 2.0 and s["SOL_min"] == 0.0 and s["REM_latency_min"] is None
    awake = predict.sleep_statistics([0, 0, 0, 0])
    assert awake["TST_min"] == 0 and awake["SE_pct"] == 0 and awake["SOL_min"] is None and awake["SPT_min"] == 0
    assert awake["stage_pct_TST"]["N2"] is None and awake["awakenings"] == 0
    assert predict.sleep_statistics([3, 3], epoch_s=60)["TST_min"] == 2.0


# ----------------------------------------------------------------------------------------------------------------------
# The CLI end to end


def make_run(run_dir):
    torch.manual_seed(0)
    model_cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=5 * WINDOW_EPOCHS)
    probe_cfg = ProbeConfig(d_model=16, hidden_size=8, n_layers=1, dropout=0.0)
    encoder, probe = Encoder(model_cfg), ProbeHead(probe_cfg)
    run_dir.mkdir(parents=True)
    state = {**{f"encoder.{k}": v for k, v in encoder.state_dict().items()},
             **{f"probe.{k}": v for k, v in probe.state_dict().items()}}
    torch.save({"model": state}, run_dir / "ckpt_final.pt")
    config = {"model": vars(model_cfg), "probe": vars(probe_cfg), "data": {"window_s": WINDOW_EPOCHS * 30.0}}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    return run_dir


def make_edf(path, seconds, seed=0, drop=()):
    """A small PSG with the built-in aliases' labels; `drop` leaves those labels out."""
    rng = np.random.default_rng(seed)
    channels = [("C4-M1", 100, "uV", 40, (-500, 500)), ("E1-M2", 100, "uV", 40, (-500, 500)),
                ("Chin1-Chin2", 100, "uV", 10, (-200, 200)), ("ECG", 100, "mV", 0.5, (-5, 5)),
                ("SpO2", 1, "%", 1, (0, 100)), ("Thorax", 10, "uV", 100, (-1000, 1000)),
                ("Abdomen", 10, "uV", 100, (-1000, 1000))]
    signals = []
    for label, fs, dim, scale, rng_ in channels:
        if label in drop:
            continue
        x = rng.normal(0, scale, int(seconds * fs))
        signals.append((label, fs, dim, 95 + x if label == "SpO2" else x, rng_))
    return write_edf(path, signals, start=START)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("predict") / "run")


@pytest.mark.parametrize("seconds", [25 * 60 + 17, 3 * 60 + 40])       # longer than the window (stitched), shorter
def test_end_to_end_outputs(tmp_path, run, seconds, capsys):
    edf = make_edf(tmp_path / "night a.edf", seconds)
    assert predict.main([str(edf), "--run", str(run), "--device", "cpu"]) == 0
    table = pd.read_csv(tmp_path / "night a.hypnogram.csv", dtype={"clock_time": str})
    n_epochs = seconds // 30
    assert list(table.columns) == list(predict.COLUMNS) and len(table) == n_epochs
    assert table["epoch"].tolist() == list(range(n_epochs)) and table["onset_s"].tolist() == list(range(0, 30 * n_epochs, 30))
    probs = table[list(predict.PROB_COLUMNS)].to_numpy()
    assert np.allclose(probs.sum(axis=1), 1, atol=1e-4)
    assert set(table["stage"]) <= set(predict.STAGES)
    assert (table["stage"] == [predict.STAGES[k] for k in probs.argmax(axis=1)]).all()
    expected = [(START + dt.timedelta(seconds=30 * i)).strftime("%H:%M:%S") for i in range(n_epochs)]
    assert table["clock_time"].tolist() == expected and expected[1] == "00:00:15"
    stats = json.loads((tmp_path / "night a.stats.json").read_text())
    for key in ("TIB_min", "SPT_min", "TST_min", "SE_pct", "SOL_min", "WASO_min", "REM_latency_min", "stage_min",
                "stage_pct_TST", "awakenings", "absent_slots"):
        assert key in stats
    assert stats["TIB_min"] == n_epochs / 2 and stats["absent_slots"] == []
    assert stats == {**stats, **predict.sleep_statistics(probs.argmax(axis=1))}
    assert (tmp_path / "night a.png").stat().st_size > 0
    assert not list(tmp_path.glob(".*tmp*"))                               # no temporaries left behind


def test_stitching_averages_overlapping_windows(tmp_path, run):
    edf = make_edf(tmp_path / "n.edf", 25 * 60)
    out_a, out_b = tmp_path / "a", tmp_path / "b"
    assert predict.main([str(edf), "--run", str(run), "--out", str(out_a), "--device", "cpu"]) == 0
    assert predict.main([str(edf), "--run", str(run), "--out", str(out_b), "--stride_s", "300", "--device", "cpu"]) == 0
    a, b = (pd.read_csv(o / "n.hypnogram.csv") for o in (out_a, out_b))
    assert len(a) == len(b) == 50
    assert not np.allclose(a[list(predict.PROB_COLUMNS)], b[list(predict.PROB_COLUMNS)])   # half vs no overlap


def test_missing_channel_warns_and_require_all_fails_the_night_only(tmp_path, run, capsys):
    partial = make_edf(tmp_path / "partial.edf", 6 * 60, drop=("Thorax",))
    full = make_edf(tmp_path / "full.edf", 6 * 60, seed=1)
    out = tmp_path / "out"
    assert predict.main([str(partial), "--run", str(run), "--out", str(out), "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    warning = [line for line in printed.splitlines() if line.startswith("warning:")]
    assert len(warning) == 1 and "THOR" in warning[0] and "partial.edf" in warning[0]
    assert (out / "partial.hypnogram.csv").exists()
    assert json.loads((out / "partial.stats.json").read_text())["absent_slots"] == ["THOR"]

    out2 = tmp_path / "out2"
    code = predict.main([str(partial), str(full), "--run", str(run), "--out", str(out2), "--require-all",
                         "--device", "cpu"])
    captured = capsys.readouterr()
    assert code == 0
    errors = [line for line in captured.err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "partial.edf" in errors[0] and "THOR" in errors[0]
    assert not (out2 / "partial.hypnogram.csv").exists() and (out2 / "full.hypnogram.csv").exists()
    assert "1 of 2 nights staged" in captured.out and f"failed {partial}" in captured.out


def test_truncated_edf_is_one_line_error_and_all_failed_exits_1(tmp_path, run, capsys):
    good = make_edf(tmp_path / "good.edf", 4 * 60)
    raw = good.read_bytes()
    header_cut = tmp_path / "header_cut.edf"
    header_cut.write_bytes(raw[:400])                      # the per-signal header is cut short
    data_cut = tmp_path / "data_cut.edf"
    data_cut.write_bytes(raw[: len(raw) // 2])             # half the data records are missing
    assert predict.main([str(header_cut), str(data_cut), "--run", str(run), "--strict", "--device", "cpu"]) == 1
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert len(errors) == 2
    assert errors[0].startswith(f"error: {header_cut}: ") and "truncated" in errors[0]
    assert errors[1].startswith(f"error: {data_cut}: ")
    assert "0 of 2 nights staged" in captured.out
    assert not list(tmp_path.glob("*.hypnogram.csv"))


def test_fused_cpu_attention_is_the_same_function(run, monkeypatch):
    from model import load_encoder, load_probe, stage_night
    encoder, probe = load_encoder(run), load_probe(run)
    signals = torch.randn(7, 23 * 3750)
    monkeypatch.setitem(model.PAD_V_FOR_FUSED, "cpu", False)
    unfused = stage_night(encoder, probe, signals, WINDOW_EPOCHS * 3750, 5 * 3750)
    predict.fused_attention_on_cpu()
    assert model.PAD_V_FOR_FUSED["cpu"] is True
    assert torch.allclose(stage_night(encoder, probe, signals, WINDOW_EPOCHS * 3750, 5 * 3750), unfused, atol=1e-5)


def test_edf_annotation_export_reads_back_as_the_hypnogram(tmp_path, run):
    import pyedflib
    from prepare.annotations import read_hypnogram
    edf = make_edf(tmp_path / "n.edf", 25 * 60 + 17)
    assert predict.main([str(edf), "--run", str(run), "--edf-annotations", "--device", "cpu"]) == 0
    table = pd.read_csv(tmp_path / "n.hypnogram.csv")
    codes = [predict.STAGES.index(stage) for stage in table["stage"]]
    exported = tmp_path / "n.stages.edf"
    assert read_hypnogram(exported, edf_start=START).stages.tolist() == codes     # our reader, and pyedflib's:
    with pyedflib.EdfReader(str(exported)) as reader:
        onsets, durations, texts = reader.readAnnotations()
        assert reader.getStartdatetime() == START
    per_epoch = []
    for onset, duration, text in zip(onsets, durations, texts):
        assert onset == 30 * len(per_epoch) and text.startswith("Sleep stage ")
        per_epoch += [text.removeprefix("Sleep stage ")] * int(duration // 30)
    assert per_epoch == table["stage"].tolist()


def test_stage_annotation_record_by_hand():
    record = predict.stage_annotation_record(np.array([0, 0, 1, 4]))
    assert record == (b"+0\x14\x14\x00" b"+0\x1560\x14Sleep stage W\x14\x00" b"+60\x1530\x14Sleep stage N1\x14\x00"
                      b"+90\x1530\x14Sleep stage R\x14\x00" b"\x00")
