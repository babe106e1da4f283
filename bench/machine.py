"""The machine a benchmark figure was measured on, printed with every figure: the GPU's name, or the CPU's model and
the widest vector ISA it offers (x86: AVX-512 or AVX2; oneDNN's fp32 kernels run about twice as fast with AVX-512)."""
import platform
from pathlib import Path


def cpu() -> str:
    """e.g. "AMD EPYC, AVX-512, 2 cores" (from /proc/cpuinfo; the platform's name elsewhere)."""
    import os
    info = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    fields = {k.strip(): v.strip() for k, v in fields.items()}
    flags = set(fields.get("flags", "").split())
    isa = "AVX-512" if "avx512f" in flags else "AVX2" if "avx2" in flags else platform.machine()
    return f"{fields.get('model name', platform.processor() or platform.machine())}, {isa}, {os.cpu_count()} cores"


def describe(device: str = "cpu") -> str:
    """The GPU's name for device "cuda", else the CPU (cpu()). "auto": the GPU when there is one, as the training
    scripts (training.setup_distributed) and evaluate.py's --device pick it."""
    if device == "auto":
        import torch
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        import torch
        return f"GPU {torch.cuda.get_device_name()}"
    return f"CPU {cpu()}"
