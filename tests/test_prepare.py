"""python -m prepare end to end on synthetic cohorts in every dataset's native layout, bad input, and resume."""
import os
import shutil
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest
import zarr

import synthetic
from prepare import edf, store
from prepare.__main__ import main as prepare_main
from prepare.signals import SLOTS

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NSRR = ("shhs", "mesa", "mros", "apples", "wsc")
ATTRS = {"schema", "dataset", "subject", "visit", "night_id", "fs", "epoch_s", "channels", "present", "source_labels",
         "source_fs", "source_units", "filters", "edf", "annotations", "start_time", "duration_s"}


@pytest.fixture(scope="session")
def cohorts(tmp_path_factory):
    """3 one-hour synthetic nights per dataset, written once for the session (treat as read-only)."""
    root = tmp_path_factory.mktemp("cohorts")
    for dataset in NSRR + ("edf",):
        synthetic.write_cohort(dataset, root / dataset, nights=3, hours=1, seed=7)
    return root


@pytest.fixture
def cohort_copy(cohorts, tmp_path):
    def copy(dataset):
        shutil.copytree(cohorts / dataset, tmp_path / "src" / dataset)
        return tmp_path / "src" / dataset
    return copy


def run_prepare(*args):
    return prepare_main([str(a) for a in args])


@pytest.mark.parametrize("dataset", NSRR)
def test_every_dataset_meets_the_store_contract(cohorts, tmp_path, dataset, capsys):
    out = tmp_path / "out"
    assert run_prepare(dataset, cohorts / dataset, out) == 0
    assert "3 written, 0 skipped (already done), 0 failed" in capsys.readouterr().out
    manifest = pd.read_csv(out / "manifest.csv", dtype=str)
    assert list(manifest.columns) == store.MANIFEST_COLUMNS and len(manifest) == 3
    for row in manifest.itertuples():
        group = zarr.open_group(out / row.path, mode="r")
        signals, stages, attrs = group["signals"], group["stages"][:], dict(group.attrs)
        assert signals.dtype == np.float16 and signals.shape[0] == 7 and stages.dtype == np.int8
        assert signals.shape[1] == round(attrs["duration_s"] * 125) and len(stages) == signals.shape[1] // 3750
        assert ATTRS <= set(attrs) and attrs["schema"] == "pftsleep-night/1" and attrs["fs"] == 125
        assert attrs["channels"] == list(SLOTS) and all(attrs["present"])
        truth = np.load(cohorts / dataset / ".truth" / f"{row.night_id}.npy")
        assert np.array_equal(stages, truth)
        assert int(row.n_scored) == int((truth >= 0).sum()) and int(row.n_epochs) == len(truth)
        values = signals[:].astype(np.float32)
        assert np.isfinite(values).all() and (values.std(axis=1) > 0).all()
        assert attrs["source_units"]["EEG"] == "uV" and 5 < values[3].std() < 200   # µV, whatever the file's unit
        assert 80 < np.median(values[4]) <= 100                                   # SpO2 in %
        assert row.split in {"train", "val", "test"}
        assert row.split == store.split_of(dataset, row.subject)


def test_derivations_and_labels_recorded(cohorts, tmp_path):
    out = tmp_path / "out"
    run_prepare("mros", cohorts / "mros", out)
    attrs = store.read_attrs(out / "mros" / "mros-visit1-aa0001.zarr")
    assert attrs["source_labels"] == {"ECG": "ECG L - ECG R", "EOG": "LOC - A2", "EMG": "L Chin - R Chin",
                                      "EEG": "C4 - A1", "SPO2": "SaO2", "THOR": "Thoracic", "ABDO": "Abdominal"}
    attrs2 = store.read_attrs(out / "mros" / "mros-visit2-aa0001.zarr")
    assert attrs2["source_labels"]["EEG"] == "C4 - M1" and attrs2["source_labels"]["THOR"] == "Chest"
    assert attrs["source_fs"]["ECG"] == 512 and attrs["filters"]["bands_hz"]["SPO2"] == ["lowpass", 0.4]


def test_profusion_fallback_when_nsrr_xml_missing(cohort_copy, tmp_path):
    src = cohort_copy("shhs")
    nsrr_xml = src / "polysomnography/annotations-events-nsrr/shhs1/shhs1-200001-nsrr.xml"
    nsrr_xml.unlink()
    out = tmp_path / "out"
    run_prepare("shhs", src, out)
    attrs = store.read_attrs(out / "shhs" / "shhs1-200001.zarr")
    assert attrs["annotation_format"] == "profusion-xml" and attrs["annotations"].endswith("shhs1-200001-profusion.xml")
    assert store.read_attrs(out / "shhs" / "shhs1-200002.zarr")["annotation_format"] == "nsrr-xml"
    stages = zarr.open_group(out / "shhs" / "shhs1-200001.zarr", mode="r")["stages"][:]
    assert np.array_equal(stages, np.load(src / ".truth" / "shhs1-200001.npy"))


