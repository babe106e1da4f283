"""Channel dropout: how κ degrades when one slot is missing, with and without train-time channel dropout.

A user's EDF often lacks a channel (no belts, no ECG, a broken chin lead); predict.py then feeds that slot as zeros.
This measures what that costs, per slot, on the synthetic cohort (the demo's recipe: tiny encoder, tiny probe):

  none   pretraining and probe as in the paper (train.channel_dropout 0)
  probe  the same encoder, probe trained with train.channel_dropout P
  both   encoder and probe trained with train.channel_dropout P

Training: a synthetic SHHS cohort (--nights nights of --hours h, its train and val splits). Scoring: a second,
independent synthetic cohort (--eval-nights nights, another seed, every night), staged whole with each slot zeroed in
turn (`evaluate.py --absent SLOT`, exactly what predict.py does for a missing channel); the figure is pooled κ. Each
step runs the repository's own command line, keeps its output under --out, so a killed run picks up where it stopped.
About 35 minutes on 2 CPU cores.

    python bench/channel_dropout.py [--p 0.2] [--nights 30] [--eval-nights 20] [--hours 2] [--probe-epochs 12]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)
from prepare.signals import SLOTS  # noqa: E402


def quietly(*command):
    """Run one of the repository's commands with its progress output kept out of the table."""
    done = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")


def cohort(out: Path, name: str, nights: int, hours: float, seed: int) -> Path:
    root = out / name
    if not (root / "manifest.csv").exists():
        print(f"preparing {nights} synthetic nights ({name}, seed {seed})", flush=True)
        quietly("-m", "synthetic", "shhs", out / f"{name}_src", "--nights", nights, "--hours", hours, "--seed", seed)
        quietly("-m", "prepare", "shhs", out / f"{name}_src", root, "--workers", "2")
    return root


def pretrain(out: Path, nights: Path, name: str, p: float) -> Path:
    run = out / name
    if not (run / "ckpt_final.pt").exists():
        print(f"pretraining {name} (channel_dropout {p})", flush=True)
        quietly("train_pretrain.py", "--config", "configs/pretrain_tiny.yaml", "--run-dir", run,
                "--data.root", nights, "--train.channel_dropout", p)
    return run


def probe(out: Path, nights: Path, encoder: Path, name: str, p: float, epochs: int) -> Path:
    run = out / name
    if not (run / "ckpt_final.pt").exists():
        print(f"training probe {name} (channel_dropout {p}, {epochs} epochs)", flush=True)
        quietly("train_probe.py", "--config", "configs/probe_tiny.yaml", "--encoder", encoder, "--run-dir", run,
                "--data.root", nights, "--train.channel_dropout", p, "--train.epochs", epochs)
    return run


def kappa_per_absent_slot(run: Path, nights_root: Path) -> dict[str, float]:
    kappas = {}
    for absent in ("", *SLOTS):
        out = run / f"eval_absent_{absent or 'none'}"
        if not (out / "results.json").exists():
            quietly("evaluate.py", "--run", run, "--data.root", nights_root, "--split", "all", "--absent", absent,
                    "--bootstrap", "0", "--png-nights", "0", "--out", out)
        kappas[absent or "none"] = json.loads((out / "results.json").read_text())["pooled"]["kappa"]
    return kappas


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--p", type=float, default=0.2, help="train.channel_dropout of the 'probe' and 'both' runs")
    parser.add_argument("--nights", type=int, default=30, help="training cohort size (default 30)")
    parser.add_argument("--eval-nights", type=int, default=20, help="scoring cohort size (default 20)")
    parser.add_argument("--probe-epochs", type=int, default=12,
                        help="probe epochs, every variant (default 12, twice configs/probe_tiny.yaml: with dropout "
                             "the probe needs longer to converge)")
    parser.add_argument("--hours", type=float, default=2.0, help="hours per synthetic night (default 2)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/channel_dropout", help="work folder")
    args = parser.parse_args()
    out = args.out
    train_nights = cohort(out, "nights", args.nights, args.hours, seed=1)
    eval_nights = cohort(out, "eval_nights", args.eval_nights, args.hours, seed=2)
    plain = pretrain(out, train_nights, "pretrain_none", 0.0)
    dropped = pretrain(out, train_nights, "pretrain_dropout", args.p)
    epochs = args.probe_epochs
    runs = {"none": probe(out, train_nights, plain, "probe_none", 0.0, epochs),
            "probe": probe(out, train_nights, plain, "probe_dropout", args.p, epochs),
            "both": probe(out, train_nights, dropped, "probe_both", args.p, epochs)}
    table = {name: kappa_per_absent_slot(run, eval_nights) for name, run in runs.items()}
    lines = [f"| absent slot | κ, no channel dropout | κ, probe p={args.p:g} | κ, encoder + probe p={args.p:g} |",
             "|---|---|---|---|"]
    for slot in ("none", *SLOTS):
        lines.append(f"| {slot} | " + " | ".join(f"{table[name][slot]:.3f}" for name in runs) + " |")
    lines += ["", f"Trained and scored on {machine.describe('auto')}."]
    report = "\n".join(lines)
    (out / "channel_dropout.md").write_text(report + "\n")
    print(report)
    print(f"channel dropout: κ with EEG absent {table['none']['EEG']:.3f} (no dropout) vs {table['both']['EEG']:.3f} "
          f"(p={args.p:g}; {machine.describe('auto')}); table in {out / 'channel_dropout.md'}")


if __name__ == "__main__":
    main()
