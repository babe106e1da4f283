"""Label lag: what κ loses when the technologists' stages arrive K epochs late.

Upstream's hypnogram reader delivered the MrOS, APPLES and WSC labels one epoch late (docs/upstream.md §11 item 8); if
the paper scored against them, its κ there is depressed by that lag. This measures the cost on the synthetic cohort
(the demo's recipe: tiny encoder, tiny probe): one probe run, evaluated with `evaluate.py --label-lag K` for K = 0, 1
and 2 (the truth shifted K epochs later, its first K epochs unscored; the predictions are the same in each). The figure
is pooled κ over the --split nights (default: the test split, a few nights; `--split all` scores all of them, the
training nights included, for a steadier if flattering figure), each staged whole.

Every step runs the repository's own command line and keeps its output under --out; a step whose output exists is
skipped and a killed training run resumes (--resume), so rerunning after a kill picks up where it stopped. Training
takes nearly all the time: about 4 minutes on 2 idle CPU cores (much longer when another job shares them); an
evaluation takes seconds.

    python bench/label_lag.py [--out bench/out/label_lag] [--nights 30] [--hours 2] [--split test]
"""
import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)
LAGS = (0, 1, 2)


def step(done: Path, what: str, *command) -> None:
    """Run `python *command` in the repository unless `done` exists; its output is shown only if it fails."""
    if done.exists():
        print(f"{what}: done before ({done})", flush=True)
        return
    began = time.perf_counter()
    print(f"{what} …", end=" ", flush=True)
    job = subprocess.run([sys.executable, *map(str, command)], cwd=ROOT, capture_output=True, text=True)
    if job.returncode:
        raise SystemExit(f"\n{' '.join(map(str, command))} failed (exit status {job.returncode}):\n"
                         f"{(job.stdout + job.stderr)[-3000:]}")
    print(f"{time.perf_counter() - began:.0f} s", flush=True)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/label_lag",
                        help="work folder: cohort, runs, evaluations (default bench/out/label_lag)")
    parser.add_argument("--nights", type=int, default=30, help="synthetic SHHS nights (default 30)")
    parser.add_argument("--hours", type=float, default=2.0, help="hours per synthetic night (default 2)")
    parser.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                        help="nights to score, evaluate.py's --split (default test)")
    args = parser.parse_args()
    out = args.out.resolve()
    source, nights, encoder, probe = out / "src", out / "nights", out / "pretrain", out / "probe"

    # synthetic writes the same bytes again, so a cohort cut short by a kill is simply written again
    step(nights / "manifest.csv", f"writing {args.nights} synthetic nights of {args.hours:g} h",
         "-m", "synthetic", "shhs", source, "--nights", args.nights, "--hours", args.hours, "--seed", 1)
    step(nights / "manifest.csv", "preparing them", "-m", "prepare", "shhs", source, nights, "--workers", 2)
    step(encoder / "ckpt_final.pt", "pretraining the tiny encoder", "train_pretrain.py",
         "--config", "configs/pretrain_tiny.yaml", "--run-dir", encoder, "--data.root", nights, "--resume")
    step(probe / "ckpt_final.pt", "training the tiny probe", "train_probe.py", "--config", "configs/probe_tiny.yaml",
         "--encoder", encoder, "--run-dir", probe, "--data.root", nights, "--resume")
    pooled = {}
    for lag in LAGS:
        evaluation = out / f"eval_{args.split}_lag{lag}"
        step(evaluation / "results.json", f"evaluating with --label-lag {lag}", "evaluate.py", "--run", probe,
             "--out", evaluation, "--split", args.split, "--label-lag", lag, "--png-nights", 0)
        pooled[lag] = json.loads((evaluation / "results.json").read_text())["pooled"]

    first = pooled[LAGS[0]]
    print(f"split {args.split}: {first['n_nights']} nights, {first['n_epochs']} scored epochs without lag; "
          f"κ 95 % intervals (bootstrap over nights): " +
          ", ".join(f"{lag}: [{', '.join(f'{x:.3f}' if x is not None else '—' for x in p['kappa_ci'] or [None] * 2)}]"
                    for lag, p in pooled.items()))
    print("label lag: κ " + ", ".join(f"{p['kappa']:.3f} ({lag}{' epochs' if lag == LAGS[0] else ''})"
                                      for lag, p in pooled.items()) + f"; {machine.describe('auto')}")


if __name__ == "__main__":
    main()