def _signal_field(path, label, field_offset, width):
    """Byte offset of one per-signal header field (EDF spec layout) for `label`."""
    header = edf.read_header(path)
    ns, i = len(header.signals), header.labels().index(label)
    return 256 + ns * field_offset + i * width


def patch_bytes(path, offset, text, width):
    data = bytearray(path.read_bytes())
    data[offset: offset + width] = text.ljust(width).encode()
    path.write_bytes(bytes(data))


def flatten(path, label):
    header = edf.read_header(path)
    sig = next(s for s in header.signals if s.label == label)
    records = np.memmap(path, dtype="<i2", mode="r+", offset=header.header_bytes,
                        shape=(header.n_records, header.record_samples))
    records[:, sig.offset: sig.offset + sig.samples_per_record] = 123
    records.flush()


BAD_NIGHTS = {   # night -> (how to break it, expected reason)
    "shhs1-200001": (lambda p: patch_bytes(p.edf, _signal_field(p.edf, "EEG", 0, 16), "XEEG", 16) or
                     patch_bytes(p.edf, _signal_field(p.edf, "EEG(sec)", 0, 16), "YEEG", 16),
                     "required slot EEG: none of its labels is in the EDF"),
    "shhs1-200002": (lambda p: p.edf.write_bytes(p.edf.read_bytes()[:-5000]), "truncated: header says"),
    "shhs1-200003": (lambda p: p.edf.write_bytes(b"garbage" * 100), "not an EDF file"),
    "shhs2-200001": (lambda p: [a.unlink() for a in p.annotations], "no annotation file (looked for"),
    "shhs2-200002": (lambda p: p.annotations[0].write_text("<PSGAnnotation><ScoredEvents>"), "nsrr.xml"),
    "shhs2-200003": (lambda p: flatten(p.edf, "EMG"), "required slot EMG: signal 'EMG' is flat"),
    "shhs1-200004": (lambda p: patch_bytes(p.edf, _signal_field(p.edf, "EOG(L)", 96, 8), "furlong", 8),
                     "required slot EOG: signal 'EOG(L)' has physical dimension 'furlong'"),
    "shhs2-200004": (lambda p: p.annotations[0].write_text(p.annotations[0].read_text().replace(
                     "<Start>0</Start>\n<Duration>", "<Start>0</Start>\n<Duration>9", 1)),
                     "annotation file says the recording lasts"),
    "shhs2-200005": (lambda p: p.annotations[0].write_text(p.annotations[0].read_text().replace(
                     "</ScoredEvents>", "<ScoredEvent><EventType>Stages|Stages</EventType><EventConcept>Stage 2 sleep|2"
                     "</EventConcept><Start>1800</Start><Duration>1800</Duration></ScoredEvent></ScoredEvents>")),
                     "past the recording end"),
}


def test_bad_nights_fail_alone_and_leave_nothing(tmp_path, capsys):
    src, out = tmp_path / "src", tmp_path / "out"
    synthetic.write_cohort("shhs", src, nights=11, hours=0.5, seed=3)   # shhs1-200001..6, shhs2-200001..5
    nights = {n.night_id: n for n in __import__("prepare.shhs", fromlist=["x"]).find_nights(src)}
    for night_id, (breaker, _) in BAD_NIGHTS.items():
        breaker(nights[night_id])
    assert run_prepare("shhs", src, out, "--workers", "2") == 0
    printed = capsys.readouterr().out
    failed = pd.read_csv(out / "failed.csv").set_index("night_id")
    assert set(failed.index) == set(BAD_NIGHTS)
    for night_id, (_, reason) in BAD_NIGHTS.items():
        assert reason in failed.loc[night_id, "reason"], (night_id, failed.loc[night_id, "reason"])
        assert "\n" not in failed.loc[night_id, "reason"]
        assert f"failed {night_id}: " in printed
        assert not (out / "shhs" / f"{night_id}.zarr").exists()
    assert "2 written, 0 skipped (already done), 9 failed" in printed
    assert list(pd.read_csv(out / "manifest.csv")["night_id"]) == ["shhs1-200005", "shhs1-200006"]
    assert not [p for p in (out / "shhs").iterdir() if p.name.startswith(".")]   # no temporaries left


