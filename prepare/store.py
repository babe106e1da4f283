"""Night stores on disk: atomic writes, the manifest, failed.csv and the subject-level split.

Layout (DESIGN.md §3): `<out>/<dataset>/<night_id>.zarr`, a zarr v3 group with
- `signals` float16 [7, T], one uncompressed chunk per channel ([1, T]), so that each channel is
  one raw little-endian file (`signals/c/<channel>/0`) that data.py memory-maps; bench/loader.py
  compares this with hourly chunks and with compression;
- `stages` int8 [T // 3750];
- the attrs listed in prepare/night.py.
A store is written under a hidden temporary name and renamed when complete, so a store that
exists is complete and a killed job leaves nothing that a re-run would mistake for a night.
"""
from __future__ import annotations

import csv
import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import zarr

MANIFEST_COLUMNS = ["night_id", "dataset", "subject", "visit", "path", "n_samples", "n_epochs", "n_scored",
                    "present", "split"]
FAILED_COLUMNS = ["dataset", "night_id", "edf", "reason"]
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))


def store_path(out: Path, dataset: str, night_id: str) -> Path:
    return Path(out) / dataset / f"{night_id}.zarr"


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.tmp-{os.getpid()}")


def clear_temporaries(final: Path) -> None:
    """Remove what a killed run left for this night (its hidden temp dirs)."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def write_night(final: Path, signals: np.ndarray, stages: np.ndarray, attrs: dict) -> None:
    """Write a night store atomically: temp dir, then rename; an existing store is replaced."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_temporaries(final)
    temp = _temp_path(final)
    group = zarr.open_group(temp, mode="w", zarr_format=3)
    array = group.create_array("signals", shape=signals.shape, chunks=(1, signals.shape[1]), dtype="float16",
                               compressors=None, fill_value=0.0)
    array[:] = signals
    group.create_array("stages", shape=stages.shape, chunks=stages.shape, dtype="int8",
                       compressors=None, fill_value=-1)[:] = stages
    group.attrs.update(attrs)
    if final.exists():   # --overwrite: swap, then delete the old one
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        final.rename(old)
        temp.rename(final)
        shutil.rmtree(old)
    else:
        temp.rename(final)


def read_attrs(store: Path) -> dict:
    """The store's attrs without opening zarr (fast enough to scan thousands of nights)."""
    with open(Path(store) / "zarr.json") as f:
        return json.load(f).get("attributes", {})


def split_of(dataset: str, subject: str) -> str:
    """Stable hash of (dataset, subject): visits of one subject share a split, new nights never move old ones."""
    digest = hashlib.sha256(f"{dataset}/{subject}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in SPLIT_FRACTIONS:
        edge += fraction
        if u < edge:
            return name
    return SPLIT_FRACTIONS[-1][0]


def manifest_row(out: Path, store: Path) -> dict:
    attrs = read_attrs(store)
    n_samples = int(round(attrs["duration_s"] * attrs["fs"]))
    return {
        "night_id": attrs["night_id"], "dataset": attrs["dataset"], "subject": attrs["subject"],
        "visit": attrs["visit"], "path": store.relative_to(out).as_posix(), "n_samples": n_samples,
        "n_epochs": n_samples // (attrs["fs"] * attrs["epoch_s"]), "n_scored": attrs["n_scored"],
        "present": ";".join(c for c, p in zip(attrs["channels"], attrs["present"]) if p),
        "split": split_of(attrs["dataset"], attrs["subject"]),
    }


def _atomic_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(temp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    temp.replace(path)


def write_manifest(out: Path) -> list[dict]:
    """Rebuild `<out>/manifest.csv` from every complete store (all datasets), sorted by dataset and night."""
    out = Path(out)
    rows = [manifest_row(out, store) for store in sorted(out.glob("*/*.zarr"))]
    rows.sort(key=lambda r: (r["dataset"], r["night_id"]))
    _atomic_csv(out / "manifest.csv", MANIFEST_COLUMNS, rows)
    return rows


def update_failed(out: Path, attempted: list[tuple[str, str]], failures: list[dict]) -> list[dict]:
    """Merge this run's failures into `<out>/failed.csv`: nights attempted again lose their old row."""
    path = Path(out) / "failed.csv"
    rows = []
    if path.exists():
        with open(path, newline="") as f:
            retried = set(attempted)
            rows = [r for r in csv.DictReader(f) if (r["dataset"], r["night_id"]) not in retried]
    rows += failures
    rows.sort(key=lambda r: (r["dataset"], r["night_id"]))
    _atomic_csv(path, FAILED_COLUMNS, rows)
    return rows
