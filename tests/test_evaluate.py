"""evaluate.py: every metric against an independent reference on hand-made cases, the bootstrap, and the CLI end to end
on a tiny random probe run and three tiny night stores."""
import itertools
import json

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

import evaluate as ev
import metrics
import runs
import stage
from model import ModelConfig, ProbeConfig
from prepare import store

EPOCH = 3750


# ----------------------------------------------------------------------------------------------------------------------
# Metrics


def test_kappa_textbook_examples():
    # the classic 2×2 example: p_o = 35/50 = 0.7, p_e = (25·30 + 25·20)/50² = 0.5, κ = (0.7 − 0.5)/(1 − 0.5) = 0.4
    assert metrics.kappa(np.array([[20, 5], [10, 15]])) == pytest.approx(0.4)
    # 3×3 by hand: n = 100, p_o = 0.70, rows (40, 30, 30), columns (45, 30, 25),
    # p_e = (40·45 + 30·30 + 30·25)/100² = 0.345, κ = (0.70 − 0.345)/(1 − 0.345) = 0.355/0.655
    cm = np.array([[30, 5, 5], [10, 20, 0], [5, 5, 20]])
    assert metrics.kappa(cm) == pytest.approx(0.355 / 0.655)
    assert metrics.accuracy(cm) == pytest.approx(0.70)
    assert metrics.kappa(np.eye(5) * 7) == pytest.approx(1.0)
    assert np.isnan(metrics.kappa(np.diag([9, 0, 0, 0, 0])))               # p_e = 1: undefined


def test_confusion_matrix_rows_are_truth_and_unscored_epochs_are_dropped():
    true = np.array([0, 0, 1, 2, 4, -1, -1, 3])
    pred = np.array([0, 1, 1, 2, 2, 4, 0, 3])
    cm = metrics.confusion_matrix(true, pred)
    expected = np.zeros((5, 5), int)
    for t, p in zip(true, pred):
        if t >= 0:
            expected[t, p] += 1
    assert cm.tolist() == expected.tolist() and cm.sum() == 6 and cm[0, 1] == 1


def test_f1_per_class_and_macro():
    true = np.array([0, 0, 0, 1, 1, 2, 2, 2, 2, 4, -1])
    pred = np.array([0, 0, 1, 1, 2, 2, 2, 2, 0, 1, 3])                # class 3 only in an unscored epoch
    scored = true >= 0
    reference = []
    for k in range(5):
        tp = np.sum((true == k) & (pred == k) & scored)
        fp = np.sum((true != k) & (pred == k) & scored)
        fn = np.sum((true == k) & (pred != k) & scored)
        precision = tp / (tp + fp) if tp + fp else 0.0
        recall = tp / (tp + fn) if tp + fn else 0.0
        reference.append(2 * precision * recall / (precision + recall) if precision + recall else
                         (np.nan if tp + fp + fn == 0 else 0.0))
    f1 = metrics.f1_per_class(metrics.confusion_matrix(true, pred))
    # W: tp 2 fp 1 fn 1 → 2/3; N1: tp 1 fp 2 fn 1 → 0.4; N2: tp 3 fp 1 fn 1 → 0.75; N3 absent → NaN; REM: tp 0 → 0
    assert np.allclose(f1, [2 / 3, 0.4, 0.75, np.nan, 0.0], equal_nan=True)
    assert np.allclose(f1, reference, equal_nan=True)
    # macro: mean over the classes present in truth or prediction (W, N1, N2, REM), N3 left out
    assert metrics.macro_f1(metrics.confusion_matrix(true, pred)) == pytest.approx((2 / 3 + 0.4 + 0.75 + 0.0) / 4)


def brute_force_auroc(scores, positive):
    pos, neg = scores[positive], scores[~positive]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


def brute_force_average_precision(scores, positive):
    total, previous_recall = 0.0, 0.0
    for t in sorted(set(scores), reverse=True):
        chosen = scores >= t
        precision = (chosen & positive).sum() / chosen.sum()
        recall = (chosen & positive).sum() / positive.sum()
        total += (recall - previous_recall) * precision
        previous_recall = recall
    return total


