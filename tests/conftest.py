"""Shared test fixtures: small EDFs written with pyedflib (an independent writer for our reader), run folders with
random weights written by runs.py (as a trained run is), and one prepared synthetic SHHS cohort for the training tests.
Test modules take these as fixtures, never by import."""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the scripts (docs/benchmarks.md "Threads"), before torch is imported

import datetime as dt
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pyedflib
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runs  # noqa: E402
import synthetic  # noqa: E402
from model import ModelConfig, ProbeConfig  # noqa: E402
from prepare.__main__ import main as prepare_main  # noqa: E402

PSG_START = dt.datetime(2001, 2, 3, 23, 59, 45)       # crosses midnight within the first minute
WINDOW_EPOCHS = 10                                    # the tiny probe run's window: 5 minutes


def write_edf(path, channels, start=dt.datetime(1985, 1, 1, 22, 30, 0), record_s=1):
    """channels: list of (label, fs, dimension, values, (phys_min, phys_max))."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    headers, data = [], []
    for label, fs, dim, values, (lo, hi) in channels:
        headers.append({"label": label, "dimension": dim, "sample_frequency": fs, "physical_min": lo,
                        "physical_max": hi, "digital_min": -32768, "digital_max": 32767, "transducer": "",
                        "prefilter": ""})
        data.append(np.clip(np.asarray(values, float), lo, hi))
    writer = pyedflib.EdfWriter(str(path), len(channels), file_type=pyedflib.FILETYPE_EDF)
    try:
        writer.setSignalHeaders(headers)
        writer.setStartdatetime(start)
        writer.setDatarecordDuration(record_s)
        writer.writeSamples(data)
    finally:
        writer.close()
    return path


def write_psg(path, seconds, seed=0, drop=()):
    """A small 7-slot PSG (noise) with the built-in aliases' labels, starting at PSG_START; `drop` leaves labels out."""
    rng = np.random.default_rng(seed)
    channels = [("C4-M1", 100, "uV", 40, (-500, 500)), ("E1-M2", 100, "uV", 40, (-500, 500)),
                ("Chin1-Chin2", 100, "uV", 10, (-200, 200)), ("ECG", 100, "mV", 0.5, (-5, 5)),
                ("SpO2", 1, "%", 1, (0, 100)), ("Thorax", 10, "uV", 100, (-1000, 1000)),
                ("Abdomen", 10, "uV", 100, (-1000, 1000))]
    signals = []
    for label, fs, dim, scale, physical_range in channels:
        if label in drop:
            continue
        x = rng.normal(0, scale, int(seconds * fs))
        signals.append((label, fs, dim, 95 + x if label == "SpO2" else x, physical_range))
    return write_edf(path, signals, start=PSG_START)


@pytest.fixture(scope="session")
def edf_writer():
    return write_edf


@pytest.fixture(scope="session")
def psg_writer():
    """write_psg(path, seconds, seed=0, drop=()) -> path; the EDF starts at psg_writer.start."""
    write_psg.start = PSG_START
    return write_psg


@pytest.fixture(scope="session")
def probe_run_writer():
    return runs.write_random_run


@pytest.fixture(scope="session")
def tiny_probe_run(tmp_path_factory):
    """A tiny random probe run with a 5-minute window (read-only: tests write their outputs elsewhere)."""
    model_cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=5 * WINDOW_EPOCHS)
    probe_cfg = ProbeConfig(d_model=16, hidden_size=8, n_layers=1, dropout=0.0)
    return runs.write_random_run(tmp_path_factory.mktemp("tiny") / "run", model_cfg, probe_cfg,
                           {"window_s": WINDOW_EPOCHS * 30.0})


@pytest.fixture(scope="session")
def shhs_nights(tmp_path_factory):
    """6 one-hour synthetic SHHS nights (3 subjects × 2 visits, seed 5) written and prepared once for the session,
    every night in the train split (the hash split of 3 subjects need not fill every split): 12 half-hour windows.
    Read-only: a test that writes into the folder copies it into its tmp_path first."""
    root = tmp_path_factory.mktemp("shhs")
    synthetic.write_cohort("shhs", root / "src", nights=6, hours=1, seed=5)
    prepare_main(["shhs", str(root / "src"), str(root / "nights")])
    manifest = pd.read_csv(root / "nights" / "manifest.csv", dtype=str)
    manifest["split"] = "train"
    manifest.to_csv(root / "nights" / "manifest.csv", index=False)
    return root / "nights"


