"""Our EDF reader against pyedflib (an independent implementation), and its errors."""
import numpy as np
import pyedflib
import pytest

from prepare import edf


def _night(tmp_path, edf_writer, seconds=120):
    rng = np.random.default_rng(3)
    return edf_writer(tmp_path / "a.edf", [
        ("EEG", 125, "uV", rng.normal(0, 40, 125 * seconds), (-500, 500)),
        ("ECG", 256, "mV", rng.normal(0, 0.5, 256 * seconds), (-5, 5)),
        ("SaO2", 1, "%", 90 + rng.uniform(0, 8, seconds), (0, 100)),
    ])


def test_signals_equal_pyedflib(tmp_path, edf_writer):
    path = _night(tmp_path, edf_writer)
    header = edf.read_header(path)
    assert [s.label for s in header.signals] == ["EEG", "ECG", "SaO2"]
    assert [s.fs for s in header.signals] == [125, 256, 1] and header.duration_s == 120
    assert [s.dimension for s in header.signals] == ["uV", "mV", "%"]
    with pyedflib.EdfReader(str(path)) as reference:
        assert header.start == reference.getStartdatetime()
        for i, label in enumerate(header.labels()):
            assert np.allclose(edf.read_signal(header, label), reference.readSignal(i), atol=1e-9)


def test_truncated_file_is_an_error(tmp_path, edf_writer):
    path = _night(tmp_path, edf_writer)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 500])   # part of the last 764-byte record
    with pytest.raises(edf.EdfError, match=rf"^{path}: truncated: header says 120 data records, file holds 119$"):
        edf.read_header(path)
    header = edf.read_header(path, allow_truncated=True)   # predict.py may opt in; prepare never does
    assert header.n_records == 119 and header.warnings == ["truncated: read 119 of 120 data records"]


@pytest.mark.parametrize("corrupt,message", [
    (lambda b: b"NOT AN EDF" + b[10:], "not an EDF file"),
    (lambda b: b[:100], "not an EDF file (only 100 bytes)"),
    (lambda b: b[:236] + b"abc     " + b[244:], "header field 'number of data records' is not a number: 'abc'"),
    (lambda b: b[:1000], "header truncated"),
])
def test_corrupt_header_is_an_error(tmp_path, edf_writer, corrupt, message):
    path = _night(tmp_path, edf_writer)
    path.write_bytes(corrupt(path.read_bytes()))
    with pytest.raises(edf.EdfError, match=f"^{path}: " + message.replace("(", r"\(").replace(")", r"\)")):
        edf.read_header(path)


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(edf.EdfError, match="cannot read"):
        edf.read_header(tmp_path / "nope.edf")


def test_empty_digital_range_is_an_error(tmp_path, edf_writer):
    path = _night(tmp_path, edf_writer)
    data = bytearray(path.read_bytes())
    ns = 3
    dig_max_offset = 256 + ns * (16 + 80 + 8 + 8 + 8 + 8)   # digital maximum of signal 0
    data[dig_max_offset: dig_max_offset + 8] = b"-32768  "
    path.write_bytes(bytes(data))
    header = edf.read_header(path)
    with pytest.raises(edf.EdfError, match="signal 'EEG' has an empty digital or physical range"):
        edf.read_signal(header, "EEG")
