"""Loader benchmark: 8-h windows per second per core from night stores (docs/design.md §10 target: >= 10).

Writes a few 9-h nights (band-limited noise, so that compression has something to find), then reads
8-h windows in one process (no DataLoader workers: the figure is per core) from a warm page cache,
as float16 (what a loader hands to training, which casts on the device),
with our memory-mapped reader and, for the record, with zarr's reader on the same stores and on
stores chunked per hour with zstd compression.

    python bench/loader.py [--nights 4] [--seconds 5]
"""
import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)
from data import NightDataset  # noqa: E402
from prepare import store  # noqa: E402

HOURS = 9
WINDOW_S = 8 * 3600


def fake_night(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    n = HOURS * 3600 * 125
    noise = rng.normal(0, 30, (7, n)).astype(np.float32)
    smooth = (noise + np.roll(noise, 1, axis=1) + np.roll(noise, 2, axis=1)) / 3   # some correlation
    return smooth.astype(np.float16), rng.integers(-1, 5, n // 3750).astype(np.int8)


def write_variant(path: Path, night: np.ndarray, chunk: int, compressed: bool) -> None:
    group = zarr.open_group(path, mode="w", zarr_format=3)
    compressors = zarr.codecs.ZstdCodec(level=3) if compressed else None
    group.create_array("signals", shape=night.shape, chunks=(1, chunk), dtype="float16", compressors=compressors)[:] = night


def rate(read_one, n_items: int, seconds: float) -> float:
    read_one(0)   # warm the page cache and any lazy opening
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        read_one(count % n_items)
        count += 1
    return count / (time.perf_counter() - start)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=5.0, help="time per variant")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        stores, hourly = [], []
        for i in range(args.nights):
            night, stages = fake_night(i)
            path = tmp / "ours" / f"n{i}.zarr"
            store.write_night(path, night, stages, {"night_id": f"n{i}"})
            stores.append(path)
            write_variant(tmp / "hourly" / f"n{i}.zarr", night, 450_000, compressed=True)
            hourly.append(tmp / "hourly" / f"n{i}.zarr")
        size = lambda p: sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) / 1e6
        dataset = NightDataset(stores, window_s=WINDOW_S)
        length = WINDOW_S * 125
        zarr_arrays = [zarr.open_array(p / "signals", mode="r") for p in stores]
        hourly_arrays = [zarr.open_array(p / "signals", mode="r") for p in hourly]
        variants = {
            "memmap, 1 raw chunk per channel (ours)": lambda i: dataset[i]["signals"],
            "zarr reader, same stores": lambda i: zarr_arrays[i % len(stores)][:, :length],
            "zarr reader, 1-h chunks, zstd": lambda i: hourly_arrays[i % len(hourly)][:, :length],
        }
        print(f"store size per 9-h night: raw {size(tmp / 'ours') / args.nights:.1f} MB, "
              f"zstd 1-h chunks {size(tmp / 'hourly') / args.nights:.1f} MB")
        results = {name: rate(fn, len(dataset), args.seconds) for name, fn in variants.items()}
        for name, value in results.items():
            print(f"  {name:42s} {value:7.1f} windows/s")
        print(f"loader: {results['memmap, 1 raw chunk per channel (ours)']:.1f} 8-h windows/s/core "
              f"(target >= 10; {machine.describe()})")


if __name__ == "__main__":
    main()
