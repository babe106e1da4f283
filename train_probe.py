"""Train the sleep-stage probe on the frozen embeddings of a pretrained encoder. One visible loop.

    python train_probe.py --config configs/probe_tiny.yaml --encoder runs/pretrain --run-dir runs/probe --data.root OUT
    torchrun --nproc_per_node 2 train_probe.py --config configs/probe_paper.yaml --encoder runs/paper --run-dir runs/probe
    python train_probe.py … --resume                      # continue from RUN/ckpt.pt

The encoder (`--encoder`: a train_pretrain.py run or an import_upstream.py run) stays frozen: eval mode, no gradients,
so its embeddings of a window never change and are computed once and cached (float16 zarr under
ENCODER/embeddings/, one array per split, keyed by a hash of the encoder's weights and the window settings);
probe epochs then cost only the GRU. Writes RUN/config.yaml (with the encoder's model section, so that the run folder is
self-contained), RUN/metrics.jsonl, RUN/ckpt.pt and RUN/ckpt_final.pt (encoder + probe weights): the run folder of
runs.py, which also owns the DDP plumbing shared with train_pretrain.py.

Paper recipe (configs/probe_paper.yaml): focal loss γ = 2, no class weights, excess pre/post-sleep wake left out of
the loss (train.loss_trim_wake), CutMix of 30-s epochs across the nights of a batch (p = 0.5), AdamW + one-cycle to 0.01, batch 4 × 8, 30 epochs.
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: docs/benchmarks.md "Threads"

import argparse
import hashlib
import json
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

import config
import metrics
import durable
import runs
import training
from data import N_CLASSES, WAKE_TRIMS, DataConfig, NightDataset, drop_channels, padding_to
from model import ModelConfig, ProbeConfig, ProbeHead
from prepare.store import DamagedStore, OpenLimit


@dataclass
class TrainConfig:
    batch_size: int = 4                  # windows per process per micro-step (upstream: 4, tc:46)
    grad_accum: int = 8                  # micro-steps per optimiser step (upstream: 8, tc:47)
    epochs: int = 30                     # passes over the training windows (upstream: 30, tc:48)
    max_steps: int | None = None         # optimiser steps in all (null = epochs; 0 = save the untrained model)
    max_lr: float = 0.01                 # one-cycle peak learning rate (upstream: 0.01, tc:23)
    schedule: str = "full"               # "full": one cycle over the run | "upstream": sized as upstream, 1/16 traversed
    pct_start: float = 0.3               # fraction of the steps spent warming up to max_lr
    weight_decay: float = 1e-3           # AdamW weight decay (upstream: 1e-3, tc:21)
    grad_clip: float = 0.0               # clip the total gradient norm to this (0 = off; upstream: 1, tc:58,278)
    focal_gamma: float = 2.0             # focal loss exponent (0 = cross-entropy; upstream: 2, tc:54)
    focal_form: str = "standard"         # "standard": (1 - p_t)^γ·CE | "upstream": Σ_c (1 - p_c)^γ·CE, as upstream's code
    class_weights: bool = False          # weight the loss by inverse class frequency of the training split
    loss_trim_wake: str = "paper"        # excess wake left out of the loss: "paper" | "upstream" | "none" (trim rules)
    trim_validation: bool = False        # validation scored without loss_trim_wake's wake too (upstream: true, tc:228, sl:707)
    cutmix_p: float = 0.5                # probability per batch of shuffling 30-s epochs across its nights
    cutmix_on: str = "embeddings"        # "embeddings": ours, cached embeddings | "signals": upstream's raw signals (aug:231)
                                         # "embeddings": epochs inside the nights mixed. "signals": 30-s segments of every
                                         # position, padding too, mask kept, mixed before the encoder; the training
                                         # windows are then embedded live (a cache cannot hold mixed signals), so
                                         # cache_embeddings serves validation only (one printed line says so)
    channel_dropout: float = 0.0         # replace each present channel of a window by an absent one with this probability
    cache_embeddings: bool = True        # compute the frozen encoder's embeddings once (float16 zarr) and reuse them
    cpu_threads: int = 1                 # torch threads on CPU once the embeddings are cached (0: torch's default; docs/benchmarks.md "Threads")
    keep_best: bool = False              # also keep ckpt_best.pt (best best_metric), which then is the run's model
    best_metric: str = "val_loss"        # what "best" means: "val_loss" (upstream) | "val_kappa"
    patience: int = 0                    # stop after this many validations without a better best_metric (0 = off;
                                         # train.epochs is then the maximum); implies keeping ckpt_best.pt
    bf16: bool = True                    # bf16 autocast on CUDA (ignored on CPU); the GRU always runs in fp32
    matmul_precision: str = "highest"    # fp32 products on CUDA: highest | high (TF32) | medium (upstream; TF32 too)
    max_nonfinite_steps: int = 20        # steps in a row with non-finite gradients (each skipped) that stop the run
    recipe: str = "custom"               # the recipe's name (paper, upstream, tiny), reported by evaluate.py
    seed: int = 0                        # seeds the window order, dropout and CutMix
    log_every: int = 10                  # optimiser steps between metrics.jsonl lines
    eval_every: int = 200                # optimiser steps between validation passes (and at the end; 0 = every epoch)
    evals_per_epoch: int = 0             # validations per epoch, evenly spaced (0: eval_every; upstream 2, tc:20,275)
                                         # upstream counts micro-batches (every int(batches · 0.5)); ours optimiser
                                         # steps, round(k · steps per epoch / n): at most one step from upstream's points
    ckpt_every: int = 200                # optimiser steps between checkpoints (and at the end)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)    # copied from the encoder run; not for overriding
    probe: ProbeConfig = field(default_factory=ProbeConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


def parse_args(argv=None) -> tuple[argparse.Namespace, Config]:
    """(args, config); the config's model section is the encoder's, filled in by main once it has read the encoder."""
    parser = config.parser(Config, __doc__, "train_probe.py")
    parser.add_argument("--config", type=Path, help="YAML config (configs/probe_paper.yaml, configs/probe_tiny.yaml)")
    parser.add_argument("--encoder", type=Path, required=True, help="run folder of the pretrained (or imported) encoder")
    runs.add_run_arguments(parser)
    args, extra = parser.parse_known_args(argv)
    return args, config.load(Config, runs.config_source(args), extra)


# ----------------------------------------------------------------------------------------------------------------------
# labels: wake trimming, CutMix, focal loss


def cutmix_epochs(embeddings: torch.Tensor, stages: torch.Tensor, n_valid_epochs: torch.Tensor, p: float,
                  patches_per_epoch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """With probability p, shuffle the 30-s epochs (their 5 patch embeddings and their label) across all nights and
    positions of the batch — the paper's cross-class "CutMix across batch and patches", applied to the frozen
    embeddings rather than the raw signal. Padded epochs stay where they are.
    embeddings [B, C, N, D], stages [B, E], n_valid_epochs [B] -> (embeddings, stages)."""
    if p <= 0 or torch.rand(1).item() >= p:
        return embeddings, stages
    B, C, N, D = embeddings.shape
    E = stages.shape[1]
    blocks = embeddings[:, :, : E * patches_per_epoch].reshape(B, C, E, patches_per_epoch, D)   # [B, C, E, 5, D]
    valid = torch.arange(E, device=stages.device)[None, :] < n_valid_epochs[:, None]              # [B, E]
    b, e = torch.nonzero(valid, as_tuple=True)
    order = torch.randperm(len(b), device=stages.device)
    mixed_blocks, mixed_stages = blocks.clone(), stages.clone()
    mixed_blocks[b, :, e] = blocks[b[order], :, e[order]]
    mixed_stages[b, e] = stages[b[order], e[order]]
    mixed = embeddings.clone()
    mixed[:, :, : E * patches_per_epoch] = mixed_blocks.reshape(B, C, E * patches_per_epoch, D)
    return mixed, mixed_stages


def cutmix_signals(signals: torch.Tensor, stages: torch.Tensor, p: float,
                   epoch_samples: int) -> tuple[torch.Tensor, torch.Tensor]:
    """train.cutmix_on "signals", upstream's CutMix (aug:231-275, cross-class): with probability p, the raw signals are
    cut into 30-s segments and one random permutation over EVERY (night, epoch) position of the batch, padded,
    unscored and trimmed ones included, moves the segments with their labels. The padding mask is not moved (the
    caller keeps it, as upstream): a real epoch landing in a padded slot is hidden from attention, padding landing in a
    real slot is attended to (its label -1 is ignored). signals [B, C, E·epoch_samples], stages [B, E] -> both mixed."""
    if p <= 0 or torch.rand(1).item() >= p:
        return signals, stages
    B, C, _ = signals.shape
    E = stages.shape[1]
    segments = signals.reshape(B, C, E, epoch_samples).transpose(1, 2).reshape(B * E, C, epoch_samples)
    order = torch.randperm(B * E, device=stages.device)
    mixed = segments[order].reshape(B, E, C, epoch_samples).transpose(1, 2).reshape(B, C, E * epoch_samples)
    return mixed, stages.reshape(-1)[order].reshape(B, E)


def focal_loss(logits: torch.Tensor, stages: torch.Tensor, gamma: float, weights: torch.Tensor | None,
               form: str = "standard") -> torch.Tensor:
    """Focal loss over scored epochs (stage -1 ignored). logits [B, E, 5], stages [B, E] -> scalar.
    "standard" (Lin et al.): mean of (1 - p_t)^γ · CE_t; with class weights w, Σ w_t·loss_t / Σ w_t.
    "upstream" (its loss.py as it runs, docs/upstream.md §11 item 4): the factor is summed over all classes,
    Σ_c (1 - p_c)^γ · w_t·CE_t, averaged over the scored epochs."""
    logits, stages = logits.reshape(-1, logits.shape[-1]).float(), stages.reshape(-1)
    scored = stages >= 0
    if not scored.any():
        return logits.sum() * 0.0
    log_p = F.log_softmax(logits[scored], dim=-1)                                       # [M, 5]
    log_p_true = log_p.gather(1, stages[scored, None]).squeeze(1)                      # [M]
    w = weights[stages[scored]] if weights is not None else torch.ones_like(log_p_true)
    if form == "upstream":
        return ((1 - log_p.exp()) ** gamma).sum(dim=1).mul(-w * log_p_true).mean()
    loss = -(1 - log_p_true.exp()) ** gamma * log_p_true
    return (loss * w).sum() / w.sum()


# ----------------------------------------------------------------------------------------------------------------------
# data: windows with their embeddings (cached) or their signals


class ProbeWindows(torch.utils.data.Dataset):
    """NightDataset windows for the probe: item = {embeddings [C, N, D] float32 (when cached) or signals [C, L]
    float16, padding_mask [L], padded_epochs [E], stages [E], n_valid_epochs}."""

    def __init__(self, nights: NightDataset, cache=None):
        self.nights, self.cache = nights, cache

    def __len__(self) -> int:
        return len(self.nights)

    def __getitem__(self, index: int) -> dict:
        night, start, last = self.nights.windows[index]
        n_valid_epochs = min(self.nights.window_epochs, last - start)
        if self.cache is None:
            item = self.nights[index]
        else:
            stages = self.nights.stages_of(index)                                           # [E]
            item = {"embeddings": torch.from_numpy(self.cache[index].astype(np.float32)),
                    "padded_epochs": self.nights.padded_epochs(index, stages), "stages": stages,
                    "present": self.nights.present_of(index)}
        item["n_valid_epochs"] = n_valid_epochs
        return item


def cache_key(encoder: torch.nn.Module, nights: NightDataset, precision: str) -> str:
    """Embeddings depend on the encoder's weights, on exactly which windows were cut and on the precision they were
    computed in ("bf16", or "fp32-" and the matmul precision; main sets it)."""
    digest = hashlib.sha256(precision.encode())
    for name, tensor in encoder.state_dict().items():
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    digest.update(json.dumps([[str(nights.stores[n]), s, e] for n, s, e in nights.windows]).encode())
    digest.update(str(nights.window_samples).encode())
    digest.update(nights.mask_epochs.encode())     # masked epochs are padding for the encoder: other embeddings
    return digest.hexdigest()[:16]


@torch.no_grad()
def embedding_cache(encoder, nights: NightDataset, encoder_dir: Path, cfg: Config, rank: int, world: int, device,
                    autocast, precision: str):
    """Embeddings of every window as a float16 zarr array [n_windows, C, N, D] under ENCODER/embeddings/KEY.zarr,
    computed once (each process its share) and reused by every later probe run on the same windows."""
    import zarr
    path = runs.embedding_cache_dir(encoder_dir, cache_key(encoder, nights, precision))
    done = path / "complete"
    if not done.exists():
        n_patches = nights.window_samples // cfg.model.patch_len
        shape = (len(nights), cfg.model.n_channels, n_patches, cfg.model.d_model)
        if rank == 0:
            zarr.open_array(path, mode="w", shape=shape, chunks=(1, *shape[1:]), dtype="float16", zarr_format=3)
        if world > 1:
            dist.barrier()
        array = zarr.open_array(path, mode="r+")
        mine = list(range(rank, len(nights), world))
        loader = torch.utils.data.DataLoader(nights, batch_size=cfg.train.batch_size, sampler=mine,
                                             num_workers=cfg.data.num_workers,
                                             generator=torch.Generator())   # caching must not move the global RNG
        position = 0
        for batch in tqdm(loader, desc="caching embeddings", disable=rank != 0):
            with autocast:
                embeddings = encoder.embed(batch["signals"].to(device).float(), padding_to(batch["padding_mask"], device))
            for row in embeddings.float().cpu().numpy():
                array[mine[position]] = row.astype(np.float16)
                position += 1
        if world > 1:
            dist.barrier()
        if rank == 0:   # written last: an interrupted cache is recomputed, never half-used
            durable.write_atomic(done, lambda temp: temp.write_text("ok\n"))
    if world > 1:
        dist.barrier()
    return zarr.open_array(path, mode="r")


@torch.no_grad()
def absent_embeddings(encoder, padding_mask: torch.Tensor, autocast, memo: dict) -> torch.Tensor:
    """What the frozen encoder makes of all-zero (absent) channels under each window's padding: padding_mask [B, L]
    -> [B, C, N, D]. In eval mode the encoder treats every channel on its own, so a window with channel c zeroed
    has exactly these embeddings in row c and its own in the others (tests/test_train_probe.py): channel dropout can
    act on cached embeddings. Memoised by the padded patches (full windows and night ends: few values unless
    data.mask_epochs is on); rounded through float16 like the cache, so a dropped channel looks exactly like one the
    store marks absent."""
    rows = []
    for mask in padding_mask:                                                            # [L]
        key = mask[::encoder.cfg.patch_len].cpu().numpy().tobytes()
        if key not in memo:
            if len(memo) >= 16:
                memo.clear()
            zeros = torch.zeros(1, encoder.cfg.n_channels, len(mask), device=mask.device)
            with autocast:
                memo[key] = encoder.embed(zeros, mask[None])[0].half().float()          # [C, N, D]
        rows.append(memo[key])
    return torch.stack(rows)                                                             # [B, C, N, D]


def drop_channel_embeddings(embeddings, present, padding_mask, encoder, p: float, autocast, memo: dict):
    """Channel dropout on embeddings [B, C, N, D]: each present channel (present [B, C]) becomes absent with
    probability p, as a channel missing from a user's EDF is (zeros in, predict.py). padding_mask [B, L] or None."""
    dropped = present & ~drop_channels(present, p)                                       # [B, C]
    if not dropped.any():
        return embeddings
    if padding_mask is None:
        B, _, N, _ = embeddings.shape
        padding_mask = torch.zeros(B, N * encoder.cfg.patch_len, dtype=torch.bool, device=embeddings.device)
    return torch.where(dropped[:, :, None, None], absent_embeddings(encoder, padding_mask, autocast, memo), embeddings)


