"""train_pretrain.py: the loss falls, DDP (2 gloo processes) equals one process, kill + resume equals no kill,
channel dropout zeroes whole channels of what the model sees; --resume with another config, a full disk at a
checkpoint and a mistyped dataset."""
import os
import socket
import subprocess
import sys
from types import SimpleNamespace

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


# ---------------------------------------------------------------------------------------------------------------------
# --resume with another config; a full disk at a checkpoint; a mistyped dataset


def test_resume_takes_the_new_plans_lr_and_weight_decay_and_keeps_the_moments():
    """training.resume with train.max_lr and weight_decay changed, the total unchanged: the optimiser's LR at the
    resumed step is the new schedule's (one_cycle for the new values, stepped as far), its weight decay the new one,
    and Adam's moments the checkpoint's. Unchanged, the checkpoint's scheduler is restored as it was."""
    import dataclasses

    import training

    def stepped(tc, steps):
        parameter = torch.nn.Parameter(torch.zeros(3))
        optimizer, scheduler = training.one_cycle([parameter], tc, 10, 100)
        for _ in range(steps):
            parameter.grad = torch.ones(3)
            optimizer.step()
            scheduler.step()
        return optimizer, scheduler

    old, new = train_pretrain.TrainConfig(max_lr=0.003), train_pretrain.TrainConfig(max_lr=0.001, weight_decay=1e-3)
    optimizer, scheduler = stepped(old, 4)
    ckpt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 4, "epoch": 0,
            "step_in_epoch": 4, "rng_cpu": [torch.get_rng_state()], "config": {"train": dataclasses.asdict(old)}}
    for tc in (new, old):
        resumed, resumed_scheduler = stepped(tc, 0)
        training.resume(ckpt, resumed, resumed_scheduler, 0, 1, 24, torch.device("cpu"))
        reference, _ = stepped(tc, 4)                         # the plan of `tc` from the start, 4 steps on
        group = resumed.param_groups[0]
        assert group["lr"] == pytest.approx(reference.param_groups[0]["lr"], rel=1e-12), tc.max_lr
        assert group["max_lr"] == tc.max_lr and group["weight_decay"] == tc.weight_decay
        moments = next(iter(resumed.state.values()))["exp_avg"]
        assert torch.equal(moments, next(iter(optimizer.state.values()))["exp_avg"])
    assert resumed_scheduler.state_dict() == scheduler.state_dict()          # unchanged plan: as it was


def test_a_resume_with_more_processes_and_less_accumulation_goes_on_from_the_same_window(capsys):
    """docs/gpu.md's way of adding GPUs: 2 processes × 3 × 8 resumed as 8 × 3 × 2, the global batch kept. The
    checkpoint stopped after 5 optimiser steps of its epoch (5 × 48 windows of the order used); the resumed run goes
    on at its step 5 too, i.e. from window 240."""
    import training
    old, new = train_pretrain.TrainConfig(batch_size=3, grad_accum=8), train_pretrain.TrainConfig(batch_size=3,
                                                                                                  grad_accum=2)
    optimizer, scheduler = training.one_cycle([torch.nn.Parameter(torch.zeros(1))], old, 10, 1000)
    ckpt = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "step": 5, "epoch": 0,
            "step_in_epoch": 5, "rng_cpu": [torch.get_rng_state()] * 2,
            "config": {"train": {"batch_size": 3, "grad_accum": 8}}}
    optimizer, scheduler = training.one_cycle([torch.nn.Parameter(torch.zeros(1))], new, 10, 1000)
    progress = training.resume(ckpt, optimizer, scheduler, 0, 8, 6, torch.device("cpu"))
    assert progress["step_in_epoch"] == 5
    assert "resumed on 8 processes a run written by 2: epoch 0 goes on from window 240" in capsys.readouterr().out


def test_a_resumed_run_trains_at_the_new_max_lr(shhs_nights, tmp_path, capsys):
    """A finished 2-step run continued to 4 steps with another train.max_lr: steps 3 and 4 have the LR of a run
    planned with that max_lr for 4 steps, and the run folder records the value it trained at."""
    resumed, planned = tmp_path / "resumed", tmp_path / "planned"
    train_pretrain.main(run_args(shhs_nights, resumed, "--train.max_steps", 2, "--train.batch_size", 4))
    train_pretrain.main(run_args(shhs_nights, resumed, "--train.max_steps", 4, "--train.batch_size", 4,
                                 "--train.max_lr", 0.001, "--resume"))
    assert "resumed at step 2 with a new schedule: 4 steps to max_lr 0.001" in capsys.readouterr().out
    train_pretrain.main(run_args(shhs_nights, planned, "--train.max_steps", 4, "--train.batch_size", 4,
                                 "--train.max_lr", 0.001))
    lr = {run: {m["step"]: m["lr"] for m in runs.read_metrics(run) if "lr" in m} for run in (resumed, planned)}
    assert lr[resumed][3] == pytest.approx(lr[planned][3], rel=1e-12)
    assert lr[resumed][4] == pytest.approx(lr[planned][4], rel=1e-12)
    assert runs.read_run(resumed).config["train"]["max_lr"] == 0.001
    assert runs.read_run(resumed).checkpoint["config"]["train"]["max_lr"] == 0.001


