"""Shared test helpers: writing small EDFs with pyedflib (an independent writer for our reader)."""
import datetime as dt
import sys
from pathlib import Path

import numpy as np
import pyedflib
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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


@pytest.fixture
def edf_writer():
    return write_edf


def pytest_configure(config):
    # pyedflib warns about header fields it rounds to 8 characters; that rounding is what real EDFs hold.
    config.addinivalue_line("filterwarnings", "ignore::UserWarning:pyedflib")
