"""Does pretraining learn? κ of a linear and of the paper's GRU probe on a pretrained and on an untrained encoder.

The linear probe (`--probe.kind linear`: one linear map per 6-s patch on the frozen embeddings, averaged over the 5
patches of an epoch) is the standard check of self-supervised representations: it can only read what the encoder
already makes linearly available. The GRU probe can learn much on top of any embedding. The untrained encoder is
`train_pretrain.py --train.max_steps 0` (the same architecture with its initial weights).

Everything runs the repository's own commands (the demo's recipe: configs/pretrain_tiny.yaml, configs/probe_tiny.yaml)
on the demo's synthetic cohort, and scores the test split with evaluate.py; each step is skipped when its output exists,
so a killed run resumes. About 10 minutes on 2 CPU cores.

    python bench/pretraining_gain.py [--nights 30] [--hours 2] [--seed 1] [--out bench/out/pretraining_gain]
"""
import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)


def run(*command) -> None:
    done = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed:\n{done.stderr[-3000:]}")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=30, help="synthetic SHHS nights (default 30, as make demo)")
    parser.add_argument("--hours", type=float, default=2.0, help="hours per night (default 2)")
    parser.add_argument("--seed", type=int, default=1, help="cohort seed (default 1, as make demo)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/pretraining_gain", help="work folder")
    args = parser.parse_args()
    out = args.out
    nights = out / "nights"
    if not (nights / "manifest.csv").exists():
        run("-m", "synthetic", "shhs", out / "src", "--nights", args.nights, "--hours", args.hours, "--seed", args.seed)
        run("-m", "prepare", "shhs", out / "src", nights, "--workers", "2")
    encoders = {"pretrained": [], "untrained": ["--train.max_steps", "0"]}
    kappas = {}
    for encoder, extra in encoders.items():
        if not (out / encoder / "ckpt_final.pt").exists():
            run("train_pretrain.py", "--config", "configs/pretrain_tiny.yaml", "--run-dir", out / encoder,
                "--data.root", nights, *extra)
        for kind in ("linear", "gru"):
            probe = out / f"probe_{encoder}_{kind}"
            if not (probe / "ckpt_final.pt").exists():
                run("train_probe.py", "--config", "configs/probe_tiny.yaml", "--encoder", out / encoder,
                    "--run-dir", probe, "--data.root", nights, "--probe.kind", kind)
            if not (probe / "eval" / "results.json").exists():
                run("evaluate.py", "--run", probe, "--out", probe / "eval", "--bootstrap", "0", "--png-nights", "0")
            kappas[encoder, kind] = json.loads((probe / "eval" / "results.json").read_text())["pooled"]["kappa"]
    lines = ["| encoder | linear probe κ | GRU probe κ |", "|---|---|---|"]
    lines += [f"| {e} | {kappas[e, 'linear']:.3f} | {kappas[e, 'gru']:.3f} |" for e in encoders]
    lines += ["", f"Trained and scored on {machine.describe('auto')}."]
    (out / "pretraining_gain.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    gap = kappas["pretrained", "linear"] - kappas["untrained", "linear"]
    print(f"pretraining gain: linear-probe κ {kappas['pretrained', 'linear']:.3f} pretrained vs "
          f"{kappas['untrained', 'linear']:.3f} untrained (gap {gap:+.3f}; goal >= +0.10; {machine.describe('auto')})")


if __name__ == "__main__":
    main()
