"""Stage whole nights from EDF files with a trained probe run: hypnogram, hypnodensity and sleep statistics per night.

    python predict.py night.edf --run runs/probe                          # writes next to the EDF
    python predict.py edfs/*.edf --run runs/probe --out predictions --channels map.yaml --device cuda

Each EDF goes through exactly the signal path of `python -m prepare edf` (prepare.night.prepare_night: channel
aliases or --channels map.yaml, unit conversion, the paper's filters, resampling to 125 Hz), unlabelled. A slot that
is missing (or flat, all-NaN, in unknown units) is fed to the model as zeros and named in a one-line warning; with
--require-all it fails that night instead. The night is staged whole by stage.stage_night: windows of the run's
data.window_s every --stride-s (default half a window), an epoch's probabilities averaged over the windows that saw
it; a night shorter than one window is zero-padded and masked. Only full 30-s epochs are staged.

Per night <stem> (the EDF's name without .edf), written to a temporary name and renamed when complete:
  <stem>.hypnogram.csv  epoch, onset_s, clock_time (HH:MM:SS from the EDF start; empty if the header has none),
                        stage (W/N1/N2/N3/R, the most probable), p_W, p_N1, p_N2, p_N3, p_REM
  <stem>.stats.json     sleep statistics of the predicted hypnogram (below), the run, the absent slots, warnings
  <stem>.png            hypnogram over hypnodensity (matplotlib; skipped with a note if it is not installed)
  <stem>.stages.edf     with --edf-annotations: the predicted stages as an EDF+ annotation file ('Sleep stage W',
                        'Sleep stage N1' … 'Sleep stage R', one annotation per run of equal stages, onsets from the
                        recording start) that EDFbrowser, MNE or `python -m prepare edf --annotations` can read

Sleep statistics: stage.sleep_statistics (its module docstring defines each one; so does the README).

EDFs from other vendors: labels and units in UTF-8 or Latin-1 ('µV'), any sampling rate (resampled to 125 Hz),
physical dimensions V, mV or µV, and headers pyedflib refuses (prepare/edf.py is our own reader) are read as they are.
An EDF+D (discontinuous) file is laid out on its records' own start times, the gaps interpolated and named in the
night's warnings. A file with fewer data records than its header says is staged as far as it goes, with a warning
(--strict: an error). Anything else that is wrong (unreadable header, every slot missing, unknown unit, records that
overlap) prints one line naming the file and the cause; the batch goes on, and a summary lists the failures. Exit
status 0 if at least one night was staged, 1 if every night failed.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

import runs
import stage
from prepare import edf as edf_format
from prepare.annotations import STAGES
from prepare.generic import CHANNELS
from prepare.night import NIGHT_ERRORS, Night, make_options, prepare_night
from prepare.signals import EPOCH_S, EPOCH_SAMPLES, FS, SLOTS

COLUMNS = ("epoch", "onset_s", "clock_time", "stage", *(f"p_{name}" for name in STAGES))


class NightFailed(Exception):
    """A night that could not be staged; the message is the one-line cause."""


def load_run(run_dir: Path):
    """(encoder, probe, window_s) of a probe run; exits with one line if the folder is not one."""
    try:
        run = runs.read_run(run_dir)
        return run.encoder(), run.probe(), float(run.config["data"]["window_s"])
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as err:   # no folder/checkpoint, weights that do not fit
        raise SystemExit(f"predict.py: {run_dir} is not a probe run (needs config.yaml with model:, probe:, "
                         f"data.window_s and ckpt_final.pt): {str(err).splitlines()[0]}")


def read_night(edf: Path, opts) -> tuple[np.ndarray, dict]:
    """The prepared [7, T] float32 signals and attrs, through the same code as `python -m prepare edf`."""
    night = Night(dataset="edf", night_id=edf.stem, subject=edf.stem, visit="", edf=edf, labelled=False)
    try:
        signals, _, attrs = prepare_night(night, CHANNELS, opts)
    except NIGHT_ERRORS as err:
        # the file is named once, by main: drop the reader's own "path: " prefix
        raise NightFailed(str(err).replace("\n", " ").removeprefix(f"{edf}: ")) from None
    return signals.astype(np.float32), attrs


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(temp):
        with open(temp, "w") as f:
            f.write(",".join(COLUMNS) + "\n")
            f.writelines(",".join(str(row[c]) for c in COLUMNS) + "\n" for row in rows)
    runs.write_atomic(path, write)


def write_json(path: Path, value: dict) -> None:
    runs.write_atomic(path, lambda temp: temp.write_text(json.dumps(value, indent=2) + "\n"))


def predict_one(edf: Path, out: Path | None, run, opts, args, plt) -> list[Path]:
    """Stage one EDF and write its files; raises NightFailed with a one-line cause."""
    encoder, probe, window_s = run
    signals, attrs = read_night(edf, opts)
    absent = [slot for slot, ok in zip(SLOTS, attrs["present"]) if not ok]
    if len(absent) == len(SLOTS):
        raise NightFailed(f"no usable channel: {'; '.join(attrs['warnings'])}")
    if absent:
        reasons = [warning for warning in attrs["warnings"] if warning.startswith("slot ")]
        print(f"warning: {edf}: absent slots {', '.join(absent)} (fed as zeros): {'; '.join(reasons)}")
    window = int(round(window_s / EPOCH_S)) * EPOCH_SAMPLES
    stride = int(round((args.stride_s or window_s / 2) / EPOCH_S)) * EPOCH_SAMPLES
    probs = stage.stage_night(encoder, probe, signals, window, max(stride, EPOCH_SAMPLES), args.batch_size,
                        args.device).numpy()                                                    # [E, 5]
    folder = out or edf.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / edf.stem
    written = [stem.with_name(stem.name + ".hypnogram.csv"), stem.with_name(stem.name + ".stats.json")]
    write_csv(written[0], stage.hypnogram_rows(probs, attrs["start_time"]))
    stats = stage.sleep_statistics(probs.argmax(axis=1))
    write_json(written[1], {"edf": str(edf), "run": str(args.run), "start_time": attrs["start_time"],
                            "window_s": window_s, "stride_s": stride / FS, **stats,
                            "absent_slots": absent, "source_labels": attrs["source_labels"],
                            "warnings": attrs["warnings"]})
    for warning in attrs["warnings"]:
        if not warning.startswith("slot "):                       # slot warnings were printed with the absent slots
            print(f"warning: {edf}: {warning}")
    if args.edf_annotations:
        written.append(stem.with_name(stem.name + ".stages.edf"))
        start = dt.datetime.fromisoformat(attrs["start_time"]) if attrs["start_time"] else None
        edf_format.write_annotations(written[-1], stage.stage_annotations(probs.argmax(axis=1)), start, "predict.py")
    if plt is not None:
        written.append(stem.with_name(stem.name + ".png"))
        stage.plot_hypnogram(written[-1], probs, edf.name, plt=plt)
    return written


# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("edfs", nargs="+", type=Path, metavar="EDF", help="EDF files to stage, each independently")
    parser.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                        help="probe run folder (config.yaml + ckpt_final.pt, trained or imported)")
    parser.add_argument("--channels", type=Path, metavar="map.yaml",
                        help="YAML mapping slot -> EDF label or 'A - B' derivation (null = absent), e.g. "
                             "{EEG: C4-M1, EOG: E1 - M2}; slots left out use the built-in alias table")
    parser.add_argument("--out", type=Path, help="output folder (default: next to each EDF)")
    parser.add_argument("--edf-annotations", action="store_true",
                        help="also write <stem>.stages.edf, the predicted stages as EDF+ annotations")
    parser.add_argument("--require-all", action="store_true",
                        help="fail a night if any of the 7 slots is absent (default: absent slots are zeros, warned)")
    parser.add_argument("--strict", action="store_true",
                        help="fail a night whose EDF holds fewer data records than its header says (default: stage "
                             "the records that are there and say so in a warning)")
    parser.add_argument("--stride-s", dest="stride_s", type=float, default=None,
                        help="seconds between window starts (default: half the run's data.window_s)")
    parser.add_argument("--zero-phase", action="store_true",
                        help="zero-phase filters, as `python -m prepare --zero-phase`: only for a run trained on "
                             "nights prepared that way (default: the paper's causal filters)")
    parser.add_argument("--batch-size", dest="batch_size", type=int, default=4,
                        help="windows per forward pass (default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if available)")
    for old in ("--stride_s", "--batch_size"):                     # the spellings before flags were kebab-case
        parser.add_argument(old, dest=old[2:], type=float if old.endswith("_s") else int, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    # the channel map is checked exactly as `python -m prepare` checks it
    opts = make_options(args.channels, require="all" if args.require_all else "none", zero_phase=args.zero_phase)
    opts.allow_truncated = not args.strict
    encoder, probe, window_s = load_run(args.run)
    run = (encoder.to(args.device), probe.to(args.device), window_s)
    plt = stage.pyplot()
    failures, started = [], time.time()
    for edf in args.edfs:
        try:
            written = predict_one(edf, args.out, run, opts, args, plt)
            print(f"{edf}: wrote {', '.join(p.name for p in written)}")
        except NightFailed as err:
            failures.append((edf, str(err)))
        except Exception as err:          # a bug must not sink the batch, but must be visible as one
            failures.append((edf, f"internal error ({type(err).__name__}): {err}".replace("\n", " ")))
        if failures and failures[-1][0] == edf:
            print(f"error: {edf}: {failures[-1][1]}", file=sys.stderr)
    n_ok = len(args.edfs) - len(failures)
    print(f"{n_ok} of {len(args.edfs)} nights staged in {time.time() - started:.1f} s, {len(failures)} failed")
    for edf, reason in failures:
        print(f"  failed {edf}: {reason}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
