"""Matrix-product benchmark: staging's fp32 products through MKL and through oneDNN, on this CPU.

torch's CPU matrix products go to MKL. On AMD CPUs MKL's fp32 GEMM keeps to its AVX2 kernels, while oneDNN (also in
every torch build) picks its kernels from the CPU's features, AVX-512 included. Staging on CPU therefore sends its
products through oneDNN (cpu_kernels.linear, switch cpu_kernels.ONEDNN). This prints, for each product a staged 8-h
night makes at the paper config, the median time of each library and its GFLOP/s, then one figure: oneDNN's speed over
MKL's, the geometric mean over the products. Below 1 (an Intel CPU may be one) means set cpu_kernels.ONEDNN = False.

    python bench/gemm.py [--threads 2] [--repeats 7]
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as predict.py: docs/benchmarks.md "Threads"

import argparse
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import cpu_kernels  # noqa: E402
import machine  # noqa: E402  (bench/machine.py)

# (what, rows of x, weight [out, in]) at the paper config: N = 4800 patches, D = 512, d_ff 2048, 4 heads of 128,
# cpu_kernels.QUERY_BLOCK queries per block, the probe's GRU (input 7 · 512, hidden 1024)
PRODUCTS = [
    ("q/k/v/out projection", 4800, (512, 512)),
    ("feed-forward in", cpu_kernels.FF_ROWS, (2048, 512)),
    ("scores, layer 3 (head dim 384)", cpu_kernels.QUERY_BLOCK, (4800, 384)),
    ("weights·v", cpu_kernels.QUERY_BLOCK, (128, 4800)),
    ("GRU input gates, layer 1", 4800, (3072, 3584)),
    ("GRU recurrent step", 1, (3072, 1024)),
]


def median_seconds(product, repeats: int) -> float:
    product()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        product()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--repeats", type=int, default=7, help="timed repeats per product (default 7)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    generator = torch.Generator().manual_seed(0)
    ratios = []
    print(f"{'product':32s} {'shape':>22s} {'MKL':>16s} {'oneDNN':>16s}")
    for what, rows, (out_features, in_features) in PRODUCTS:
        x = torch.randn(rows, in_features, generator=generator)
        weight = torch.randn(out_features, in_features, generator=generator)
        repeats = args.repeats * (200 if rows == 1 else 1)          # a recurrent step takes ≈ 0.1 ms
        with torch.inference_mode():                                # as staging
            mkl = median_seconds(lambda: F.linear(x, weight), repeats)
            onednn = median_seconds(lambda: cpu_kernels.linear(x, weight), repeats)
        gflop = 2 * rows * in_features * out_features / 1e9
        ratios.append(mkl / onednn)
        print(f"{what:32s} {f'[{rows}, {in_features}]·[{in_features}, {out_features}]':>22s} "
              f"{mkl * 1e3:8.2f} ms {gflop / mkl:4.0f} GF/s {onednn * 1e3:8.2f} ms {gflop / onednn:4.0f} GF/s")
    mean = math.exp(sum(map(math.log, ratios)) / len(ratios))
    print(f"gemm: oneDNN {mean:.2f}× MKL's speed (geometric mean of {len(ratios)} products, fp32, "
          f"{args.threads} threads; cpu_kernels.ONEDNN = {cpu_kernels.ONEDNN}; {machine.describe()})")


if __name__ == "__main__":
    main()
