"""Prediction benchmark: seconds and peak memory to stage one night on CPU (docs/design.md §10 target: <= 10 s, <= 2 GB
per 8-h night).

Random weights at the paper config (Encoder(ModelConfig()), ProbeHead(ProbeConfig())), input [7, hours × 3600 × 125]
noise, staged by stage.stage_night with the paper's 8-h window and its default windows (stage.staging_windows: an
8-h night is one window, a 9.5-h night one of 8 h and one of 1.5 h). The staging runs in a child process so that its
peak RSS is its own (it includes importing torch and building the model, as a real `predict.py` run would); only the
stage_night call is timed. On the CPU stage_night runs cpu_kernels.py: one channel sequence at a time, attention a
block of queries at a time with the scores kept from layer to layer, the probe's GRU with each layer's two directions
side by side, the products through oneDNN (bench/gemm.py). EDF reading and filtering are `bench/prepare.py`'s; the
whole predict.py process against YASA's is `bench/vs_yasa.py`'s.

    python bench/predict.py [--hours 8] [--threads 2] [--timeout 300] [--check] [--folder N] [--workers W]

--check also stages the same night through model.py's reference paths (stage_night(reference=True): SDPA attention,
MKL's products, nn.GRU over the packed sequence) and prints the largest difference in any probability.

--folder N also stages a folder of N synthetic EDFs of --hours each (`python -m synthetic edf`) with the paper-config
random-weight run through `predict.py FOLDER --workers W` (default 1: one reader process reads and filters the next
night while the current one is staged) and prints nights per hour, the figure a lab staging folders cares about.
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as predict.py: docs/benchmarks.md "Threads"

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET = "targets: <= 15 s, <= 1.3 GB on 2 CPU cores; <= 10 s, <= 2 GB (docs/design.md §10)"
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import machine  # noqa: E402  (bench/machine.py)


def child(hours: float, threads: int, check: bool) -> None:
    import torch
    from model import Encoder, ModelConfig, ProbeConfig, ProbeHead
    from stage import stage_night
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder, probe = Encoder(ModelConfig()).eval(), ProbeHead(ProbeConfig()).eval()
    window = encoder.cfg.max_patches * encoder.cfg.patch_len                      # 8 h = 3,600,000 samples
    signals = torch.randn(encoder.cfg.n_channels, int(hours * 3600 * 125))        # [7, T]
    start = time.perf_counter()
    probs = stage_night(encoder, probe, signals, window, batch_size=1, device="cpu")
    result = {"seconds": time.perf_counter() - start, "epochs": len(probs)}
    if check:
        reference = stage_night(encoder, probe, signals, window, batch_size=1, device="cpu", reference=True)
        result["max_difference"] = (probs - reference).abs().max().item()
    print(json.dumps(result))


def folder_nights_per_hour(n_nights: int, hours: float, workers: int, timeout: float) -> float:
    """Nights per hour of `predict.py FOLDER --workers W` on N synthetic EDFs (reading, filtering, staging, writing)."""
    import tempfile
    import runs
    from model import ModelConfig, ProbeConfig
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        subprocess.run([sys.executable, "-m", "synthetic", "edf", str(tmp / "edfs"), "--nights", str(n_nights),
                        "--hours", str(hours), "--seed", "3"], cwd=ROOT, check=True, capture_output=True)
        runs.write_random_run(tmp / "run", ModelConfig(), ProbeConfig(), {"window_s": 28800.0})
        start = time.perf_counter()
        subprocess.run([sys.executable, "predict.py", str(tmp / "edfs"), "--run", str(tmp / "run"), "--out",
                        str(tmp / "out"), "--workers", str(workers), "--device", "cpu"], cwd=ROOT, check=True,
                       capture_output=True, timeout=timeout * n_nights)
        return n_nights / (time.perf_counter() - start) * 3600


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=8.0, help="night length (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds (default 300)")
    parser.add_argument("--check", action="store_true",
                        help="also stage through the reference paths and print the largest probability difference")
    parser.add_argument("--folder", type=int, default=0, metavar="N",
                        help="also stage a folder of N synthetic EDFs with predict.py and print nights per hour")
    parser.add_argument("--workers", type=int, default=1, help="predict.py --workers for --folder (default 1)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.hours, args.threads, args.check)
    command = [sys.executable, __file__, "--child", "--hours", str(args.hours), "--threads", str(args.threads)]
    command += ["--check"] if args.check else []
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"predict: gave up after {args.timeout:g} s per {args.hours:g}-h night "
                         f"(paper config, cpu, {args.threads} threads; {machine.cpu()}); {TARGET}")
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"the staging child failed:\n{err.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024      # Linux: kB
    print(f"staged {result['epochs']} epochs")
    print(f"predict: {result['seconds']:.1f} s, {peak_mb:.0f} MB peak RSS per {args.hours:g}-h night "
          f"(paper config, cpu, {args.threads} threads; {machine.cpu()}); {TARGET}")
    if args.check:      # the peak above then includes the reference run's
        print(f"largest probability difference from the reference paths: {result['max_difference']:.2e}")
    if args.folder:
        rate = folder_nights_per_hour(args.folder, args.hours, args.workers, args.timeout)
        print(f"predict.py FOLDER --workers {args.workers}: {rate:.0f} nights per hour ({args.folder} nights of "
              f"{args.hours:g} h, paper config, cpu)")


if __name__ == "__main__":
    main()
