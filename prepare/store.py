"""Night stores on disk, written and read here only: the store, the manifest, failed.csv and the subject split.

Layout (docs/design.md §3): `<out>/<dataset>/<night_id>.zarr`, a zarr v3 group with
- `signals` float16 [7, T], one uncompressed chunk per channel ([1, T]), so that each channel is
  one raw little-endian file (`signals/c/<channel>/0`) that data.py memory-maps; bench/loader.py
  compares this with hourly chunks and with compression;
- `stages` int8 [T // 3750];
- the attrs listed in prepare/night.py.
A store is written under a hidden temporary name and renamed when complete (durable.write_atomic), so
a store that exists is complete and a killed job leaves nothing that a re-run would mistake for a
night. `read_night` memory-maps the raw chunks (bench/loader.py measures it against zarr's own
reader); a store written any other way (other chunking, compression) is read through zarr instead.
`read_stages` reads only the stages and attrs (data.py's index of a whole cohort). A store that cannot
be opened because a limit is reached (open files, memory maps) is OpenLimit, never DamagedStore.
"""
from __future__ import annotations

import csv
import errno
import hashlib
import json
import random
import shutil
from math import floor
from pathlib import Path

import numpy as np
import pandas as pd

from durable import write_atomic
from .signals import SLOTS

MANIFEST_COLUMNS = ["night_id", "dataset", "subject", "visit", "path", "n_samples", "n_epochs", "n_scored",
                    "present", "split"]
FAILED_COLUMNS = ["dataset", "night_id", "edf", "reason"]
SPLIT_FRACTIONS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
# data.mesa_holdout: upstream's MESA split (benmfox/PFTSleep @31f33c1 jobs/model_training/train_transformer.py:79-89,
# repeated for the probe's MESA variant in train_classifier.py:108-118)
MESA_SHUFFLE_SEED = 123        # train_transformer.py:81  random.Random(123).shuffle(zarr_files_mesa)
MESA_TRAIN_SIZE = 0.9          # train_transformer.py:71, :84  GroupShuffleSplit(train_size=TRAIN_VAL_SPLIT)
MESA_SPLIT_SEED = 126          # train_transformer.py:44, :84  random_state=126
# data.resplit_seed: the probe's own train/val split of the non-test nights (train_classifier.py:73-106: line 102
# calls splitter_wsc = GroupShuffleSplit(n_splits=1, train_size=0.7, random_state=126), tc:56, :84-85)
RESPLIT_TRAIN_SIZE = 0.7       # train_classifier.py:84  WSC_MROS_TRAIN_SIZE = 0.7


def store_path(out: Path, dataset: str, night_id: str) -> Path:
    return Path(out) / dataset / f"{night_id}.zarr"


def clear_temporaries(final: Path) -> None:
    """Remove what a killed run left for this night (its hidden temporary folders)."""
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)


class DamagedStore(ValueError):
    """A night store whose files disagree with its metadata (truncated, deleted or overwritten by hand)."""


class OpenLimit(RuntimeError):
    """A sound night store that cannot be opened because a process or system limit is reached (open files, memory
    maps). An Exception, not SystemExit, so that it comes back from a DataLoader worker."""


LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE, errno.ENOMEM)   # open files (process, system); mmap: maps or memory


def write_night(final: Path, signals: np.ndarray, stages: np.ndarray, attrs: dict) -> None:
    """Write a night store atomically (an existing store is replaced). signals [7, T] float16, stages [T // 3750].

    zarr writes only the metadata; the chunks, one raw file per channel, are written here one after the other, so
    that a failure (a full disk) is raised only once nothing is writing any more and the temporary store can be
    removed whole (zarr's own writer runs chunk writes concurrently, which could outlive the exception)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    clear_temporaries(final)

    def write(temp: Path) -> None:
        import zarr                                  # here: staging and loading read raw chunks without it (0.1 s)
        group = zarr.open_group(temp, mode="w", zarr_format=3)
        group.create_array("signals", shape=signals.shape, chunks=(1, signals.shape[1]), dtype="float16",
                           compressors=None, fill_value=0.0)
        group.create_array("stages", shape=stages.shape, chunks=stages.shape, dtype="int8",
                           compressors=None, fill_value=-1)
        group.attrs.update(attrs)
        for c, channel in enumerate(signals):
            write_chunk(temp / "signals" / "c" / str(c) / "0", channel.astype("<f2"))
        write_chunk(temp / "stages" / "c" / "0", stages.astype(np.int8))
    write_atomic(final, write)


def write_chunk(path: Path, values: np.ndarray) -> None:
    """One raw little-endian chunk file, as zarr's `bytes` codec lays it out."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(np.ascontiguousarray(values).tobytes())


