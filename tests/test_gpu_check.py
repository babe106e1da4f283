"""bench/gpu_check.py --dry-run: every check a CPU can run, at tiny sizes, ends in one table and exit status 0; a check
that fails (forced by the hidden --_force-fail, which spoils that check's observation, not its verdict) shows as a
FAIL row and makes the exit status 1, while the other checks still run."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ["sdpa", "step", "memory", "resume", "ddp", "predict", "cudnn", "compile"]


def gpu_check(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "bench" / "gpu_check.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=240)


def table(stdout: str) -> dict[str, tuple[str, str, str]]:
    """The table's rows: check -> (result, figure, pass/FAIL)."""
    lines = [line for line in stdout.splitlines() if line.startswith("| ")][1:]      # without the header
    cells = [[cell.strip() for cell in line.strip("|").split(" | ")] for line in lines]
    assert all(len(row) == 4 for row in cells), lines
    return {check: (result, figure, verdict) for check, result, figure, verdict in cells}


def test_dry_run_passes_every_check_and_prints_one_table():
    proc = gpu_check("--dry-run")
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert proc.stdout.count("| check") == 1
    rows = table(proc.stdout)
    assert list(rows) == CHECKS
    assert all(verdict == "pass" for _, _, verdict in rows.values()), rows
    assert all(figure.endswith(" cores") and "CPU " in figure for _, figure, _ in rows.values()), rows   # the machine
    assert rows["sdpa"][0] == ("unmasked: L1 flash (cpu), L2 math, L3 math; masked: L1 flash (cpu), L2 math, L3 math")
    assert "ms/step" in rows["step"][0] and "efficient/default" in rows["step"][0] and "GFLOP/s" in rows["step"][1]
    assert rows["memory"][0] == ("kept for the backward: 8.5 GiB in bf16, 16.4 GiB in fp32; weights, gradients and "
                                 "AdamW 0.28 GB")                                   # docs/gpu.md's estimate
    assert "largest relative difference 0.00e+00 (required: exactly equal)" in rows["resume"][0]
    assert rows["ddp"][0].startswith("2 gloo processes, exit 0, 3 of 3 losses logged, all finite")
    assert rows["predict"][0].startswith("hypnogram CSV: 60 epochs")
    assert rows["cudnn"][0] == "n/a on CPU" and rows["compile"][0].startswith("left out of --dry-run")


def test_a_failing_check_fails_the_run_and_hides_no_other():
    proc = gpu_check("--dry-run", "--only", "sdpa,step", "--_force-fail", "sdpa")
    assert proc.returncode == 1, proc.stdout + proc.stderr[-3000:]
    rows = table(proc.stdout)
    assert list(rows) == ["sdpa", "step"]
    result, _, verdict = rows["sdpa"]
    assert verdict == "FAIL", result
    assert result.startswith("unmasked L3 ran cudnn, expected math; "
                             "unmasked: cuDNN in L3 under attention_kernels no_cudnn"), result
    assert rows["step"][2] == "pass"
    assert "2 checks, 1 failed" in proc.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is here")
def test_without_a_gpu_it_says_so_and_names_the_dry_run():
    proc = gpu_check("--only", "sdpa")
    assert proc.returncode == 2 and "--dry-run" in proc.stderr
