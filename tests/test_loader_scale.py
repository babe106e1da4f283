"""Issue 22 item 5, the loader at cohort scale: thousands of nights read under `ulimit -n 1024` with the open files and
memory maps bounded (NightDataset keeps max_open_nights nights open), a limit reported as a limit (never as a damaged
store), and a /dev/shm too small for the batches in flight named in one line before training."""
import contextlib
import errno
import json
import os
import pickle
import resource
import subprocess
import sys
import weakref

import numpy as np
import pandas as pd
import pytest
import torch

import training
import train_pretrain
from data import NightDataset
from prepare import store

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EPOCH = 3750
N_STORES = 3                 # distinct nights behind the symlinks, so that a window read from the wrong night shows
N_NIGHTS = 2000
MAX_OPEN = 8
CHANNEL_FILES = 7            # a night's memmaps: 7 file descriptors and 7 memory maps
PROC = pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="counts descriptors and maps in /proc/self")
SMALL = ["--config", "configs/pretrain_tiny.yaml", "--model.d_model", "16", "--model.d_ff", "32", "--model.n_heads",
         "2", "--model.max_patches", "300", "--data.window_s", "1800", "--data.val_split", "train",
         "--train.max_steps", "1"]


def night_signals(seed: int) -> np.ndarray:
    """The one-epoch night `seed` [7, 3750] float16, exact integers."""
    return (np.arange(7)[:, None] * 100 + seed * 10 + np.arange(EPOCH)[None, :] % 7).astype(np.float16)


def write_store(path, seed: int):
    stages = np.array([2], np.int8)
    attrs = {"night_id": path.stem, "dataset": "t", "subject": path.stem, "visit": "1", "fs": 125, "epoch_s": 30,
             "duration_s": 30.0, "n_scored": 1, "channels": list("ABCDEFG"), "present": [True] * 7}
    store.write_night(path, night_signals(seed), stages, attrs)
    return path


def cohort(folder, n_nights: int):
    """n_nights night stores folder/t/n{i}.zarr: symlinks to N_STORES real ones under folder/real/ (night i holds
    night_signals(i % 3))."""
    real = [write_store(folder / "real" / f"s{k}.zarr", k) for k in range(N_STORES)]
    (folder / "t").mkdir(parents=True)
    paths = []
    for i in range(n_nights):
        paths.append(folder / "t" / f"n{i}.zarr")
        paths[-1].symlink_to(real[i % N_STORES], target_is_directory=True)
    return paths


def training_cohort(folder, n_nights: int):
    """A `python -m prepare` output folder of n_nights real one-epoch nights, every one in the train split."""
    for i in range(n_nights):
        write_store(folder / "t" / f"n{i}.zarr", i)
    store.write_manifest(folder)
    manifest = pd.read_csv(folder / "manifest.csv", dtype=str)
    manifest["split"] = "train"
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder


# Runs in a process started under ulimit -n 1024: reads one window of every night, in this process and through a
# DataLoader with 2 workers, and reports what each process held of the stores at most (files open, maps) and in all.
SCALE_SCRIPT = r"""
import json, os, sys
import numpy as np, torch
sys.path.insert(0, os.getcwd())
from data import NightDataset

real, n_nights, max_open = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])

def held():
    fds = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            fds.append(os.readlink(f"/proc/self/fd/{fd}"))
        except OSError:                                   # the listing's own descriptor, closed meanwhile
            pass
    with open("/proc/self/maps") as f:
        maps = f.read().splitlines()
    return {"store_fds": sum(real in t for t in fds), "fds": len(fds),
            "store_maps": sum(real in m for m in maps), "maps": len(maps)}

class Counting(NightDataset):                           # measures at every 20th window (reading /proc takes time)
    def __getitem__(self, index):
        item = super().__getitem__(index)
        item.update(held() if index % 20 == 0 else dict.fromkeys(("store_fds", "fds", "store_maps", "maps"), 0))
        return item

SIGNALS = [torch.from_numpy((np.arange(7)[:, None] * 100 + seed * 10 + np.arange(3750)[None, :] % 7).astype(np.float16))
           for seed in range(3)]                           # night_signals(seed) of the 3 real stores

def expected(night):
    return SIGNALS[night % 3]

dataset = Counting([f"{os.path.dirname(real)}/t/n{i}.zarr" for i in range(n_nights)], window_s=30,
                   max_open_nights=max_open)
report = {"before": held(), "windows": len(dataset), "wrong": 0, "main": {}, "workers": {}}
for i in range(len(dataset)):
    item = dataset[i]
    report["wrong"] += item["night"] != i or not torch.equal(item["signals"], expected(i))
    for key in ("store_fds", "fds", "store_maps", "maps"):
        report["main"][key] = max(report["main"].get(key, 0), item[key])
loader = torch.utils.data.DataLoader(dataset, batch_size=50, num_workers=2)
seen = 0
for batch in loader:
    for night, signals in zip(batch["night"].tolist(), batch["signals"]):
        report["wrong"] += not torch.equal(signals, expected(night))
        seen += 1
    for key in ("store_fds", "fds", "store_maps", "maps"):
        report["workers"][key] = max(report["workers"].get(key, 0), int(batch[key].max()))
report["seen"] = seen

# max_open_nights too high for the limit (7000 descriptors): the worker's error names the limit. The iterator is kept,
# so that it is not shut down (a 5-s wait for a worker that raised) but ended with this process.
too_many = iter(torch.utils.data.DataLoader(NightDataset(dataset.stores, window_s=30, max_open_nights=1000),
                                            batch_size=50, num_workers=1))
try:
    for batch in too_many:
        pass
except Exception as err:
    report["too_many"] = [type(err).__name__, str(err).splitlines()[-1]]
print(json.dumps(report))
"""


