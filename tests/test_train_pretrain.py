"""train_pretrain.py: the loss falls, DDP (2 gloo processes) equals one process, kill + resume equals no kill, and
channel dropout zeroes whole channels of what the model sees."""
import os
import socket
import subprocess
import sys

import pytest
import torch

import runs
import train_pretrain

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "32", "--model.d_ff", "64",
         "--model.max_patches", "300", "--data.window_s", "1800", "--data.stride_s", "1800",
         "--data.num_workers", "0", "--data.val_split", "train", "--train.log_every", "1"]


def run_args(nights, run, *extra, run_flag="--run"):
    return [*SMALL, "--data.root", str(nights), run_flag, str(run), *map(str, extra)]


def weights(run):
    return runs.read_run(run).checkpoint["model"]


def test_loss_falls_and_run_folder_is_complete(shhs_nights, tmp_path):
    run = tmp_path / "run"
    train_pretrain.main(run_args(shhs_nights, run, "--train.max_steps", "24", "--train.batch_size", "4",
                                 "--train.max_lr", "0.003", "--train.eval_every", "24"))
    losses = [m["loss"] for m in runs.read_metrics(run) if "loss" in m]
    assert len(losses) == 24 and min(losses[-3:]) < 0.6 * losses[0], losses
    assert {"config.yaml", "metrics.jsonl", "ckpt.pt", "ckpt_final.pt"} <= {p.name for p in run.iterdir()}
    assert "val_loss" in runs.read_metrics(run)[-1]
    ckpt = runs.read_run(run).checkpoint
    assert ckpt["step"] == 24 and ckpt["config"]["model"]["d_model"] == 32
    encoder = runs.read_run(run).encoder()
    assert not encoder.training and encoder.embed(torch.randn(1, 7, 1800 * 125)).shape == (1, 7, 300, 32)


def test_two_gloo_processes_equal_one_process(shhs_nights, tmp_path):
    deterministic = ["--model.dropout", "0", "--pretrain.p_zero", "0", "--pretrain.p_jitter", "0",
                     "--train.max_steps", "3", "--train.grad_accum", "2"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:                  # a free port: a fixed one can be held by another job
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "train_pretrain.py", *run_args(shhs_nights, tmp_path / "ddp", *deterministic,
                                                         "--train.batch_size", "1", run_flag="--run-dir")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train_pretrain.main(run_args(shhs_nights, tmp_path / "one", *deterministic, "--train.batch_size", "2"))
    # Same global batch, same data order, synchronised BatchNorm: the same loss and gradient norm at every step...
    for single, pair in zip(runs.read_metrics(tmp_path / "one"), runs.read_metrics(tmp_path / "ddp"), strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in single:
                assert pair[key] == pytest.approx(single[key], rel=1e-4), (key, single, pair)
    # ...and the same parameters, up to float rounding that Adam's normalisation can blow up to ~lr for
    # parameters whose gradient is ~0 (3 steps at lr <= 1.4e-3).
    one, two = weights(tmp_path / "one"), weights(tmp_path / "ddp")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key].double(), two[key].double(), atol=3e-3), key
    assert runs.read_run(tmp_path / "ddp").checkpoint["step"] == 3


def test_killed_run_resumes_to_the_same_parameters(shhs_nights, tmp_path, kill_and_resume):
    steps = ["--train.max_steps", "8", "--train.ckpt_every", "2", "--train.batch_size", "2"]
    kill_and_resume("train_pretrain.py", train_pretrain.main, lambda run: run_args(shhs_nights, run, *steps),
                    tmp_path, 8)


