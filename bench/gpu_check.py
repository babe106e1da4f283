"""GPU check: what the first run on a GPU must confirm, in one table (at most 8 minutes on one H100/H200).

    python bench/gpu_check.py                        # on a CUDA machine: every check, paper sizes
    python bench/gpu_check.py --only sdpa,cudnn      # some checks (names below)
    python bench/gpu_check.py --dry-run              # what a CPU can run of it, at tiny sizes (under a minute)

Prints ONE table, a row per check (check | result | figure | pass/FAIL), every figure naming the machine
(bench/machine.py), and exits 1 if any check failed (an exception in a check is a FAIL row with its one-line cause; the
other checks still run). --dry-run runs every check a CPU can at tiny sizes on the CPU; the others say "n/a on CPU".
--keep DIR keeps the work folder (cohort, run folders, predictions) for a closer look.

sdpa     Which SDPA kernel each attention layer launched in one training step of the paper config (ModelConfig(), an
         8-h window, batch 3, bf16 autocast), for a batch without padding and one whose last eighth is padded
         (attention then takes a key mask): the aten op per layer and the CUDA kernels under it, forward and backward
         (torch.profiler). Expected, by model.py's rules (ATTENTION_KERNELS, v_padding), under the default
         model.attention_kernels no_cudnn: no cuDNN anywhere; unmasked: layers 1 and 2 flash (layer 2's v padded to
         its q/k width 256), layer 3 (q/k 384) memory-efficient; masked: memory-efficient in every layer. (CPU: the
         flash kernel for the CPU where q, k, v share a head dim, i.e. layer 1, math in layers 2 and 3.)
         FAIL: what ran is printed; a layer on math means a kernel refused its shapes or dtype (bench/pretrain.py
         --device cuda --bf16 lists, per layer, which kernels accept it and why the others decline); a flash layer
         turned efficient means v_padding's rule no longer matches FlashAttention's limits; cuDNN under no_cudnn means
         sdpa_kernel is not honoured.
step     Pretrainer forward + loss + backward + AdamW step at the paper's shape: median step time of 10 after 3
         warm-up, torch.cuda.max_memory_allocated, and MFU (3 x forward x batch FLOPs per step, bench/flops.py: by the
         model's FLOPs and by the executed ones, against --peak-tflops; docs/design.md §10's target is >= 45 % by model
         FLOPs on an H100), unpadded and padded, and unpadded again with model.attention_kernels efficient. The
         masked/unmasked ratio bounds what a packed (variable-length) kernel could save on padded batches (nights
         shorter than the window; docs/gpu.md). efficient/default says whether FlashAttention, with layer 2's v
         zero-padded to 256 for it, pays: above 1 it does; below 1 set model.attention_kernels efficient (no flash,
         no padding). FAIL: a non-finite loss or an error (an out-of-memory names the allocation); a missed MFU
         target is reported, not failed.
resume   train_pretrain.py on a small synthetic cohort (6 one-hour SHHS nights, half-hour windows), 20 steps with a
         checkpoint every 5, uninterrupted; then killed right after step 12 (PFTSLEEP_KILL_AFTER_STEP: durable.kill_point)
         and resumed: the losses in metrics.jsonl, step by step, must equal the uninterrupted run's within 1e-3
         relative (on the CPU, in --dry-run: exactly).
         FAIL: the largest relative difference is printed; a small one (1e-3 .. 1e-2) is likely non-deterministic
         kernels (atomics in attention's backward), a large one a state the checkpoint misses (RNG, scheduler, data
         order: training.save_training_checkpoint / training.resume).
ddp      torchrun --nproc_per_node 2 train_pretrain.py, a few steps: exit 0 and finite losses (NCCL on >= 2 GPUs;
         "skipped: 1 GPU" on one; gloo on the CPU in --dry-run). FAIL: the job's last error line is printed.
predict  predict.py on an 8-h synthetic EDF with a random-weight paper-config probe run, --device cuda, and again
         --device cpu: wall times, the hypnogram CSV (stage.HYPNOGRAM_COLUMNS, one row per 30-s epoch, probabilities
         finite and summing to 1) and the two devices' probabilities within 1e-3 (staging is fp32 on both). --dry-run:
         a half-hour night, a tiny run, the CPU only. FAIL: a larger difference points at the GPU's attention path
         (SelfAttention.sdpa_attention, stage.stage_night), since the CPU stages through cpu_kernels.attention.
cudnn    cuDNN against memory-efficient attention on one masked batch (q, k, v [21, 4, 4800, 128] bf16, the last 600
         keys masked; 4800 = 64 mod 128, where some cuDNN versions give NaN gradients): outputs and gradients finite
         and equal within bf16 tolerance (2e-2 of the largest magnitude). n/a when cuDNN attention is not available.
         FAIL: keep model.attention_kernels no_cudnn (the default); never switch to "torch" on this stack.
memory   An estimate at the paper's shape (8-h windows, batch 3), computed the same on any machine: the bytes autograd
         keeps for the backward in one traced training step (fake tensors; attention stands in as a fused kernel,
         which keeps q, k, v, its output and a log-sum-exp), bf16 and fp32, and the weights' and AdamW's states.
         Compare with the step row's measured peak: a peak far above it means something is kept that a fused kernel
         would not keep (a layer on the math kernel keeps [S, H, N, N] weights).
compile  The resume check's uninterrupted run, without dropout and corruption (compiled code draws other random
         numbers than eager), eager and with --train.compile true: compile time (the compiled run's wall time minus
         the eager one's) and its losses against eager's within 1e-2 relative (bf16, other fusions). Runs only
         with at least 3 minutes of the 8-minute budget (--budget-s) left; left out of --dry-run (tens of seconds on a
         CPU for the tiny model). FAIL: train with train.compile false (the default).
"""
import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # as the scripts (docs/benchmarks.md "Threads"), before torch loads OpenMP

