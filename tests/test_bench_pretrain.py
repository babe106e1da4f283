"""bench/pretrain.py runs end to end at a toy size (parent + one child process) and prints its figure last."""
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_pretrain_toy(tmp_path):
    config = tmp_path / "toy.yaml"
    config.write_text("model:\n  d_model: 16\n  n_layers: 3\n  n_heads: 2\n  d_ff: 32\npretrain:\n  p_zero: 0.05\n")
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "pretrain.py"), "--config", str(config),
                           "--hours", "0.05", "--steps", "1", "--warmup", "0", "--threads", "1"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert "N = 30 patches" in proc.stdout                       # 0.05 h = 180 s = 22,500 samples = 30 patches
    assert re.fullmatch(r"pretrain: \d+ ms/night fwd\+bwd, peak RSS \d+ MB, \d+ GFLOP/s by model FLOPs \(\d+ executed\) "
                        r"\(toy, 0.05 h, cpu fp32, 1 thread; CPU .+, (AVX-512|AVX2|\w+), \d+ cores\)", lines[-1]), lines[-1]
    # three layers, SDPA path: the profiled step saw one SDPA kernel per layer
    sdpa = next(line for line in lines if "SDPA kernels run" in line)
    assert len(sdpa.split(":", 1)[1].split(",")) == 3, sdpa