def test_channel_dropout_zeroes_whole_channels_of_the_training_input(shhs_nights, tmp_path, training_inputs):
    """The same seed and first batch with and without train.channel_dropout: with it, the model is given some channels
    zeroed and marked absent, and every other channel unchanged. A dropout that does nothing fails here."""
    seen = {}
    for p in (0.0, 0.5):
        seen[p] = training_inputs(train_pretrain, "Pretrainer")
        train_pretrain.main(run_args(shhs_nights, tmp_path / f"p{p}", "--train.max_steps", "1",
                                     "--train.batch_size", "4", "--train.channel_dropout", p))
    (plain, _, plain_present), (signals, _, present) = seen[0.0][0], seen[0.5][0]
    assert plain_present.all() and (plain != 0).any(dim=-1).all()      # every channel of every window is there
    assert not present.all() and present.any(dim=1).all()              # some channels dropped, never a whole window
    assert not signals[~present].any()                                 # a dropped channel is all zeros...
    assert torch.equal(signals[present], plain[present])               # ...and the others are what they were
    assert runs.read_run(tmp_path / "p0.5").config["train"]["channel_dropout"] == 0.5
    assert runs.read_metrics(tmp_path / "p0.5")[0]["loss"] != runs.read_metrics(tmp_path / "p0.0")[0]["loss"]


def test_upstream_schedule_and_best_checkpoint(shhs_nights, tmp_path):
    """train.schedule upstream: the LR of every step equals a OneCycleLR built with upstream's arguments
    (epochs, steps_per_epoch = training windows // batch size) and stepped once per optimiser step. train.keep_best:
    ckpt_best.pt holds the step of the lowest val_loss, and it is what read_run gives."""
    run = tmp_path / "run"
    train_pretrain.main(run_args(shhs_nights, run, "--train.max_steps", "5", "--train.batch_size", "2",
                                 "--train.grad_accum", "2", "--train.epochs", "4", "--train.schedule", "upstream",
                                 "--train.keep_best", "true", "--train.eval_every", "1"))
    n_windows = 12                                     # 6 one-hour nights in 30-min windows
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=0.003 / 25)
    upstream = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=0.003, epochs=4, steps_per_epoch=n_windows // 2)
    expected = []
    for _ in range(5):
        optimizer.step()
        upstream.step()
        expected.append(upstream.get_last_lr()[0])
    logged = [m["lr"] for m in runs.read_metrics(run) if "lr" in m]
    assert logged == pytest.approx(expected, rel=1e-12)
    # the cycle is sized in micro-batches (4 epochs × 12 // 2 = 24) while 4 epochs are 12 optimiser steps: the run
    # could only ever traverse 1 / grad_accum of it (1/16 with the paper's 8 × 2 processes)
    assert runs.load_checkpoint(run / runs.FINAL, "cpu")["scheduler"]["total_steps"] == 24
    val = {m["step"]: m["val_loss"] for m in runs.read_metrics(run) if "val_loss" in m}
    best_step = min(val, key=val.get)
    assert runs.read_run(run).checkpoint["step"] == best_step
    assert runs.load_checkpoint(run / runs.BEST, "cpu")["best"] == pytest.approx(val[best_step])


def test_masked_epochs_take_no_part_in_the_pretraining_loss(shhs_nights):
    """data.mask_epochs: an unscored epoch inside a window is padding, so what it holds cannot move the loss."""
    from data import NightDataset
    from model import ModelConfig, Pretrainer
    stores = sorted(shhs_nights.glob("*/*.zarr"))
    windows = NightDataset(stores, window_s=1800, mask_epochs="unscored")
    item = next(windows[i] for i in range(len(windows))
                if windows[i]["padded_epochs"][:-1].any() and not windows[i]["padded_epochs"][-1])
    model = Pretrainer(ModelConfig(d_model=16, n_heads=2, n_layers=1, d_ff=32, max_patches=300, revin_stats="valid"))
    signals = item["signals"].float()                                                    # [7, L], as training casts
    scrambled = signals.clone()
    scrambled[:, item["padding_mask"]] = torch.randn(7, int(item["padding_mask"].sum())) * 500   # [7, masked samples]

    def loss(signals, padding_mask):
        torch.manual_seed(0)                                                             # the same corruption draws
        return model(signals[None], padding_mask[None]).item()
    masked_change = abs(loss(scrambled, item["padding_mask"]) - loss(signals, item["padding_mask"]))
    unmasked = torch.zeros_like(item["padding_mask"])
    unmasked_change = abs(loss(scrambled, unmasked) - loss(signals, unmasked))
    assert masked_change < 1e-5 and unmasked_change > 1e-4, (masked_change, unmasked_change)
