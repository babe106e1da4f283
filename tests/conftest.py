"""Shared test fixtures: small EDFs written with pyedflib (an independent writer for our reader) and run folders with
random weights written by runs.py (as a trained run is). Test modules take these as fixtures, never by import."""
import dataclasses
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import pyedflib
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import runs  # noqa: E402
from model import Encoder, ModelConfig, ProbeConfig, ProbeHead  # noqa: E402

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


def write_probe_run(run_dir, model_cfg: ModelConfig, probe_cfg: ProbeConfig, data: dict):
    """A probe run folder (config.yaml + ckpt_final.pt) with seeded random weights, written by runs.py."""
    torch.manual_seed(0)
    weights = torch.nn.ModuleDict({"encoder": Encoder(model_cfg), "probe": ProbeHead(probe_cfg)}).state_dict()
    Path(run_dir).mkdir(parents=True)
    runs.save_checkpoint(Path(run_dir) / runs.FINAL, {"model": weights})
    runs.save_config(run_dir, {"model": dataclasses.asdict(model_cfg), "probe": dataclasses.asdict(probe_cfg),
                               "data": data})
    return Path(run_dir)


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
    return write_probe_run


@pytest.fixture(scope="session")
def tiny_probe_run(tmp_path_factory):
    """A tiny random probe run with a 5-minute window (read-only: tests write their outputs elsewhere)."""
    model_cfg = ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=5 * WINDOW_EPOCHS)
    probe_cfg = ProbeConfig(d_model=16, hidden_size=8, n_layers=1, dropout=0.0)
    return write_probe_run(tmp_path_factory.mktemp("tiny") / "run", model_cfg, probe_cfg,
                           {"window_s": WINDOW_EPOCHS * 30.0})


def pytest_configure(config):
    # pyedflib warns about header fields it rounds to 8 characters; that rounding is what real EDFs hold.
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:pyedflib")