def run_until_killed(args, what: str, count: int) -> None:
    """`python *args` in the repository with PFTSLEEP_KILL_AFTER_<WHAT>=count (durable.kill_point), which must end it by
    SIGKILL at that point."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), f"PFTSLEEP_KILL_AFTER_{what.upper()}": str(count)}
    job = subprocess.run([sys.executable, *map(str, args)], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert job.returncode == -signal.SIGKILL, f"exit status {job.returncode}, not SIGKILL:\n{job.stderr[-3000:]}"


def check_kill_and_resume(script: str, main, args, folder: Path, total_steps: int) -> None:
    """Training script `script` (in-process: `main`) with arguments args(run), which must set train.ckpt_every 2 and
    train.max_steps total_steps (> 3), killed right after step 3 and resumed, ends as the uninterrupted run: the same
    weights exactly, and metrics.jsonl lines of steps 1..total_steps once each with the same values (timings aside)."""
    reference, killed = folder / "reference", folder / "killed"
    main(args(reference))
    run_until_killed([script, *args(killed)], "step", 3)
    # the run killed itself right after step 3: ckpt.pt holds step 2, and step 3, already logged, is lost
    assert runs.load_checkpoint(killed / runs.LATEST, "cpu")["step"] == 2 and not (killed / runs.FINAL).exists()
    assert [m["step"] for m in runs.read_metrics(killed) if "loss" in m] == [1, 2, 3]
    main([*args(killed), "--resume"])
    resumed, uninterrupted = (runs.read_run(run).checkpoint for run in (killed, reference))
    assert resumed["step"] == uninterrupted["step"] == total_steps
    assert resumed["model"].keys() == uninterrupted["model"].keys()
    for key in uninterrupted["model"]:
        assert torch.equal(resumed["model"][key], uninterrupted["model"][key]), key
    logged, expected = ([{k: v for k, v in m.items() if k not in ("windows_per_s", "s_per_step")}
                         for m in runs.read_metrics(run)] for run in (killed, reference))
    assert [m["step"] for m in logged if "loss" in m] == list(range(1, total_steps + 1))
    assert logged == expected


def expect_one_line_exit(call) -> str:
    """call() must exit with one line (SystemExit with a message, no traceback); returns the line."""
    with pytest.raises(SystemExit) as exit_info:
        call()
    message = str(exit_info.value.code)
    assert "\n" not in message and "Traceback" not in message, message
    return message


@pytest.fixture(scope="session")
def one_line_exit():
    """one_line_exit(call) -> the one line call() exits with (expect_one_line_exit)."""
    return expect_one_line_exit


@pytest.fixture(scope="session")
def killed_run():
    """killed_run(args, what, count): runs `python *args` until durable.kill_point(what, count) SIGKILLs it."""
    return run_until_killed


@pytest.fixture(scope="session")
def kill_and_resume():
    """kill_and_resume(script, main, args, folder, total_steps): see check_kill_and_resume."""
    return check_kill_and_resume


@pytest.fixture
def training_inputs(monkeypatch):
    """record(module, name) -> list: replaces the model class `module.name` (for this test) by a subclass whose
    forward, in training mode, appends its positional arguments (detached copies) to the list it returns."""
    originals = {}

    def record(module, name):
        base = originals.setdefault((module, name), getattr(module, name))
        calls = []

        class Recording(base):
            def forward(self, *args, **kwargs):
                if self.training:
                    calls.append([a.detach().clone() if torch.is_tensor(a) else a for a in args])
                return super().forward(*args, **kwargs)

        monkeypatch.setattr(module, name, Recording)
        return calls
    return record


def pytest_configure(config):
    # pyedflib warns about header fields it rounds to 8 characters; that rounding is what real EDFs hold.
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:pyedflib")
