"""Contention benchmark: how much slower one training step gets when a second identical job shares the machine.

Shared machines are the norm (a cluster node, a laptop doing other work, DataLoader workers beside the compute
threads). OpenMP threads that spin while they wait for work steal the cores another job needs; the scripts therefore
default to OMP_WAIT_POLICY=PASSIVE, and train_probe.py to one thread once the embeddings are cached
(train.cpu_threads; docs/benchmarks.md "Threads"). This runs one step kind in a child process alone, then two children at once,
each timing steps for --seconds, and prints the median step time of each and the slowdown (two jobs / alone).

    python bench/contention.py [--step probe|pretrain] [--threads N] [--wait-policy PASSIVE|ACTIVE|default]

--step probe: the tiny probe's GRU (configs/probe_tiny.yaml widths) on cached-size embeddings, forward + backward +
AdamW; pretrain: the tiny encoder's reconstruction step (configs/pretrain_tiny.yaml widths) on 4 one-hour windows.
"""
import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)


def child(step: str, threads: int, seconds: float) -> None:
    import torch
    from model import ModelConfig, Pretrainer, ProbeConfig, ProbeHead
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(0)
    if step == "probe":
        model = ProbeHead(ProbeConfig(d_model=64, hidden_size=64)).train()
        inputs = (torch.randn(4, 7, 600, 64),)                                  # [B, C, N, D]: 1-h windows
        loss_of = lambda: model(*inputs).logsumexp(-1).mean()                   # noqa: E731
    else:
        model = Pretrainer(ModelConfig(d_model=64, n_heads=4, d_ff=256, max_patches=600)).train()
        inputs = (torch.randn(4, 7, 600 * 750),)                                # [B, C, T]
        loss_of = lambda: model(*inputs)                                        # noqa: E731
    optimizer = torch.optim.AdamW(model.parameters())
    times, end = [], time.time() + seconds
    while time.time() < end or len(times) < 3:
        start = time.perf_counter()
        loss_of().backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    print(statistics.median(times[1:]))


def run(jobs: int, args) -> list[float]:
    env = dict(os.environ)
    if args.wait_policy != "default":
        env["OMP_WAIT_POLICY"] = args.wait_policy
    else:
        env.pop("OMP_WAIT_POLICY", None)
    command = [sys.executable, __file__, "--child", "--step", args.step, "--threads", str(args.threads),
               "--seconds", str(args.seconds)]
    children = [subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True) for _ in range(jobs)]
    return [float(child.communicate()[0].strip().splitlines()[-1]) for child in children]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--step", choices=["probe", "pretrain"], default="probe", help="which step (default probe)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads per job (default 0: torch's default)")
    parser.add_argument("--wait-policy", default="PASSIVE", choices=["PASSIVE", "ACTIVE", "default"],
                        help="OMP_WAIT_POLICY of the jobs (default PASSIVE, as the scripts; default = unset)")
    parser.add_argument("--seconds", type=float, default=12.0, help="seconds of steps per measurement (default 12)")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(args.step, args.threads, args.seconds)
    alone, = run(1, args)
    together = run(2, args)
    print(f"contention ({args.step} step, threads {args.threads or 'default'}, OMP_WAIT_POLICY {args.wait_policy}; "
          f"{machine.describe()}): "
          f"alone {alone * 1000:.0f} ms, two jobs {' / '.join(f'{t * 1000:.0f}' for t in together)} ms per step, "
          f"slowdown {max(together) / alone:.1f}x")


if __name__ == "__main__":
    main()