def test_rerun_skips_done_nights_and_overwrite_redoes_them(cohorts, tmp_path, capsys):
    out = tmp_path / "out"
    run_prepare("wsc", cohorts / "wsc", out, "--limit", "2")
    assert "2 written, 0 skipped" in capsys.readouterr().out
    run_prepare("wsc", cohorts / "wsc", out)
    assert "1 written, 2 skipped (already done)" in capsys.readouterr().out
    before = (out / "wsc" / "wsc-visit1-10001-nsrr.zarr" / "signals" / "c" / "3" / "0").read_bytes()
    run_prepare("wsc", cohorts / "wsc", out, "--overwrite", "--zero-phase")
    assert "3 written, 0 skipped" in capsys.readouterr().out
    after = (out / "wsc" / "wsc-visit1-10001-nsrr.zarr" / "signals" / "c" / "3" / "0").read_bytes()
    assert before != after and len(pd.read_csv(out / "manifest.csv")) == 3


def test_shards_partition_the_nights(cohorts, tmp_path):
    outs = []
    for shard in ("0/2", "1/2"):
        out = tmp_path / shard.replace("/", "of")
        run_prepare("mesa", cohorts / "mesa", out, "--shard", shard)
        outs.append({p.stem for p in (out / "mesa").glob("*.zarr")})
    assert outs[0] | outs[1] == {"mesa-sleep-0001", "mesa-sleep-0002", "mesa-sleep-0003"} and not outs[0] & outs[1]


def test_edf_dataset_with_channel_map_and_explicit_annotations(cohorts, tmp_path):
    src = cohorts / "edf"
    out = tmp_path / "out"
    channel_map = tmp_path / "map.yaml"
    channel_map.write_text("EEG: C4-M1\nEOG: E1-M2\nEMG: Chin1-Chin2\nABDO: null\n")
    edfs = sorted(p for p in src.glob("night-00?.edf"))
    hypnograms = [p.with_name(p.stem + "-Hypnogram.edf") for p in edfs]
    assert run_prepare("edf", *edfs, out, "--annotations", *hypnograms, "--channels", channel_map) == 0
    attrs = store.read_attrs(out / "edf" / "night-001.zarr")
    assert attrs["present"] == [True, True, True, True, True, True, False] and attrs["annotation_format"] == "edf+"
    stages = zarr.open_group(out / "edf" / "night-001.zarr", mode="r")["stages"][:]
    assert np.array_equal(stages, np.load(src / ".truth" / "night-001.npy"))


def test_edf_folder_finds_sidecars_and_skips_hypnogram_files(cohorts, tmp_path):
    out = tmp_path / "out"
    run_prepare("edf", cohorts / "edf", out)
    assert sorted(p.stem for p in (out / "edf").glob("*.zarr")) == ["night-001", "night-002", "night-003"]
    assert store.read_attrs(out / "edf" / "night-002.zarr")["annotation_format"] == "edf+"


def test_cli_errors_are_one_line(tmp_path):
    env = {**os.environ, "PYTHONPATH": ROOT}
    empty = tmp_path / "empty"
    empty.mkdir()
    result = subprocess.run([sys.executable, "-m", "prepare", "shhs", str(empty), str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 2 and "error: no shhs nights found under" in result.stderr
    result = subprocess.run([sys.executable, "-m", "prepare", "--help"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert result.returncode == 0 and "--shard" in result.stdout and "annotations-events-nsrr" in result.stdout


def _tree(out):
    """Every file of every store (bytes) plus the manifest: what 'equal result' means."""
    files = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
             and not p.name.startswith(".") and p.name != "failed.csv"}
    return files


def test_killed_run_resumes_to_the_same_result(cohorts, tmp_path, killed_run, capsys):
    src, reference, resumed = cohorts / "mros", tmp_path / "reference", tmp_path / "resumed"
    run_prepare("mros", src, reference)
    # the job (one worker: nights in night_id order) kills itself right after its second night, before the manifest
    killed_run(["-m", "prepare", "mros", src, resumed], "night", 2)
    first_two = sorted(p.name for p in (reference / "mros").glob("*.zarr"))[:2]
    assert sorted(p.name for p in (resumed / "mros").iterdir()) == first_two     # whole stores only, no temporaries
    assert not (resumed / "manifest.csv").exists()
    capsys.readouterr()
    run_prepare("mros", src, resumed)
    assert "1 written, 2 skipped (already done), 0 failed" in capsys.readouterr().out
    assert _tree(resumed) == _tree(reference)
    assert not [p for p in (resumed / "mros").iterdir() if p.name.startswith(".")]
