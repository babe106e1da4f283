"""What train_pretrain.py and train_probe.py share around their loops: the processes (torchrun/DDP, precision), the
plan (steps, the one-cycle schedule, validation points), the data order (one shuffle per epoch dealt to the
processes, micro-batches, the shared-memory check), the optimiser step with its non-finite guard, and the RNG states
and counters a training checkpoint carries so that a killed run resumes to the same result. The run folder and its
files are runs.py's.
"""
from __future__ import annotations

import dataclasses
import gc
import math
import os
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.nn as dist_nn

import runs
from model import ModelConfig


# ----------------------------------------------------------------------------------------------------------------------
# The processes


def setup_distributed() -> tuple[int, int, torch.device]:
    """(rank, world size, device) — torchrun sets RANK/WORLD_SIZE/LOCAL_RANK; plain python is one process."""
    if "RANK" not in os.environ:
        return 0, 1, torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
        dist.init_process_group("nccl")
    else:
        device = torch.device("cpu")
        dist.init_process_group("gloo")
    return dist.get_rank(), dist.get_world_size(), device


def teardown_distributed() -> None:
    """Ends the process group. Call it after `del` of the DDP wrapper: its reducer holds the group, and freed after the
    group (at the script's exit) gloo's destructor can deadlock, leaving a process that never exits."""
    gc.collect()                                                     # a wrapper let go of but held in a cycle
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