import argparse
import math
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import torch  # noqa: E402

import machine  # noqa: E402  (bench/machine.py)
import training
from flops import SDPA_OPS, forward_flops  # noqa: E402  (bench/flops.py)

KILL_ENV = "PFTSLEEP_KILL_AFTER_STEP"
ATTENTION_KERNEL = re.compile(r"flash|fmha|cutlass|cudnn|attention|sdpa", re.IGNORECASE)
MFU_TARGET = 45.0                      # % by model FLOPs, bf16, H100 (docs/design.md §10)
COMPILE_NEEDS_S = 180                  # budget left for the compile check to start
# compiled code draws other random numbers (dropout, the corruption) than eager: the compile check turns them off
NO_RANDOMNESS = ["--model.dropout", "0", "--pretrain.p_zero", "0", "--pretrain.p_jitter", "0"]


@dataclass
class Row:
    check: str
    result: str
    figure: str
    ok: bool


class CheckFailed(Exception):
    """A check that could not finish; the message is its one-line cause."""


@dataclass
class Plan:
    """The sizes of one session: the paper's on the GPU, tiny ones on the CPU (--dry-run)."""
    device: str
    model: dict                        # ModelConfig fields of the in-process checks (sdpa, step)
    hours: float                       # their window
    batch: int
    warmup: int
    steps: int
    widths: list                       # train_pretrain.py overrides of configs/pretrain_tiny.yaml's sizes
    train_steps: int                   # resume, compile: optimiser steps, checkpoint interval, kill point
    ckpt_every: int
    kill_after: int
    resume_rtol: float
    ddp_steps: int
    predict_hours: float
    predict_run: tuple                 # (ModelConfig kwargs, ProbeConfig kwargs, window_s)
    timeout_s: float                   # per subprocess
    peak_tflops: float = 989.0

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def dtype(self):
        return torch.bfloat16 if self.cuda else torch.float32

    def machine(self) -> str:
        return machine.describe(self.device)


def gpu_plan() -> Plan:
    """The paper's config and shape; training runs at the paper's widths on half-hour windows."""
    return Plan(device="cuda", model={}, hours=8.0, batch=3, warmup=3, steps=10,
                widths=["--model.d_model", "512", "--model.n_heads", "4", "--model.d_ff", "2048",
                        "--model.n_layers", "3"],
                train_steps=20, ckpt_every=5, kill_after=12, resume_rtol=1e-3, ddp_steps=5,
                predict_hours=8.0, predict_run=({}, {}, 28800.0), timeout_s=300)


def dry_plan() -> Plan:
    """--dry-run: tiny sizes on the CPU; fp32 there, so a resumed run must equal the uninterrupted one exactly."""
    tiny_run = (dict(d_model=16, n_layers=1, n_heads=2, d_ff=32, max_patches=50),     # tests/conftest.py's
                dict(d_model=16, hidden_size=8, n_layers=1, dropout=0.0), 300.0)      # tiny_probe_run: 5-min window
    return Plan(device="cpu", model=dict(d_model=32, n_heads=4, d_ff=64, n_layers=3), hours=0.1, batch=2, warmup=1,
                steps=3, widths=["--model.d_model", "32", "--model.d_ff", "64", "--train.batch_size", "2"],
                train_steps=6, ckpt_every=2, kill_after=3, resume_rtol=0.0, ddp_steps=3,
                predict_hours=0.5, predict_run=tiny_run, timeout_s=120)


# ----------------------------------------------------------------------------------------------------------------------
# Processes


def one_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    cause = text[0] if text else "no detail"
    return (cause if isinstance(err, CheckFailed) else f"{type(err).__name__}: {cause}")[:300]


def last_error(text: str) -> str:
    """The line of a failed job's output that says why: the last one naming an error, else the last line."""
    lines = [line.strip() for line in text.replace("\r", "\n").splitlines() if line.strip()]
    named = [line for line in lines if re.search(r"error|exception|refused|cannot|not a", line, re.IGNORECASE)]
    return ((named or lines or ["no output"])[-1])[:240]