def test_auroc_and_auprc_with_ties_match_brute_force():
    rng = np.random.default_rng(1)
    for _ in range(20):
        n = rng.integers(5, 40)
        scores = rng.integers(0, 6, n) / 5                             # few distinct values: many ties
        positive = rng.random(n) < 0.4
        if positive.all() or not positive.any():
            continue
        assert metrics.auroc(scores, positive) == pytest.approx(brute_force_auroc(scores, positive))
        assert metrics.average_precision(scores, positive) == pytest.approx(brute_force_average_precision(scores, positive))
    # by hand: positives 0.8, 0.4; negatives 0.4, 0.1 → pairs: 1, 1, ½ (tie), 1 → 3.5/4
    scores, positive = np.array([0.8, 0.4, 0.4, 0.1]), np.array([True, True, False, False])
    assert metrics.auroc(scores, positive) == pytest.approx(0.875)
    # thresholds 0.8: P 1, R ½; 0.4: P ⅔, R 1; 0.1: R unchanged → ½·1 + ½·⅔
    assert metrics.average_precision(scores, positive) == pytest.approx(0.5 + 1 / 3)
    assert np.isnan(metrics.auroc(scores, np.zeros(4, bool))) and np.isnan(metrics.average_precision(scores, np.zeros(4, bool)))


def test_bootstrap_is_seeded_and_brackets_the_pooled_value():
    rng = np.random.default_rng(0)
    night_cms = np.stack([metrics.confusion_matrix(t, np.where(rng.random(50) < 0.7, t, rng.integers(0, 5, 50)))
                          for t in rng.integers(0, 5, (12, 50))])        # 12 nights of 50 epochs, ~75 % agreement
    a, b = metrics.bootstrap_ci(night_cms, 200, seed=0), metrics.bootstrap_ci(night_cms, 200, seed=0)
    c = metrics.bootstrap_ci(night_cms, 200, seed=1)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["kappa"], c["kappa"])
    pooled = metrics.kappa(night_cms.sum(0))
    assert a["kappa"][0] < pooled < a["kappa"][1] and a["f1_per_class"].shape == (5, 2)
    # one resample by hand: nights picked (0, 0, 3, …) pool to the sum of their matrices
    picks = np.random.default_rng(0).integers(0, 12, size=(200, 12))
    kappas = [metrics.kappa(night_cms[p].sum(0)) for p in picks]
    assert np.allclose(a["kappa"], np.percentile(kappas, [2.5, 97.5]))


# ----------------------------------------------------------------------------------------------------------------------
# The CLI end to end


def make_night(root, dataset, name, n_epochs, seed):
    rng = np.random.default_rng(seed)
    signals = rng.normal(0, 20, (7, n_epochs * EPOCH)).astype(np.float16)              # [7, T]
    stages = rng.integers(0, 5, n_epochs).astype(np.int8)                               # [T // 3750]
    stages[[0, n_epochs // 2]] = -1                                                     # unscored epochs
    attrs = {"night_id": name, "dataset": dataset, "subject": name, "visit": "1", "fs": 125, "epoch_s": 30,
             "duration_s": n_epochs * 30, "n_scored": int((stages >= 0).sum()), "channels": list("ABCDEFG"),
             "present": [True] * 7}
    store.write_night(store.store_path(root, dataset, name), signals, stages, attrs)


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory, probe_run_writer):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)        # a tiny GRU on several threads of a busy machine can be 50× slower than on one
    tmp = tmp_path_factory.mktemp("eval")
    root, run, out = tmp / "nights", tmp / "run", tmp / "out"
    make_night(root, "shhs", "shhs1-0001", 30, seed=1)        # two stitched 20-epoch windows (starts 0 and 10)
    make_night(root, "shhs", "shhs1-0002", 12, seed=2)        # one padded window
    make_night(root, "mesa", "mesa-0003", 25, seed=3)
    store.write_manifest(root)
    probe_run_writer(run, ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=120),
                     ProbeConfig(d_model=16, hidden_size=8, n_layers=1, dropout=0.0),
                     {"root": str(root), "datasets": None, "window_s": 20 * 30.0, "stride_s": None})
    results = ev.main(["--run", str(run), "--split", "all", "--bootstrap", "50", "--png-nights", "2",
                       "--out", str(out)])
    yield root, run, out, results
    torch.set_num_threads(threads)


