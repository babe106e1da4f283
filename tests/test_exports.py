"""predict.py's outputs: hypnogram CSV rows that sum to exactly 1, every --export format read back by prepare's own
readers as the same stages, the batch's summary.csv, and --embeddings."""
import json
from decimal import Decimal

import numpy as np
import pandas as pd
import pytest

import predict
import stage
from prepare import annotations
from prepare import edf as edf_format
from prepare.annotations import AASM_LETTERS, read_hypnogram
from prepare.generic import CHANNELS
from prepare.night import Night, Options, prepare_night

SECONDS = 25 * 60 + 17


def test_rounded_probabilities_sum_to_exactly_one():
    rng = np.random.default_rng(0)
    probs = np.concatenate([rng.dirichlet(np.full(5, 0.3), 20_000), np.full((1, 5), 0.2),
                            [[1 / 3, 1 / 3, 1 / 3, 0, 0], [1 - 4e-7, 1e-7, 1e-7, 1e-7, 1e-7]]]).astype(np.float32)
    units = stage.rounded_probs(probs)                                       # [E, 5] in units of 1e-5
    assert (units.sum(axis=1) == 100_000).all() and (units >= 0).all()
    assert np.abs(units / 1e5 - probs).max() < 1e-5                          # each still within one unit
    assert units[-3].tolist() == [20_000] * 5 and units[-2].tolist() == [33_334, 33_333, 33_333, 0, 0]


def test_hypnogram_csv_rows_sum_to_one_and_yasa_reads_it(tmp_path, tiny_probe_run, psg_writer):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--device", "cpu"]) == 0
    text = pd.read_csv(tmp_path / "night.hypnogram.csv", dtype=str, keep_default_na=False)
    assert list(text.columns) == list(stage.HYPNOGRAM_COLUMNS) == ["epoch", "onset_s", "date", "clock_time", "stage", "p_W",
                                                           "p_N1", "p_N2", "p_N3", "p_REM"]
    for row in text[list(stage.PROB_COLUMNS)].itertuples(index=False):      # every row, exactly, in decimal
        assert sum(Decimal(p) for p in row) == 1 and all(len(p) == 7 for p in row)
    assert text["date"].tolist()[:2] == ["2001-02-03", "2001-02-04"]       # the night crosses midnight at epoch 1
    staged = stage.stage_edf(edf, tiny_probe_run)
    table = pd.read_csv(tmp_path / "night.hypnogram.csv")
    assert np.abs(table[list(stage.PROB_COLUMNS)].to_numpy() - staged.probs).max() <= 1e-5
    # what yasa.Hypnogram(values, proba=…) checks (YASA 0.7+): stage letters it accepts, proba columns among its
    # labels (WAKE, N1, N2, N3, REM: not W or R) and rows summing to 1
    proba = table.filter(like="p_").set_axis(["WAKE", "N1", "N2", "N3", "REM"], axis=1)
    assert set(table["stage"]) <= {"W", "N1", "N2", "N3", "R"} and np.allclose(proba.sum(axis=1), 1, rtol=0, atol=1e-12)


@pytest.mark.parametrize("flags", [["--export", "luna,xml,txt,edf"], ["--export", "txt", "--edf-annotations"]])
def test_every_export_reads_back_as_the_predicted_stages(tmp_path, tiny_probe_run, psg_writer, flags):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    out = tmp_path / "out"
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--out", str(out), "--device", "cpu", *flags]) == 0
    codes = [AASM_LETTERS.index(letter) for letter in pd.read_csv(out / "night.hypnogram.csv")["stage"]]
    assert len(codes) == SECONDS // 30 and len(set(codes)) > 1                # several runs of stages to write
    exported = sorted(out.glob("night.stages.*"))
    assert [p.suffix for p in exported] == ([".annot", ".edf", ".txt", ".xml"] if "luna,xml,txt,edf" in flags
                                            else [".edf", ".txt"])
    formats = {".annot": "luna-annot", ".edf": "edf+", ".txt": "text", ".xml": "nsrr-xml"}
    for path in exported:
        hypnogram = read_hypnogram(path, edf_start=psg_writer.start)         # the format detected from the file
        assert hypnogram.format == formats[path.suffix] and hypnogram.stages.tolist() == codes, path.name
        # and as the labels of `python -m prepare edf night.edf --annotations <export>`
        night = Night(dataset="edf", night_id="night", subject="s", visit="1", edf=edf, annotations=[path])
        assert prepare_night(night, CHANNELS, Options())[1].tolist() == codes, path.name
    header, annotations = edf_format.read_annotations(out / "night.stages.edf")
    assert header.start == psg_writer.start and annotations[0][2].startswith("Sleep stage ")