class SyncedBatchNorm(torch.nn.BatchNorm1d):
    """BatchNorm1d whose training-mode statistics are every process's sums (gloo too: torch's SyncBatchNorm is
    GPU-only), gradients flowing back through all_reduce; the same parameters and buffers, so checkpoints are
    unchanged. Running statistics as nn.BatchNorm1d keeps them (unbiased variance)."""

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens [M, D] -> [M, D]"""
        if not (self.training and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(tokens)
        D = tokens.shape[-1]
        t = tokens.float()                                                               # [M, D]
        stats = torch.cat([t.sum(0), (t * t).sum(0), t.new_full((1,), t.shape[0])])     # [2D + 1]
        stats = dist_nn.all_reduce(stats)                                                # summed over processes
        count, mean = stats[-1], stats[:D] / stats[-1]                                   # [], [D]
        var = (stats[D:2 * D] / count - mean * mean).clamp_min(0)                        # population variance [D]
        with torch.no_grad():
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp_min(1), self.momentum)
            self.num_batches_tracked += 1
        normalised = (t - mean) * torch.rsqrt(var + self.eps) * self.weight + self.bias  # [M, D]
        return normalised.to(tokens.dtype)


def synchronise_batch_norm(model: torch.nn.Module) -> torch.nn.Module:
    """Every BatchNorm1d of `model` becomes a SyncedBatchNorm, in place (the class only: weights and buffers stay)."""
    for module in model.modules():
        if type(module) is torch.nn.BatchNorm1d:
            module.__class__ = SyncedBatchNorm
    return model


def autocast(device: torch.device, bf16: bool):
    """bf16 autocast on CUDA (no GradScaler needed); fp32 elsewhere (bf16 matmuls are slow on most CPUs)."""
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" and bf16 else nullcontext()


MATMUL_PRECISIONS = ("highest", "high", "medium")


def set_matmul_precision(device: torch.device, precision: str) -> str:
    """train.matmul_precision for the fp32 matrix products on CUDA (outside bf16 autocast, or all of them without it):
    "highest" true fp32; "high" and "medium" (upstream's scripts) TF32, the only one CUDA's products offer (torch's
    docstring). The CPU keeps fp32. Returns the precision the products run at, as the embedding cache's key records
    it."""
    if precision not in MATMUL_PRECISIONS:
        raise SystemExit(f"config: train.matmul_precision must be one of {', '.join(MATMUL_PRECISIONS)}, got {precision!r}")
    if device.type != "cuda":
        return "highest"
    torch.set_float32_matmul_precision(precision)
    return precision


def mean_over_processes(values: list[float], device) -> list[float]:
    if not dist.is_initialized():
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(tensor)
    return (tensor / dist.get_world_size()).tolist()


# ----------------------------------------------------------------------------------------------------------------------
# The plan: steps, schedule


def check_window(window_s: float, model_cfg: ModelConfig) -> None:
    """One line when data.window_s needs more patches than the encoder has positions (the model would silently
    see only the first max_patches of every window)."""
    patches = int(round(window_s * 125)) // model_cfg.patch_len
    if patches > model_cfg.max_patches:
        raise SystemExit(f"config: data.window_s {window_s:g} s is {patches} patches of {model_cfg.patch_len} samples; "
                         f"the encoder has positions for {model_cfg.max_patches} (model.max_patches)")


def total_steps(n_windows: int, world: int, tc, what: str) -> tuple[int, int]:
    """(windows per process per optimiser step, optimiser steps in all: train.max_steps, else train.epochs whole
    epochs; 0 saves the untrained model). Exits with one line when the windows are fewer than one step needs."""
    per_step = tc.batch_size * tc.grad_accum
    steps_per_epoch = n_windows // (world * per_step)
    if steps_per_epoch == 0:
        raise SystemExit(f"{n_windows} {what} are fewer than one optimiser step needs ({world} processes × batch "
                         f"{tc.batch_size} × accumulation {tc.grad_accum})")
    return per_step, tc.max_steps if tc.max_steps is not None else tc.epochs * steps_per_epoch


def one_cycle(parameters, tc, total_steps: int, n_windows: int):
    """AdamW with the one-cycle schedule (from max_lr / 25 up to max_lr, then annealed), stepped once per optimiser
    step. train.schedule "full": the cycle spans the run's optimiser steps (the paper's text). "upstream": the cycle is
    sized as upstream's code sizes it, epochs × (training windows // batch_size), i.e. in one process's micro-batches,
    but is still stepped per optimiser step, so only 1 / (grad_accum × processes) of it is ever traversed: with the
    paper's 8 × 2, the LR rises from 4e-4 to about 1.39e-3 and never anneals (docs/upstream.md §11 item 1)."""
    if tc.schedule not in ("full", "upstream"):
        raise SystemExit(f"config: train.schedule must be full or upstream, got {tc.schedule!r}")
    cycle = total_steps if tc.schedule == "full" else tc.epochs * (n_windows // tc.batch_size)
    optimizer = torch.optim.AdamW(parameters, lr=tc.max_lr / 25, weight_decay=tc.weight_decay)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=tc.max_lr, total_steps=max(cycle, 1),
                                                    pct_start=tc.pct_start)
    return optimizer, scheduler


# ----------------------------------------------------------------------------------------------------------------------
# The data order


def epoch_order(n_windows: int, epoch: int, seed: int, rank: int, world: int, per_step: int) -> list[int]:
    """This process's windows for one epoch: one shuffle common to all processes (seeded by seed and epoch), cut to
    whole optimiser steps over all processes, then dealt round-robin (as DistributedSampler does)."""
    order = torch.randperm(n_windows, generator=torch.Generator().manual_seed(seed * 100_003 + epoch))
    usable = n_windows // (world * per_step) * (world * per_step)
    return order[:usable][rank::world].tolist()