def test_cli_writes_the_contract_files(evaluated):
    root, run, out, results = evaluated
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == results and set(on_disk) == {"pooled", "datasets", "settings", "skipped"}
    assert on_disk["skipped"] == []
    assert set(on_disk["datasets"]) == {"shhs", "mesa"} and on_disk["settings"] == {"protocol": "night", "label_lag": 0}
    keys = {"kappa", "accuracy", "macro_f1", "f1_per_class", "auroc", "auprc", "confusion", "n_nights", "n_epochs",
            "kappa_ci", "accuracy_ci", "macro_f1_ci"}
    for group in [on_disk["pooled"], *on_disk["datasets"].values()]:
        assert keys <= set(group) and len(group["kappa_ci"]) == 2 and np.array(group["confusion"]).shape == (5, 5)
    assert on_disk["pooled"]["n_nights"] == 3 and on_disk["datasets"]["shhs"]["n_nights"] == 2
    assert on_disk["pooled"]["n_epochs"] == 30 + 12 + 25 - 6

    per_night = pd.read_csv(out / "per_night.csv")
    assert list(per_night.columns) == ["night_id", "dataset", "n_epochs", "kappa", "accuracy", "macro_f1"]
    assert sorted(per_night["n_epochs"]) == [10, 23, 28]
    report = (out / "results.md").read_text()
    assert "0.60" in report and "Fox et al. 2025" in report          # MESA's paper κ beside ours
    assert ("Protocol `night`: every night staged whole: windows of 600 s back to back from its start, the fewest "
            "of equal length" in report)
    assert "Label lag: none" in report and "recipe: not recorded" in report
    for name in ["confusion.png", "bland_altman.png", "hypnogram_mesa-0003.png", "hypnogram_shhs1-0001.png"]:
        assert (out / name).stat().st_size > 0


def test_predictions_csv_reproduces_the_metrics(evaluated):
    root, run, out, results = evaluated
    predictions = pd.read_csv(out / "predictions.csv", dtype={"night_id": str})
    assert list(predictions.columns) == ["night_id", "dataset", "epoch", "true", "pred",
                                         "p_W", "p_N1", "p_N2", "p_N3", "p_REM"]
    assert len(predictions) == results["pooled"]["n_epochs"] and (predictions["true"] >= 0).all()
    # exactly the scored epochs of each night, each once
    manifest = pd.read_csv(root / "manifest.csv")
    assert predictions.groupby("night_id").size().to_dict() == dict(zip(manifest["night_id"], manifest["n_scored"]))
    assert not predictions.duplicated(["night_id", "epoch"]).any()
    probs = predictions[["p_W", "p_N1", "p_N2", "p_N3", "p_REM"]].to_numpy()
    assert np.allclose(probs.sum(1), 1, atol=1e-4) and (probs.argmax(1) == predictions["pred"]).all()
    # κ by the textbook formula from the CSV alone
    t, p = predictions["true"].to_numpy(), predictions["pred"].to_numpy()
    p_o = np.mean(t == p)
    p_e = sum(np.mean(t == k) * np.mean(p == k) for k in range(5))
    assert (p_o - p_e) / (1 - p_e) == pytest.approx(results["pooled"]["kappa"])
    assert results["pooled"]["auroc"]["W"] == pytest.approx(brute_force_auroc(probs[:, 0], t == 0), abs=1e-5)


