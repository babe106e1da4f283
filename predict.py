"""Stage whole nights from EDF files with a trained probe run: hypnogram, hypnodensity and sleep statistics per night.

    python predict.py night.edf --run runs/probe                          # writes next to the EDF
    python predict.py edfs/*.edf --run runs/probe --out predictions --channels map.yaml --export luna,xml --device cuda

Each EDF is staged by stage.stage_edf (the Python API: the CLI writes what the API returns) through exactly the signal
path of `python -m prepare edf` (channel aliases or --channels map.yaml, unit conversion, the paper's filters,
resampling to 125 Hz), unlabelled. Channel labels: the built-in alias table, or the NSRR dataset's own (SHHS, MESA,
MrOS, APPLES, WSC: detected from the labels, or --dataset). A night without EEG, EOG or EMG (the AASM staging slots)
fails with one line naming the labels it saw; --allow-missing stages it anyway, those slots fed as zeros, with a
warning that quotes what a missing slot cost on the synthetic benchmark (docs/benchmarks.md "Channel dropout"). Any other missing
slot (or flat, all-NaN, in unknown units) is fed as zeros, with a warning; --require-all fails the night instead. The
night is staged whole by stage.stage_night: the fewest windows of at most the run's data.window_s, of equal length,
back to back (9.5 h: two of 4.75 h), each computed over its own length (its masked zero padding left out: exact), so
that a night costs what its length does; with --stride-s, windows every stride, an epoch's probabilities averaged over
the windows that saw it (more time, docs/design.md "Staging windows"). Only full 30-s epochs are staged.

Per night <stem> (the EDF's name without .edf), in --out or beside the EDF; all of a night's files or none (each
written to a temporary name, all renamed when every one is complete; a target that is a folder fails the night in one
line). Two EDFs of the same name that would write into one folder (a/night.edf and b/night.edf with one --out, or
night.edf beside NIGHT.EDF) are refused before any night is staged, in one line naming them: stage them into
separate --out folders, or rename one. The same file given twice (itself and its folder) is staged once.
  <stem>.hypnogram.csv   epoch, onset_s, date (YYYY-MM-DD) and clock_time (HH:MM:SS) from the EDF start (empty if the
                         header has none), stage (W/N1/N2/N3/R, the most probable), p_W, p_N1, p_N2, p_N3, p_REM
                         (5 decimals, every row summing to exactly 1)
  <stem>.stats.json      sleep statistics of the predicted hypnogram (sleep_statistics.sleep_statistics; lights-off to lights-on:
                         --lights-off/--lights-on, else the EDF+ annotations' 'Lights off'/'Lights on', else the whole
                         recording), the run, the absent slots, the alias table, the source labels and their units as
                         the EDF declares them, every warning
  <stem>.png             hypnogram over hypnodensity (matplotlib; skipped with a note if it is not installed)
  <stem>.stages.edf      --export edf (or --edf-annotations): EDF+ annotations 'Sleep stage W' … 'Sleep stage R', one
                         per run of equal stages (EDFbrowser, MNE, pyedflib, `python -m prepare edf --annotations`)
  <stem>.stages.annot    --export luna: Luna .annot, one row per epoch (class W/N1/N2/N3/R, start/stop in seconds)
  <stem>.stages.xml      --export xml: NSRR XML ('Stages|Stages' events, one per run)
  <stem>.stages.txt      --export txt: one stage per line (W, N1, N2, N3, R)
  <stem>.embeddings.npy  --embeddings: float16 [E, 7, D] (epochs × slots ECG, EOG, EMG, EEG, SPO2, THOR, ABDO ×
                         the run's d_model): per 30-s epoch and slot, the mean of the encoder's 5 patch embeddings
                         (6 s each), averaged over the windows that saw the epoch; numpy.load reads it
and, for the batch, summary.csv in --out (without --out: in the EDFs' common folder): one row per night, status ok or
failed with the reason, its statistics, absent slots and warnings; rewritten after every night.

EDFs from other vendors: labels and units in UTF-8 or Latin-1 ('µV'), any sampling rate (resampled to 125 Hz),
physical dimensions V, mV or µV, and headers pyedflib refuses (prepare/edf.py is our own reader) are read as they are.
An EDF+D (discontinuous) file is laid out on its records' own start times, the gaps interpolated and named in the
night's warnings. A file with fewer data records than its header says is staged as far as it goes, with a warning
(--strict: an error). Anything else that is wrong (unreadable header, a staging slot missing, unknown unit, records
that overlap) prints one line naming the file and the cause; the batch goes on, and a summary lists the failures.
Before any night: the output folders must be writable and the run must have a final checkpoint (a run still training
or killed has only ckpt.pt: --latest uses it); otherwise one line and exit status 1. Exit status 0 if at least one
night was staged, 1 if every night failed.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: docs/benchmarks.md "Threads"

import argparse
import csv
import sys
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

import config
import durable
import sleep_statistics
import stage
from prepare import annotations
from prepare.night import make_options

def output_folders(args) -> list[Path]:
    """Where this batch writes: --out, else each EDF's folder."""
    return [args.out] if args.out else sorted({edf.parent for edf in args.edfs})