def class_weights(nights: NightDataset) -> torch.Tensor:
    """Inverse class frequency over the training windows, normalised to mean 1."""
    counts = torch.zeros(N_CLASSES)
    for index in range(len(nights)):
        stages = nights.stages_of(index)
        counts += torch.bincount(stages[stages >= 0], minlength=N_CLASSES)
    weights = counts.sum() / counts.clamp_min(1)
    return weights / weights.mean()


# ----------------------------------------------------------------------------------------------------------------------


def labelled_nights(cfg: Config, split: str) -> NightDataset:
    return NightDataset.from_config(cfg.data, split, labelled_only=True)


def probe_inputs(batch: dict, encoder, cfg: Config, device, autocast, trim: str, cutmix_p: float = 0.0):
    """(embeddings [B, C, N, D], padding_mask [B, L] or None (nothing padded), stages [B, E], n_valid_epochs [B]) on
    the device. cutmix_p (train.cutmix_on "signals"; windows without cached embeddings): CutMix of the raw signals
    after the wake trim has set the labels and before the encoder, as upstream's callback after its dataset."""
    n_valid = batch["n_valid_epochs"].to(device)
    epoch_samples = cfg.model.patch_len * cfg.probe.patches_per_epoch
    padded_epochs = padding_to(batch["padded_epochs"], device)                                 # [B, E] or None
    padding_mask = None if padded_epochs is None else padded_epochs.repeat_interleave(epoch_samples, dim=1)   # [B, L]
    stages = batch["stages"].to(device)
    if trim != "none":
        stages = torch.stack([WAKE_TRIMS[trim](s) for s in stages])
    if "embeddings" in batch:
        embeddings = batch["embeddings"].to(device, non_blocking=True)
    else:
        signals, stages = cutmix_signals(batch["signals"].to(device, non_blocking=True), stages, cutmix_p, epoch_samples)
        with torch.no_grad(), autocast:
            embeddings = encoder.embed(signals.float(), padding_mask).float()
    return embeddings, padding_mask, stages, n_valid