def run_command(args: list, timeout: float, env: dict | None = None, expect: int = 0) -> tuple[str, float]:
    """`python *args` in the repository, in its own process group (killed whole on a time-out: torchrun's workers
    too) -> (stdout, seconds). CheckFailed unless it exits with `expect` within `timeout` seconds."""
    what = Path(str(args[0])).name if args[0] != "-m" else f"python -m {args[1]}"
    started = time.perf_counter()
    job = subprocess.Popen([sys.executable, *map(str, args)], cwd=ROOT, env={**os.environ, **(env or {})},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = job.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(job.pid, signal.SIGKILL)
        job.communicate()
        raise CheckFailed(f"{what} timed out after {timeout:g} s") from None
    if job.returncode != expect:
        raise CheckFailed(f"{what} exited {job.returncode} (expected {expect}): {last_error(err + out)}")
    return out, time.perf_counter() - started


def free_port() -> int:
    with socket.socket() as probe:                  # a fixed port can be held by another job
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Context:
    """One session: the plan, the work folder, and what several checks share (the cohort, the training command)."""

    def __init__(self, plan: Plan, folder: Path, force_fail: str | None = None, budget_s: float = 480.0):
        self.plan, self.folder, self.force_fail, self.budget_s = plan, folder, force_fail, budget_s
        self.started = time.monotonic()
        self._cohort: Path | None = None

    def forced(self, check: str) -> bool:
        """--_force-fail CHECK (for the tests): that check's observation is spoiled, its verdict code untouched."""
        return self.force_fail == check

    def left_s(self) -> float:
        return self.budget_s - (time.monotonic() - self.started)

    def cohort(self) -> Path:
        """6 one-hour synthetic SHHS nights, prepared, every night in the train split (tests/conftest.py's
        shhs_nights): 12 half-hour windows."""
        if self._cohort is None:
            import pandas as pd
            src, nights = self.folder / "src", self.folder / "nights"
            run_command(["-m", "synthetic", "shhs", src, "--nights", "6", "--hours", "1", "--seed", "5"],
                        self.plan.timeout_s)
            run_command(["-m", "prepare", "shhs", src, nights], self.plan.timeout_s)
            manifest = pd.read_csv(nights / "manifest.csv", dtype=str)
            manifest["split"] = "train"
            manifest.to_csv(nights / "manifest.csv", index=False)
            self._cohort = nights
        return self._cohort

    def train_args(self, run_dir: Path, steps: int | None = None) -> list:
        p = self.plan
        return ["train_pretrain.py", "--config", "configs/pretrain_tiny.yaml", "--data.root", self.cohort(),
                "--data.window_s", "1800", "--model.max_patches", "300", "--data.val_split", "train",
                "--train.max_steps", steps or p.train_steps, "--train.ckpt_every", p.ckpt_every,
                "--train.log_every", "1", "--data.num_workers", "0", *p.widths, "--run-dir", run_dir]

    def pretrain(self, run_dir: Path, *extra, env: dict | None = None, expect: int = 0) -> float:
        """train_pretrain.py (train_args) -> seconds."""
        return run_command([*self.train_args(run_dir), *extra], self.plan.timeout_s, env, expect)[1]


# ----------------------------------------------------------------------------------------------------------------------
# In-process steps (sdpa, step)


def bench_model(plan: Plan, **overrides):
    """(config, Pretrainer, AdamW, signals [B, 7, T], padding mask with the last eighth padded) at the plan's shape;
    overrides: ModelConfig fields."""
    from model import ModelConfig, Pretrainer
    cfg = ModelConfig(**{**plan.model, **overrides})
    T = int(round(plan.hours * 3600 * 125)) // cfg.patch_len * cfg.patch_len
    cfg.max_patches = T // cfg.patch_len
    torch.manual_seed(0)
    model = Pretrainer(cfg).to(plan.device).train()
    optimizer = torch.optim.AdamW(model.parameters())
    x = torch.randn(plan.batch, cfg.n_channels, T, device=plan.device)
    mask = torch.zeros(plan.batch, T, dtype=torch.bool, device=plan.device)
    mask[:, T - T // 8:] = True
    return cfg, model, optimizer, x, mask


def train_step(plan: Plan, model, optimizer, x, mask) -> float:
    """forward + loss (bf16 autocast on CUDA, as training.autocast) + backward + AdamW step -> the loss."""
    optimizer.zero_grad(set_to_none=True)
    with training.autocast(torch.device(plan.device), plan.cuda):
        loss = model(x, mask)
    loss.backward()
    optimizer.step()
    return loss.item()                                   # waits for the GPU


def short_kernel(name: str) -> str:
    """'void pytorch_flash::flash_fwd_kernel<…>(…)' -> 'flash_fwd_kernel' (the name without namespaces, template
    arguments and parameters)."""
    bare = name.removeprefix("void ").replace("(anonymous namespace)::", "")
    return (re.split(r"[<(]", bare, maxsplit=1)[0].rsplit("::", 1)[-1] or name)[:64]


def kernels_under(event) -> list[str]:
    """The CUDA kernels a profiled CPU op and the ops under it launched (full names)."""
    return [k.name for k in event.kernels] + [name for child in event.cpu_children for name in kernels_under(child)]


def attention_kernels(event) -> list[str]:
    names = kernels_under(event)
    shown = [n for n in names if ATTENTION_KERNEL.search(n)] or names
    return list(dict.fromkeys(short_kernel(n) for n in shown))


def profiled_attention(step, cuda: bool) -> list[dict]:
    """Run step() under torch.profiler -> per layer, in call order: {"op": SDPA_OPS's name of its forward op,
    "forward": kernel names, "backward": kernel names (fused kernels; math's backward is plain autograd)}."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()                        # every kernel of the step inside the profile
    events = prof.events()
    forward = sorted((e for e in events if e.name in SDPA_OPS), key=lambda e: e.time_range.start)
    backward = sorted((e for e in events if e.name.endswith("_backward") and e.name[:-len("_backward")] in SDPA_OPS),
                      key=lambda e: e.time_range.start)
    layers = [{"op": SDPA_OPS[e.name], "forward": attention_kernels(e), "backward": []} for e in forward]
    fused = [layer for layer in layers if layer["op"] != "math"]
    for layer, event in zip(reversed(fused), backward):     # backward runs the last layer first
        layer["backward"] = attention_kernels(event)
    return layers


def expected_ops(cfg, device: str, dtype, masked: bool) -> list[str] | None:
    """What model.py's rules say each layer runs (SDPA_OPS's names); None where they do not say (cuDNN allowed)."""
    from model import ATTENTION_KERNELS, v_padding
    from torch.nn.attention import SDPBackend
    allowed = ATTENTION_KERNELS[cfg.attention_kernels]
    if SDPBackend.CUDNN_ATTENTION in allowed or cfg.attention != "sdpa":
        return None
    d, ops = cfg.d_model // cfg.n_heads, []
    for layer in range(1, cfg.n_layers + 1):
        qk = d * (layer if cfg.residual_attention else 1)
        if device == "cpu":    # the CPU's flash kernel takes one head dim for q, k and v; v is never padded there
            ops.append("flash (cpu)" if SDPBackend.FLASH_ATTENTION in allowed and qk == d else "math")
        elif v_padding(allowed, device, dtype, qk, 0, masked):   # v of width 0 is padded wherever flash can run
            ops.append("flash")
        else:
            ops.append("efficient" if SDPBackend.EFFICIENT_ATTENTION in allowed else "math")
    return ops


def describe_layers(layers: list[dict], cuda: bool) -> str:
    def kernels(layer):
        names = "; ".join(filter(None, [", ".join(layer["forward"]),
                                        "bwd " + ", ".join(layer["backward"]) if layer["backward"] else ""]))
        return f" [{names}]" if names else " [no CUDA kernel attributed]" if cuda else ""
    return ", ".join(f"L{i} {layer['op']}{kernels(layer)}" for i, layer in enumerate(layers, 1))


def attention_problems(label: str, layers: list[dict], expected: list[str] | None, cfg) -> list[str]:
    problems = []
    if len(layers) != cfg.n_layers:
        problems.append(f"{label}: {len(layers)} SDPA calls for {cfg.n_layers} layers")
    for i, (layer, op) in enumerate(zip(layers, expected or []), 1):
        if layer["op"] != op:
            problems.append(f"{label} L{i} ran {layer['op']}, expected {op}")
    cudnn = [i for i, layer in enumerate(layers, 1)
             if layer["op"] == "cudnn" or any("cudnn" in k.lower() for k in layer["forward"] + layer["backward"])]
    if cudnn and cfg.attention_kernels == "no_cudnn":
        problems.append(f"{label}: cuDNN in L{', L'.join(map(str, cudnn))} under attention_kernels no_cudnn")
    return problems


def shape_text(plan: Plan, cfg) -> str:
    size = "paper config" if not plan.model else f"d_model {cfg.d_model}, {cfg.n_layers} layers"
    return f"{plan.hours:g} h, batch {plan.batch}, {'bf16' if plan.cuda else 'fp32'}, {size}"


# ----------------------------------------------------------------------------------------------------------------------
# The checks: each returns a Row


def check_sdpa(ctx: Context) -> Row:
    plan = ctx.plan
    cfg, model, optimizer, x, mask = bench_model(plan)
    train_step(plan, model, optimizer, x, None)                     # warm-up: lazy initialisation outside the profile
    ran = {label: profiled_attention(lambda: train_step(plan, model, optimizer, x, m), plan.cuda)
           for label, m in (("unmasked", None), ("masked", mask))}
    if ctx.forced("sdpa") and ran["unmasked"]:
        ran["unmasked"][-1]["op"] = "cudnn"
    problems = [p for label, masked in (("unmasked", False), ("masked", True))
                for p in attention_problems(label, ran[label], expected_ops(cfg, plan.device, plan.dtype, masked), cfg)]
    result = "; ".join(f"{label}: {describe_layers(layers, plan.cuda) or 'no SDPA call'}"
                       for label, layers in ran.items())
    if problems:
        result = "; ".join(problems) + " — ran: " + result
    return Row("sdpa", result, f"{shape_text(plan, cfg)}; {plan.machine()}", not problems)


def timed_steps(plan: Plan, model, optimizer, x, mask) -> tuple[float, float | None, list[float]]:
    """-> (median step seconds, peak allocated bytes on CUDA, the losses)."""
    sync = torch.cuda.synchronize if plan.cuda else (lambda: None)
    for _ in range(plan.warmup):
        train_step(plan, model, optimizer, x, mask)
    if plan.cuda:
        torch.cuda.reset_peak_memory_stats()
    times, losses = [], []
    for _ in range(plan.steps):
        sync()
        start = time.perf_counter()
        losses.append(train_step(plan, model, optimizer, x, mask))
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times), torch.cuda.max_memory_allocated() if plan.cuda else None, losses


def check_step(ctx: Context) -> Row:
    plan = ctx.plan
    cfg, model, optimizer, x, mask = bench_model(plan)
    measured = {label: timed_steps(plan, model, optimizer, x, m) for label, m in (("unmasked", None), ("masked", mask))}
    del model, optimizer
    # the same unmasked batch without FlashAttention: does flash, with layer 2's v padded for it, pay?
    _, model, optimizer, _, _ = bench_model(plan, attention_kernels="efficient")
    measured["unmasked, attention_kernels efficient"] = timed_steps(plan, model, optimizer, x, None)
    N = cfg.max_patches
    per_step = {kind: 3 * plan.batch * sum(forward_flops(cfg, N, **kwargs).values()) for kind, kwargs in
                (("model", {}), ("executed", dict(executed=True, device=plan.device, dtype=plan.dtype, masked=False)))}
    seconds = measured["unmasked"][0]
    parts = [f"{label} {s * 1000:.0f} ms/step" + (f", peak {peak / 2**30:.1f} GiB" if peak is not None else "")
             for label, (s, peak, _) in measured.items()]
    result = "; ".join(parts) + (f"; masked/unmasked {measured['masked'][0] / seconds:.2f}x; efficient/default "
                                 f"{measured['unmasked, attention_kernels efficient'][0] / seconds:.2f}x")
    nonfinite = [label for label, (_, _, losses) in measured.items() if not all(map(math.isfinite, losses))]
    if nonfinite:
        result = f"non-finite loss ({', '.join(nonfinite)}); " + result
    if plan.cuda:
        mfu = {kind: 100 * flops / seconds / (plan.peak_tflops * 1e12) for kind, flops in per_step.items()}
        figure = (f"MFU {mfu['model']:.1f} % by model FLOPs ({per_step['model'] / seconds / 1e12:.0f} TFLOP/s), "
                  f"{mfu['executed']:.1f} % by executed, of {plan.peak_tflops:g} TFLOP/s; target >= {MFU_TARGET:g} % "
                  f"{'met' if mfu['model'] >= MFU_TARGET else 'missed'}")
    else:
        figure = (f"{per_step['model'] / seconds / 1e9:.1f} GFLOP/s by model FLOPs "
                  f"({per_step['executed'] / seconds / 1e9:.1f} executed); peak memory n/a on CPU")
    return Row("step", result, f"{figure}; {shape_text(plan, cfg)}, median of {plan.steps}; {plan.machine()}",
               not nonfinite)


def logged_losses(run_dir: Path) -> dict:
    """{(step, "loss" | "val_loss"): value} from metrics.jsonl."""
    import runs
    return {(m["step"], key): m[key] for m in runs.read_metrics(run_dir) for key in ("loss", "val_loss") if key in m}


def largest_relative_difference(run_dir: Path, reference: Path) -> tuple[float, str]:
    """Step by step over the losses both runs logged -> (largest |a - b| / |b|, what was compared); CheckFailed when
    they logged different steps."""
    got, want = logged_losses(run_dir), logged_losses(reference)
    if got.keys() != want.keys() or not want:
        steps = lambda values: sorted({step for step, _ in values})  # noqa: E731
        raise CheckFailed(f"{run_dir.name} logged steps {steps(got)}, {reference.name} {steps(want)}")
    diffs = [abs(got[k] - want[k]) / max(abs(want[k]), 1e-12) if math.isfinite(got[k] + want[k]) else math.inf
             for k in want]
    counts = {key: sum(k == key for _, k in want) for key in ("loss", "val_loss")}
    return max(diffs), " and ".join(f"{n} {key}{'es' if n != 1 else ''}" for key, n in counts.items() if n)


def check_resume(ctx: Context) -> Row:
    plan = ctx.plan
    reference, killed = ctx.folder / "uninterrupted", ctx.folder / "killed"
    ctx.pretrain(reference)
    ctx.pretrain(killed, env={KILL_ENV: str(plan.kill_after)}, expect=-signal.SIGKILL)
    ctx.pretrain(killed, "--resume")
    diff, compared = largest_relative_difference(killed, reference)
    ok = diff <= plan.resume_rtol
    bound = f"within {plan.resume_rtol:g} relative" if plan.resume_rtol else "exactly equal"
    result = (f"killed after step {plan.kill_after} (exit -9), resumed to {plan.train_steps}: {compared} against the "
              f"uninterrupted run's, largest relative difference {diff:.2e} (required: {bound})")
    return Row("resume", result, f"{plan.train_steps} steps, {' '.join(plan.widths)}; {plan.machine()}", ok)


def check_ddp(ctx: Context) -> Row:
    import runs
    plan = ctx.plan
    if plan.cuda and torch.cuda.device_count() < 2:
        return Row("ddp", f"skipped: {torch.cuda.device_count()} GPU", plan.machine(), True)
    run = ctx.folder / "ddp"
    _, seconds = run_command(["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", free_port(),
                              *ctx.train_args(run, plan.ddp_steps)], plan.timeout_s,
                             env={"OMP_NUM_THREADS": "1"} if not plan.cuda else None)
    losses = [m["loss"] for m in runs.read_metrics(run) if "loss" in m]
    ok = len(losses) == plan.ddp_steps and all(map(math.isfinite, losses))
    backend = "NCCL" if plan.cuda else "gloo"
    result = (f"2 {backend} processes, exit 0, {len(losses)} of {plan.ddp_steps} losses logged, "
              f"{'all finite' if all(map(math.isfinite, losses)) else 'NOT finite'}: "
              + ", ".join(f"{v:.4f}" for v in losses))
    return Row("ddp", result, f"{seconds:.1f} s wall for {plan.ddp_steps} steps; {plan.machine()}", ok)


def read_hypnogram(path: Path, epochs: int):
    """predict.py's <stem>.hypnogram.csv -> probabilities [E, 5]; CheckFailed when it is not what predict.py's docstring
    says (stage.HYPNOGRAM_COLUMNS, one row per full 30-s epoch, stages W/N1/N2/N3/R, probabilities finite, summing
    to 1)."""
    import numpy as np
    import pandas as pd
    import stage
    table = pd.read_csv(path)
    if tuple(table.columns) != stage.HYPNOGRAM_COLUMNS:
        raise CheckFailed(f"{path.name}: columns {list(table.columns)}, not {list(stage.HYPNOGRAM_COLUMNS)}")
    if len(table) != epochs:
        raise CheckFailed(f"{path.name}: {len(table)} rows for {epochs} epochs")
    probs = table[list(stage.PROB_COLUMNS)].to_numpy(np.float64)
    if not np.isfinite(probs).all() or np.abs(probs.sum(axis=1) - 1).max() > 1e-6:
        raise CheckFailed(f"{path.name}: probabilities not finite or not summing to 1")
    if not table["stage"].isin(["W", "N1", "N2", "N3", "R"]).all():
        raise CheckFailed(f"{path.name}: stages {sorted(set(table['stage']))}")
    return probs


def check_predict(ctx: Context) -> Row:
    import runs
    from model import ModelConfig, ProbeConfig
    plan = ctx.plan
    edfs = ctx.folder / "edf"
    run_command(["-m", "synthetic", "edf", edfs, "--nights", "1", "--hours", plan.predict_hours, "--seed", "99"],
                plan.timeout_s)
    model_kwargs, probe_kwargs, window_s = plan.predict_run
    run = runs.write_random_run(ctx.folder / "probe-run", ModelConfig(**model_kwargs), ProbeConfig(**probe_kwargs),
                                {"window_s": window_s})
    epochs = int(plan.predict_hours * 120)
    probs, times = {}, []
    for device in (["cuda", "cpu"] if plan.cuda else ["cpu"]):
        out = ctx.folder / f"predict-{device}"
        stdout, seconds = run_command(["predict.py", edfs / "night-001.edf", "--run", run, "--out", out, "--device",
                                       device], plan.timeout_s)
        probs[device] = read_hypnogram(out / "night-001.hypnogram.csv", epochs)
        staged = re.search(r"staged in ([\d.]+) s", stdout)
        times.append(f"{device} {seconds:.1f} s wall" + (f" (reading + staging {staged.group(1)} s)" if staged else ""))
    result = f"hypnogram CSV: {epochs} epochs, columns as stage.HYPNOGRAM_COLUMNS, probabilities finite, summing to 1"
    ok = True
    if plan.cuda:
        diff = float(abs(probs["cuda"] - probs["cpu"]).max())
        ok = diff <= 1e-3
        result += f"; cuda against cpu: largest probability difference {diff:.1e} (required <= 1e-3)"
    size = "paper config" if not model_kwargs else f"tiny run ({window_s:g}-s window)"
    return Row("predict", result, f"{', '.join(times)}; {plan.predict_hours:g}-h night, {size}, random weights; "
                                  f"{plan.machine()}", ok)


def check_cudnn(ctx: Context) -> Row:
    plan = ctx.plan
    if not plan.cuda:
        return Row("cudnn", "n/a on CPU", plan.machine(), True)
    import warnings
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    S, H, N, d, masked = 21, 4, 4800, 128, 600
    generator = torch.Generator("cuda").manual_seed(0)
    q, k, v, grad = (torch.randn(S, H, N, d, device="cuda", dtype=torch.bfloat16, generator=generator)
                     for _ in range(4))
    mask = torch.ones(S, 1, 1, N, dtype=torch.bool, device="cuda")
    mask[..., N - masked:] = False

    def attend(backend):
        leaves = [t.clone().requires_grad_() for t in (q, k, v)]
        with sdpa_kernel([backend]):
            out = F.scaled_dot_product_attention(*leaves, attn_mask=mask)
        out.backward(grad)
        return [out.detach().float()] + [t.grad.float() for t in leaves]
    with warnings.catch_warnings(record=True) as caught:           # PyTorch says why a kernel declines in warnings
        warnings.simplefilter("always")
        try:
            cudnn = attend(SDPBackend.CUDNN_ATTENTION)
        except RuntimeError as err:
            why = "; ".join(dict.fromkeys(str(w.message).split(" (Triggered")[0] for w in caught)) or one_line(err)
            return Row("cudnn", f"n/a: cuDNN attention not available ({why[:200]})", plan.machine(), True)
    efficient = attend(SDPBackend.EFFICIENT_ATTENTION)
    names = ("out", "dq", "dk", "dv")
    nonfinite = [f"{backend} {name}" for backend, tensors in (("cudnn", cudnn), ("efficient", efficient))
                 for name, t in zip(names, tensors) if not t.isfinite().all()]
    errors = {name: ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()
              for name, a, b in zip(names, cudnn, efficient)}
    ok = not nonfinite and max(errors.values()) <= 2e-2
    result = ("NOT finite: " + ", ".join(nonfinite) + "; " if nonfinite else "finite; ") + \
        "difference / max magnitude " + ", ".join(f"{n} {e:.1e}" for n, e in errors.items()) + " (required <= 2e-2)"
    return Row("cudnn", result, f"[{S}, {H}, {N}, {d}] bf16, last {masked} keys masked; cuDNN "
                                f"{torch.backends.cudnn.version()}; {plan.machine()}", ok)


def check_compile(ctx: Context) -> Row:
    plan = ctx.plan
    if not plan.cuda:
        return Row("compile", "left out of --dry-run (compiling takes tens of seconds on a CPU, even the tiny "
                              "model)", plan.machine(), True)
    if ctx.left_s() < COMPILE_NEEDS_S:
        return Row("compile", f"skipped: {max(ctx.left_s(), 0):.0f} s of the {ctx.budget_s:g}-s budget left",
                   plan.machine(), True)
    eager, compiled = ctx.folder / "eager", ctx.folder / "compiled"
    eager_s = ctx.pretrain(eager, *NO_RANDOMNESS)
    compiled_s = ctx.pretrain(compiled, *NO_RANDOMNESS, "--train.compile", "true")
    diff, compared = largest_relative_difference(compiled, eager)
    result = f"{compared} against eager's: largest relative difference {diff:.2e} (required <= 1e-2)"
    return Row("compile", result, f"compile time about {compiled_s - eager_s:.0f} s (run {compiled_s:.0f} s, eager "
                                  f"{eager_s:.0f} s; {plan.train_steps} steps); {plan.machine()}", diff <= 1e-2)


class FusedAttentionStandIn(torch.autograd.Function):
    """Shapes only: what a fused SDPA kernel keeps for its backward (q, k, v, the output and the log-sum-exp [S, H, N]
    in fp32), where the CPU's math path would keep [S, H, N, N] weights that no GPU kernel keeps."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


def kept_for_backward(batch: int, bf16: bool) -> int:
    """Bytes autograd keeps between forward and backward in one training step of the paper config at 8 h, counted on
    fake tensors (no memory, no arithmetic; CPU bf16 autocast casts as CUDA's does for these ops), each storage once."""
    from torch._subclasses.fake_tensor import FakeTensorMode
    import torch.nn.functional as F
    from model import ModelConfig, Pretrainer
    storages = {}

    def keep(tensor):
        storages[id(tensor.untyped_storage())] = tensor.untyped_storage().nbytes()
        return tensor
    real_sdpa = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = lambda q, k, v, **kwargs: FusedAttentionStandIn.apply(q, k, v)
    try:
        with FakeTensorMode(), torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            model = Pretrainer(ModelConfig()).train()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                model(torch.empty(batch, 7, 8 * 3600 * 125))
    finally:
        F.scaled_dot_product_attention = real_sdpa
    return sum(storages.values())


def check_memory(ctx: Context) -> Row:
    """The estimate docs/gpu.md quotes, at the paper's shape whatever the plan (fake tensors cost nothing)."""
    from model import ModelConfig, Pretrainer
    with torch.device("meta"):
        parameters = sum(p.numel() for p in Pretrainer(ModelConfig()).parameters())
    kept = {bf16: kept_for_backward(3, bf16) for bf16 in (True, False)}
    states = parameters * 4 * 4                  # fp32 weights, gradients and AdamW's two moments
    result = (f"kept for the backward: {kept[True] / 2**30:.1f} GiB in bf16, {kept[False] / 2**30:.1f} GiB in fp32; "
              f"weights, gradients and AdamW {states / 1e9:.2f} GB")
    return Row("memory", result, f"estimate, paper config, 8-h windows, batch 3 (compare the step row's peak); "
                                 f"{ctx.plan.machine()}", kept[True] > 0)


CHECKS = {"sdpa": check_sdpa, "step": check_step, "memory": check_memory, "resume": check_resume, "ddp": check_ddp, "predict": check_predict,
          "cudnn": check_cudnn, "compile": check_compile}


# ----------------------------------------------------------------------------------------------------------------------


def table(rows: list[Row]) -> str:
    width = max(len("check"), *(len(r.check) for r in rows))
    clean = lambda text: text.replace("|", "/")  # noqa: E731  (a cell never splits the table)
    lines = [f"| {'check':<{width}} | result | figure | pass/FAIL |", f"|{'-' * (width + 2)}|---|---|---|"]
    lines += [f"| {r.check:<{width}} | {clean(r.result)} | {clean(r.figure)} | {'pass' if r.ok else 'FAIL'} |"
              for r in rows]
    return "\n".join(lines)


def run_checks(ctx: Context, names: list[str]) -> list[Row]:
    rows = []
    for name in names:
        started = time.perf_counter()
        print(f"gpu_check: {name} …", file=sys.stderr, flush=True)
        try:
            row = CHECKS[name](ctx)
        except (Exception, SystemExit) as err:               # a script's one-line exit is a failure, not the end
            row = Row(name, f"error: {one_line(err)}", ctx.plan.machine(), False)
        if ctx.plan.cuda:
            torch.cuda.empty_cache()
        print(f"gpu_check: {name} {'pass' if row.ok else 'FAIL'} in {time.perf_counter() - started:.1f} s",
              file=sys.stderr, flush=True)
        rows.append(row)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="run on the CPU at tiny sizes what a CPU can")
    parser.add_argument("--only", metavar="CHECKS", help=f"comma list of checks to run (of {', '.join(CHECKS)})")
    parser.add_argument("--peak-tflops", type=float, default=989.0,
                        help="accelerator peak for MFU (default 989: H100 SXM dense bf16)")
    parser.add_argument("--budget-s", type=float, default=480.0,
                        help="seconds the session may take (default 480); the compile check needs 180 of them left")
    parser.add_argument("--keep", type=Path, metavar="DIR",
                        help="work in DIR and keep it (default: a temporary folder)")
    parser.add_argument("--_force-fail", dest="force_fail", choices=["sdpa"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    names = list(CHECKS) if not args.only else [n.strip() for n in args.only.split(",") if n.strip()]
    if unknown := [n for n in names if n not in CHECKS]:
        parser.error(f"--only: unknown checks {unknown}; checks are {', '.join(CHECKS)}")
    if not args.dry_run and not torch.cuda.is_available():
        parser.exit(2, "gpu_check.py: no CUDA device here; --dry-run runs the CPU's share of the checks\n")
    plan = dry_plan() if args.dry_run else gpu_plan()
    plan.peak_tflops = args.peak_tflops
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    folder = args.keep or Path(tempfile.mkdtemp(prefix="gpu_check-"))
    ctx = Context(plan, folder, args.force_fail, args.budget_s)
    try:
        rows = run_checks(ctx, names)
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    failed = sum(not r.ok for r in rows)
    stack = f"torch {torch.__version__}" + (f", CUDA {torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}"
                                           if plan.cuda else "")
    print(f"gpu_check{' --dry-run' if args.dry_run else ''}: {plan.machine()}; {stack}; {len(rows)} checks, "
          f"{failed} failed, {time.monotonic() - ctx.started:.0f} s")
    print(table(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