def check_writable(folders: list[Path]) -> None:
    """Create each output folder and write and remove a file there, before any night is computed: a folder that
    cannot take the outputs fails now, in one line, not after an hour of staging."""
    for folder in folders:
        probe = folder / f".predict-write-check-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as err:
            raise SystemExit(f"predict.py: cannot write to the output folder {folder}: {err.strerror or err}")


def distinct_edfs(edfs: list[Path], out: Path | None) -> list[Path]:
    """Each file once (the same file given twice is staged once, with a note); SystemExit (one line naming them)
    for EDFs whose outputs would be the same files: <stem>.* in one folder, the name compared regardless of case
    (a case-insensitive disk, as macOS's, holds night.* and NIGHT.* as one file)."""
    unique, seen = [], set()
    for edf in edfs:
        if edf.resolve() in seen:
            print(f"note: {edf} is given twice: staged once")
            continue
        seen.add(edf.resolve())
        unique.append(edf)
    by_output: dict[str, list[Path]] = {}
    for edf in unique:
        by_output.setdefault(str((out or edf.parent).resolve() / edf.stem).casefold(), []).append(edf)
    if clashes := [group for group in by_output.values() if len(group) > 1]:
        named = "; ".join(f"{' and '.join(map(str, group))} would both write {(out or group[0].parent) / group[0].stem}.*"
                          for group in clashes)
        raise SystemExit(f"predict.py: EDFs of the same name: {named}: stage them into separate --out folders, or "
                         f"rename one")
    return unique


def summary_row(edf: Path, result: stage.NightResult | None = None, reason: str = "") -> dict:
    """One summary.csv row: night, file, status (ok / failed), reason, the statistics (per-stage ones flattened,
    e.g. stage_min_N2; the transition counts left out), absent slots, warnings."""
    row = {"night": edf.stem, "file": str(edf), "status": "ok" if result else "failed", "reason": reason}
    if result is None:
        return row
    for key, value in result.stats.items():
        if not isinstance(value, dict):
            row[key] = value
        elif key != "transitions":
            row.update({f"{key}_{name}": v for name, v in value.items()})
    return {**row, "absent_slots": " ".join(result.absent), "warnings": " | ".join(result.warnings)}


def write_summary(path: Path, rows: list[dict]) -> None:
    """summary.csv: every column any row has, in order of appearance; a failed night's statistics are empty."""
    columns = list(dict.fromkeys(key for row in rows for key in row))

    def write(temp):
        with open(temp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, restval="")
            writer.writeheader()
            writer.writerows({k: "" if v is None else v for k, v in row.items()} for row in rows)
    durable.write_atomic(path, write)


def read_night(edf: Path, args) -> stage.PreparedNight | stage.StagingError:
    """One EDF read and filtered for staging, or why it cannot be (returned, not raised, so that a reader process
    hands it back like a result)."""
    try:
        return stage.read_edf_night(edf, args.channel_map, args.dataset, args.allow_missing,
                                    require_all=args.require_all, strict=args.strict, zero_phase=args.zero_phase)
    except stage.StagingError as err:
        return err
    except Exception as err:          # a bug must not sink the batch, but must be visible as one
        return stage.StagingError(f"internal error ({type(err).__name__}): {err}".replace("\n", " "))