def test_resume_refuses_another_model_or_data_and_allows_the_harmless(shhs_nights, tmp_path, one_line_exit):
    run = tmp_path / "run"
    train_pretrain.main(run_args(shhs_nights, run, "--train.max_steps", 2, "--train.batch_size", 4))
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    message = one_line_exit(lambda: train_pretrain.main(run_args(shhs_nights, run, "--model.d_model", 16, "--resume")))
    assert message == (f"--resume: model.d_model is 32 in {run}, 16 now: a resumed run keeps the model and data it "
                       f"was started with; start a new run (another --run-dir)")
    message = one_line_exit(lambda: train_pretrain.main(run_args(
        shhs_nights, run, "--pretrain.p_zero", 0.2, "--data.datasets", "[shhs]", "--data.stride_s", 900, "--resume")))
    assert message.startswith(f"--resume: pretrain.p_zero is 0.05 in {run}, 0.2 now; data.datasets is None in {run}, "
                              f"['shhs'] now; data.stride_s is 1800.0 in {run}, 900.0 now: a resumed run keeps")
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before                 # nothing written
    # where the data lie, how they are read, the attention kernel and train.*: allowed
    train_pretrain.main(run_args(shhs_nights, run, "--train.max_steps", 3, "--train.batch_size", 4,
                                 "--model.attention_kernels", "math", "--data.max_open_nights", 2,
                                 "--train.log_every", 2, "--resume"))
    assert runs.read_run(run).checkpoint["step"] == 3


def test_a_full_disk_while_training_is_one_line_and_leaves_no_partial_checkpoint(shhs_nights, tmp_path, monkeypatch,
                                                                                 one_line_exit):
    """torch.save's zip writer reports a full disk as a RuntimeError without errno: the run stops with one line
    naming the checkpoint and the cause, and leaves neither a checkpoint nor a temporary."""
    def full_disk(state, target):
        with open(target, "wb") as f:
            f.write(b"PK half a checkpoint")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")
    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(runs.shutil, "disk_usage", lambda path: SimpleNamespace(total=10 << 30, used=10 << 30, free=0))
    run = tmp_path / "run"
    message = one_line_exit(lambda: train_pretrain.main(run_args(shhs_nights, run, "--train.max_steps", 1,
                                                                 "--train.batch_size", 4)))
    assert message.startswith(f"{run / runs.LATEST}: cannot write the checkpoint (no space left on device: the "
                              f"checkpoint needs ") and message.endswith(" MiB, 0.0 MiB are free); nothing was written")
    assert not [p.name for p in run.iterdir() if p.name.startswith(".") or p.suffix == ".pt"]
    # with room on the disk, the cause is torch.save's own message; an older checkpoint stays
    monkeypatch.undo()
    runs.save_checkpoint(run / runs.LATEST, {"step": 1})
    monkeypatch.setattr(torch, "save", full_disk)
    message = one_line_exit(lambda: runs.save_checkpoint(run / runs.LATEST, {"step": 2}))
    assert message == (f"{run / runs.LATEST}: cannot write the checkpoint (torch.save: [enforce fail at "
                       f"inline_container.cc:672] . PytorchStreamWriter failed writing file data/0: file write "
                       f"failed); the previous one is kept")
    monkeypatch.undo()
    assert runs.load_checkpoint(run / runs.LATEST, "cpu") == {"step": 1}
    assert not [p.name for p in run.iterdir() if p.name.startswith(".")]


def test_a_mistyped_dataset_is_named_not_blamed_on_the_batch(shhs_nights, tmp_path, one_line_exit):
    run = tmp_path / "run"
    message = one_line_exit(lambda: train_pretrain.main(run_args(shhs_nights, run, "--data.datasets", "[shss]")))
    assert message == f"data.datasets: no dataset 'shss' in {shhs_nights / 'manifest.csv'} (its datasets: shhs)"
    message = one_line_exit(lambda: train_pretrain.main(run_args(shhs_nights, run, "--data.datasets",
                                                                 "[shhs, 'shhs:3']")))
    assert message == (f"data.datasets: 'shhs:3': shhs has no visit '3' in {shhs_nights / 'manifest.csv'} "
                       f"(its visits: 1, 2)")
    assert not run.exists()