def test_sleep_statistics_agreement_block(evaluated):
    """results.json's agreement (pooled and per dataset) is Bland–Altman over the nights' statistics, each night's
    statistics computed on the technologist's scored epochs only; sleep_statistics.csv holds them per night."""
    root, run, out, results = evaluated
    keys = {"TST_min", "SE_pct", "WASO_min", "SOL_min", "REM_latency_from_onset_min",
            "W_min", "N1_min", "N2_min", "N3_min", "R_min"}
    for group in [results["pooled"], *results["datasets"].values()]:
        assert set(group["agreement"]) == keys
        for a in group["agreement"].values():
            assert set(a) == {"n", "bias", "sd", "loa", "mean_reference", "mean_observed"} and len(a["loa"]) == 2
    table = pd.read_csv(out / "sleep_statistics.csv", dtype={"night_id": str}).set_index("night_id")
    assert len(table) == 3 and {f"{k}_{side}" for k in keys for side in ("true", "pred")} <= set(table.columns)
    # TST by hand from predictions.csv (its rows are exactly the scored epochs): sleep epochs × 0.5 min
    predictions = pd.read_csv(out / "predictions.csv", dtype={"night_id": str})
    by_night = predictions.groupby("night_id")
    tst_true, tst_pred = (by_night.apply(lambda n, c=c: 0.5 * (n[c] > 0).sum()) for c in ("true", "pred"))
    assert np.allclose(table.loc[tst_true.index, "TST_min_true"], tst_true)
    assert np.allclose(table.loc[tst_pred.index, "TST_min_pred"], tst_pred)
    differences = (tst_pred - tst_true).to_numpy()
    tst = results["pooled"]["agreement"]["TST_min"]
    assert tst["n"] == 3 and tst["bias"] == pytest.approx(differences.mean())
    assert tst["loa"] == pytest.approx([differences.mean() - 1.96 * differences.std(ddof=1),
                                       differences.mean() + 1.96 * differences.std(ddof=1)])
    # SE over the whole recording (TIB = every epoch, unscored ones included)
    manifest = pd.read_csv(root / "manifest.csv", dtype={"night_id": str}).set_index("night_id")
    tib = 0.5 * manifest.loc[table.index, "n_epochs"]
    assert np.allclose(table["SE_pct_pred"], 100 * table["TST_min_pred"] / tib)
    shhs = results["datasets"]["shhs"]["agreement"]["W_min"]
    w_diff = (table["W_min_pred"] - table["W_min_true"])[["shhs1-0001", "shhs1-0002"]]
    assert shhs["n"] == 2 and shhs["bias"] == pytest.approx(w_diff.mean())
    report = (out / "results.md").read_text()
    assert "95 % limits of agreement" in report and "| TST_min | 3 |" in report
    assert (out / "bland_altman.png").stat().st_size > 0


def test_stitched_probabilities_are_stage_night(evaluated):
    root, run, out, results = evaluated
    channels, stages, _ = store.read_night(root / "shhs" / "shhs1-0001.zarr")
    probs = stage.stage_night(runs.read_run(run).encoder(), runs.read_run(run).probe(), np.stack([np.asarray(c, np.float32) for c in channels]),
                        20 * EPOCH).numpy()
    predictions = pd.read_csv(out / "predictions.csv")
    night = predictions[predictions["night_id"] == "shhs1-0001"]
    assert np.allclose(night[["p_W", "p_N1", "p_N2", "p_N3", "p_REM"]].to_numpy(), probs[night["epoch"]], atol=1e-5)