@torch.no_grad()
def validate(probe, encoder, dataset, cfg: Config, rank, world, device, autocast, weights) -> dict | None:
    """Loss and accuracy over the validation windows, and the confusion counts for κ; with train.trim_validation, over
    the epochs train.loss_trim_wake leaves in (as upstream's validation windows)."""
    if dataset is None or len(dataset) == 0:
        return None
    probe.eval()
    confusion = torch.zeros(N_CLASSES, N_CLASSES, dtype=torch.float64, device=device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)
    loader = torch.utils.data.DataLoader(dataset, batch_size=cfg.train.batch_size, num_workers=cfg.data.num_workers,
                                         sampler=list(range(rank, len(dataset), world)),
                                         generator=torch.Generator())   # validating must not move the global RNG
    trim = cfg.train.loss_trim_wake if cfg.train.trim_validation else "none"
    for batch in loader:
        embeddings, padding_mask, stages, _ = probe_inputs(batch, encoder, cfg, device, autocast, trim)
        with autocast:
            logits = probe(embeddings, padding_mask)
        loss = focal_loss(logits, stages, cfg.train.focal_gamma, weights, cfg.train.focal_form)
        scored = stages >= 0
        loss_sum += torch.tensor([loss.item() * scored.sum().item(), scored.sum().item()], device=device)
        pairs = stages[scored] * N_CLASSES + logits.argmax(-1)[scored]
        confusion += torch.bincount(pairs, minlength=N_CLASSES ** 2).view(N_CLASSES, N_CLASSES).to(confusion)
    if dist.is_initialized():
        dist.all_reduce(confusion)
        dist.all_reduce(loss_sum)
    probe.train()
    confusion = confusion.cpu().numpy()
    return {"val_loss": (loss_sum[0] / loss_sum[1]).item(), "val_accuracy": float(metrics.accuracy(confusion)),
            "val_kappa": float(metrics.kappa(confusion))}


