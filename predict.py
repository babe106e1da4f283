"""Stage whole nights from EDF files with a trained probe run: hypnogram, hypnodensity and sleep statistics per night.

    python predict.py night.edf --run runs/probe                          # writes next to the EDF
    python predict.py edfs/*.edf --run runs/probe --out predictions --channels map.yaml --device cuda

Each EDF goes through exactly the signal path of `python -m prepare edf` (prepare.night.prepare_night: channel
aliases or --channels map.yaml, unit conversion, the paper's filters, resampling to 125 Hz), unlabelled. A slot that
is missing (or flat, all-NaN, in unknown units) is fed to the model as zeros and named in a one-line warning; with
--require-all it fails that night instead. The night is staged whole by model.stage_night: windows of the run's
data.window_s every --stride_s (default half a window), an epoch's probabilities averaged over the windows that saw
it; a night shorter than one window is zero-padded and masked. Only full 30-s epochs are staged.

Per night <stem> (the EDF's name without .edf), written to a temporary name and renamed when complete:
  <stem>.hypnogram.csv  epoch, onset_s, clock_time (HH:MM:SS from the EDF start; empty if the header has none),
                        stage (W/N1/N2/N3/R, the most probable), p_W, p_N1, p_N2, p_N3, p_REM
  <stem>.stats.json     sleep statistics of the predicted hypnogram (below), the run, the absent slots, warnings
  <stem>.png            hypnogram over hypnodensity (matplotlib; skipped with a note if it is not installed)
  <stem>.stages.edf     with --edf-annotations: the predicted stages as an EDF+ annotation file ('Sleep stage W',
                        'Sleep stage N1' … 'Sleep stage R', one annotation per run of equal stages, onsets from the
                        recording start) that EDFbrowser, MNE or `python -m prepare edf --annotations` can read

Sleep statistics (AASM-style; minutes unless noted; an epoch is 30 s = 0.5 min; sleep = N1, N2, N3 or R):
  TIB_min          time in bed: all recorded full epochs × 0.5 (lights-off/on are not in an EDF: the recording is TIB)
  SOL_min          sleep onset latency: first sleep epoch − recording start (null if no sleep)
  SPT_min          sleep period time: first to last sleep epoch inclusive
  TST_min          total sleep time: sleep epochs × 0.5
  WASO_min         wake after sleep onset: W epochs inside the SPT
  SE_pct           sleep efficiency: TST / TIB × 100
  REM_latency_min  first R epoch − first sleep epoch (null if no R)
  stage_min        minutes per stage W, N1, N2, N3, R (over the whole recording)
  stage_pct_TST    N1, N2, N3, R as % of TST (null if TST = 0)
  awakenings       runs of >= MIN_AWAKENING_EPOCHS consecutive W epochs inside the SPT (2 epochs = 1 min)

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
import os
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
import yaml

import model
from model import load_encoder, load_probe, stage_night
from prepare.__main__ import EXPECTED_ERRORS, build_options
from prepare.generic import CHANNELS
from prepare.night import Night, prepare_night
from prepare.signals import EPOCH_S, EPOCH_SAMPLES, FS, SLOTS

STAGES = ("W", "N1", "N2", "N3", "R")                      # class index = stage code; R as in AASM hypnograms
PROB_COLUMNS = ("p_W", "p_N1", "p_N2", "p_N3", "p_REM")    # DESIGN.md §8 column names
COLUMNS = ("epoch", "onset_s", "clock_time", "stage", *PROB_COLUMNS)
MIN_AWAKENING_EPOCHS = 2                                   # an awakening is >= 1 min of W inside the SPT
W, REM = 0, 4

# ----------------------------------------------------------------------------------------------------------------------
# Sleep statistics: a pure function of the stage sequence


def _runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """(start, length) of each run of True in a 1-d boolean array."""
    edges = np.diff(np.concatenate([[0], mask.astype(np.int8), [0]]))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return list(zip(starts.tolist(), (ends - starts).tolist()))


def sleep_statistics(stages, epoch_s: float = EPOCH_S) -> dict:
    """Statistics of a hypnogram (codes 0 W, 1 N1, 2 N2, 3 N3, 4 R), definitions in the module docstring."""
    stages = np.asarray(stages, dtype=np.int64)
    minutes = epoch_s / 60
    sleep = stages > W
    asleep = np.flatnonzero(sleep)
    tst = int(sleep.sum()) * minutes
    stats = {"epoch_s": epoch_s, "n_epochs": len(stages), "TIB_min": len(stages) * minutes,
             "SOL_min": None, "SPT_min": 0.0, "TST_min": tst, "WASO_min": 0.0,
             "SE_pct": 100 * tst / (len(stages) * minutes) if len(stages) else None,
             "REM_latency_min": None, "awakenings": 0,
             "stage_min": {name: int(np.sum(stages == k)) * minutes for k, name in enumerate(STAGES)},
             "stage_pct_TST": {name: (100 * int(np.sum(stages == k)) * minutes / tst if tst else None)
                               for k, name in enumerate(STAGES) if k != W},
             "min_awakening_epochs": MIN_AWAKENING_EPOCHS}
    if len(asleep) == 0:
        return stats
    onset, last = int(asleep[0]), int(asleep[-1])
    period = stages[onset:last + 1]                                   # the SPT: starts and ends with sleep
    stats["SOL_min"] = onset * minutes
    stats["SPT_min"] = len(period) * minutes
    stats["WASO_min"] = int(np.sum(period == W)) * minutes
    stats["awakenings"] = sum(length >= MIN_AWAKENING_EPOCHS for _, length in _runs(period == W))
    rem = np.flatnonzero(stages == REM)
    if len(rem):
        stats["REM_latency_min"] = (int(rem[0]) - onset) * minutes
    return stats


# ----------------------------------------------------------------------------------------------------------------------
# One night


class NightFailed(Exception):
    """A night that could not be staged; the message is the one-line cause."""


def fused_attention_on_cpu() -> None:
    """model.py keeps unfused attention on CPU because the fused *backward* is slower there (training). Prediction is
    forward only, where the fused kernel is faster and never materialises the [7, 4, N, N] scores: 8-h night at the
    paper config, 2 threads, encoder 53 s -> 36 s, peak RSS 7.3 GB -> 2.1 GB (same function, exact up to rounding)."""
    model.PAD_V_FOR_FUSED["cpu"] = True


def load_run(run_dir: Path):
    """(encoder, probe, window_s) of a probe run; exits with one line if the folder is not one."""
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
        encoder, probe = load_encoder(run_dir), load_probe(run_dir)
        return encoder, probe, float(config["data"]["window_s"])
    except (OSError, KeyError, TypeError, RuntimeError) as err:     # no folder/checkpoint, or weights that do not fit
        raise SystemExit(f"predict.py: {run_dir} is not a probe run (needs config.yaml with model:, probe:, "
                         f"data.window_s and ckpt_final.pt): {str(err).splitlines()[0]}")


def read_night(edf: Path, opts) -> tuple[np.ndarray, dict]:
    """The prepared [7, T] float32 signals and attrs, through the same code as `python -m prepare edf`."""
    night = Night(dataset="edf", night_id=edf.stem, subject=edf.stem, visit="", edf=edf, labelled=False)
    try:
        signals, _, attrs = prepare_night(night, CHANNELS, opts)
    except EXPECTED_ERRORS as err:
        # the file is named once, by main: drop the reader's own "path: " prefix
        raise NightFailed(str(err).replace("\n", " ").removeprefix(f"{edf}: ")) from None
    return signals.astype(np.float32), attrs


def clock_times(start_time: str | None, onsets: np.ndarray) -> list[str]:
    if not start_time:
        return [""] * len(onsets)
    start = dt.datetime.fromisoformat(start_time)
    return [(start + dt.timedelta(seconds=float(s))).strftime("%H:%M:%S") for s in onsets]


def hypnogram_rows(probs: np.ndarray, start_time: str | None) -> list[dict]:
    onsets = np.arange(len(probs)) * EPOCH_S
    clocks = clock_times(start_time, onsets)
    pred = probs.argmax(axis=1)
    return [{"epoch": i, "onset_s": int(onsets[i]), "clock_time": clocks[i], "stage": STAGES[pred[i]],
             **{c: f"{p:.5f}" for c, p in zip(PROB_COLUMNS, probs[i])}} for i in range(len(probs))]


def write_atomic(path: Path, write) -> None:
    """write(tmp_path), then rename: a killed run never leaves a half-written file under the final name."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_csv(path: Path, rows: list[dict]) -> None:
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(",".join(COLUMNS) + "\n")
            f.writelines(",".join(str(row[c]) for c in COLUMNS) + "\n" for row in rows)
    write_atomic(path, write)