def read_nights(edfs: list[Path], args):
    """(edf, PreparedNight or StagingError) in order. With --workers N, N reader processes read and filter the next
    nights while this process stages the current one; at most N nights wait, read, so memory stays bounded."""
    if args.workers < 1:
        yield from ((edf, read_night(edf, args)) for edf in edfs)
        return
    with ProcessPoolExecutor(args.workers, initializer=durable.die_with_parent, initargs=(os.getpid(),)) as pool:
        pending, queue = deque(), iter(edfs)
        for edf in queue:
            pending.append((edf, pool.submit(read_night, edf, args)))
            if len(pending) > args.workers:
                edf_done, future = pending.popleft()
                yield edf_done, future.result()
        while pending:
            edf_done, future = pending.popleft()
            yield edf_done, future.result()


def load_run(args) -> tuple[stage.Model, object]:
    """The run's model and matplotlib.pyplot (None without matplotlib); a run that cannot stage is SystemExit."""
    try:
        return stage.load_model(args.run, args.device, args.latest), stage.pyplot()
    except stage.StagingError as err:
        raise SystemExit(f"predict.py: {err}") from None


def stage_one(edf: Path, night: stage.PreparedNight, model: stage.Model, args, plt):
    """Stage one read night and write its files (the API's result writes them); raises stage.StagingError."""
    result = stage.stage_prepared(night, model, args.lights_off, args.lights_on, stride_s=args.stride_s,
                                  batch_size=args.batch_size, embeddings=args.embeddings)
    for warning in result.warnings:
        print(f"warning: {edf}: {warning}")
    written = result.write((args.out or edf.parent) / edf.stem, exports=args.export, embeddings=args.embeddings,
                           plot=plt is not None, plt=plt)
    return result, written


def edf_files(paths: list[Path]) -> list[Path]:
    """EDF files as given, and those in each folder given (*.edf, any case, sorted); a missing path is kept so that
    it fails as one night."""
    files = []
    for path in paths:
        files += sorted(p for p in path.iterdir() if p.suffix.lower() == ".edf") if path.is_dir() else [path]
    return files


# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="predict.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("edfs", nargs="+", type=Path, metavar="EDF",
                        help="EDF files to stage, each independently, or folders of them (their *.edf)")
    parser.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                        help="probe run folder (config.yaml + ckpt_final.pt or ckpt_best.pt, trained or imported)")
    parser.add_argument("--latest", action="store_true",
                        help="accept a run without a final checkpoint (still training, or killed): its ckpt.pt")
    parser.add_argument("--channels", type=Path, metavar="map.yaml",
                        help="YAML mapping slot -> EDF label or 'A - B' derivation (null = absent), e.g. "
                             "{EEG: C4-M1, EOG: E1 - M2}; slots left out use the alias table")
    parser.add_argument("--dataset", choices=sorted(stage.CHANNEL_TABLES),
                        help="alias table for the EDF's labels: an NSRR dataset's, or edf (the built-in one); "
                             "default: the table that resolves the most slots")
    parser.add_argument("--allow-missing", action="store_true",
                        help="stage a night without EEG, EOG or EMG (fed as zeros, with a warning that quotes the "
                             "cost); by default such a night fails")
    parser.add_argument("--require-all", action="store_true",
                        help="fail a night if any of the 7 slots is absent (default: absent slots other than EEG, "
                             "EOG, EMG are zeros, warned)")
    parser.add_argument("--out", type=Path, help="output folder (default: next to each EDF)")
    parser.add_argument("--export", default="", metavar="FORMATS",
                        help=f"also write the stages as hypnogram files, a comma list of {', '.join(annotations.EXPORTS)} "
                             "(EDF+ annotations, Luna .annot, NSRR XML, one stage per line)")
    parser.add_argument("--edf-annotations", action="store_true", help="the same as --export edf")
    parser.add_argument("--embeddings", action="store_true",
                        help="also write <stem>.embeddings.npy: float16 [epochs, 7 slots, d_model], per 30-s epoch "
                             "and slot the mean of the encoder's 5 patch embeddings (numpy.load reads it)")
    parser.add_argument("--lights-off", metavar="TIME",
                        help="lights-off for the statistics of every night: HH:MM[:SS] (the first such time at or "
                             "after the recording start: the next day when earlier on the clock), an ISO date-time or "
                             "seconds after the start (default: the EDF+ annotation 'Lights off', else the recording "
                             "start). A time more than 30 s outside a night's recording fails that night in one line "
                             "naming the recording's start and end; it is never moved into it")
    parser.add_argument("--lights-on", metavar="TIME", help="lights-on, as --lights-off (default: the recording end)")
    parser.add_argument("--strict", action="store_true",
                        help="fail a night whose EDF holds fewer data records than its header says (default: stage "
                             "the records that are there and say so in a warning)")
    parser.add_argument("--stride-s", dest="stride_s", type=config.positive(float), default=None,
                        help="seconds between window starts, windows overlapping and averaged (default: none, the "
                             "fewest equal windows back to back; half the run's data.window_s costs about twice the "
                             "time)")
    parser.add_argument("--zero-phase", action="store_true",
                        help="zero-phase filters, as `python -m prepare --zero-phase`: only for a run trained on "
                             "nights prepared that way (default: the paper's causal filters)")
    parser.add_argument("--workers", type=config.non_negative, default=0,
                        help="reader processes that read and filter the next nights while this one stages the current "
                             "night (default 0: read each night in turn)")
    parser.add_argument("--batch-size", dest="batch_size", type=config.positive(int), default=4,
                        help="windows per forward pass (default 4)")
    parser.add_argument("--device", default="auto",
                        help="auto (default: CUDA when present, else the CPU), cpu, cuda or cuda:N")
    args = parser.parse_args(argv)
    args.edfs = edf_files(args.edfs)
    if not args.edfs:
        parser.error("no EDF files in the folders given")
    args.export = [fmt.strip().lower() for fmt in args.export.split(",") if fmt.strip()]
    if unknown := sorted(set(args.export) - set(annotations.EXPORTS)):
        parser.error(f"--export: unknown formats {unknown}; formats are {', '.join(annotations.EXPORTS)}")
    if args.edf_annotations and "edf" not in args.export:
        args.export.append("edf")
    if args.allow_missing and args.require_all:
        parser.error("--allow-missing and --require-all contradict each other")
    for name in ("lights_off", "lights_on"):                      # seconds after the start, or a clock/date-time
        value = getattr(args, name)
        if value is not None and value.replace(".", "", 1).isdigit():
            setattr(args, name, float(value))
        elif value is not None:
            try:                                                    # its form, before any night is staged
                sleep_statistics.seconds_after_start(value, "2000-01-01T00:00:00")
            except ValueError as err:
                parser.error(f"--{name.replace('_', '-')}: {err}")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    # the channel map is checked exactly as `python -m prepare` checks it, once for the batch
    args.channel_map = make_options(args.channels).channel_map
    args.edfs = distinct_edfs(args.edfs, args.out)
    folders = output_folders(args)
    check_writable(folders)
    summary = (args.out or Path(os.path.commonpath([folder.resolve() for folder in folders]))) / "summary.csv"
    if summary.is_dir():
        raise SystemExit(f"predict.py: {summary} is a folder: the batch's summary.csv cannot be written there "
                         f"(move or rename the folder)")
    started = time.time()
    with ThreadPoolExecutor(1) as loader:      # the run loads while the first night is read: their C parts overlap
        loading = loader.submit(load_run, args)
        rows, failures = [], []
        for edf, night in read_nights(args.edfs, args):
            model, plt = loading.result()                                # once for every night; SystemExit if bad
            try:
                if isinstance(night, stage.StagingError):
                    raise night
                result, written = stage_one(edf, night, model, args, plt)
                rows.append(summary_row(edf, result))
                print(f"{edf}: wrote {', '.join(p.name for p in written)}")
            except stage.StagingError as err:
                failures.append((edf, str(err)))
            except Exception as err:          # a bug must not sink the batch, but must be visible as one
                failures.append((edf, f"internal error ({type(err).__name__}): {err}".replace("\n", " ")))
            if failures and failures[-1][0] == edf:
                print(f"error: {edf}: {failures[-1][1]}", file=sys.stderr)
                rows.append(summary_row(edf, reason=failures[-1][1]))
            write_summary(summary, rows)
    n_ok = len(args.edfs) - len(failures)
    print(f"{n_ok} of {len(args.edfs)} nights staged in {time.time() - started:.1f} s, {len(failures)} failed "
          f"(summary: {summary})")
    for edf, reason in failures:
        print(f"  failed {edf}: {reason}")
    return 0 if n_ok else 1


if __name__ == "__main__":
    sys.exit(main())