def test_cli_refuses_a_non_probe_run_and_an_empty_selection(evaluated, tmp_path):
    root, run, out, results = evaluated
    pretrain = tmp_path / "pretrain"
    pretrain.mkdir()
    (pretrain / "config.yaml").write_text(yaml.safe_dump({"model": {}, "data": {}}))
    runs.save_checkpoint(pretrain / runs.FINAL, {"model": {}})                 # a pretraining run: no probe
    with pytest.raises(SystemExit) as error:
        ev.main(["--run", str(pretrain), "--out", str(tmp_path / "o")])
    assert str(error.value) == (f"evaluate.py: {pretrain} is a pretraining run (an encoder, no probe: section in its "
                                f"config.yaml): staging and embed_edf need a probe run, e.g. one trained on it with "
                                f"train_probe.py --encoder {pretrain}")
    with pytest.raises(SystemExit) as error:                               # the manifest holds shhs and mesa only
        ev.main(["--run", str(run), "--datasets", "apples", "--split", "all", "--out", str(tmp_path / "o")])
    assert str(error.value) == f"--datasets: no dataset 'apples' in {root / 'manifest.csv'} (its datasets: mesa, shhs)"


def test_absent_slot_is_zeroed_in_every_night(evaluated, tmp_path):
    root, run, out, results = evaluated
    absent = ev.main(["--run", str(run), "--split", "all", "--bootstrap", "0", "--absent", "eeg,ABDO",
                      "--png-nights", "0", "--out", str(tmp_path / "absent")])
    channels, _, _ = store.read_night(root / "shhs" / "shhs1-0001.zarr")
    signals = np.stack([np.asarray(c, np.float32) for c in channels])
    signals[[3, 6]] = 0                                                  # EEG and ABDO
    probs = stage.stage_night(runs.read_run(run).encoder(), runs.read_run(run).probe(), signals, 20 * EPOCH).numpy()
    predictions = pd.read_csv(tmp_path / "absent" / "predictions.csv")
    night = predictions[predictions["night_id"] == "shhs1-0001"]
    assert np.allclose(night[["p_W", "p_N1", "p_N2", "p_N3", "p_REM"]].to_numpy(), probs[night["epoch"]], atol=1e-5)
    assert absent["pooled"]["n_epochs"] == results["pooled"]["n_epochs"]
    assert "absent `EEG,ABDO`" in (tmp_path / "absent" / "results.md").read_text()
    with pytest.raises(SystemExit, match=r"--absent EYE: not a slot \(slots: ECG, EOG"):
        ev.main(["--run", str(run), "--absent", "eye", "--out", str(tmp_path / "o")])


# ----------------------------------------------------------------------------------------------------------------------
# Protocols and label lag


def night_predictions(folder, night_id):
    predictions = pd.read_csv(folder / "predictions.csv", dtype={"night_id": str})
    return predictions[predictions["night_id"] == night_id]


PROBS = ["p_W", "p_N1", "p_N2", "p_N3", "p_REM"]


