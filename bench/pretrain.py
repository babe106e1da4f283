"""Pretraining-step benchmark: ms per night for forward + loss + backward, and peak memory (docs/design.md §10 targets:
>= 3x faster than the upstream implementation at equal config on the same machine; peak memory <= 1/4 of upstream's;
on an H100 in bf16, MFU >= 45 %).

    python bench/pretrain.py [--config tiny|paper|PATH.yaml] [--hours H] [--batch B] [--device cpu|cuda]
                             [--threads N] [--steps K] [--attention sdpa|math] [--bf16] [--compile] [--upstream DIR]

    python bench/pretrain.py --config paper --hours 2 --threads 2 --upstream /path/to/PFTSleep
        the reference shape of docs/design.md §10: paper widths built for a 2-h night (1,200 patches), batch 1, fp32,
        2 CPU threads; upstream's figure there is a median of 8.3 s per step and 4.1 GB peak RSS.

What is timed: `Pretrainer` in train mode (dropout and the paper's jitter/zero corruption active) on random input
[B, 7, T] without padding, T = hours · 3600 · 125 samples, N = T // patch_len patches, and the positional table built
for exactly N patches (max_patches = N, as upstream builds W_pos for its window). One step = zero_grad, forward with the
loss, backward (no optimiser step). Warm-up steps are excluded; the figure is the median step divided by B.

Every measurement runs in its own child process (`--_child ours|upstream`, the same arguments), because the CPU memory
figure is the process's peak RSS (getrusage ru_maxrss: a high-water mark that never comes down, and that includes
the Python/torch runtime, printed as "at start"). On CUDA the memory figure is torch.cuda.max_memory_allocated over
the timed steps (weights, gradients and activations; not the allocator's cache).

--upstream DIR: DIR holds upstream's `pftsleep` package (benmfox/PFTSleep). Its `PatchTFTSimple` is built with the paper
kwargs at the same widths (max_seq_len = T) and timed the same way (loss: upstream's `masked_mse_loss`), in a separate
child process; the last line then compares the two. Nothing of upstream is copied here; it is imported at run time.

FLOPs are bench/flops.py's: the model's (the function, comparable with any implementation of it) and the executed ones
(what this path computes). On CUDA the bench prints the achieved TFLOP/s = 3·forward·B / median step and MFU = that /
--peak-tflops by both (default peak 989: H100 SXM dense bf16; an fp32 run is still compared with that bf16 peak).
--padded pads the last eighth of every night, so that attention takes a mask, as in most training batches of real
nights, which changes the kernels. It also reports, for every layer, which SDPA kernels accept that layer's q/k/v
shapes and dtype (forward and backward, tried one at a time under sdpa_kernel) and which one PyTorch picks by itself,
and it lists the SDPA ops that a profiled step actually ran, layer by layer (on CPU too). One process: under torchrun
the step also synchronises BatchNorm (training.SyncedBatchNorm); bench/gpu_check.py times the training script itself.
"""
import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import time
import types
import warnings
from dataclasses import fields
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]

import machine  # noqa: E402  (bench/machine.py)
from flops import SDPA_OPS, forward_flops  # noqa: E402  (bench/flops.py)

SAMPLE_RATE = 125
TINY = dict(d_model=64, n_layers=2, n_heads=4, d_ff=128)   # used when configs/pretrain_tiny.yaml does not exist yet


# ----------------------------------------------------------------------------------------------------------------------
# Configuration


