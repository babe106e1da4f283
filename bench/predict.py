"""Prediction benchmark: seconds and peak memory to stage one night on CPU (docs/design.md §10 target: <= 10 s, <= 2 GB
per 8-h night).

Random weights at the paper config (Encoder(ModelConfig()), ProbeHead(ProbeConfig())), input [7, hours × 3600 × 125]
noise, staged by stage.stage_night with the paper's 8-h window (so an 8-h night is one window). The staging runs in
a child process so that its peak RSS is its own (it includes importing torch and building the model, as a real
`predict.py` run would); only the stage_night call is timed. Staging runs in inference mode, so attention takes the fused
kernel on CPU too (model.SelfAttention.sdpa_attention decides per call), and stage_night runs the encoder one channel
sequence at a time on CPU (Encoder.encode's sequences_per_pass). EDF reading and filtering are `bench/prepare.py`'s.

    python bench/predict.py [--hours 8] [--threads 2] [--timeout 300]
"""
import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def child(hours: float, threads: int) -> None:
    import torch
    from model import Encoder, ModelConfig, ProbeConfig, ProbeHead
    from stage import stage_night
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    encoder, probe = Encoder(ModelConfig()).eval(), ProbeHead(ProbeConfig()).eval()
    window = encoder.cfg.max_patches * encoder.cfg.patch_len                      # 8 h = 3,600,000 samples
    signals = torch.randn(encoder.cfg.n_channels, int(hours * 3600 * 125))        # [7, T]
    start = time.perf_counter()
    probs = stage_night(encoder, probe, signals, window, window // 2, batch_size=1, device="cpu")
    seconds = time.perf_counter() - start
    print(json.dumps({"seconds": seconds, "epochs": len(probs)}))


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hours", type=float, default=8.0, help="night length (default 8)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="give up after this many seconds (default 300)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.hours, args.threads)
    command = [sys.executable, __file__, "--child", "--hours", str(args.hours), "--threads", str(args.threads)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, check=True)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"predict: gave up after {args.timeout:g} s per {args.hours:g}-h night "
                         f"(paper config, cpu, {args.threads} threads); target <= 10 s, <= 2 GB")
    except subprocess.CalledProcessError as err:
        raise SystemExit(f"the staging child failed:\n{err.stderr}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    peak_mb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024      # Linux: kB
    print(f"staged {result['epochs']} epochs")
    print(f"predict: {result['seconds']:.1f} s, {peak_mb:.0f} MB peak RSS per {args.hours:g}-h night "
          f"(paper config, cpu, {args.threads} threads); target <= 10 s, <= 2 GB")


if __name__ == "__main__":
    main()