def test_upstream_protocol_scores_one_window_from_the_start(evaluated, tmp_path):
    root, run, out, results = evaluated
    recorded = tmp_path / "run"                                            # the run with a recipe in its config
    recorded.mkdir()
    for name in ("ckpt_final.pt", "config.yaml"):
        (recorded / name).write_bytes((run / name).read_bytes())
    config = yaml.safe_load((run / "config.yaml").read_text())
    (recorded / "config.yaml").write_text(yaml.safe_dump({**config, "train": {"recipe": "as_run"}}))
    upstream = ev.main(["--run", str(recorded), "--split", "all", "--bootstrap", "0", "--protocol", "upstream",
                        "--png-nights", "0", "--out", str(tmp_path / "up")])
    window = 20                                                            # the run's window_s, in epochs
    expected_epochs = 0
    for night_id, dataset, n_epochs in [("shhs1-0001", "shhs", 30), ("mesa-0003", "mesa", 25), ("shhs1-0002", "shhs", 12)]:
        channels, stages, _ = store.read_night(root / dataset / f"{night_id}.zarr")
        # only epochs [0, window) are scored: the technologists' scored epochs among them, each once
        scored = np.flatnonzero(stages[:window] >= 0)
        expected_epochs += len(scored)
        night = night_predictions(tmp_path / "up", night_id)
        assert night["epoch"].tolist() == scored.tolist() and (night["true"] == stages[scored]).all()
        # the probabilities: one window over the night cropped to the window (zero-padded when shorter)
        cropped = np.stack([np.asarray(c[:window * EPOCH], np.float32) for c in channels])
        probs = stage.stage_night(runs.read_run(run).encoder(), runs.read_run(run).probe(), cropped, window * EPOCH, window * EPOCH).numpy()
        assert len(probs) == min(n_epochs, window)
        assert np.allclose(night[PROBS].to_numpy(), probs[night["epoch"]], atol=1e-5)
    assert upstream["pooled"]["n_epochs"] == expected_epochs == 18 + 18 + 10
    assert upstream["settings"] == {"protocol": "upstream", "label_lag": 0}
    per_night = pd.read_csv(tmp_path / "up" / "per_night.csv").set_index("night_id")["n_epochs"].to_dict()
    assert per_night == {"shhs1-0001": 18, "mesa-0003": 18, "shhs1-0002": 10}
    # a night shorter than the window: staged as under the night protocol
    short = night_predictions(tmp_path / "up", "shhs1-0002").reset_index(drop=True)
    pd.testing.assert_frame_equal(short, night_predictions(out, "shhs1-0002").reset_index(drop=True), atol=1e-6)
    # a longer one is not: under `night` its first window overlaps the second
    longer = night_predictions(tmp_path / "up", "shhs1-0001")[PROBS].to_numpy()
    assert not np.allclose(longer, night_predictions(out, "shhs1-0001")[PROBS].to_numpy()[:len(longer)], atol=1e-5)
    report = (tmp_path / "up" / "results.md").read_text()
    assert "Protocol `upstream`: only the first 600 s of each night" in report and "recipe: as_run" in report


def test_label_lag_shifts_the_truth_and_kappa_follows(evaluated, tmp_path):
    root, run, out, results = evaluated
    lagged = ev.main(["--run", str(run), "--split", "all", "--bootstrap", "0", "--label-lag", "1",
                      "--png-nights", "0", "--out", str(tmp_path / "lag1")])
    predictions = pd.read_csv(tmp_path / "lag1" / "predictions.csv", dtype={"night_id": str})
    for night_id, dataset in [("shhs1-0001", "shhs"), ("shhs1-0002", "shhs"), ("mesa-0003", "mesa")]:
        _, stages, _ = store.read_night(root / dataset / f"{night_id}.zarr")
        shifted = np.concatenate([[-1], stages[:-1]])                      # truth[e] = stages[e − 1]; epoch 0 unscored
        night = predictions[predictions["night_id"] == night_id]
        assert night["epoch"].tolist() == np.flatnonzero(shifted >= 0).tolist()
        assert night["true"].tolist() == shifted[night["epoch"]].tolist() and 0 not in night["epoch"].tolist()
        # the predictions themselves do not move (compared on the epochs scored in both runs)
        both = night.merge(night_predictions(out, night_id), on="epoch", suffixes=("", "_unlagged"))
        assert len(both) >= len(night) - 2
        assert np.allclose(both[PROBS].to_numpy(), both[[f"{c}_unlagged" for c in PROBS]].to_numpy(), atol=1e-6)
    t, p = predictions["true"].to_numpy(), predictions["pred"].to_numpy()
    p_o = np.mean(t == p)
    p_e = sum(np.mean(t == k) * np.mean(p == k) for k in range(5))
    assert (p_o - p_e) / (1 - p_e) == pytest.approx(lagged["pooled"]["kappa"])
    assert lagged["pooled"]["n_epochs"] == len(predictions) and lagged["settings"] == {"protocol": "night", "label_lag": 1}
    assert "Label lag: 1 epoch later (the first 1 of each night unscored)" in (tmp_path / "lag1" / "results.md").read_text()


