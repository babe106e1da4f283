"""The upstream recipe (configs/*_upstream.yaml) against upstream's code (benmfox/PFTSleep @31f33c1, docs/reproduce.md
"Paper text vs upstream code"): every switch set as the table says, and the switches of data.py and runs.py against hand-computed
values: gradient clipping, the label lag of upstream's hypnogram reader, the exclusions, WSC's EEG."""
from pathlib import Path

import numpy as np
import pytest
import torch

import config
import runs
import training
import train_pretrain
import train_probe
from data import NightDataset, upstream_label_lag
from prepare import store
from prepare.night import make_options

ROOT = Path(__file__).resolve().parents[1]
EPOCH = 3750


def load(script, name: str):
    return config.load(script.Config, ROOT / "configs" / name)


def test_the_upstream_configs_set_what_upstream_ran():
    """One assertion per row of the table in docs/reproduce.md (upstream file:line in the config's comments)."""
    pretrain, probe = load(train_pretrain, "pretrain_upstream.yaml"), load(train_probe, "probe_upstream.yaml")
    for cfg in (pretrain, probe):
        t, d = cfg.train, cfg.data
        assert (t.schedule, t.keep_best, t.grad_clip, t.bf16, t.matmul_precision) == ("upstream", True, 1.0, False,
                                                                                    "medium")
        assert (d.mask_epochs, d.label_lag, d.complete_only, d.first_window_only, d.mesa_holdout) == (
            "upstream", "upstream", True, True, 100)
        assert d.split_fractions == [0.49, 0.21, 0.30] and d.window_s == 28800
    assert pretrain.data.datasets == ["shhs", "wsc", "mros:1", "mesa"] and pretrain.train.evals_per_epoch == 1
    assert (pretrain.train.max_lr, pretrain.train.weight_decay, pretrain.train.epochs) == (0.01, 1e-4, 100)
    t = probe.train
    assert probe.data.datasets == ["shhs"] and probe.data.resplit_seed == 126
    assert (t.focal_form, t.loss_trim_wake, t.trim_validation, t.cutmix_on, t.cutmix_p, t.cache_embeddings,
            t.evals_per_epoch) == ("upstream", "upstream", True, "signals", 0.5, False, 2)
    assert (t.max_lr, t.weight_decay, t.epochs, t.batch_size, t.grad_accum) == (0.01, 1e-3, 30, 4, 8)


def test_the_paper_configs_name_the_source_of_every_value():
    for name in ("pretrain_paper.yaml", "probe_paper.yaml"):
        for line in (ROOT / "configs" / name).read_text().splitlines():
            key, _, value = line.partition(":")
            if line.startswith("  ") and value.strip() and key.strip() not in ("root", "train_split", "val_split",
                                                                               "num_workers", "recipe", "log_every",
                                                                               "ckpt_every"):
                assert any(source in line for source in ("# abstract", "# upstream", "# ours")), (name, line)


def test_gradient_clipping_scales_the_total_norm_to_the_limit():
    """Gradients (3, 4) have norm 5; clipped to 1 they are (0.6, 0.8): one SGD step of lr 1 moves the weights by that."""
    weights = torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.SGD([weights], lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    weights.grad = torch.tensor([3.0, 4.0])
    norm = training.optimizer_step([weights], optimizer, scheduler, 1.0, runs.new_progress(), 20)
    assert norm.item() == pytest.approx(5.0)
    assert weights.detach().tolist() == pytest.approx([-0.6, -0.8])


def write_store(path: Path, dataset: str, stages, present=(True,) * 7, nan_samples=None) -> Path:
    stages = np.asarray(stages, np.int8)
    signals = np.random.default_rng(0).normal(size=(7, len(stages) * EPOCH)).astype(np.float16)
    store.write_night(path, signals, stages, {"dataset": dataset, "present": list(present),
                                              "nan_samples": nan_samples or {}})
    return path


def test_label_lag_upstream_reads_mros_wsc_apples_one_epoch_late_with_epoch_0_n1(tmp_path):
    """sl:250 reads the CSV's header as a first stage 1: epoch 0 is N1, epoch k the true epoch k − 1 (the last one
    falls off); SHHS is read as it is."""
    truth = [0, 0, 2, 2, 3, 4, -1, 2]
    stores = [write_store(tmp_path / f"{name}.zarr", name, truth) for name in ("mros", "wsc", "apples", "shhs")]
    lagged = NightDataset(stores, window_s=len(truth) * 30, label_lag="upstream")
    for night in range(3):
        assert lagged.night_stages[night].tolist() == [1, 0, 0, 2, 2, 3, 4, -1]
    assert lagged.night_stages[3].tolist() == truth
    assert NightDataset(stores, window_s=len(truth) * 30).night_stages[0].tolist() == truth      # the default: none
    assert upstream_label_lag(np.array([4], np.int8)).tolist() == [1]
    assert lagged.stages_of(0).tolist() == [1, 0, 0, 2, 2, 3, 4, -1]                              # what training sees


def test_complete_only_leaves_out_nights_lacking_a_channel_or_with_nan_filled(tmp_path):
    whole = write_store(tmp_path / "whole.zarr", "shhs", [0, 2, 2])
    no_eeg = write_store(tmp_path / "no_eeg.zarr", "shhs", [0, 2, 2], present=(True,) * 3 + (False,) + (True,) * 3)
    nan = write_store(tmp_path / "nan.zarr", "shhs", [0, 2, 2], nan_samples={"ECG": 0, "EEG": 12})
    kept = NightDataset([no_eeg, whole, nan], window_s=90, complete_only=True)
    assert kept.stores == [whole] and kept.left_out == [no_eeg, nan] and len(kept) == 1
    assert NightDataset([no_eeg, whole, nan], window_s=90).stores == [no_eeg, whole, nan]


def test_the_wsc_channel_map_picks_c3_m2_as_upstream():
    """A WSC night with both C4_M1 and C3_M2: our table takes C4_M1, configs/channels_wsc_upstream.yaml C3_M2."""
    from prepare import signals
    from prepare.wsc import CHANNELS
    labels = ["ECG", "E1", "chin", "C4_M1", "C3_M2", "spo2", "thorax", "abdomen"]
    upstream_map = make_options(ROOT / "configs" / "channels_wsc_upstream.yaml").channel_map
    assert signals.resolve(labels, CHANNELS)["EEG"] == ("C4_M1", None)
    assert signals.resolve(labels, CHANNELS, upstream_map)["EEG"] == ("C3_M2", None)
    assert signals.resolve(labels, CHANNELS, upstream_map)["EOG"] == signals.resolve(labels, CHANNELS)["EOG"]
