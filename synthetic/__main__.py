"""python -m synthetic DATASET DIR --nights N --hours H --seed S: write a synthetic cohort (see --help)."""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from .cohort import DATASETS, write_cohort


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m synthetic",
        description="Write synthetic PSG nights in a dataset's native NSRR layout (EDF + its annotation "
                    "files), so that `python -m prepare DATASET OUTDIR OUT` reads them like a real "
                    "download. For tests and demos only: NOT a stand-in for real data.",
        epilog="Layouts: shhs polysomnography/edfs/shhs{1,2}/ + NSRR and Profusion XML; mesa "
               "polysomnography/edfs/mesa-sleep-NNNN.edf + XMLs; mros polysomnography/edfs/visit{1,2}/ "
               "(electrodes against a common reference) + XMLs; apples polysomnography/apples-NNNNNN.edf + "
               "Luna .annot; wsc polysomnography/wsc-visitV-ID-nsrr.edf + .stg.txt (even nights, Gamma, "
               "100 Hz) or .allscore.txt (odd nights, Twin, 200 Hz); edf night-NNN.edf + Sleep-EDF style "
               "night-NNN-Hypnogram.edf. True stages per full 30-s epoch (0=W 1=N1 2=N2 3=N3 4=REM, "
               "-1 movement/unscored) go to OUTDIR/.truth/<night_id>.npy. Same arguments, same bytes.")
    parser.add_argument("dataset", choices=DATASETS, help="which native layout to write")
    parser.add_argument("outdir", type=Path, help="dataset root to write into (created if missing)")
    parser.add_argument("--nights", type=int, default=3, help="number of nights (default 3); shhs and mros "
                        "pair nights into subjects with visits 1 and 2")
    parser.add_argument("--hours", type=float, default=1.0, help="recording length per night (default 1); "
                        "0-29 s are added so that a partial last epoch exists; below 2 h the sleep "
                        "cycles are compressed so that every stage appears")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    nights = write_cohort(args.dataset, args.outdir, args.nights, args.hours, args.seed)
    for night in nights:
        print(f"{night['night_id']}: {night['edf']}")
    print(f"wrote {len(nights)} {args.dataset} nights to {args.outdir} in {time.perf_counter() - began:.1f} s",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