def check_shared_memory(dataset, batch_size: int, num_workers: int, shm: str = "/dev/shm",
                        prefetch_factor: int = 2) -> None:
    """One line before training, instead of a worker's bus error mid-run, when `shm` (where DataLoader workers hand
    their batches over on Linux; 64 MB in a default Docker container) has less room free than the batches in flight:
    each training process on this machine runs 2 loaders at once (training's stays in flight while validation's
    fills), each with num_workers × prefetch_factor batches; a batch's size is one item's tensors × batch_size."""
    if num_workers == 0 or not os.path.isdir(shm) or len(dataset) == 0:
        return
    item = dataset[0]
    batch = batch_size * sum(v.nbytes if torch.is_tensor(v) else 8 for v in item.values())   # ints collate to int64
    processes = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    need = processes * 2 * num_workers * prefetch_factor * batch
    stat = os.statvfs(shm)
    free = stat.f_bavail * stat.f_frsize
    if free < need:
        raise SystemExit(f"{shm} has {free / 2**20:.1f} MiB free, the batches in flight need {need / 2**20:.1f} MiB "
                         f"({processes} process(es) × 2 loaders × {num_workers} workers × {prefetch_factor} batches of "
                         f"{batch / 2**20:.1f} MiB): give the container more shared memory (docker run --shm-size 8g) "
                         f"or lower data.num_workers (0 reads in the main process)")


def micro_batches(dataset, progress: dict, total_steps: int, batch_size: int, per_step: int, seed: int, rank: int,
                  world: int, num_workers: int, device):
    """(micro-step index within the epoch, batch) from where `progress` stands, epoch after epoch in epoch_order, until
    progress["step"] (counted by the caller) reaches total_steps; a resumed run starts mid-epoch at its
    step_in_epoch. Advances progress["epoch"] at each epoch's end."""
    while progress["step"] < total_steps:
        order = epoch_order(len(dataset), progress["epoch"], seed, rank, world, per_step)
        loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=order[progress["step_in_epoch"] * per_step:],
            num_workers=num_workers, pin_memory=device.type == "cuda", drop_last=True,
            generator=torch.Generator())   # its own generator: creating a loader must not move the global RNG
        yield from enumerate(loader)
        progress["epoch"] += 1
        progress["step_in_epoch"] = 0


# ----------------------------------------------------------------------------------------------------------------------
# The steps


def validation_point(step_in_epoch: int, steps_per_epoch: int, evals_per_epoch: int) -> bool:
    """train.evals_per_epoch n: whether the epoch's optimiser step `step_in_epoch` (progress counts from 1) is one of
    its n evenly spaced validation points, round(k · steps_per_epoch / n) (halves up, at least 1) for k = 1 … n; the
    last is the epoch's end. Progress counters only: a resumed run validates where an uninterrupted one does."""
    n = evals_per_epoch
    return any(step_in_epoch == max(1, (2 * k * steps_per_epoch + n) // (2 * n)) for k in range(1, n + 1))


def optimizer_step(parameters, optimizer, scheduler, grad_clip: float, progress: dict,
                   max_nonfinite: int) -> torch.Tensor:
    """Clip (0 = off), step, schedule, zero the gradients and count the step; returns the gradient norm. A step whose
    gradient norm is not finite (a bf16 overflow, a NaN from a kernel) leaves the weights and the optimiser's moments
    as they were, but still counts and schedules, so that data order and LR stay those of an unbroken run; after
    max_nonfinite such steps in a row the run stops with one line (the same in every process: the norm is of the
    all-reduced gradients)."""
    grad_norm = torch.nn.utils.clip_grad_norm_(parameters, grad_clip or math.inf)
    if torch.isfinite(grad_norm):
        optimizer.step()
        progress["nonfinite_run"] = 0
    else:
        progress["nonfinite_steps"] += 1
        progress["nonfinite_run"] += 1
        if progress["nonfinite_run"] >= max_nonfinite:
            raise SystemExit(f"step {progress['step'] + 1}: the gradients were not finite for {max_nonfinite} "
                             f"optimiser steps in a row (each skipped); the run stops. Resume from its last checkpoint "
                             f"(--resume) with a lower train.max_lr, train.bf16 false or model.attention_kernels math")
    with warnings.catch_warnings():             # "scheduler.step() before optimizer.step()": a skipped step, on purpose
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    progress["step"] += 1
    progress["step_in_epoch"] += 1
    return grad_norm


# ----------------------------------------------------------------------------------------------------------------------
# Resuming: RNG states and the checkpoint's counters


def rng_states(device) -> dict:
    """Every process's RNG state (a collective under torchrun), so that a resumed run draws the same dropout and
    corruption in every process as an uninterrupted one."""
    states = {"rng_cpu": torch.get_rng_state()}
    if device.type == "cuda":
        states["rng_cuda"] = torch.cuda.get_rng_state(device)
    if not dist.is_initialized():
        return {key: [value] for key, value in states.items()}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, states)
    return {key: [g[key] for g in gathered] for key in states}


def restore_rng(ckpt: dict, rank: int, world: int, device) -> None:
    """This process's RNG states from a checkpoint; both setters take CPU byte tensors only, wherever the checkpoint
    was mapped."""
    if len(ckpt["rng_cpu"]) != world:   # resumed on another number of processes: keep fresh seeds
        return
    torch.set_rng_state(ckpt["rng_cpu"][rank].to("cpu", torch.uint8))
    if device.type == "cuda" and "rng_cuda" in ckpt:
        torch.cuda.set_rng_state(ckpt["rng_cuda"][rank].to("cpu", torch.uint8), device)


def save_training_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, cfg, progress: dict,
                             device, master: bool) -> None:
    """A training checkpoint (module docstring) from every process's RNG state (a collective: all processes call
    this), written by the master."""
    rng = rng_states(device)
    if master:
        runs.save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), **progress, **rng,
                               "config": dataclasses.asdict(cfg)})


