"""data.mesa_holdout and data.resplit_seed draw exactly the splits upstream's calls draw (benmfox/PFTSleep @31f33c1:
random.Random(123).shuffle + GroupShuffleSplit(train_size=0.9, random_state=126) for MESA, train_transformer.py:79-89;
GroupShuffleSplit(train_size=0.7, random_state=126) for the probe's own re-split, train_classifier.py:73-106).
The expected lists in fixtures/upstream_splits.json were computed by scikit-learn itself ("generated_by" holds the
script and versions); scikit-learn is not a dependency of this repository."""
import csv
import json
from pathlib import Path
from types import SimpleNamespace

import pytest

import evaluate
import train_probe
from data import DataConfig, NightDataset
from prepare.store import MANIFEST_COLUMNS, read_manifest

FIXTURE = json.loads((Path(__file__).parent / "fixtures" / "upstream_splits.json").read_text())


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """The fixture's manifest as a prepare output folder (manifest.csv only: nothing here opens a store)."""
    root = tmp_path_factory.mktemp("splits")
    with open(root / "manifest.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=MANIFEST_COLUMNS)
        writer.writeheader()
        for row in FIXTURE["manifest"]:
            row = dict(zip(FIXTURE["columns"], row))
            writer.writerow({**row, "path": f"{row['dataset']}/{row['night_id']}.zarr", "n_samples": 3750,
                             "n_epochs": 1, "n_scored": 1, "present": "EEG"})
    return root


def nights(root, split, datasets=None, **switches) -> list[str]:
    return sorted(read_manifest(root, split, datasets, **switches)["night_id"])


@pytest.mark.parametrize("holdout", ["100", "10"])
def test_mesa_holdout_is_upstreams_split(root, holdout):
    expected = FIXTURE["mesa_holdout"][holdout]
    for split in ("test", "train", "val"):
        assert nights(root, split, ["mesa"], mesa_holdout=int(holdout)) == expected[split]
    assert nights(root, "test", ["shhs", "wsc"], mesa_holdout=int(holdout)) == nights(root, "test", ["shhs", "wsc"])


@pytest.mark.parametrize("seed", ["126", "3"])
def test_resplit_is_upstreams_probe_split_per_dataset(root, seed):
    expected = FIXTURE["resplit_seed"][seed]
    for dataset in ("shhs", "wsc", "mesa"):
        for split in ("train", "val"):
            # the partition of a dataset is the same whatever else is selected (evaluate.py, the "+ mesa" probe)
            assert nights(root, split, [dataset], resplit_seed=int(seed)) == expected[dataset][split]
            together = nights(root, split, ["shhs", "wsc", "mesa"], resplit_seed=int(seed))
            assert [n for n in together if n in set(expected[dataset]["train"] + expected[dataset]["val"])] == \
                expected[dataset][split]
    # 90 non-test SHHS subjects: sklearn's floor(0.7 * 90) = 62 train subjects (0.7 * 90 = 62.99999999999999)
    shhs = read_manifest(root, "train", ["shhs"], resplit_seed=int(seed))
    assert shhs["subject"].nunique() == 62


def test_resplit_keeps_test_and_never_splits_a_subject(root):
    manifest = read_manifest(root, resplit_seed=126)
    assert (manifest["split"] == "test").equals(read_manifest(root)["split"] == "test")
    assert manifest.groupby(["dataset", "subject"])["split"].nunique().max() == 1       # shhs1 + shhs2 stay together
    assert (manifest.groupby(["dataset", "subject"]).size() > 1).any()
    # a visit selector re-splits by the dataset's subjects (all visits), then selects the visit
    visit1 = read_manifest(root, "train", ["shhs:1"], resplit_seed=126)
    assert sorted(visit1["night_id"]) == [n for n in FIXTURE["resplit_seed"]["126"]["shhs"]["train"]
                                          if n.startswith("shhs1-")]


def test_with_mesa_holdout_the_resplit_leaves_mesa_to_upstreams_rule(root):
    both = {split: nights(root, split, ["shhs", "mesa"], mesa_holdout=100, resplit_seed=126)
            for split in ("train", "val", "test")}
    expected_mesa, expected_shhs = FIXTURE["mesa_holdout"]["100"], FIXTURE["resplit_seed"]["126"]["shhs"]
    for split in ("train", "val"):
        assert both[split] == sorted(expected_mesa[split] + expected_shhs[split])
    assert both["test"] == sorted(expected_mesa["test"] + nights(root, "test", ["shhs"]))


class Recorded(NightDataset):
    """A NightDataset that only records the stores it was given (the fixture's manifest has no stores)."""
    def __init__(self, stores, **kwargs):
        self.stores = sorted(Path(store).stem for store in stores)


def test_every_reader_of_the_selection_gets_the_switches(root, monkeypatch):
    cfg = DataConfig(root=str(root), datasets=["shhs", "mesa"], mesa_holdout=100, resplit_seed=126)
    monkeypatch.setattr(train_probe, "NightDataset", Recorded)
    for split in ("train", "val", "test"):
        expected = nights(root, split, cfg.datasets, mesa_holdout=100, resplit_seed=126)
        if split != "test":
            upstream = FIXTURE["mesa_holdout"]["100"][split] + FIXTURE["resplit_seed"]["126"]["shhs"][split]
            assert expected == sorted(upstream)
        assert Recorded.from_config(cfg, split).stores == expected
        assert train_probe.labelled_nights(SimpleNamespace(data=cfg), split).stores == expected
        selected = evaluate.select_nights(root, split, cfg.datasets, None, mesa_holdout=100, resplit_seed=126)
        assert sorted(selected["night_id"]) == expected