def test_lag_labels_both_ways():
    stages = np.array([0, 1, 2, 3, 4, -1, 2], np.int8)
    assert ev.lag_labels(stages, 0).tolist() == stages.tolist()
    assert ev.lag_labels(stages, 2).tolist() == [-1, -1, 0, 1, 2, 3, 4]
    assert ev.lag_labels(stages, -1).tolist() == [1, 2, 3, 4, -1, 2, -1]
    assert ev.lag_labels(stages, 7).tolist() == [-1] * 7 and ev.lag_labels(stages, -9).tolist() == [-1] * 7


@pytest.mark.parametrize("flags, message", [
    (["--protocol", "whole"], r"--protocol whole: unknown \(protocols: night, upstream\)"),
    (["--protocol", "upstream", "--stride-s", "300"], "--stride-s does not apply to --protocol upstream"),
    (["--label-lag", "1.5"], "--label-lag 1.5: not a whole number of epochs"),
    (["--label-lag", "12"], r"--label-lag 12: \|K\| must be less than the shortest selected night \(shhs1-0002: 12 epochs\)"),
    (["--label-lag", "-12"], r"--label-lag -12: .*\(shhs1-0002: 12 epochs\)"),
    (["--protocol", "upstream", "--window-s", "300", "--label-lag", "10"],
     r"--label-lag 10: .*\((shhs1-0001|mesa-0003|shhs1-0002): 10 epochs in the window\)"),
])
def test_bad_protocol_and_label_lag_are_one_line_errors(evaluated, tmp_path, flags, message):
    root, run, out, results = evaluated
    with pytest.raises(SystemExit, match=message) as error:
        ev.main(["--run", str(run), "--split", "all", "--out", str(tmp_path / "o"), *flags])
    assert "\n" not in str(error.value) and not (tmp_path / "o").exists()


def test_a_night_store_deleted_since_the_manifest_is_skipped_and_listed(evaluated, tmp_path, capsys):
    """The batch rule: a night that cannot be read is one line naming it and its store, the others are scored, and
    results.json, results.md and the last printed lines list what was skipped; nothing left: one line, no output."""
    import shutil
    root, run, out, results = evaluated
    copy = tmp_path / "nights"
    shutil.copytree(root, copy)
    shutil.rmtree(copy / "shhs" / "shhs1-0002.zarr")
    base = ["--run", str(run), "--data.root", str(copy), "--split", "all", "--bootstrap", "0", "--png-nights", "0"]
    capsys.readouterr()
    partial = ev.main([*base, "--out", str(tmp_path / "partial")])
    reason = (f"{copy / 'shhs' / 'shhs1-0002.zarr'}: night store not found (manifest.csv lists it: deleted or moved "
              f"since; prepare the night again)")
    printed = capsys.readouterr()
    assert f"skipped shhs1-0002: {reason}" in printed.err.splitlines()
    assert printed.out.rstrip().splitlines()[-1] == f"  skipped shhs1-0002: {reason}"
    assert partial["skipped"] == [{"night_id": "shhs1-0002", "dataset": "shhs",
                                   "path": str(copy / "shhs" / "shhs1-0002.zarr"), "reason": reason}]
    assert partial["pooled"]["n_nights"] == 2 and partial["datasets"]["shhs"]["n_nights"] == 1
    assert json.loads((tmp_path / "partial" / "results.json").read_text())["skipped"] == partial["skipped"]
    assert sorted(pd.read_csv(tmp_path / "partial" / "per_night.csv")["night_id"]) == ["mesa-0003", "shhs1-0001"]
    assert f"- shhs1-0002: {reason}" in (tmp_path / "partial" / "results.md").read_text()
    for store_path in (copy / "shhs" / "shhs1-0001.zarr", copy / "mesa" / "mesa-0003.zarr"):
        shutil.rmtree(store_path)
    with pytest.raises(SystemExit) as error:
        ev.main([*base, "--out", str(tmp_path / "none")])
    assert str(error.value).startswith("evaluate.py: none of the 3 selected nights could be read; the first: ")
    assert "\n" not in str(error.value) and not (tmp_path / "none").exists()