# --resume with a config that differs from the checkpoint's (docs/bad-input.md "Resuming with another config"): every
# train.* field is applied from the resumed step (resume() rebuilds the schedule for the new train.max_lr, pct_start,
# weight_decay, epochs, max_steps, batch_size, grad_accum); these fields of the other sections change nothing that is
# trained and are allowed too (where the data lie, how they are read, which attention kernel computes the same
# function); a change of any other field of model, pretrain, probe or data is refused.
RESUME_ALLOWED = {"model.attention", "model.attention_kernels", "data.root", "data.num_workers",
                  "data.max_open_nights"}


def check_resume_config(ckpt: dict, cfg, run_dir) -> None:
    """One line naming every field of `cfg` (the resumed run's config, as resolved now) outside train.* and
    RESUME_ALLOWED whose value differs from the checkpoint's config: the weights, the objective and the data order
    are the checkpoint's, and a run that changed them would neither load (another width) nor be the run it says it
    is. Fields the checkpoint does not record (written before they existed) are not compared."""
    saved, now = ckpt.get("config") or {}, dataclasses.asdict(cfg)
    changed = [f"{section}.{name} is {old!r} in {run_dir}, {now[section][name]!r} now"
               for section, fields in saved.items() if section != "train" and isinstance(fields, dict)
               for name, old in fields.items()
               if name in now.get(section, {}) and f"{section}.{name}" not in RESUME_ALLOWED
               and now[section][name] != old]
    if changed:
        raise SystemExit(f"--resume: {'; '.join(changed)}: a resumed run keeps the model and data it was started "
                         f"with; start a new run (another --run-dir)")


# the optimiser's per-group settings that one_cycle derives from train.*: the one-cycle bounds and the weight decay
PLANNED = ("initial_lr", "max_lr", "min_lr", "weight_decay")