def test_export_without_a_start_time(tmp_path):
    stages = np.array([0, 0, 1, 2, 2, 2, 3, 4, 4, 0])
    for fmt, suffix in annotations.EXPORTS.items():
        path = tmp_path / f"n{suffix}"
        annotations.write_stages(path, fmt, stages, start_time=None)
        assert read_hypnogram(path).stages.tolist() == stages.tolist(), fmt
    assert (tmp_path / "n.stages.txt").read_text() == "W\nW\nN1\nN2\nN2\nN2\nN3\nR\nR\nW\n"
    with pytest.raises(SystemExit):
        predict.parse_args(["x.edf", "--run", "r", "--export", "csv"])


def test_batch_summary_one_row_per_night(tmp_path, tiny_probe_run, psg_writer, capsys):
    good = psg_writer(tmp_path / "good.edf", 6 * 60)
    no_eeg = psg_writer(tmp_path / "no_eeg.edf", 6 * 60, seed=1, drop=("C4-M1",))
    no_thorax = psg_writer(tmp_path / "no_thorax.edf", 6 * 60, seed=2, drop=("Thorax",))
    out = tmp_path / "out"
    assert predict.main([str(good), str(no_eeg), str(no_thorax), "--run", str(tiny_probe_run), "--out", str(out),
                         "--device", "cpu"]) == 0
    summary = pd.read_csv(out / "summary.csv", dtype={"absent_slots": str, "warnings": str, "reason": str},
                          keep_default_na=False)
    assert summary["night"].tolist() == ["good", "no_eeg", "no_thorax"]
    assert summary["file"].tolist() == [str(good), str(no_eeg), str(no_thorax)]
    assert summary["status"].tolist() == ["ok", "failed", "ok"]
    assert summary["reason"][1].startswith("no EEG among the EDF's labels") and summary["reason"][0] == ""
    assert summary["absent_slots"].tolist() == ["", "", "THOR"] and "THOR 0.64" in summary["warnings"][2]
    stats = json.loads((out / "good.stats.json").read_text())
    assert float(summary["TST_min"][0]) == stats["TST_min"]
    assert float(summary["stage_min_N2"][0]) == stats["stage_min"]["N2"]
    assert summary["TST_min"][1] == "" and summary["absent_slots"][1] == ""   # a failed night has no statistics
    assert "summary: " in capsys.readouterr().out
    # without --out, next to the EDFs
    assert predict.main([str(good), "--run", str(tiny_probe_run), "--device", "cpu"]) == 0
    assert pd.read_csv(tmp_path / "summary.csv")["night"].tolist() == ["good"]


def test_embeddings_file(tmp_path, tiny_probe_run, psg_writer, capsys):
    edf = psg_writer(tmp_path / "night.edf", SECONDS)
    assert predict.main([str(edf), "--run", str(tiny_probe_run), "--embeddings", "--device", "cpu"]) == 0
    saved = np.load(tmp_path / "night.embeddings.npy")                       # plain numpy
    assert saved.dtype == np.float16 and saved.shape == (SECONDS // 30, 7, 16)   # [E, C, d_model]
    assert np.allclose(saved, stage.embed_edf(edf, tiny_probe_run), rtol=1e-3, atol=1e-3)
    with pytest.raises(SystemExit):
        predict.parse_args(["--help"])
    assert "float16 [epochs, 7 slots, d_model]" in " ".join(capsys.readouterr().out.split())
