"""Cross-check with YASA: our sleep statistics against YASA's on the same hypnogram, through the files a user gets.

A synthetic night (`python -m synthetic edf`) is rewritten as EDF+ with `Lights off` and `Lights on` events, staged by
`predict.py` and by `stage.stage_edf` (the two must write identical files), and the hypnogram CSV is loaded into
`yasa.Hypnogram` with its probabilities by docs/outputs.md's one-liner. YASA's `sleep_statistics()` and
`transition_matrix()` on the lights-off..lights-on part of that hypnogram (YASA expects it cropped) are compared with
ours (docs/outputs.md "Sleep statistics": the definitions; SE and SME rounded to YASA's 4 decimals). Prints each pair and the
largest absolute difference, where our null and YASA's NaN agree.

    pip install yasa             # not one of our dependencies (it pulls MNE, LightGBM and more); 0.8.1 checked
    python bench/yasa_agreement.py [--run RUN] [--hours 3] [--seed 0]

--run: a probe run folder (default: a tiny random-weight one, whose hypnogram changes stage often: a hard case for
the statistics). Compared: TIB, SOL, SPT, TST, WASO, SE, SME, Lat_REM, minutes per stage, transition counts.
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)

OURS_AND_YASAS = [("TIB_min", "TIB"), ("SOL_min", "SOL"), ("SPT_min", "SPT"), ("TST_min", "TST"),
                  ("WASO_min", "WASO"), ("SE_pct", "SE"), ("SME_pct", "SME"), ("Lat_REM_min", "Lat_REM")]
YASA_STAGES = {"W": "WAKE", "N1": "N1", "N2": "N2", "N3": "N3", "R": "REM"}   # ours -> YASA's labels


def random_probe_run(folder: Path) -> Path:
    """A tiny probe run with seeded random weights and a 30-minute window."""
    import runs
    from model import ModelConfig, ProbeConfig
    return runs.write_random_run(folder, ModelConfig(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=300),
                                 ProbeConfig(d_model=16, hidden_size=8, n_layers=1, dropout=0.0), {"window_s": 1800.0})


def night_with_lights(folder: Path, hours: float, seed: int) -> tuple[Path, float, float]:
    """A synthetic EDF rewritten as EDF+ with Lights off 611 s after the start and Lights on 905 s before the end
    (neither on an epoch boundary) -> (path, lights-off s, lights-on s)."""
    import pyedflib
    import synthetic
    night = synthetic.write_cohort("edf", folder / "src", nights=1, hours=hours, seed=seed)[0]
    reader = pyedflib.EdfReader(str(night["edf"]))
    try:
        headers = reader.getSignalHeaders()
        samples = [reader.readSignal(i) for i in range(reader.signals_in_file)]
        start, seconds = reader.getStartdatetime(), reader.getFileDuration()
    finally:
        reader.close()
    path, off, on = folder / "lit.edf", 611.0, seconds - 905.0
    writer = pyedflib.EdfWriter(str(path), len(headers), file_type=pyedflib.FILETYPE_EDFPLUS)
    try:
        writer.setSignalHeaders(headers)
        writer.setStartdatetime(start)
        writer.writeAnnotation(off, -1, "Lights off")
        writer.writeAnnotation(on, -1, "Lights on")
        writer.writeSamples(samples)
    finally:
        writer.close()
    return path, off, on


def compare(ours: dict, hypnogram: list[str], yasa) -> list[tuple[str, float, float]]:
    """(name, ours, YASA's) for each compared statistic, on the lights-off..lights-on hypnogram."""
    cropped = yasa.Hypnogram(hypnogram[ours["lights_off_epoch"]:ours["lights_on_epoch"]])
    theirs = cropped.sleep_statistics()
    # YASA rounds its percentages to 4 decimals
    pairs = [(name, round(ours[name], 4) if name.endswith("_pct") and ours[name] is not None else ours[name],
              theirs[yasa_name]) for name, yasa_name in OURS_AND_YASAS]
    pairs += [(f"stage_min {s}", ours["stage_min"][s], theirs[y]) for s, y in YASA_STAGES.items()]
    counts = cropped.transition_matrix()[0]                             # [from, to] counts, YASA's labels
    pairs += [(f"transitions {a}->{b}", ours["transitions"][a][b], counts.loc[ya, yb] if ya in counts.index
               and yb in counts.columns else 0) for a, ya in YASA_STAGES.items() for b, yb in YASA_STAGES.items()]
    return pairs


def difference(ours, theirs) -> float:
    """|ours - theirs|, where our null and YASA's NaN (a statistic that does not exist for the night) agree."""
    missing = (ours is None, theirs is None or theirs != theirs)
    if any(missing):
        return 0.0 if all(missing) else float("inf")
    return abs(float(ours) - float(theirs))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", type=Path, help="probe run folder (default: a tiny random-weight run)")
    parser.add_argument("--hours", type=float, default=3.0, help="night length (default 3)")
    parser.add_argument("--seed", type=int, default=0, help="synthetic night seed (default 0)")
    args = parser.parse_args()
    try:
        import yasa
    except ImportError:
        raise SystemExit("yasa_agreement: needs YASA (`pip install yasa`), which is not one of our dependencies")
    import pandas as pd
    import stage
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        run = args.run or random_probe_run(tmp / "run")
        edf, off, on = night_with_lights(tmp, args.hours, args.seed)
        subprocess.run([sys.executable, str(ROOT / "predict.py"), str(edf), "--run", str(run), "--out",
                        str(tmp / "cli"), "--device", "cpu"], check=True, capture_output=True)
        night = stage.stage_edf(edf, run, device="cpu")
        night.write(tmp / "api" / edf.stem)
        for name in (f"{edf.stem}.hypnogram.csv", f"{edf.stem}.stats.json"):
            if (tmp / "cli" / name).read_bytes() != (tmp / "api" / name).read_bytes():
                raise SystemExit(f"yasa_agreement: predict.py and stage.stage_edf wrote different {name}")
        table = pd.read_csv(tmp / "cli" / f"{edf.stem}.hypnogram.csv")
        ours = json.loads((tmp / "cli" / f"{edf.stem}.stats.json").read_text())
    # docs/outputs.md's one-liner: the stage letters as they are, the probabilities under YASA's labels
    hypnogram = yasa.Hypnogram(table["stage"].tolist(),
                               proba=table.filter(like="p_").set_axis(list(YASA_STAGES.values()), axis=1))
    print(f"{edf.name}: {len(table)} epochs, lights off {off:g} s (epoch {ours['lights_off_epoch']}), lights on "
          f"{on:g} s (epoch {ours['lights_on_epoch']}); yasa {yasa.__version__}: Hypnogram of {hypnogram.n_epochs} "
          f"epochs with probabilities; predict.py and stage.stage_edf wrote identical files")
    pairs = compare(ours, table["stage"].tolist(), yasa)
    for name, mine, theirs in pairs:
        print(f"  {name:24s} ours {mine!s:>20}   yasa {theirs!s:>20}")
    worst = max(difference(mine, theirs) for _, mine, theirs in pairs)
    print(f"yasa_agreement: largest difference from YASA over {len(pairs)} statistics: {worst:.2g} "
          f"(staged on {machine.describe()})")


if __name__ == "__main__":
    main()
