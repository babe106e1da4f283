"""Self-supervised pretraining of the PFTSleep encoder: reconstruct corrupted full-night patches. One visible loop.

    python train_pretrain.py --config configs/pretrain_tiny.yaml --run-dir runs/tiny --data.root demo/nights
    torchrun --nproc_per_node 2 train_pretrain.py --config configs/pretrain_paper.yaml --run-dir runs/paper --data.root OUT
    torchrun --nnodes 2 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 train_pretrain.py …
(under torchrun spell --run as --run-dir: torchrun takes `--run` for an abbreviation of its own --run-path)
    python train_pretrain.py --config … --run-dir runs/paper --resume       # continue from runs/paper/ckpt.pt

Writes RUN/config.yaml (the resolved config), RUN/metrics.jsonl (one JSON object per logging step: step, loss, lr,
grad_norm, …; and val_loss at validation steps), RUN/ckpt.pt (latest, every train.ckpt_every steps) and
RUN/ckpt_final.pt. Checkpoints hold model, optimiser, scheduler, step, epoch and RNG states and are written atomically,
so a run killed at any moment and resumed with --resume ends with the same parameters as an uninterrupted one.

Under torchrun: one process per GPU (NCCL) or per CPU process group member (gloo), DDP with synchronised BatchNorm,
gradient accumulation with no_sync() on all but the last micro-step. bf16 autocast on CUDA (no GradScaler), fp32 on CPU.
The run folder, the process group, RNG states and the epoch order are runs.py's.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: docs/benchmarks.md "Threads"

import argparse
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import config
import durable
import runs
import training
from data import DataConfig, NightDataset, drop_channels, padding_to
from model import ModelConfig, PretrainConfig, Pretrainer
from prepare.store import DamagedStore, OpenLimit


@dataclass
class TrainConfig:
    batch_size: int = 3                  # nights per process per micro-step (upstream: 3, tt:36)
    grad_accum: int = 8                  # micro-steps per optimiser step (upstream: 8, tt:37)
    epochs: int = 100                    # passes over the training windows (upstream: 100, tt:38)
    max_steps: int | None = None         # optimiser steps in all (null = epochs; 0 = save the untrained model)
    max_lr: float = 0.01                 # one-cycle peak learning rate (upstream: 0.01, tt:209; starts at max_lr / 25)
    schedule: str = "full"               # "full": one cycle over the run | "upstream": sized as upstream, 1/16 traversed
    pct_start: float = 0.3               # fraction of the steps spent warming up to max_lr
    weight_decay: float = 1e-4           # AdamW weight decay (upstream: 1e-4, tt:220)
    grad_clip: float = 0.0               # clip the total gradient norm to this (0 = off; upstream: 1, tt:33,232)
    channel_dropout: float = 0.0         # zero each present channel of a window with this probability (0 = off, as upstream)
    keep_best: bool = False              # also keep ckpt_best.pt (lowest val_loss), which then is the run's model
    bf16: bool = True                    # bf16 autocast on CUDA (ignored on CPU)
    matmul_precision: str = "highest"    # fp32 products on CUDA: highest | high (TF32) | medium (upstream; TF32 too)
    max_nonfinite_steps: int = 20        # steps in a row with non-finite gradients (each skipped) that stop the run
    compile: bool = False                # torch.compile the model
    recipe: str = "custom"               # the recipe's name (paper, upstream, tiny), reported by evaluate.py
    seed: int = 0                        # seeds the window order, dropout and corruption
    log_every: int = 10                  # optimiser steps between metrics.jsonl lines
    eval_every: int = 500                # optimiser steps between validation passes (and at the end; 0: the end only)
    evals_per_epoch: int = 0             # validations per epoch, evenly spaced (0: eval_every; upstream 1, tt:30,230)
                                         # upstream counts micro-batches (at each epoch's last); ours optimiser steps,
                                         # round(k · steps per epoch / n): at most one step from upstream's points
    ckpt_every: int = 500                # optimiser steps between checkpoints (and at the end)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def parse_args(argv=None) -> tuple[argparse.Namespace, Config]:
    parser = config.parser(Config, __doc__, "train_pretrain.py")
    parser.add_argument("--config", type=Path, help="YAML config (configs/pretrain_paper.yaml, configs/pretrain_tiny.yaml)")
    runs.add_run_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return args, config.load(Config, runs.config_source(args), extra)


@torch.no_grad()
def validate(model, dataset, cfg: Config, rank: int, world: int, device, autocast) -> float | None:
    """Mean reconstruction loss over the validation windows (no corruption: the model is in eval mode)."""
    if dataset is None or len(dataset) == 0:
        return None
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)                       # [sum of losses, windows]
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
                                         sampler=list(range(rank, len(dataset), world)),
                                         generator=torch.Generator())   # validating must not move the global RNG
    for batch in loader:
        with autocast:
            loss = model(batch["signals"].to(device).float(), padding_to(batch["padding_mask"], device),
                         batch["present"].to(device))
        total += torch.tensor([loss.item() * len(batch["signals"]), len(batch["signals"])], device=device)
    if dist.is_initialized():
        dist.all_reduce(total)
    model.train()
    return (total[0] / total[1]).item()


def main(argv=None) -> None:
    args, cfg = parse_args(argv)
    rank, world, device = training.setup_distributed()
    master = rank == 0
    tc = cfg.train
    torch.manual_seed(tc.seed * 1000 + rank)            # dropout and corruption differ between processes
    training.set_matmul_precision(device, tc.matmul_precision)
    training.check_window(cfg.data.window_s, cfg.model)
    ckpt = runs.load_latest(args.run, device) if args.resume else None
    if ckpt is not None:                                 # before anything is read or written
        training.check_resume_config(ckpt, cfg, args.run)

    try:
        train_set = NightDataset.from_config(cfg.data, cfg.data.train_split)
        val_set = NightDataset.from_config(cfg.data, cfg.data.val_split)
    except (DamagedStore, OpenLimit) as err:
        raise SystemExit(str(err)) from None
    training.check_shared_memory(train_set, tc.batch_size, cfg.data.num_workers)
    if master and (left_out := train_set.left_out + val_set.left_out):
        print(f"data.complete_only: {len(left_out)} nights left out (a channel missing or NaN filled), e.g. {left_out[0]}")
    per_step, total_steps = training.total_steps(len(train_set), world, tc, f"training windows in {cfg.data.root}")

    model = Pretrainer(cfg.model, cfg.pretrain).to(device)
    optimizer, scheduler = training.one_cycle(model.parameters(), tc, total_steps, len(train_set))
    progress = runs.new_progress()
    if ckpt is not None:
        model.load_state_dict(ckpt["model"])
        progress = training.resume(ckpt, optimizer, scheduler, rank, world, per_step, device)
    raw_model = model
    if world > 1:
        # BatchNorm statistics are synchronised in the forward (training.SyncedBatchNorm), so no buffer broadcasts
        model = DistributedDataParallel(training.synchronise_batch_norm(model),
                                        device_ids=[device.index] if device.type == "cuda" else None,
                                        broadcast_buffers=False)
    if tc.compile:
        model = torch.compile(model)
    autocast = training.autocast(device, tc.bf16)

    if master:
        runs.start_run(args.run, cfg, progress, {"train": train_set.stores, "val": val_set.stores})
        print(f"pretraining {sum(p.numel() for p in raw_model.parameters()):,} parameters on {world} × {device.type}; "
              f"{len(train_set)} training windows, {len(val_set)} validation windows, {total_steps} optimiser steps")
    bar = tqdm(total=total_steps, initial=progress["step"], desc="pretrain", disable=not master)
    steps_per_epoch = len(train_set) // (world * per_step)
    started, window_count, loss_sum, steps_since_log = time.time(), 0, 0.0, 0

    for micro, batch in training.micro_batches(train_set, progress, total_steps, tc.batch_size, per_step, tc.seed, rank, world,
                                           cfg.data.num_workers, device):
        signals = batch["signals"].to(device, non_blocking=True).float()              # [B, 7, T]
        padding_mask = padding_to(batch["padding_mask"], device)                      # [B, T], None: none padded
        present = drop_channels(batch["present"], tc.channel_dropout).to(device)      # [B, 7]
        signals = signals * present[:, :, None]                                       # dropped = absent = zeros
        last_micro = (micro + 1) % tc.grad_accum == 0
        # DDP: only the last micro-step of an optimiser step all-reduces gradients
        sync = nullcontext() if last_micro or world == 1 else model.no_sync()
        with sync:
            with autocast:
                loss = model(signals, padding_mask, present) / tc.grad_accum
            loss.backward()
        loss_sum += loss.item()
        window_count += len(signals)
        if not last_micro:
            continue

        grad_norm = training.optimizer_step(raw_model.parameters(), optimizer, scheduler, tc.grad_clip, progress,
                                        tc.max_nonfinite_steps)
        step = progress["step"]
        steps_since_log += 1
        bar.update()
        if progress["nonfinite_run"] and master:
            bar.write(f"step {step}: gradients not finite, step skipped ({progress['nonfinite_steps']} so far)")

        if step % tc.log_every == 0 or step == total_steps:
            loss_mean, = training.mean_over_processes([loss_sum / steps_since_log], device)
            elapsed = time.time() - started
            record = {"step": step, "epoch": progress["epoch"], "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm.item(), "nonfinite_steps": progress["nonfinite_steps"],
                      "windows_per_s": window_count * world / elapsed}
            if master:
                bar.set_postfix(loss=f"{loss_mean:.4f}")
                runs.append_metrics(args.run, record)
            started, window_count, loss_sum, steps_since_log = time.time(), 0, 0.0, 0
        if tc.evals_per_epoch:
            due = training.validation_point(progress["step_in_epoch"], steps_per_epoch, tc.evals_per_epoch)
        else:
            due = tc.eval_every and step % tc.eval_every == 0
        if due or step == total_steps:
            val_loss = validate(raw_model, val_set, cfg, rank, world, device, autocast)
            if master and val_loss is not None:
                runs.append_metrics(args.run, {"step": step, "val_loss": val_loss})
                bar.write(f"step {step}: val_loss {val_loss:.4f}")
            if tc.keep_best:
                training.track_best(args.run, val_loss, False, 0, raw_model, optimizer, scheduler, cfg, progress, device,
                                master)
        if step % tc.ckpt_every == 0 or step == total_steps:
            training.save_training_checkpoint(args.run / runs.LATEST, raw_model, optimizer, scheduler, cfg, progress,
                                          device, master)
        durable.kill_point("step", step)
        if step == total_steps:
            break

    bar.close()
    training.save_training_checkpoint(args.run / runs.FINAL, raw_model, optimizer, scheduler, cfg, progress, device, master)
    if master:
        losses = [m["loss"] for m in runs.read_metrics(args.run) if "loss" in m]
        summary = f", training loss {losses[0]:.4f} (first log) → {losses[-1]:.4f} (last)" if losses else ""
        print(f"done: {progress['step']} steps{summary}; run folder {args.run}")
    del model                                                # the DDP wrapper, before its process group
    training.teardown_distributed()


if __name__ == "__main__":
    main()