def _is_raw(array_dir: Path) -> tuple[bool, list[int]]:
    """(whether each chunk spans the whole last axis as raw little-endian bytes, the array's shape)."""
    meta = json.loads((array_dir / "zarr.json").read_text())
    raw = (meta["chunk_grid"]["configuration"]["chunk_shape"][-1] == meta["shape"][-1]
           and [c["name"] for c in meta["codecs"]] == ["bytes"]
           and meta["codecs"][0].get("configuration", {}).get("endian", "little") == "little")
    return raw, meta["shape"]


def read_night(store: str | Path) -> tuple[list, np.ndarray, dict]:
    """(channels, stages, attrs): `channels` is 7 array-likes [T] float16 (memmaps where possible: each holds a file
    descriptor and a memory map until it is freed). DamagedStore (one line naming the store) when its files are
    unreadable or disagree with its metadata; OpenLimit when a limit of the process or system is what failed."""
    return _reading(Path(store), _read_night)


def read_stages(store: str | Path) -> tuple[np.ndarray, dict]:
    """(stages, attrs) with the signal chunks' sizes checked but nothing left open: cheap enough for every night of a
    cohort. The same errors as read_night."""
    return _reading(Path(store), _read_stages)


def _reading(store: Path, read):
    try:
        return read(store)
    except DamagedStore:
        raise
    except (OSError, ValueError, KeyError, TypeError) as err:      # metadata cut short, a chunk zarr cannot decode
        if isinstance(err, OSError) and err.errno in LIMIT_ERRNOS:  # the store is sound: a limit is what failed
            raise OpenLimit(limit_message(store, err.errno)) from None
        raise DamagedStore(f"{store}: damaged night store ({type(err).__name__}: {err}); prepare it again "
                           f"(--overwrite)") from None


def limit_message(store: Path, code: int) -> str:
    """One line: the limit `code` (EMFILE, ENFILE, ENOMEM from mmap) hit while opening `store`, and its fix."""
    lower = "or lower data.max_open_nights (night stores each loader process keeps open)"
    if code == errno.EMFILE:
        try:
            import resource
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        except (ImportError, OSError):      # not Unix
            soft = "?"
        return (f"cannot open {store}: too many open files in this process (ulimit -n {soft}): raise the limit "
                f"(ulimit -n 65536) {lower}")
    if code == errno.ENFILE:
        return (f"cannot open {store}: too many open files on this machine (fs.file-max {_sysctl('fs/file-max')}): "
                f"raise the limit (sysctl -w fs.file-max=2097152) {lower}")
    return (f"cannot memory-map {store}: out of memory maps (vm.max_map_count {_sysctl('vm/max_map_count')}) or "
            f"address space: raise the limit (sysctl -w vm.max_map_count=262144) {lower}")


def _sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", name).read_text().strip()
    except OSError:                         # not Linux, or no file descriptor left to read it with
        return "?"


def _read_night(store: Path) -> tuple[list, np.ndarray, dict]:
    attrs = read_attrs(store)
    chunks, n_samples = _signal_chunks(store)
    if chunks is None:
        import zarr
        channels = list(zarr.open_array(store / "signals", mode="r")[:])
    else:
        channels = [np.memmap(chunk, dtype="<f2", mode="r", shape=(n_samples,)) if chunk.exists()
                    else np.zeros(n_samples, np.float16) for chunk in chunks]
    return channels, _stages(store), attrs


def _signal_chunks(store: Path) -> tuple[list | None, int]:
    """(the 7 raw chunk files, their size checked; None when the store is chunked or compressed otherwise, T)."""
    raw, (_, n_samples) = _is_raw(store / "signals")
    if not raw:
        return None, n_samples
    # zarr skips chunks equal to the fill value: an absent channel may have no file at all.
    chunks = [store / "signals" / "c" / str(c) / "0" for c in range(len(SLOTS))]
    for chunk in chunks:
        _check_size(store, chunk, 2 * n_samples)
    return chunks, n_samples


def _read_stages(store: Path) -> tuple[np.ndarray, dict]:
    attrs = read_attrs(store)
    _signal_chunks(store)             # a damaged signal chunk is named when the dataset is built, not mid-training
    return _stages(store), attrs