def write_json(path: Path, value: dict) -> None:
    write_atomic(path, lambda tmp: tmp.write_text(json.dumps(value, indent=2) + "\n"))


def stage_annotation_record(stages: np.ndarray) -> bytes:
    """EDF+ TALs of a hypnogram: the record's time-keeping TAL, then one '+onset\x15duration\x14Sleep stage X\x14\x00'
    per run of equal stages (the Sleep-EDF convention), padded with zeros to whole 2-byte samples."""
    tals = [b"+0\x14\x14\x00"]
    change = np.flatnonzero(np.diff(stages)) + 1
    for start, stop in zip(np.concatenate([[0], change]), np.concatenate([change, [len(stages)]])):
        text = f"+{start * EPOCH_S:g}\x15{(stop - start) * EPOCH_S:g}\x14Sleep stage {STAGES[stages[start]]}\x14\x00"
        tals.append(text.encode("ascii"))
    record = b"".join(tals)
    return record + b"\x00" * (len(record) % 2)


def write_stage_annotations(path: Path, stages: np.ndarray, start_time: str | None) -> None:
    """An annotation-only EDF+C file (one data record of duration 0, as Sleep-EDF's hypnograms) of the stages."""
    start = dt.datetime.fromisoformat(start_time) if start_time else dt.datetime(1985, 1, 1)   # EDF's epoch date
    record = stage_annotation_record(stages)

    def field(text, width: int) -> bytes:
        return str(text).encode("ascii").ljust(width)[:width]

    recording = f"Startdate {start.strftime('%d-%b-%Y').upper()} X X predict.py"
    header = b"".join([field("0", 8), field("X X X X", 80), field(recording, 80), field(start.strftime("%d.%m.%y"), 8),
                       field(start.strftime("%H.%M.%S"), 8), field(512, 8), field("EDF+C", 44), field(1, 8),
                       field(0, 8), field(1, 4)])
    header += b"".join([field("EDF Annotations", 16), field("", 80), field("", 8), field(-1, 8), field(1, 8),
                        field(-32768, 8), field(32767, 8), field("", 80), field(len(record) // 2, 8), field("", 32)])
    write_atomic(path, lambda tmp: tmp.write_bytes(header + record))


def plot_night(path: Path, probs: np.ndarray, title: str, plt) -> None:
    """Predicted hypnogram (W on top, then R, N1, N2, N3) over the hypnodensity (stacked probabilities)."""
    level = np.array([4, 2, 1, 0, 3])                       # stage code -> height
    hours = np.arange(len(probs) + 1) * EPOCH_S / 3600      # epoch edges, so the last epoch has its width
    pred = level[probs.argmax(axis=1)]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 5), sharex=True, height_ratios=[1.3, 1])
    top.step(hours, np.append(pred, pred[-1]), where="post", color="black", lw=1)
    top.set(yticks=range(5), yticklabels=["N3", "N2", "N1", "R", "W"], title=title)
    bottom.stackplot(hours, np.append(probs, probs[-1:], axis=0).T, labels=STAGES, step="post")
    bottom.set(ylim=(0, 1), xlim=(0, hours[-1]), ylabel="probability", xlabel="hours from start of recording")
    bottom.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8)
    fig.tight_layout()
    write_atomic(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


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
    probs = stage_night(encoder, probe, signals, window, max(stride, EPOCH_SAMPLES), args.batch_size,
                        args.device).numpy()                                                    # [E, 5]
    folder = out or edf.parent
    folder.mkdir(parents=True, exist_ok=True)
    stem = folder / edf.stem
    written = [stem.with_name(stem.name + ".hypnogram.csv"), stem.with_name(stem.name + ".stats.json")]
    write_csv(written[0], hypnogram_rows(probs, attrs["start_time"]))
    stats = sleep_statistics(probs.argmax(axis=1))
    write_json(written[1], {"edf": str(edf), "run": str(args.run), "start_time": attrs["start_time"],
                            "window_s": window_s, "stride_s": stride / FS, **stats,
                            "absent_slots": absent, "source_labels": attrs["source_labels"],
                            "warnings": attrs["warnings"]})
    for warning in attrs["warnings"]:
        if not warning.startswith("slot "):                       # slot warnings were printed with the absent slots
            print(f"warning: {edf}: {warning}")
    if args.edf_annotations:
        written.append(stem.with_name(stem.name + ".stages.edf"))
        write_stage_annotations(written[-1], probs.argmax(axis=1), attrs["start_time"])
    if plt is not None:
        written.append(stem.with_name(stem.name + ".png"))
        plot_night(written[-1], probs, edf.name, plt)
    return written


# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("edfs", nargs="+", type=Path, metavar="EDF", help="EDF files to stage, each independently")
    parser.add_argument("--run", type=Path, required=True,
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
    parser.add_argument("--stride_s", type=float, default=None,
                        help="seconds between window starts (default: half the run's data.window_s)")
    parser.add_argument("--zero-phase", action="store_true",
                        help="zero-phase filters, as `python -m prepare --zero-phase`: only for a run trained on "
                             "nights prepared that way (default: the paper's causal filters)")
    parser.add_argument("--batch_size", type=int, default=4, help="windows per forward pass (default 4)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda if available)")
    return parser.parse_args(argv)


def import_pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("note: matplotlib is not installed: no PNGs (pip install matplotlib)")
        return None


def main(argv=None) -> int:
    args = parse_args(argv)
    # build_options validates the map exactly as `python -m prepare` does
    opts = build_options(SimpleNamespace(channels=args.channels, require="all" if args.require_all else "none",
                                         zero_phase=args.zero_phase, clean_spo2=False))
    opts.allow_truncated = not args.strict
    fused_attention_on_cpu()
    encoder, probe, window_s = load_run(args.run)
    run = (encoder.to(args.device), probe.to(args.device), window_s)
    plt = import_pyplot()
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
