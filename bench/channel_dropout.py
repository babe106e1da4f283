"""Channel dropout: how κ degrades when one slot is missing, with and without train-time channel dropout.

A user's EDF often lacks a channel (no belts, no ECG, a broken chin lead); predict.py then feeds that slot as zeros.
This measures what that costs, per slot, on the synthetic cohort (the demo's recipe: tiny encoder, tiny probe):

  none   pretraining and probe as in the paper (train.channel_dropout 0)
  probe  the same encoder, probe trained with train.channel_dropout P
  both   encoder and probe trained with train.channel_dropout P

Training: a synthetic SHHS cohort (--nights nights of --hours h, its train and val splits). Scoring: a second,
independent synthetic cohort (--eval-nights nights, another seed, every night), staged whole with each slot zeroed in
turn (evaluate.stage_all(absent=...), exactly what predict.py does for a missing channel); the figure is pooled κ.
Every step keeps its output under --out, so a killed run picks up where it stopped. About 35 minutes on 2 CPU cores.

    python bench/channel_dropout.py [--p 0.2] [--nights 30] [--eval-nights 20] [--hours 2] [--probe-epochs 12]
"""
import argparse
import contextlib
import io
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import evaluate  # noqa: E402
import train_pretrain  # noqa: E402
import train_probe  # noqa: E402
from prepare import synthetic  # noqa: E402
from prepare.__main__ import main as prepare_main  # noqa: E402
from prepare.signals import SLOTS  # noqa: E402


def quietly(function, *args):
    """Run a pipeline step with its progress output kept out of the table."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        return function(*args)


def cohort(out: Path, name: str, nights: int, hours: float, seed: int) -> Path:
    root = out / name
    if not (root / "manifest.csv").exists():
        print(f"preparing {nights} synthetic nights ({name}, seed {seed})", flush=True)
        synthetic.write_cohort("shhs", out / f"{name}_src", nights=nights, hours=hours, seed=seed)
        quietly(prepare_main, ["shhs", str(out / f"{name}_src"), str(root), "--workers", "2"])
    return root


def pretrain(out: Path, nights: Path, name: str, p: float) -> Path:
    run = out / name
    if not (run / "ckpt_final.pt").exists():
        print(f"pretraining {name} (channel_dropout {p})", flush=True)
        quietly(train_pretrain.main, ["--config", str(ROOT / "configs/pretrain_tiny.yaml"), "--run", str(run),
                                      "--data.root", str(nights), "--train.channel_dropout", str(p)])
    return run


def probe(out: Path, nights: Path, encoder: Path, name: str, p: float, epochs: int) -> Path:
    run = out / name
    if not (run / "ckpt_final.pt").exists():
        print(f"training probe {name} (channel_dropout {p}, {epochs} epochs)", flush=True)
        quietly(train_probe.main, ["--config", str(ROOT / "configs/probe_tiny.yaml"), "--encoder", str(encoder),
                                   "--run", str(run), "--data.root", str(nights), "--train.channel_dropout", str(p),
                                   "--train.epochs", str(epochs)])
    return run


def kappa_per_absent_slot(run: Path, nights_root: Path) -> dict[str, float]:
    encoder, probe_head, config = evaluate.load_run(run)
    nights = evaluate.select_nights(nights_root, "all", None)
    window_s = config["data"]["window_s"]
    kappas = {}
    for absent in ("", *SLOTS):
        staged = quietly(evaluate.stage_all, nights, nights_root, encoder, probe_head, window_s, window_s / 2, 4,
                         "cpu", (absent,) if absent else ())
        kappas[absent or "none"] = evaluate.score(staged, 0, 0)["kappa"]
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
    report = "\n".join(lines)
    (out / "channel_dropout.md").write_text(report + "\n")
    print(report)
    print(f"channel dropout: κ with EEG absent {table['none']['EEG']:.3f} (no dropout) vs {table['both']['EEG']:.3f} "
          f"(p={args.p:g}); table in {out / 'channel_dropout.md'}")


if __name__ == "__main__":
    main()