def resume(ckpt: dict, optimizer, scheduler, rank: int, world: int, per_step: int, device) -> dict:
    """Restore optimiser, scheduler and RNG from a training checkpoint (the caller loads the weights, whose key
    prefix it knows); returns the progress counters. `optimizer` and `scheduler` are one_cycle's for the config as
    resolved now.

    A run continued with another plan (`--resume --train.max_steps 8` on a finished 6-step run; another
    train.max_lr, pct_start, weight_decay, epochs) keeps its weights, optimiser moments and step, and takes the
    schedule and settings of the new plan at its current step: the LR from then on is what a run planned that way
    from the start would have at those steps. An unchanged plan restores the scheduler as it was. A run resumed on
    another number of processes or with another train.batch_size × grad_accum goes on from the same place in the
    epoch's order (epoch_order deals one shuffle common to all processes), rounded down to a whole optimiser step of
    the new size; on another number of processes its processes draw from fresh seeds (restore_rng), and its global
    batch is the new one."""
    planned = [{key: group[key] for key in PLANNED if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(ckpt["optimizer"])
    saved = ckpt["scheduler"]
    same_plan = (saved["total_steps"] == scheduler.total_steps
                 and saved.get("_schedule_phases", scheduler._schedule_phases) == scheduler._schedule_phases
                 and all(group.get(key) == value for group, new in zip(optimizer.param_groups, planned)
                         for key, value in new.items()))
    if same_plan:
        scheduler.load_state_dict(saved)
    else:
        was = {key: optimizer.param_groups[0].get(key) for key in ("max_lr", "weight_decay")}
        for group, new in zip(optimizer.param_groups, planned):
            group.update(new)                   # the new plan's bounds and weight decay; the moments stay
        scheduler.last_epoch = min(ckpt["step"], scheduler.total_steps) - 1
        with warnings.catch_warnings():         # "scheduler.step() before optimizer.step()": here on purpose
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()                    # sets every group's LR for the current step of the new cycle
        if rank == 0:
            print(f"resumed at step {ckpt['step']} with a new schedule: {scheduler.total_steps} steps to max_lr "
                  f"{planned[0]['max_lr']:.3g}, weight decay {planned[0]['weight_decay']:.3g} (the checkpoint's: "
                  f"{saved['total_steps']} steps to {was['max_lr']:.3g}, {was['weight_decay']:.3g}): LR "
                  f"{scheduler.get_last_lr()[0]:.3g} from here")
    restore_rng(ckpt, rank, world, device)
    progress = {key: ckpt.get(key, default) for key, default in runs.new_progress().items()}
    written_by = len(ckpt["rng_cpu"])
    saved_train = (ckpt.get("config") or {}).get("train") or {}
    saved_per_step = saved_train.get("batch_size", 0) * saved_train.get("grad_accum", 0) or per_step
    if written_by != world or saved_per_step != per_step:
        position = progress["step_in_epoch"] * saved_per_step * written_by   # windows of the epoch already used
        progress["step_in_epoch"] = position // (per_step * world)
        if rank == 0:
            who = (f"resumed on {world} processes a run written by {written_by}" if written_by != world else
                   f"resumed with train.batch_size × grad_accum {per_step} (the checkpoint's {saved_per_step})")
            window = progress["step_in_epoch"] * per_step * world
            print(f"{who}: epoch {progress['epoch']} goes on from window {window} of its order (the checkpoint "
                  f"stopped at {position}); {world} × {per_step} windows per optimiser step from here"
                  + (", fresh random seeds" if written_by != world else ""))
    return progress


def track_best(run_dir: Path, score: float | None, higher_is_better: bool, patience: int, model, optimizer,
               scheduler, cfg, progress: dict, device, master: bool) -> bool:
    """After a validation: save ckpt_best.pt when `score` (the same in every process) is the best so far; returns
    True when `patience` (> 0) validations in a row have not improved on it, i.e. training should stop. Collective,
    like save_training_checkpoint."""
    if score is None:
        return False
    best = progress["best"]
    if best is None or (score > best if higher_is_better else score < best):
        progress["best"], progress["stale"] = score, 0
        save_training_checkpoint(Path(run_dir) / runs.BEST, model, optimizer, scheduler, cfg, progress, device, master)
        return False
    progress["stale"] += 1
    return 0 < patience <= progress["stale"]