def check_resume_encoder(ckpt: dict, encoder_run, encoder_dir: Path, run_dir: Path) -> None:
    """One line when --encoder is not the encoder the resumed probe run was trained on (its checkpoint holds that
    encoder's weights): the probe's inputs would change under it."""
    saved = {k.removeprefix("encoder."): v for k, v in ckpt["model"].items() if k.startswith("encoder.")}
    now = encoder_run.state("encoder")
    if saved and (saved.keys() != now.keys() or any(not torch.equal(saved[k], now[k]) for k in now)):
        raise SystemExit(f"--resume: --encoder {encoder_dir} has other weights than the encoder {run_dir} was trained "
                         f"on: a resumed run keeps the model and data it was started with; start a new run "
                         f"(another --run-dir)")


def main(argv=None) -> None:
    args, cfg = parse_args(argv)
    rank, world, device = training.setup_distributed()
    master = rank == 0
    tc = cfg.train
    torch.manual_seed(tc.seed * 1000 + rank)
    autocast = training.autocast(device, tc.bf16)
    matmul = training.set_matmul_precision(device, tc.matmul_precision)
    precision = "bf16" if device.type == "cuda" and tc.bf16 else f"fp32-{matmul}"     # of the cached embeddings

    if tc.best_metric not in ("val_loss", "val_kappa"):
        raise SystemExit(f"config: train.best_metric must be val_loss or val_kappa, got {tc.best_metric!r}")
    if tc.loss_trim_wake not in WAKE_TRIMS or tc.focal_form not in ("standard", "upstream"):
        raise SystemExit(f"config: train.loss_trim_wake must be one of {', '.join(WAKE_TRIMS)} (got "
                         f"{tc.loss_trim_wake!r}) and train.focal_form standard or upstream (got {tc.focal_form!r})")
    if tc.cutmix_on not in ("embeddings", "signals"):
        raise SystemExit(f"config: train.cutmix_on must be embeddings or signals, got {tc.cutmix_on!r}")
    try:
        encoder_run = runs.read_run(args.encoder)
    except (OSError, ValueError) as err:       # not a run folder, a killed run, an unreadable checkpoint
        raise SystemExit(f"--encoder: {err}") from None
    cfg.model = ModelConfig(**encoder_run.config["model"])
    cfg.probe.n_channels, cfg.probe.d_model = cfg.model.n_channels, cfg.model.d_model
    encoder = encoder_run.encoder().to(device).requires_grad_(False)                    # frozen, eval mode
    training.check_window(cfg.data.window_s, cfg.model)
    ckpt = runs.load_latest(args.run, device) if args.resume else None
    if ckpt is not None:                                 # before any embedding is computed or file written
        training.check_resume_config(ckpt, cfg, args.run)
        check_resume_encoder(ckpt, encoder_run, args.encoder, args.run)
    try:
        train_nights, val_nights = labelled_nights(cfg, cfg.data.train_split), labelled_nights(cfg, cfg.data.val_split)
    except (DamagedStore, OpenLimit) as err:
        raise SystemExit(str(err)) from None
    if master and (left_out := train_nights.left_out + val_nights.left_out):
        print(f"data.complete_only: {len(left_out)} nights left out (a channel missing or NaN filled), e.g. {left_out[0]}")
    training.check_shared_memory(train_nights, tc.batch_size, cfg.data.num_workers)         # windows of signals
    train_cache = val_cache = None
    mix_signals = tc.cutmix_on == "signals" and tc.cutmix_p > 0            # training windows are then embedded live
    if tc.cache_embeddings:
        if not mix_signals:
            train_cache = embedding_cache(encoder, train_nights, args.encoder, cfg, rank, world, device, autocast,
                                          precision)
        elif master:
            print("train.cutmix_on signals: the training windows are embedded live (CutMix mixes their raw signals "
                  "first); only the validation windows use the embedding cache")
        val_cache = embedding_cache(encoder, val_nights, args.encoder, cfg, rank, world, device, autocast, precision) \
            if len(val_nights) else None
    train_set, val_set = ProbeWindows(train_nights, train_cache), ProbeWindows(val_nights, val_cache)
    if train_cache is not None:
        training.check_shared_memory(train_set, tc.batch_size, cfg.data.num_workers)        # windows of embeddings
    threads = torch.get_num_threads()
    if device.type == "cpu" and tc.cpu_threads and train_cache is not None:
        # the GRU's many small steps: one thread is as fast as two alone, and never spins against another job
        torch.set_num_threads(tc.cpu_threads)
    weights = class_weights(train_nights).to(device) if tc.class_weights else None

    per_step, total_steps = training.total_steps(len(train_set), world, tc, "labelled training windows")

    probe = ProbeHead(cfg.probe).to(device)
    optimizer, scheduler = training.one_cycle(probe.parameters(), tc, total_steps, len(train_set))
    progress = runs.new_progress()
    if ckpt is not None:
        probe.load_state_dict({k.removeprefix("probe."): v for k, v in ckpt["model"].items() if k.startswith("probe.")})
        progress = training.resume(ckpt, optimizer, scheduler, rank, world, per_step, device)
    model = DistributedDataParallel(probe, device_ids=[device.index] if device.type == "cuda" else None) \
        if world > 1 else probe
    # the checkpoint holds encoder + probe, so that the probe run alone is a complete model (load_encoder/load_probe)
    checkpointed = torch.nn.ModuleDict({"encoder": encoder, "probe": probe})

    if master:
        runs.start_run(args.run, cfg, progress, {"train": train_nights.stores, "val": val_nights.stores})
        print(f"probe: {sum(p.numel() for p in probe.parameters()):,} parameters on {world} × {device.type}; "
              f"{len(train_set)} training windows, {len(val_set)} validation windows, {total_steps} optimiser steps")
    bar = tqdm(total=total_steps, initial=progress["step"], desc="probe", disable=not master)
    started, loss_sum, steps_since_log, stop = time.time(), 0.0, 0, False
    steps_per_epoch = len(train_set) // (world * per_step)
    absent_memo = {}                                                 # absent_embeddings per number of valid samples

    for micro, batch in training.micro_batches(train_set, progress, total_steps, tc.batch_size, per_step, tc.seed, rank, world,
                                           cfg.data.num_workers, device):
        embeddings, padding_mask, stages, n_valid = probe_inputs(batch, encoder, cfg, device, autocast,
                                                                 tc.loss_trim_wake, tc.cutmix_p if mix_signals else 0.0)
        if tc.channel_dropout > 0:
            embeddings = drop_channel_embeddings(embeddings, batch["present"].to(device), padding_mask, encoder,
                                                 tc.channel_dropout, autocast, absent_memo)
        if tc.cutmix_on == "embeddings":
            embeddings, stages = cutmix_epochs(embeddings, stages, n_valid, tc.cutmix_p, cfg.probe.patches_per_epoch)
        last_micro = (micro + 1) % tc.grad_accum == 0
        sync = nullcontext() if last_micro or world == 1 else model.no_sync()
        with sync:
            with autocast:
                logits = model(embeddings, padding_mask)                            # [B, E, 5]
            loss = focal_loss(logits, stages, tc.focal_gamma, weights, tc.focal_form) / tc.grad_accum
            loss.backward()
        loss_sum += loss.item()
        if not last_micro:
            continue

        grad_norm = training.optimizer_step(probe.parameters(), optimizer, scheduler, tc.grad_clip, progress,
                                        tc.max_nonfinite_steps)
        step = progress["step"]
        steps_since_log += 1
        bar.update()
        if progress["nonfinite_run"] and master:
            bar.write(f"step {step}: gradients not finite, step skipped ({progress['nonfinite_steps']} so far)")

        if step % tc.log_every == 0 or step == total_steps:
            loss_mean, = training.mean_over_processes([loss_sum / steps_since_log], device)
            record = {"step": step, "epoch": progress["epoch"], "loss": loss_mean, "lr": scheduler.get_last_lr()[0],
                      "grad_norm": grad_norm.item(), "nonfinite_steps": progress["nonfinite_steps"],
                      "s_per_step": (time.time() - started) / steps_since_log}
            if master:
                bar.set_postfix(loss=f"{loss_mean:.4f}")
                runs.append_metrics(args.run, record)
            started, loss_sum, steps_since_log = time.time(), 0.0, 0
        if tc.evals_per_epoch:
            due = training.validation_point(progress["step_in_epoch"], steps_per_epoch, tc.evals_per_epoch)
        else:
            due = step % tc.eval_every == 0 if tc.eval_every else progress["step_in_epoch"] == steps_per_epoch
        if due or step == total_steps:
            scores = validate(probe, encoder, val_set, cfg, rank, world, device, autocast, weights)
            if master and scores is not None:
                runs.append_metrics(args.run, {"step": step, **scores})
                bar.write(f"step {step}: " + ", ".join(f"{k} {v:.4f}" for k, v in scores.items()))
            if tc.keep_best or tc.patience:
                stop = training.track_best(args.run, scores and scores[tc.best_metric], tc.best_metric == "val_kappa",
                                       tc.patience, checkpointed, optimizer, scheduler, cfg, progress, device, master)
        if step % tc.ckpt_every == 0 or step == total_steps:
            training.save_training_checkpoint(args.run / runs.LATEST, checkpointed, optimizer, scheduler, cfg, progress,
                                          device, master)
        durable.kill_point("step", step)
        if step == total_steps or stop:
            break

    bar.close()
    training.save_training_checkpoint(args.run / runs.FINAL, checkpointed, optimizer, scheduler, cfg, progress, device, master)
    if master:
        why = f" (stopped: {tc.best_metric} not better for {tc.patience} validations)" if stop else ""
        best = (f"; the run's model is ckpt_best.pt ({tc.best_metric} {progress['best']:.4f})"
                if progress["best"] is not None else "")
        print(f"done: {progress['step']} steps{why}{best}; run folder {args.run}")
    torch.set_num_threads(threads)                   # the caller's (tests run many scripts in one process)
    del model                                                # the DDP wrapper, before its process group
    training.teardown_distributed()


if __name__ == "__main__":
    main()