def resolve_config(args):
    """-> (ModelConfig, PretrainConfig, label, source, default hours). configs/pretrain_{tiny,paper}.yaml when they
    exist (their `model:` and `pretrain:` sections; `data.window_s` gives the default window), else built-ins."""
    import yaml
    from model import ModelConfig, PretrainConfig
    name = args.config
    path = Path(name) if name not in ("tiny", "paper") else ROOT / "configs" / f"pretrain_{name}.yaml"
    label = f"{name} config" if name in ("tiny", "paper") else path.stem
    if path.exists():
        values = yaml.safe_load(path.read_text()) or {}
        source = str(path.relative_to(ROOT) if path.resolve().is_relative_to(ROOT) else path)
    elif name in ("tiny", "paper"):
        values = {"model": TINY} if name == "tiny" else {}
        source = "built-in " + ("ModelConfig(" + ", ".join(f"{k}={v}" for k, v in TINY.items()) + ")"
                                if name == "tiny" else "ModelConfig()")
    else:
        raise SystemExit(f"--config {name}: no such file")

    def pick(cls, section):
        known = {f.name for f in fields(cls)}
        given = values.get(section) or {}
        ignored = sorted(set(given) - known)
        if ignored and not args._child:
            print(f"note: {source}: {section}.{', '.join(ignored)} ignored by this bench", file=sys.stderr)
        return cls(**{k: v for k, v in given.items() if k in known})

    model_cfg, objective = pick(ModelConfig, "model"), pick(PretrainConfig, "pretrain")
    window_s = (values.get("data") or {}).get("window_s")
    return model_cfg, objective, label, source, (window_s / 3600 if window_s else 8.0)


def resolve(args):
    """Everything both the parent and the children need, identically."""
    model_cfg, objective, label, source, default_hours = resolve_config(args)
    hours = args.hours if args.hours is not None else default_hours
    T = int(round(hours * 3600 * SAMPLE_RATE))
    N = T // model_cfg.patch_len
    if N < 1:
        raise SystemExit(f"--hours {hours}: shorter than one patch")
    T = N * model_cfg.patch_len
    model_cfg.max_patches = N
    if args.attention:
        model_cfg.attention = args.attention
    cuda = args.device == "cuda"
    steps = args.steps if args.steps is not None else (10 if cuda else 3)
    warmup = args.warmup if args.warmup is not None else (3 if cuda else 1)
    return types.SimpleNamespace(model=model_cfg, objective=objective, label=label, source=source, hours=hours, T=T,
                                 N=N, steps=steps, warmup=warmup)


# ----------------------------------------------------------------------------------------------------------------------
# Child: one measurement in a fresh process


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def build_ours(run, padding_mask):
    from model import Pretrainer
    model = Pretrainer(run.model, run.objective)
    return model, lambda x: model(x, padding_mask)


def build_upstream(run, upstream_dir: str):
    sys.path.append(str(Path(upstream_dir).resolve()))
    if importlib.util.find_spec("lightning") is None:
        # Stub, for import only: upstream's augmentations.py does `from lightning.pytorch.callbacks import Callback`
        # (for a training callback this bench never uses). Nothing else of lightning is touched.
        callbacks = types.ModuleType("lightning.pytorch.callbacks")
        callbacks.Callback = object
        sys.modules.update({"lightning": types.ModuleType("lightning"),
                            "lightning.pytorch": types.ModuleType("lightning.pytorch"),
                            "lightning.pytorch.callbacks": callbacks})
    from pftsleep.loss import masked_mse_loss
    from pftsleep.transformers import PatchTFTSimple
    cfg, o = run.model, run.objective
    if o.corruption == "jitter_zero":   # upstream splits mask_ratio in half: zero with p = r/2, jitter with p = r/2
        if o.p_zero != o.p_jitter:
            print("note: upstream cannot zero and jitter at different rates; using p_zero for both", file=sys.stderr)
        augmentations, mask_ratio = ["jitter_zero_mask"], 2 * o.p_zero
    else:
        augmentations, mask_ratio = ["patch_mask"], o.mask_ratio
    model = PatchTFTSimple(   # the paper's kwargs (docs/upstream.md §2) at our widths
        c_in=cfg.n_channels, win_length=cfg.patch_len, hop_length=cfg.patch_len, max_seq_len=run.T,
        d_model=cfg.d_model, n_layers=cfg.n_layers, n_heads=cfg.n_heads, d_ff=cfg.d_ff, dropout=cfg.dropout,
        attn_dropout=0.0, res_attention=cfg.residual_attention, use_revin=True, affine=True, dim1reduce=False,
        shared_embedding=False, norm="BatchNorm", pre_norm=False, act="gelu", pretrain_head=True,
        augmentations=augmentations, mask_ratio=mask_ratio)

    def loss(x):
        prediction, target, mask, key_padding = model(x)
        return masked_mse_loss(prediction, target, mask, use_mask=False, padding_mask=key_padding)
    return model, loss


