"""Prepare benchmark: hours of PSG prepared per second per core (docs/design.md §10 target: >= 0.5).

Writes synthetic nights in a dataset's native layout (default MrOS, the heaviest: 512-Hz ECG and a
derivation for every slot), then times `python -m prepare`'s per-night work (read EDF, annotations,
units, filters, resampling, write the store) in this one process, so the figure is per core.

    python bench/prepare.py [--dataset mros] [--hours 8] [--nights 2]
"""
import argparse
import importlib
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)
import synthetic  # noqa: E402
from prepare import store  # noqa: E402
from prepare.night import Options, prepare_night  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="mros", choices=["shhs", "mesa", "mros", "apples", "wsc"])
    parser.add_argument("--hours", type=float, default=8.0)
    parser.add_argument("--nights", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        src, out = Path(tmp) / "src", Path(tmp) / "out"
        synthetic.write_cohort(args.dataset, src, nights=args.nights, hours=args.hours, seed=0)
        dataset = importlib.import_module(f"prepare.{args.dataset}")          # its layout and channel table
        nights = dataset.find_nights(src)
        timings = []
        for night in nights:
            start = time.perf_counter()
            signals, stages, attrs = prepare_night(night, dataset.CHANNELS, Options())
            store.write_night(store.store_path(out, night.dataset, night.night_id), signals, stages, attrs)
            timings.append(time.perf_counter() - start)
        best = min(timings)
        print(f"{args.dataset}: {len(nights)} nights of {args.hours:g} h, seconds per night: "
              + ", ".join(f"{t:.2f}" for t in timings))
        print(f"prepare: {args.hours / best:.2f} h of PSG/s/core (target >= 0.5; {machine.describe()})")


if __name__ == "__main__":
    main()
