"""Staging speed against YASA: whole processes, from the EDF on disk to the files a user keeps, alternately in one run.

    python bench/vs_yasa.py [--hours 8 9.5] [--repeats 3] [--yasa 0.8.1] [--no-check] [--avx2]

Ours: `predict.py NIGHT.edf --run RUN --device cpu` (import, EDF read, filters and resampling, the paper-config
network with random weights, which cost what trained ones do, sleep statistics, CSV, JSON and PNG). YASA:
`yasa.SleepStaging` on the same file read by MNE (`mne.io.read_raw_edf(preload=True)`, C4-M1 / E1-M2 / Chin1-Chin2),
its hypnogram with probabilities written as CSV: what a YASA user runs. Both on synthetic nights of each --hours
(`python -m synthetic edf`: 256-Hz electrodes), one pair after the other, the order swapped every repeat. Printed: the
median wall time of each, the median of the pairs' ratios (ours / YASA's; <= 1 means ours is no slower), CPU seconds,
and the machine (CPU model and ISA).

YASA lives in a virtual environment of its own that this bench builds once (bench/out/yasa-venv, `pip install
yasa==VERSION` from the package registry); if it cannot be built, one line says why and only ours is timed.

--check (default) also stages the longest night's prepared signals through model.py's reference paths (whole
zero-padded windows, SDPA, nn.GRU: stage_night(reference=True)) and prints the largest difference in any probability
from the staging path predict.py takes: the speed is for the same function.

--phases also times each phase of our process in turn (import, EDF read and filters, run load, matplotlib, encoder,
probe, the rest of staging, outputs: predict.py's own functions, one after the other), medians of --repeats runs per
night: where the time goes (docs/benchmarks.md "Where a predict.py process spends its time").

--avx2 runs both with oneDNN and PyTorch held to AVX2 kernels (ONEDNN_MAX_CPU_ISA, ATEN_CPU_CAPABILITY) and NumPy's
AVX-512 dispatch off: on an AVX-512 host, an estimate of an AVX2-only one of the same clock (docs/benchmarks.md).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as predict.py: docs/benchmarks.md "Threads"

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)

YASA_VENV = ROOT / "bench" / "out" / "yasa-venv"
AVX2_ONLY = {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2",
             "NPY_DISABLE_CPU_FEATURES": "AVX512F AVX512CD AVX512_SKX AVX512_CLX AVX512_CNL AVX512_ICL AVX512_SPR"}
YASA_STAGING = """
import sys, mne, yasa
raw = mne.io.read_raw_edf(sys.argv[1], preload=True, verbose=False)
hypnogram = yasa.SleepStaging(raw, eeg_name="C4-M1", eog_name="E1-M2", emg_name="Chin1-Chin2").predict()
hypnogram.proba.assign(stage=hypnogram.hypno.to_numpy()).to_csv(sys.argv[2])
"""


def yasa_python(version: str) -> tuple[Path | None, str]:
    """(the YASA venv's python, "") or (None, why it could not be built)."""
    python = YASA_VENV / "bin" / "python"
    check = [str(python), "-c", "import yasa; print(yasa.__version__)"]
    if python.exists() and subprocess.run(check, capture_output=True, text=True).stdout.strip() == version:
        return python, ""
    print(f"building {YASA_VENV} (pip install yasa=={version}) ...", flush=True)
    for command in ([sys.executable, "-m", "venv", "--clear", str(YASA_VENV)],
                    [str(python), "-m", "pip", "install", "-q", f"yasa=={version}"]):
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode:
            last = (done.stderr.strip().splitlines() or ["no message"])[-1]
            return None, f"YASA not timed: `{' '.join(command[-3:])}` failed ({last})"
    return python, ""


def timed(command: list[str], env: dict) -> tuple[float, float]:
    """(wall seconds, CPU seconds of the child) of one whole process; its failure stops the bench."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode:
        raise SystemExit(f"vs_yasa: {' '.join(command[:2])} failed:\n{done.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def reference_difference(edf: Path, run: Path) -> float:
    """Largest probability difference between predict.py's staging path and model.py's reference paths."""
    import numpy as np
    import stage
    model = stage.load_model(run, "cpu")
    signals = stage.read_edf_night(edf).signals.astype(np.float32)
    window = int(round(model.window_s / 30)) * 3750
    fast = stage.stage_night(model.encoder, model.probe, signals, window)
    reference = stage.stage_night(model.encoder, model.probe, signals, window, batch_size=1, reference=True)
    return (fast - reference).abs().max().item()


PHASES = ("import", "read and filter", "load the run", "import matplotlib", "encoder", "probe", "rest of staging",
          "outputs")


def phases_child(edf: str, run: str, out: str) -> None:
    """One predict.py night, phase by phase (PHASES), printed as JSON seconds. Runs in its own process."""
    started = time.perf_counter()
    __import__("predict")                                            # everything predict.py imports
    import stage
    seconds = {"import": time.perf_counter() - started}

    def timed_call(name, function, *args, **kwargs):
        start = time.perf_counter()
        result = function(*args, **kwargs)
        seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - start
        return result
    night = timed_call("read and filter", stage.read_edf_night, edf)
    model = timed_call("load the run", stage.load_model, run, "cpu")
    plt = timed_call("import matplotlib", stage.pyplot)
    encoder, probe = model.encoder, model.probe
    contextualise, forward = encoder.contextualise, probe.forward
    encoder.contextualise = lambda *a, **k: timed_call("encoder", contextualise, *a, **k)
    probe.forward = lambda *a, **k: timed_call("probe", forward, *a, **k)
    staged = timed_call("staging", stage.stage_prepared, night, model)
    seconds["rest of staging"] = seconds.pop("staging") - seconds["encoder"] - seconds["probe"]
    timed_call("outputs", staged.write, Path(out) / "night", plt=plt)
    print(json.dumps(seconds))


def phases_table(nights: list[tuple[float, Path]], run: Path, repeats: int, env: dict, out: Path) -> str:
    """Medians over `repeats` child processes per night of each phase: a markdown table."""
    columns = []
    for _, edf in nights:
        runs_ = [json.loads(subprocess.run([sys.executable, __file__, "--phases-child", str(edf), str(run), str(out)],
                                           cwd=ROOT, env=env, capture_output=True, text=True, check=True
                                           ).stdout.strip().splitlines()[-1]) for _ in range(repeats)]
        columns.append({phase: statistics.median(r[phase] for r in runs_) for phase in PHASES})
    lines = ["| phase (s, median of %d) | %s |" % (repeats, " | ".join(f"{h:g} h" for h, _ in nights)),
             "|---|" + "---|" * len(nights)]
    lines += [f"| {phase} | " + " | ".join(f"{c[phase]:.2f}" for c in columns) + " |" for phase in PHASES]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, nargs="+", default=[8.0, 9.5], help="night lengths (default 8 9.5)")
    parser.add_argument("--repeats", type=int, default=3, help="pairs per night length (default 3)")
    parser.add_argument("--yasa", default="0.8.1", help="the YASA version to install and time (default 0.8.1)")
    parser.add_argument("--no-check", dest="check", action="store_false",
                        help="skip the comparison with the reference paths")
    parser.add_argument("--avx2", action="store_true", help="hold both to AVX2 kernels (an AVX2-only estimate)")
    parser.add_argument("--phases", action="store_true", help="also time each phase of our process in turn")
    parser.add_argument("--phases-child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.phases_child:
        return phases_child(*args.phases_child)
    import runs
    from model import ModelConfig, ProbeConfig
    env = {**os.environ, **(AVX2_ONLY if args.avx2 else {})}
    isa = f"{machine.cpu()}{', held to AVX2 kernels' if args.avx2 else ''}"
    python, why_not = yasa_python(args.yasa)
    if why_not:
        print(why_not)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = runs.write_random_run(tmp / "run", ModelConfig(), ProbeConfig(), {"window_s": 28800.0})
        for k, hours in enumerate(args.hours):
            folder = tmp / f"edf{k}"
            subprocess.run([sys.executable, "-m", "synthetic", "edf", str(folder), "--nights", "1", "--hours",
                            str(hours), "--seed", str(3 + k)], cwd=ROOT, check=True, capture_output=True)
            edf = folder / "night-001.edf"
            ours_command = [sys.executable, "predict.py", str(edf), "--run", str(run), "--out", str(tmp / "ours"),
                            "--device", "cpu"]
            yasa_command = [str(python), "-c", YASA_STAGING, str(edf), str(tmp / "yasa.csv")] if python else None
            times = {"ours": [], "yasa": []}
            for repeat in range(args.repeats):
                order = [("ours", ours_command), ("yasa", yasa_command)][::1 if repeat % 2 == 0 else -1]
                for name, command in order:
                    if command:
                        times[name].append(timed(command, env))
                print(f"{hours:g} h, pair {repeat + 1}: ours {times['ours'][-1][0]:.1f} s"
                      + (f", YASA {times['yasa'][-1][0]:.1f} s" if python else ""), flush=True)
            rows.append((hours, times, edf))
        phases = phases_table([(h, e) for h, _, e in rows], run, args.repeats, env, tmp) if args.phases else None
        difference = reference_difference(edf, run) if args.check else None
    lines = [f"| night | predict.py (CPU s) | YASA {args.yasa} (CPU s) | ratio, median of pairs |", "|---|---|---|---|"]
    for hours, times, _ in rows:
        ours = statistics.median(t for t, _ in times["ours"])
        ours_cpu = statistics.median(c for _, c in times["ours"])
        if not times["yasa"]:
            lines.append(f"| {hours:g} h | {ours:.1f} s ({ours_cpu:.0f}) | not timed | |")
            continue
        yasa = statistics.median(t for t, _ in times["yasa"])
        yasa_cpu = statistics.median(c for _, c in times["yasa"])
        ratio = statistics.median(o / y for (o, _), (y, _) in zip(times["ours"], times["yasa"]))
        lines.append(f"| {hours:g} h | {ours:.1f} s ({ours_cpu:.0f}) | {yasa:.1f} s ({yasa_cpu:.0f}) | {ratio:.2f} |")
    lines.append(f"\nWall-time medians of {args.repeats} alternating pairs, synthetic EDFs (256-Hz electrodes); "
                 f"CPU {isa}.")
    if difference is not None:
        lines.append(f"Largest probability difference from the reference paths ({args.hours[-1]:g}-h night): "
                     f"{difference:.2e} (target <= 1e-5).")
    if phases:
        lines += ["", phases]
    report = "\n".join(lines)
    out = ROOT / "bench" / "out"
    out.mkdir(parents=True, exist_ok=True)
    (out / "vs_yasa.md").write_text(report + "\n")
    print(report)


if __name__ == "__main__":
    main()