def sdpa_backends(run, dtype, device) -> list[dict]:
    """Per layer: which SDPA kernels accept its q/k/v (forward and backward), and PyTorch's own pick. Shapes of one
    night (S = C sequences); which kernels apply depends on head dims, dtype and layout, not on the batch."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    cfg = run.model
    S, H, N, d = cfg.n_channels, cfg.n_heads, run.N, cfg.d_model // cfg.n_heads
    names = {int(b.value) if hasattr(b, "value") else int(b): n for n, b in SDPBackend.__members__.items()}
    candidates = [getattr(SDPBackend, n) for n in ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
                  if hasattr(SDPBackend, n)]
    report = []
    for layer in range(1, cfg.n_layers + 1):
        dqk = d * (layer if cfg.residual_attention else 1)
        q, k = (torch.randn(S, H, N, dqk, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
        v = torch.randn(S, H, N, d, device=device, dtype=dtype, requires_grad=True)
        entry = {"layer": layer, "q/k head dim": dqk, "v head dim": d, "accepted": [], "rejected": {}}
        try:
            entry["default"] = names.get(int(torch._fused_sdp_choice(q, k, v, scale=1.0)), "?")
        except Exception as e:  # private API; informative only
            entry["default"] = f"unknown ({type(e).__name__})"
        for backend in candidates:
            name = backend.name if hasattr(backend, "name") else str(backend)
            with warnings.catch_warnings(record=True) as caught:   # PyTorch says why a kernel declines in warnings
                warnings.simplefilter("always")
                try:
                    with sdpa_kernel([backend]):
                        out = F.scaled_dot_product_attention(q, k, v, scale=1.0)
                        out.float().sum().backward()
                    entry["accepted"].append(name)
                    error = None
                except Exception as e:
                    error = (str(e).strip().splitlines() or [type(e).__name__])[0]
            if error is not None:
                reasons = [str(w.message).split(" (Triggered internally")[0] for w in caught]
                reasons = [r for r in reasons if not r.rstrip().endswith("because:")]
                entry["rejected"][name] = ("; ".join(dict.fromkeys(reasons)) or error)[:240]
            q.grad = k.grad = v.grad = None
            out = None
            if device == "cuda":
                torch.cuda.empty_cache()
        report.append(entry)
    return report


def child(args) -> dict:
    import torch
    run = resolve(args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = args.device
    cuda = device == "cuda"
    if cuda and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device")
    at_start = rss_mb()
    padding_mask = None
    if args.padded:                                          # the last eighth of every night padded: a masked batch
        padding_mask = torch.zeros(args.batch, run.T, dtype=torch.bool, device=device)
        padding_mask[:, run.T - run.T // 8:] = True
    model, step_loss = build_ours(run, padding_mask) if args._child == "ours" else build_upstream(run, args.upstream)
    model.to(device).train()
    forward = torch.compile(step_loss) if args.compile else step_loss
    x = torch.randn(args.batch, run.model.n_channels, run.T, device=device)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    def step():
        model.zero_grad(set_to_none=True)
        cpu_start = time.process_time()
        start = time.perf_counter()
        with torch.autocast(device_type=device, dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward(x)
        sync()
        middle = time.perf_counter()
        loss.backward()
        sync()
        return middle - start, time.perf_counter() - middle, time.process_time() - cpu_start

    for _ in range(run.warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    timings = [step() for _ in range(run.steps)]
    result = {
        "impl": args._child,
        "params": sum(p.numel() for p in model.parameters()),
        "step_s": [f + b for f, b, _ in timings],
        "forward_s": statistics.median(f for f, _, _ in timings),
        "backward_s": statistics.median(b for _, b, _ in timings),
        # CPU seconds of the whole process per step: a check on the wall-clock figure when other work shares the cores
        "cpu_s": statistics.median(c for _, _, c in timings),
        "rss_start_mb": at_start,
        # ru_maxrss is in KiB on Linux: the process's high-water mark, runtime included
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "threads": torch.get_num_threads(),
    }
    if cuda:
        result["peak_cuda_mb"] = torch.cuda.max_memory_allocated() / 2**20
        result["gpu"] = torch.cuda.get_device_name()
    if args.profile or (args._child == "ours" and run.model.attention == "sdpa"):
        # One more step under the profiler (after the peak was read): which SDPA kernel each layer's forward ran,
        # and with --profile the top ops
        from torch.profiler import ProfilerActivity, profile
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with profile(activities=activities) as prof:
            step()
        events = sorted((e for e in prof.events() if e.name in SDPA_OPS), key=lambda e: e.time_range.start)
        result["sdpa_ops"] = [SDPA_OPS[e.name] for e in events]
        if args.profile:
            sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
            result["profile"] = prof.key_averages().table(sort_by=sort, row_limit=args.profile)
    if cuda and args._child == "ours" and run.model.attention == "sdpa":
        result["sdpa_backends"] = sdpa_backends(run, torch.bfloat16 if args.bf16 else torch.float32, device)
    return result


# ----------------------------------------------------------------------------------------------------------------------
# Parent: run the children, print the figures


def measure(impl: str, threads: int) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), *sys.argv[1:], "--_child", impl],
                          env=env, capture_output=True, text=True)
    lines = proc.stdout.splitlines()
    results = [line for line in lines if line.startswith("RESULT ")]
    if proc.returncode != 0 or not results:
        sys.stderr.write(proc.stdout + proc.stderr)
        raise SystemExit(f"{impl}: the measurement failed (exit status {proc.returncode})")
    # pass warnings on; drop the profiler's own chatter (lines such as "USDT:... profiler_start")
    noise = ("USDT:", "STAGE:")
    chatter = "".join(line for line in proc.stderr.splitlines(keepends=True) if not line.startswith(noise))
    if chatter.strip():
        sys.stdout.flush()
        sys.stderr.write(chatter)
    return json.loads(results[-1][len("RESULT "):])


def memory_mb(result: dict) -> float:
    return result.get("peak_cuda_mb", result["peak_rss_mb"])


def describe(result: dict, batch: int) -> str:
    steps = ", ".join(f"{s * 1000:.0f}" for s in result["step_s"])
    median = statistics.median(result["step_s"])
    memory = (f"peak allocated {result['peak_cuda_mb']:.0f} MB" if "peak_cuda_mb" in result else
              f"peak RSS {result['peak_rss_mb']:.0f} MB ({result['rss_start_mb']:.0f} MB at start)")
    return (f"step {median * 1000:.0f} ms median of [{steps}] (forward {result['forward_s'] * 1000:.0f} + backward "
            f"{result['backward_s'] * 1000:.0f}; process CPU time {result['cpu_s']:.1f} s), "
            f"{median * 1000 / batch:.0f} ms/night; {memory}; "
            f"{result['params'] / 1e6:.2f} M params")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="paper",
                        help="tiny | paper (configs/pretrain_{tiny,paper}.yaml, or built-ins when absent) | a YAML file")
    parser.add_argument("--hours", type=float, default=None,
                        help="window length (default: the config's data.window_s, else 8); T = hours·3600·125")
    parser.add_argument("--batch", type=int, default=1, help="nights per step")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (the reference figure used 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 3 on cpu, 10 on cuda)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (default 1 on cpu, 3 on cuda)")
    parser.add_argument("--attention", choices=["sdpa", "math"], default=None, help="our attention path (default: config)")
    parser.add_argument("--bf16", action="store_true", help="autocast to bfloat16 (both implementations)")
    parser.add_argument("--padded", action="store_true",
                        help="pad the last eighth of every night (ours only): attention then takes a mask")
    parser.add_argument("--compile", action="store_true", help="torch.compile the step's forward (both implementations)")
    parser.add_argument("--upstream", metavar="DIR", help="a PFTSleep checkout (holds pftsleep/): time it too")
    parser.add_argument("--peak-tflops", type=float, default=989.0, help="accelerator peak for MFU (H100 SXM dense bf16)")
    parser.add_argument("--profile", type=int, default=0, metavar="ROWS",
                        help="also print the top ROWS ops of one profiled step (of each implementation)")
    parser.add_argument("--_child", choices=["ours", "upstream"], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._child:
        print("RESULT " + json.dumps(child(args)))
        return

    run = resolve(args)
    precision = "bf16 autocast" if args.bf16 else "fp32"
    print(f"config: {run.label} ({run.source}); attention {run.model.attention}, residual attention "
          f"{run.model.residual_attention}, d_model {run.model.d_model}, {run.model.n_layers} layers")
    print(f"shape: {run.hours:g} h window, T = {run.T:,} samples, N = {run.N:,} patches, batch {args.batch}; "
          f"{args.device} {precision}, {args.threads} thread{'s' * (args.threads != 1)}{', compiled' if args.compile else ''}; "
          f"{run.steps} timed steps after {run.warmup} warm-up")
    if args.padded and args.upstream:
        raise SystemExit("--padded times ours only (upstream's step takes no padding mask here)")
    import torch
    flops = forward_flops(run.model, run.N)
    executed_flops = forward_flops(run.model, run.N, executed=True, device=args.device,
                                   dtype=torch.bfloat16 if args.bf16 else torch.float32, masked=args.padded)
    forward, executed = sum(flops.values()), sum(executed_flops.values())
    for name, counts in (("model", flops), ("executed", executed_flops)):
        print(f"analytic FLOPs per night, {name}: forward {sum(counts.values()) / 1e12:.3f} T (" +
              ", ".join(f"{k} {v / 1e9:.1f} G" for k, v in counts.items()) +
              f"), fwd+bwd {3 * sum(counts.values()) / 1e12:.3f} T")

    ours = measure("ours", args.threads)
    upstream = measure("upstream", args.threads) if args.upstream else None

    if "gpu" in ours:
        print(f"gpu: {ours['gpu']}")
    print("ours:     " + describe(ours, args.batch))
    if ours.get("sdpa_ops"):
        print("  SDPA kernels run by a profiled step (forward, in call order): " + ", ".join(ours["sdpa_ops"]))
    for entry in ours.get("sdpa_backends", []):
        rejected = "; ".join(f"{k}: {v}" for k, v in entry["rejected"].items())
        print(f"  layer {entry['layer']} (q/k head dim {entry['q/k head dim']}, v {entry['v head dim']}): default "
              f"{entry['default']}; accepted {', '.join(entry['accepted']) or 'none'}"
              + (f"; rejected {rejected}" if rejected else ""))
    if ours.get("profile"):
        print(ours["profile"])
    if upstream:
        print("upstream: " + describe(upstream, args.batch))
        if upstream.get("profile"):
            print(upstream["profile"])

    per_night = statistics.median(ours["step_s"]) / args.batch
    what = (f"{run.label}, {run.hours:g} h{', padded' if args.padded else ''}, {args.device} {'bf16' if args.bf16 else 'fp32'}"
            + (f", {args.threads} thread{'s' * (args.threads != 1)}" if args.device == "cpu" else "") + (", compiled" if args.compile else ""))
    memory_kind = "allocated" if args.device == "cuda" else "RSS"
    figure = f"pretrain: {per_night * 1000:.0f} ms/night fwd+bwd, peak {memory_kind} {memory_mb(ours):.0f} MB"
    if args.device == "cuda":
        mfu = [100 * 3 * f / per_night / (args.peak_tflops * 1e12) for f in (forward, executed)]
        figure += (f", {3 * forward / per_night / 1e12:.0f} TFLOP/s, MFU {mfu[0]:.1f} % by model FLOPs, {mfu[1]:.1f} % "
                   f"by executed")
    else:
        figure += f", {3 * forward / per_night / 1e9:.0f} GFLOP/s by model FLOPs ({3 * executed / per_night / 1e9:.0f} executed)"
    print(f"{figure} ({what}; {machine.describe(args.device)})")
    if upstream:
        up_night = statistics.median(upstream["step_s"]) / args.batch
        print(f"upstream: {up_night * 1000:.0f} ms/night fwd+bwd, peak {memory_kind} {memory_mb(upstream):.0f} MB; "
              f"ours is {up_night / per_night:.1f}× faster, {memory_mb(upstream) / memory_mb(ours):.1f}× less memory")


if __name__ == "__main__":
    main()
