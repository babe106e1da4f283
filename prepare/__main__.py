"""python -m prepare: turn NSRR downloads (or any EDFs) into night stores.

See `python -m prepare --help` and README.md ("Preparing data") and docs/reproduce.md.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: docs/benchmarks.md "Threads"

import argparse
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from tqdm import tqdm

from config import positive
from durable import die_with_parent, kill_point
from . import apples, generic, mesa, mros, shhs, store, wsc
from .night import DEFAULT_REQUIRED, NIGHT_ERRORS, Night, Options, make_options, prepare_night, unknown_label_report
from .signals import SLOTS

DATASETS = {"shhs": shhs, "mesa": mesa, "mros": mros, "apples": apples, "wsc": wsc, "edf": generic}

EPILOG = f"""
datasets and the layout SRC must have (as NSRR distributes it):
  shhs    SRC/polysomnography/edfs/shhs1/shhs1-200001.edf  + annotations-events-nsrr/shhs1/shhs1-200001-nsrr.xml
  mesa    SRC/polysomnography/edfs/mesa-sleep-0001.edf     + annotations-events-nsrr/mesa-sleep-0001-nsrr.xml
  mros    SRC/polysomnography/edfs/visit1/mros-visit1-aa0001.edf + annotations-events-nsrr/visit1/…-nsrr.xml
  apples  SRC/polysomnography/apples-130001.edf            + apples-130001.annot (Luna)
  wsc     SRC/polysomnography/wsc-visit1-10119-nsrr.edf    + …-nsrr.stg.txt or …-nsrr.allscore.txt
  edf     EDF files or folders of them (any source): python -m prepare edf a.edf b.edf OUT [--annotations A B]
For SHHS, MESA and MrOS the NSRR XML is read; the Profusion XML (annotations-events-profusion/) is the
fallback when the NSRR one is missing. The file used is recorded in each store's attrs.