@PROC
def test_thousands_of_nights_under_ulimit_1024_keep_files_and_maps_bounded(tmp_path):
    """Before the LRU, the ~146th night failed here (7 descriptors a night, all kept), reported as a damaged store."""
    cohort(tmp_path, N_NIGHTS)
    real = str(tmp_path / "real")

    def ulimit_1024():
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))
    job = subprocess.run([sys.executable, "-c", SCALE_SCRIPT, real, str(N_NIGHTS), str(MAX_OPEN)], cwd=ROOT,
                         capture_output=True, text=True, timeout=300, preexec_fn=ulimit_1024)
    assert job.returncode == 0, job.stderr[-3000:]
    report = json.loads(job.stdout.splitlines()[-1])
    assert report["windows"] == report["seen"] == N_NIGHTS and report["wrong"] == 0
    bound = MAX_OPEN * CHANNEL_FILES                 # every store file a process holds belongs to an open night
    for process in ("main", "workers"):
        held = report[process]
        assert 0 < held["store_fds"] <= bound and 0 < held["store_maps"] <= bound, (process, held)
        assert held["fds"] < 200, (process, held)
        # maps besides the stores' (libraries, arenas) do not grow with the nights read
        assert held["maps"] - held["store_maps"] < report["before"]["maps"] + 200, (process, held, report["before"])
    kind, message = report["too_many"]                 # OpenLimit came back from the worker as itself
    assert kind == "OpenLimit" and "too many open files in this process (ulimit -n 1024)" in message, message
    assert "damaged" not in message and "lower data.max_open_nights" in message


@PROC
def test_lru_keeps_at_most_max_open_nights_open_and_closes_the_evicted(tmp_path):
    paths = [write_store(tmp_path / f"n{i}.zarr", i) for i in range(4)]

    def held(night):                                                # this process's descriptors and maps of a night
        fds = [os.readlink(f"/proc/self/fd/{fd}") for fd in os.listdir("/proc/self/fd")
               if os.path.exists(f"/proc/self/fd/{fd}")]
        with open("/proc/self/maps") as f:
            maps = f.read()
        return sum(str(paths[night]) in t for t in fds), maps.count(str(paths[night]))
    dataset = NightDataset(paths, window_s=30, max_open_nights=2)
    assert [held(n) for n in range(4)] == [(0, 0)] * 4             # indexing the nights leaves nothing open
    for night in (0, 1, 0):
        dataset[night]
    evicted = weakref.ref(dataset._open[1][0]._mmap)               # night 1: the least recently used now
    item = dataset[2]
    assert list(dataset._open) == [0, 2] and evicted() is None      # its memmaps freed: unmapped, descriptors closed
    assert torch.equal(item["signals"], torch.from_numpy(night_signals(2)))
    assert [held(n) for n in range(4)] == [(7, 7), (0, 0), (7, 7), (0, 0)]
    for night in (3, 1, 3):
        dataset[night]
    assert list(dataset._open) == [1, 3] and [held(n) for n in range(4)] == [(0, 0), (7, 7), (0, 0), (7, 7)]
    assert list(pickle.loads(pickle.dumps(dataset))._open) == []    # a spawned worker opens its own