def _stages(store: Path) -> np.ndarray:
    stages_chunk = store / "stages" / "c" / "0"
    stages_raw, (n_epochs,) = _is_raw(store / "stages")
    if stages_raw and stages_chunk.exists():
        _check_size(store, stages_chunk, n_epochs)
        stages = np.fromfile(stages_chunk, dtype=np.int8)
    else:
        import zarr
        stages = zarr.open_array(store / "stages", mode="r")[:]
    return stages


def _check_size(store: Path, chunk: Path, expected: int) -> None:
    if chunk.exists() and chunk.stat().st_size != expected:
        raise DamagedStore(f"{store}: damaged night store: {chunk.relative_to(store)} holds {chunk.stat().st_size} "
                           f"bytes, its metadata says {expected}; prepare it again (--overwrite)")


def read_attrs(store: Path) -> dict:
    """The store's attrs without opening zarr (fast enough to scan thousands of nights)."""
    with open(Path(store) / "zarr.json") as f:
        return json.load(f).get("attributes", {})


def split_of(dataset: str, subject: str, fractions=SPLIT_FRACTIONS) -> str:
    """Stable hash of (dataset, subject): visits of one subject share a split, new nights never move old ones.
    `fractions`: ((name, share), …) summing to 1, e.g. upstream's 70/30 then 70/30 (0.49, 0.21, 0.30)."""
    digest = hashlib.sha256(f"{dataset}/{subject}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    edge = 0.0
    for name, fraction in fractions:
        edge += fraction
        if u < edge:
            return name
    return fractions[-1][0]


def group_shuffle_split(groups, train_size: float, seed: int) -> np.ndarray:
    """Rows (True) on the train side of sklearn's `next(GroupShuffleSplit(n_splits=1, train_size=train_size,
    random_state=seed).split(X, groups=groups))`, the rest on its other ("test", for us val) side, computed as
    sklearn does (sklearn/model_selection/_split.py, checked against scikit-learn 1.9.1 by tests/test_splits.py):
    GroupShuffleSplit._iter_indices takes the sorted unique groups (np.unique); _validate_shuffle_split with a float
    train_size and no test_size gives n_train = floor(train_size * n_groups), n_test = n_groups - n_train;
    BaseShuffleSplit._iter_indices draws permutation = RandomState(seed).permutation(n_groups), test groups =
    permutation[:n_test], train groups = permutation[n_test:n_test + n_train]. Where n_train is 0 (one group) sklearn
    raises; here that group goes to the val side."""
    classes, inverse = np.unique(np.asarray(list(groups), dtype=str), return_inverse=True)
    n_train = floor(train_size * len(classes))
    n_test = len(classes) - n_train
    permutation = np.random.RandomState(seed).permutation(len(classes))
    return np.isin(inverse, permutation[n_test:n_test + n_train])


def upstream_mesa_split(night_ids, subjects, holdout: int) -> list[str]:
    """Upstream's MESA split (data.mesa_holdout; train_transformer.py:79-89): the nights in night_id order (upstream
    shuffles an unsorted glob listing, so its order is the filesystem's), shuffled by random.Random(123), the first
    `holdout` test, the rest by subject 90 % train / 10 % val as GroupShuffleSplit(train_size=0.9, random_state=126)."""
    order = sorted(range(len(night_ids)), key=lambda i: night_ids[i])
    random.Random(MESA_SHUFFLE_SEED).shuffle(order)
    split = [""] * len(order)
    for i in order[:holdout]:
        split[i] = "test"
    rest = order[holdout:]
    train = group_shuffle_split([subjects[i] for i in rest], MESA_TRAIN_SIZE, MESA_SPLIT_SEED)
    for i, is_train in zip(rest, train):
        split[i] = "train" if is_train else "val"
    return split


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
    def write(temp: Path) -> None:
        with open(temp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns)
            writer.writeheader()
            writer.writerows(rows)
    write_atomic(path, write)


def write_manifest(out: Path, damaged: list | None = None) -> list[dict]:
    """Rebuild `<out>/manifest.csv` from every complete store (all datasets), sorted by dataset and night. A store
    whose metadata cannot be read is left out and appended to `damaged` as (store, reason)."""
    out = Path(out)
    rows = []
    for store in sorted(out.glob("*/*.zarr")):
        try:
            rows.append(manifest_row(out, store))
        except (OSError, ValueError, KeyError, TypeError) as err:      # zarr.json cut short, attrs missing
            if damaged is not None:
                damaged.append((store, f"{type(err).__name__}: {err}"))
    rows.sort(key=lambda r: (r["dataset"], r["night_id"]))
    _atomic_csv(out / "manifest.csv", MANIFEST_COLUMNS, rows)
    return rows


def read_manifest(root: str | Path, split: str | None = None, datasets=None, split_fractions=None, *,
                  mesa_holdout: int | None = None, resplit_seed: int | None = None,
                  field: str = "data.datasets") -> pd.DataFrame:
    """Rows of `<root>/manifest.csv`, optionally one split and a selection of datasets ('shhs') or dataset visits
    ('mros:1'), so that the paper's cohorts (train on SHHS, WSC, MrOS visit 1; test on MESA, APPLES, MrOS visit 2)
    are configs, not code. The split column, in this order (each reader of a selection passes the run's data.*):
    - split_fractions [train, val, test] re-draws it with other shares by the same subject hash (null = the
      manifest's 80/10/10);
    - mesa_holdout N re-draws MESA's by upstream's rule (`upstream_mesa_split`): N shuffled nights test, the rest
      90/10 train/val by subject;
    - resplit_seed S re-draws train/val among the non-test nights of each selected dataset (all its visits; every
      dataset if datasets is null), by subject, 70/30 as GroupShuffleSplit(train_size=0.7, random_state=S) on that
      dataset's sorted unique subjects (the upstream probe's own split, train_classifier.py:102); test is unchanged.
      One dataset at a time, so a dataset's partition does not depend on what else is selected (evaluate.py's
      selection, the probe's "+ mesa" variant). MESA is left to mesa_holdout's rule when that is set (upstream's probe
      repeats pretraining's MESA split, train_classifier.py:108-118).
    A selector naming a dataset or visit the manifest does not hold is one line naming `field` (the option that gave
    `datasets`) and what the manifest holds."""
    path = Path(root) / "manifest.csv"
    if not path.exists():
        raise SystemExit(f"{root}: no manifest.csv: data.root must be a `python -m prepare` output folder")
    manifest = pd.read_csv(path, dtype={"subject": str, "visit": str, "night_id": str})
    check_selection(manifest, datasets or [], path, field)
    if split_fractions:
        fractions = tuple(zip(("train", "val", "test"), split_fractions))
        manifest["split"] = [split_of(d, s, fractions) for d, s in zip(manifest["dataset"], manifest["subject"])]
    if mesa_holdout is not None:
        mesa = manifest.index[manifest["dataset"] == "mesa"]
        manifest.loc[mesa, "split"] = upstream_mesa_split(list(manifest.loc[mesa, "night_id"]),
                                                          list(manifest.loc[mesa, "subject"]), mesa_holdout)
    if resplit_seed is not None:
        names = {str(s).partition(":")[0] for s in datasets} if datasets else set(manifest["dataset"])
        for name in sorted(names - ({"mesa"} if mesa_holdout is not None else set())):
            rows = manifest.index[(manifest["dataset"] == name) & (manifest["split"] != "test")]
            train = group_shuffle_split(manifest.loc[rows, "subject"], RESPLIT_TRAIN_SIZE, resplit_seed)
            manifest.loc[rows, "split"] = np.where(train, "train", "val")
    if split is not None:
        manifest = manifest[manifest["split"] == split]
    if datasets:
        keep = pd.Series(False, index=manifest.index)
        for selector in datasets:
            name, _, visit = str(selector).partition(":")
            keep |= (manifest["dataset"] == name) & ((manifest["visit"] == visit) if visit else True)
        manifest = manifest[keep]
    return manifest.reset_index(drop=True)


def check_selection(manifest: pd.DataFrame, datasets, path: Path, field: str) -> None:
    """One line for a selector ('name' or 'name:visit') that no night of the manifest matches: a mistyped name would
    select nothing, and the run stop later on too few windows for its batch."""
    present = sorted(set(manifest["dataset"].dropna().astype(str)))
    for selector in datasets:
        name, _, visit = str(selector).partition(":")
        if name not in present:
            raise SystemExit(f"{field}: no dataset {name!r} in {path} (its datasets: {', '.join(present) or 'none'})")
        visits = sorted(set(manifest.loc[manifest["dataset"] == name, "visit"].dropna().astype(str)))
        if visit and visit not in visits:
            raise SystemExit(f"{field}: {selector!r}: {name} has no visit {visit!r} in {path} "
                             f"(its visits: {', '.join(visits) or 'none'})")


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