output: OUT/<dataset>/<night_id>.zarr (signals float16 [7, T] at 125 Hz in the order {', '.join(SLOTS)};
stages int8 [T // 3750], 0=W 1=N1 2=N2 3=N3 4=REM -1=unscored), OUT/manifest.csv (all nights in OUT),
OUT/failed.csv (nights that could not be prepared, with the reason). Each night is written to a
temporary name and renamed when complete: a killed job re-run with the same command finishes the rest.
A bad night is reported, listed in failed.csv and skipped; the exit status is 0 unless nothing could run.
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m prepare", description="Prepare full-night PSGs as 125-Hz, 7-channel night stores "
        "(filtered as in the PFTSleep paper) with their 30-s sleep stages.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dataset", choices=sorted(DATASETS), help="which dataset layout SRC follows")
    parser.add_argument("paths", nargs="+", metavar="SRC… OUT",
                        help="dataset root (for `edf`: EDF files or folders), then the output folder")
    parser.add_argument("--workers", type=positive(int), default=1, help="processes working on nights in parallel (default 1)")
    parser.add_argument("--shard", default="0/1", metavar="I/N",
                        help="only nights whose index (sorted by id) %% N == I, 0 <= I < N: one array job each")
    parser.add_argument("--limit", type=positive(int), default=None, metavar="K", help="only the first K nights (of this shard)")
    parser.add_argument("--overwrite", action="store_true", help="prepare nights again even when their store exists")
    parser.add_argument("--channels", type=Path, metavar="map.yaml",
                        help="YAML mapping slot -> EDF label or 'A - B' derivation (null = absent); "
                             "overrides the built-in alias table, e.g. {EEG: C4-M1, EOG: E1 - M2}")
    parser.add_argument("--annotations", nargs="+", type=Path, metavar="FILE",
                        help="`edf` only: annotation file per EDF, in order (NSRR/Profusion XML, Luna .annot, "
                             "WSC .stg.txt/.allscore.txt, EDF+ hypnogram, or one stage per line)")
    parser.add_argument("--require", default=",".join(DEFAULT_REQUIRED),
                        help="slots whose absence fails a night (comma list, 'all' or 'none'; default "
                             f"{','.join(DEFAULT_REQUIRED)}); other missing slots are stored as zeros, marked absent")
    parser.add_argument("--zero-phase", action="store_true",
                        help="zero-phase Butterworth (sosfiltfilt) instead of the paper's causal sosfilt; for new models")
    parser.add_argument("--clean-spo2", action="store_true",
                        help="interpolate SpO2 samples outside 50-100 %% (off, as in the paper)")
    args = parser.parse_args(argv)
    if len(args.paths) < 2:
        parser.error("give SRC and OUT")
    *args.sources, args.out = [Path(p) for p in args.paths]
    if args.dataset != "edf" and len(args.sources) != 1:
        parser.error(f"{args.dataset} takes one SRC folder")
    if args.annotations and args.dataset != "edf":
        parser.error("--annotations is for the `edf` dataset; NSRR datasets find their own annotation files")
    try:
        index, count = (int(p) for p in args.shard.split("/"))
        assert 0 <= index < count
    except (ValueError, AssertionError):
        parser.error(f"--shard must be I/N with 0 <= I < N, got {args.shard!r}")
    args.shard = (index, count)
    return args


def prepare_one(night: Night, out: Path, opts: Options) -> tuple[Night, str | None]:
    """Prepare and write one night; returns (night, failure reason or None). Runs in a worker."""
    final = store.store_path(out, night.dataset, night.night_id)
    try:
        signals, stages, attrs = prepare_night(night, DATASETS[night.dataset].CHANNELS, opts)
        store.write_night(final, signals, stages, attrs)
        return night, None
    except NIGHT_ERRORS as err:
        reason = str(err).replace("\n", " ")
    except Exception as err:   # a bug must not sink the batch, but must be visible as one
        reason = f"internal error ({type(err).__name__}): {err}".replace("\n", " ")
    store.clear_temporaries(final)
    return night, reason


def check_writable(out: Path) -> str | None:
    """None if OUT can be created and written, else why not: checked before any night is computed."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=out, prefix=".write-test-"):
            pass
    except OSError as err:
        return f"{out}: cannot write the output folder ({err.strerror})"
    return None


def main(argv=None) -> int:
    args = parse_args(argv)
    opts = make_options(args.channels, args.require, args.zero_phase, args.clean_spo2)
    problem = check_writable(args.out)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    module = DATASETS[args.dataset]
    nights = (module.find_nights(args.sources, args.annotations) if args.dataset == "edf"
              else module.find_nights(args.sources[0]))
    if not nights:
        print(f"error: no {args.dataset} nights found under {', '.join(map(str, args.sources))} "
              f"(see `python -m prepare --help` for the expected layout)", file=sys.stderr)
        return 2
    index, count = args.shard
    nights = sorted(nights, key=lambda n: n.night_id)[index::count][: args.limit]
    todo = [n for n in nights if args.overwrite or not store.store_path(args.out, n.dataset, n.night_id).exists()]
    done_before = len(nights) - len(todo)

    failures, written, started = [], 0, time.time()
    with tqdm(total=len(todo), desc=f"prepare {args.dataset}", unit="night") as progress:
        if args.workers > 1:
            with ProcessPoolExecutor(args.workers, initializer=die_with_parent, initargs=(os.getpid(),)) as pool:
                results = pool.map(prepare_one, todo, [args.out] * len(todo), [opts] * len(todo))
                written = _collect(results, failures, progress)
        else:
            written = _collect((prepare_one(n, args.out, opts) for n in todo), failures, progress)

    damaged = []
    manifest = store.write_manifest(args.out, damaged)
    store.update_failed(args.out, [(n.dataset, n.night_id) for n in todo], failures)
    print(f"{written} written, {done_before} skipped (already done), {len(failures)} failed "
          f"in {time.time() - started:.1f} s; {args.out / 'manifest.csv'} lists {len(manifest)} nights")
    for failure in failures:
        print(f"  failed {failure['night_id']}: {failure['reason']}")
    if failures:
        print(f"  (also in {args.out / 'failed.csv'})")
    for path, reason in damaged:
        print(f"  damaged store left out of the manifest: {path} ({reason}); delete it or prepare again with "
              f"--overwrite")
    for line in unknown_label_report(args.out, todo):
        print(f"  note {line}")
    return 0


def _collect(results, failures: list, progress) -> int:
    written = 0
    for night, reason in results:
        if reason is None:
            written += 1
            kill_point("night", written)
        else:
            failures.append({"dataset": night.dataset, "night_id": night.night_id, "edf": str(night.edf), "reason": reason})
            progress.write(f"failed {night.night_id}: {reason}")
        progress.update()
    return written


if __name__ == "__main__":
    sys.exit(main())