@contextlib.contextmanager
def spare_descriptors(room: int):
    """This process's soft RLIMIT_NOFILE lowered so that only `room` descriptor numbers are free below it (yields
    the limit); restored afterwards."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    used = {int(fd) for fd in os.listdir("/proc/self/fd") if os.path.exists(f"/proc/self/fd/{fd}")}
    free = [fd for fd in range(max(used) + room + 2) if fd not in used][:room + 1]
    resource.setrlimit(resource.RLIMIT_NOFILE, (free[-1], hard))
    try:
        yield free[-1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


@PROC
def test_an_open_file_limit_is_named_as_such_not_as_a_damaged_store(tmp_path):
    path = write_store(tmp_path / "n0.zarr", 0)
    dataset = NightDataset([path], window_s=30)
    with spare_descriptors(3) as limit, pytest.raises(store.OpenLimit) as error:
        dataset[0]                                     # 1 descriptor to open with, 2 for memmaps: the 3rd fails
    message = str(error.value)
    assert message == (f"cannot open {path}: too many open files in this process (ulimit -n {limit}): raise the limit "
                       f"(ulimit -n 65536) or lower data.max_open_nights (night stores each loader process keeps open)")
    assert "damaged" not in message and not dataset._open
    assert torch.equal(dataset[0]["signals"], torch.from_numpy(night_signals(0)))     # room again: read as ever


def test_a_memory_map_limit_is_named_as_such(tmp_path, monkeypatch):
    path = write_store(tmp_path / "n0.zarr", 0)

    def no_map_left(*args, **kwargs):
        raise OSError(errno.ENOMEM, "Cannot allocate memory")
    monkeypatch.setattr(store.np, "memmap", no_map_left)
    with pytest.raises(store.OpenLimit) as error:
        store.read_night(path)
    message = str(error.value)
    assert message.startswith(f"cannot memory-map {path}: out of memory maps (vm.max_map_count ")
    assert "raise the limit (sysctl -w vm.max_map_count=262144) or lower data.max_open_nights" in message
    assert "damaged" not in message and "\n" not in message


def test_a_limit_while_indexing_the_cohort_is_one_line_from_training(tmp_path, monkeypatch, one_line_exit):
    nights = training_cohort(tmp_path / "nights", 2)

    def emfile(store_path):
        raise OSError(errno.EMFILE, "Too many open files")
    monkeypatch.setattr(store, "read_attrs", emfile)
    message = one_line_exit(lambda: train_pretrain.main([*SMALL, "--data.root", str(nights), "--data.num_workers", "0",
                                                         "--run-dir", str(tmp_path / "run")]))
    assert "too many open files in this process (ulimit -n" in message and "damaged" not in message


def test_a_small_dev_shm_is_one_line_before_training(tmp_path, monkeypatch, one_line_exit):
    nights = training_cohort(tmp_path / "nights", 2)
    dataset = NightDataset(sorted(nights.glob("t/*.zarr")), window_s=30)
    # 4 × (signals f16, padding_mask, padded_epochs, stages int64, present, night and start int64)
    batch = 4 * (7 * EPOCH * 2 + EPOCH + 1 + 8 + 7 + 8 + 8)
    shm = tmp_path / "shm"
    shm.mkdir()
    statvfs = os.statvfs

    def tiny(path):                                  # 16 free blocks of 4 KiB at `shm`, the truth elsewhere
        if str(path) not in (str(shm), "/dev/shm"):
            return statvfs(path)
        return os.statvfs_result((4096, 4096, 100, 16, 16, 100, 10, 10, 0, 255))
    monkeypatch.setattr(os, "statvfs", tiny)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    message = one_line_exit(lambda: training.check_shared_memory(dataset, 4, 2, shm=str(shm)))
    need = 2 * 2 * 2 * batch
    assert message == (f"{shm} has {16 * 4096 / 2**20:.1f} MiB free, the batches in flight need {need / 2**20:.1f} MiB "
                       f"(1 process(es) × 2 loaders × 2 workers × 2 batches of {batch / 2**20:.1f} MiB): give the "
                       f"container more shared memory (docker run --shm-size 8g) or lower data.num_workers (0 reads in "
                       f"the main process)")
    training.check_shared_memory(dataset, 4, 0, shm=str(shm))                     # no workers: nothing through shm
    training.check_shared_memory(dataset, 4, 2, shm=str(tmp_path))                # room enough: nothing said
    training.check_shared_memory(dataset, 4, 2, shm=str(tmp_path / "absent"))     # no such folder (not Linux): no check
    if os.path.isdir("/dev/shm"):                    # the training script checks before it writes anything
        message = one_line_exit(lambda: train_pretrain.main([*SMALL, "--data.root", str(nights), "--data.num_workers",
                                                             "2", "--run-dir", str(tmp_path / "run")]))
        assert message.startswith("/dev/shm has 0.1 MiB free") and "--shm-size 8g" in message
        assert not (tmp_path / "run").exists()
