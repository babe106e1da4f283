"""train_pretrain.py: the loss falls, DDP (2 gloo processes) equals one process, kill + resume equals no kill."""
import json
import os
import signal
import socket
import subprocess
import sys

import pytest
import torch

import synthetic
import runs
import train_pretrain
from prepare.__main__ import main as prepare_main

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALL = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "32", "--model.d_ff", "64",
         "--model.max_patches", "300", "--data.window_s", "1800", "--data.stride_s", "1800",
         "--data.num_workers", "0", "--data.val_split", "train", "--train.log_every", "1"]


@pytest.fixture(scope="module")
def nights(tmp_path_factory):
    """6 one-hour synthetic SHHS nights, prepared (12 half-hour training windows)."""
    root = tmp_path_factory.mktemp("pretrain")
    synthetic.write_cohort("shhs", root / "src", nights=6, hours=1, seed=5)
    prepare_main(["shhs", str(root / "src"), str(root / "nights")])
    # the hash split of 3 subjects need not hold all splits: train on every night
    manifest = (root / "nights" / "manifest.csv").read_text().replace(",val\n", ",train\n").replace(",test\n", ",train\n")
    (root / "nights" / "manifest.csv").write_text(manifest)
    return root / "nights"


def run_args(nights, run, *extra, run_flag="--run"):
    return [*SMALL, "--data.root", str(nights), run_flag, str(run), *map(str, extra)]


def metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def params(run, name="ckpt_final.pt"):
    return torch.load(run / name, weights_only=True)["model"]


def test_loss_falls_and_run_folder_is_complete(nights, tmp_path):
    run = tmp_path / "run"
    train_pretrain.main(run_args(nights, run, "--train.max_steps", "24", "--train.batch_size", "4",
                                 "--train.max_lr", "0.003", "--train.eval_every", "24"))
    losses = [m["loss"] for m in metrics(run) if "loss" in m]
    assert len(losses) == 24 and min(losses[-3:]) < 0.6 * losses[0], losses
    assert {"config.yaml", "metrics.jsonl", "ckpt.pt", "ckpt_final.pt"} <= {p.name for p in run.iterdir()}
    assert "val_loss" in metrics(run)[-1]
    ckpt = torch.load(run / "ckpt_final.pt", weights_only=True)
    assert ckpt["step"] == 24 and ckpt["config"]["model"]["d_model"] == 32
    from model import load_encoder
    encoder = load_encoder(run)
    assert not encoder.training and encoder.embed(torch.randn(1, 7, 1800 * 125)).shape == (1, 7, 300, 32)


def test_two_gloo_processes_equal_one_process(nights, tmp_path):
    deterministic = ["--model.dropout", "0", "--pretrain.p_zero", "0", "--pretrain.p_jitter", "0",
                     "--train.max_steps", "3", "--train.grad_accum", "2"]
    env = {**os.environ, "PYTHONPATH": ROOT, "OMP_NUM_THREADS": "1"}
    with socket.socket() as probe:                  # a free port: a fixed one can be held by another job
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port,
                          "train_pretrain.py", *run_args(nights, tmp_path / "ddp", *deterministic, "--train.batch_size", "1",
                                                         run_flag="--run-dir")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    train_pretrain.main(run_args(nights, tmp_path / "one", *deterministic, "--train.batch_size", "2"))
    # Same global batch, same data order, synchronised BatchNorm: the same loss and gradient norm at every step...
    for single, pair in zip(metrics(tmp_path / "one"), metrics(tmp_path / "ddp"), strict=True):
        for key in ("loss", "grad_norm", "val_loss"):
            if key in single:
                assert pair[key] == pytest.approx(single[key], rel=1e-4), (key, single, pair)
    # ...and the same parameters, up to float rounding that Adam's normalisation can blow up to ~lr for
    # parameters whose gradient is ~0 (3 steps at lr <= 1.4e-3).
    one, two = params(tmp_path / "one"), params(tmp_path / "ddp")
    assert one.keys() == two.keys()
    for key in one:
        assert torch.allclose(one[key].double(), two[key].double(), atol=3e-3), key
    assert torch.load(tmp_path / "ddp" / "ckpt_final.pt", weights_only=True)["step"] == 3


def test_killed_run_resumes_to_the_same_parameters(nights, tmp_path):
    steps = ["--train.max_steps", "8", "--train.ckpt_every", "2", "--train.batch_size", "2"]
    reference = tmp_path / "reference"
    train_pretrain.main(run_args(nights, reference, *steps))
    killed = tmp_path / "killed"
    # the run kills itself right after step 3: its checkpoint holds step 2, and step 3 (logged) is lost
    env = {**os.environ, "PYTHONPATH": ROOT, "PFTSLEEP_KILL_AFTER_STEP": "3"}
    job = subprocess.run([sys.executable, "train_pretrain.py", *run_args(nights, killed, *steps)], cwd=ROOT, env=env,
                         capture_output=True, timeout=300)
    assert job.returncode == -signal.SIGKILL
    assert runs.load_checkpoint(killed / runs.LATEST, "cpu")["step"] == 2 and not (killed / runs.FINAL).exists()
    assert [m["step"] for m in runs.read_metrics(killed) if "loss" in m] == [1, 2, 3]
    train_pretrain.main(run_args(nights, killed, *steps, "--resume"))
    resumed, uninterrupted = params(killed), params(reference)
    for key in uninterrupted:
        assert torch.equal(resumed[key], uninterrupted[key]), key
    assert [m["step"] for m in runs.read_metrics(killed) if "loss" in m] == list(range(1, 9))
