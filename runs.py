"""Run folders and the processes that write them: the only module that reads or writes a run folder's files.

A run folder is what train_pretrain.py, train_probe.py and import_upstream.py write and what train_probe.py
(--encoder), evaluate.py and predict.py (--run) read:

    config.yaml      the resolved config (sections model:, and pretrain:/probe:, data:, train: for trained runs)
    ckpt.pt          the latest checkpoint while training (every train.ckpt_every steps)
    ckpt_prev.pt     the one before it, kept so that a resume falls back to it when ckpt.pt is unreadable
    ckpt_final.pt    the checkpoint at the end (the only one an imported run has)
    ckpt_best.pt     with train.keep_best (or the probe's train.patience): the checkpoint of the best validation
                     score so far, which then IS the run's model for every reader (train_probe.py --encoder,
                     evaluate.py, predict.py; read_run)
    metrics.jsonl    one JSON object per logging step (step, loss, lr, …; val_* at validation steps)
    cohorts.json     the nights a training run used, per role: {"train": ["shhs/shhs1-200001", …], "val": […]}
    embeddings/      an encoder run's cached embeddings for the probe (embedding_cache_dir)

A checkpoint is {"model": state dict with keys encoder.*, head.* (pretraining head) and/or probe.*, and, for trained
runs, "optimizer", "scheduler", "step", "epoch", "step_in_epoch", "best", "stale" (new_progress), "rng_cpu"/"rng_cuda"
(one state per process) and
"config"}. Checkpoints load with torch.load(weights_only=True), configs with yaml.safe_load: a run folder never runs
code. Every file is written by `write_atomic` (temporary name, then rename), so a killed job never leaves half a file
under a final name.

Also here, because only the training processes need them: torchrun/DDP set-up, every process's RNG state, the epoch
order, and a deterministic kill point for the tests that kill a job and resume it.
"""
from __future__ import annotations

import ctypes
import dataclasses
import json
import math
import os
import shutil
import signal
import warnings
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

from model import Encoder, ModelConfig, ProbeConfig, ProbeHead

CONFIG, LATEST, FINAL, BEST, METRICS = "config.yaml", "ckpt.pt", "ckpt_final.pt", "ckpt_best.pt", "metrics.jsonl"
PREVIOUS = "ckpt_prev.pt"
COHORTS = "cohorts.json"


def write_atomic(path: str | Path, write, previous: str | Path | None = None) -> None:
    """write(temporary_path) creates a file or a folder, which then replaces `path` in one rename. On any error
    (a full disk included) nothing is left but the old `path`; a kill between the two steps can leave a hidden
    `.name.tmp-PID`, never a partial `path`. With `previous`, the old file is first renamed to it (kept as a
    fallback)."""
    path = Path(path)
    temp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(temp)
        if previous is not None and path.exists():
            os.replace(path, previous)
        if temp.is_dir() and path.exists():      # a folder (a night store) replacing an older one: swap, then delete
            old = path.with_name(f".{path.name}.old-{os.getpid()}")
            path.rename(old)
            temp.rename(path)
            shutil.rmtree(old)
        else:
            os.replace(temp, path)
    finally:
        if temp.is_dir():
            shutil.rmtree(temp, ignore_errors=True)
        else:
            temp.unlink(missing_ok=True)


# ----------------------------------------------------------------------------------------------------------------------
# Reading a run folder: its config and one checkpoint, each read once


@dataclass
class Run:
    """A run folder read once: `config` (a dict) and `checkpoint` (read_run says which)."""
    path: Path
    config: dict
    checkpoint: dict

    def state(self, prefix: str) -> dict:
        """The checkpoint's weights under `prefix.` (encoder, head, probe), without the prefix."""
        return {k.removeprefix(f"{prefix}."): v for k, v in self.checkpoint["model"].items() if k.startswith(f"{prefix}.")}

    def encoder(self) -> Encoder:
        """The run's encoder in eval mode: `encoder.embed(signals, padding_mask)`."""
        encoder = Encoder(ModelConfig(**self.config["model"]))
        encoder.load_state_dict(self.state("encoder"))
        return encoder.eval()

    def probe(self) -> ProbeHead:
        """The run's probe in eval mode: `probe(embeddings, padding_mask) -> logits [B, E, 5]`."""
        probe = ProbeHead(ProbeConfig(**self.config["probe"]))
        probe.load_state_dict(self.state("probe"))
        return probe.eval()


def read_config(run_dir: str | Path) -> dict:
    path = Path(run_dir) / CONFIG
    config = yaml.safe_load(path.read_text())
    if not isinstance(config, dict):
        raise ValueError(f"{path}: not a config (a YAML mapping of sections)")
    return config


def read_run(run_dir: str | Path, latest: bool = False) -> Run:
    """The config and checkpoint of a run folder; FileNotFoundError (one line) if it is not one. The checkpoint is
    ckpt_best.pt for a run trained with train.keep_best or train.patience (the best validation score, upstream's
    choice), else ckpt_final.pt. A run without one (still training, or killed) is refused unless `latest`: then its
    ckpt.pt (evaluate.py and predict.py --latest)."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (needs {CONFIG} and {FINAL})")
    config = read_config(run_dir)
    train = config.get("train") or {}
    names = ((BEST,) if train.get("keep_best") or train.get("patience") else ()) + (FINAL,) + ((LATEST,) if latest else ())
    ckpt = next((run_dir / name for name in names if (run_dir / name).exists()), None)
    if ckpt is None and (run_dir / LATEST).exists():
        raise FileNotFoundError(f"{run_dir}: no final checkpoint ({FINAL}): the run is still training or was killed "
                                f"(resume it with --resume), or pass --latest to use its {LATEST}")
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: not a run folder (needs {CONFIG} and {FINAL})")
    return Run(run_dir, config, load_checkpoint(ckpt, "cpu"))


def load_checkpoint(path: Path, device) -> dict:
    """torch.load(weights_only=True), with one line naming the file when it is not a readable checkpoint."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:    # truncated zip, bytes of another file, a pickle beyond weights_only: all unreadable
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


class CorruptCheckpoint(ValueError):
    pass


def load_encoder(run_dir) -> Encoder:
    """The encoder of any run folder (pretraining, probe or imported), in eval mode."""
    return read_run(run_dir).encoder()


def load_probe(run_dir) -> ProbeHead:
    """The probe of a probe (or imported) run folder, in eval mode."""
    return read_run(run_dir).probe()


# ----------------------------------------------------------------------------------------------------------------------
# Writing a run folder


def save_config(run_dir: Path, values) -> None:
    """The resolved config (a config dataclass or a dict), as RUN/config.yaml."""
    values = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else values
    write_atomic(Path(run_dir) / CONFIG, lambda temp: temp.write_text(yaml.safe_dump(values, sort_keys=False)))


def write_random_run(run_dir, model_cfg: ModelConfig, probe_cfg: ProbeConfig, data: dict) -> Path:
    """A probe run folder (config.yaml + ckpt_final.pt) of untrained weights from seed 0 (it seeds torch's global
    generator): what predict.py and the API read, for tests and benchmarks. data: the run's data config (window_s)."""
    torch.manual_seed(0)
    weights = torch.nn.ModuleDict({"encoder": Encoder(model_cfg), "probe": ProbeHead(probe_cfg)})
    Path(run_dir).mkdir(parents=True)
    save_checkpoint(Path(run_dir) / FINAL, {"model": weights.state_dict()})
    save_config(run_dir, {"model": dataclasses.asdict(model_cfg), "probe": dataclasses.asdict(probe_cfg), "data": data})
    return Path(run_dir)


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically; ckpt.pt keeps its predecessor as ckpt_prev.pt. A full disk is one line, the old files intact."""
    previous = path.with_name(PREVIOUS) if path.name == LATEST else None
    try:
        write_atomic(path, lambda temp: torch.save(state, temp), previous)
    except OSError as err:
        raise SystemExit(f"{path}: cannot write the checkpoint ({err.strerror or err}); the previous one is kept")


def save_training_checkpoint(path: Path, model: torch.nn.Module, optimizer, scheduler, cfg, progress: dict,
                             device, master: bool) -> None:
    """A training checkpoint (module docstring) from every process's RNG state (a collective: all processes call
    this), written by the master."""
    rng = rng_states(device)
    if master:
        save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "scheduler": scheduler.state_dict(), **progress, **rng,
                               "config": dataclasses.asdict(cfg)})


def load_latest(run_dir: Path, device) -> dict | None:
    """The checkpoint to resume from: ckpt.pt, or ckpt_prev.pt when ckpt.pt is unreadable (a disk that failed
    mid-write, a copy cut short) or missing after a kill between the two renames; None for a fresh run. Read onto the
    CPU whatever the training device: load_state_dict copies weights and optimiser state to the parameters' device, and
    the RNG states must be CPU byte tensors. Under torchrun every process must resume from the same step (a collective
    on `device`, the process's training device): a node that sees another run folder would otherwise pair its
    collectives with the wrong steps and hang."""
    latest, previous = Path(run_dir) / LATEST, Path(run_dir) / PREVIOUS
    try:
        ckpt = load_checkpoint(latest, "cpu") if latest.exists() else (
            load_checkpoint(previous, "cpu") if previous.exists() else None)
    except CorruptCheckpoint as err:
        if not previous.exists():
            raise SystemExit(f"{err}; no {PREVIOUS} to fall back to: start the run afresh") from None
        try:
            ckpt = load_checkpoint(previous, "cpu")
        except CorruptCheckpoint as second:
            raise SystemExit(f"{err}; and {second}: start the run afresh") from None
        print(f"{err}; resuming from {previous} (step {ckpt['step']})")
    if dist.is_initialized() and dist.get_world_size() > 1:
        step = -1 if ckpt is None else ckpt["step"]
        steps = torch.tensor([step, -step], dtype=torch.float64, device=device)
        dist.all_reduce(steps, op=dist.ReduceOp.MAX)                  # [highest step, -lowest step]
        if steps[0] != -steps[1]:
            raise SystemExit(f"{run_dir}: the processes would resume from different steps ({int(-steps[1])} to "
                             f"{int(steps[0])}; -1: no checkpoint): every node must see the same run folder "
                             f"(a shared filesystem)")
    return ckpt


def resume(ckpt: dict, optimizer, scheduler, rank: int, world: int, per_step: int, device) -> dict:
    """Restore optimiser, scheduler and RNG from a training checkpoint (the caller loads the weights, whose key
    prefix it knows); returns the progress counters.

    A run continued for longer or shorter than it was planned (`--resume --train.max_steps 8` on a finished 6-step
    run) keeps its weights, optimiser state and step, and takes the schedule of the new plan at its current step: the
    LR from then on is what a run planned for the new total from the start would have at those steps. A run resumed
    on another number of processes goes on from the same place in the epoch's order (epoch_order deals one shuffle
    common to all processes), rounded down to a whole optimiser step of the new size; its processes draw from fresh
    seeds (restore_rng), and its global batch is the new one."""
    optimizer.load_state_dict(ckpt["optimizer"])
    if ckpt["scheduler"]["total_steps"] == scheduler.total_steps:
        scheduler.load_state_dict(ckpt["scheduler"])
    else:
        scheduler.last_epoch = ckpt["step"] - 1
        with warnings.catch_warnings():         # "scheduler.step() before optimizer.step()": here on purpose
            warnings.simplefilter("ignore", UserWarning)
            scheduler.step()                    # sets every group's LR for the current step of the new cycle
        if rank == 0:
            print(f"resumed at step {ckpt['step']} with a schedule of {scheduler.total_steps} steps (the checkpoint's "
                  f"planned {ckpt['scheduler']['total_steps']}): LR {scheduler.get_last_lr()[0]:.3g} from here")
    restore_rng(ckpt, rank, world, device)
    progress = {key: ckpt.get(key, default) for key, default in new_progress().items()}
    written_by = len(ckpt["rng_cpu"])
    if written_by != world:
        position = progress["step_in_epoch"] * per_step * written_by         # windows of the epoch already used
        progress["step_in_epoch"] = position // (per_step * world)
        if rank == 0:
            print(f"resumed on {world} processes a run written by {written_by}: epoch {progress['epoch']} goes on "
                  f"from window {progress['step_in_epoch'] * per_step * world} of its order (the checkpoint stopped "
                  f"at {position}); {world} × {per_step} windows per optimiser step from here, fresh random seeds")
    return progress


def new_progress() -> dict:
    """The counters a training checkpoint carries: best (the best validation score so far, None before any) and stale
    (validations since it) serve train.keep_best and train.patience; nonfinite_steps (skipped optimiser steps in all)
    and nonfinite_run (in a row, up to now) serve optimizer_step's guard."""
    return {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": None, "stale": 0, "nonfinite_steps": 0,
            "nonfinite_run": 0}


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
        save_training_checkpoint(Path(run_dir) / BEST, model, optimizer, scheduler, cfg, progress, device, master)
        return False
    progress["stale"] += 1
    return 0 < patience <= progress["stale"]


def append_metrics(run_dir: Path, record: dict) -> None:
    with open(Path(run_dir) / METRICS, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_metrics(run_dir: Path) -> list[dict]:
    """metrics.jsonl's records. A torn last line (the job killed mid-write) is dropped; a bad line elsewhere is one
    line naming the file and line."""
    path = Path(run_dir) / METRICS
    lines = path.read_text(errors="replace").splitlines() if path.exists() else []
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if number < len(lines):
                raise SystemExit(f"{path}: line {number} is not a JSON record: {line[:60]!r}") from None
    return records


def keep_metrics_until(run_dir: Path, step: int) -> None:
    """Drop metrics.jsonl lines after `step` (written by a run that was killed after its last checkpoint)."""
    path = Path(run_dir) / METRICS
    if not path.exists():
        return
    kept = [json.dumps(m) + "\n" for m in read_metrics(run_dir) if m["step"] <= step]
    write_atomic(path, lambda temp: temp.write_text("".join(kept)))


def embedding_cache_dir(encoder_dir: Path, key: str) -> Path:
    """Where train_probe.py keeps the embeddings of one window set under one encoder (a zarr array)."""
    return Path(encoder_dir) / "embeddings" / f"{key}.zarr"


# ----------------------------------------------------------------------------------------------------------------------
# Training plumbing shared by train_pretrain.py and train_probe.py


def add_run_arguments(parser) -> None:
    # --run-dir first: torchrun (2.13) rejects a script argument spelled --run as an abbreviation of its --run-path
    parser.add_argument("--run-dir", "--run", dest="run", type=Path, required=True,
                        help="run folder for config, metrics and checkpoints (--run is the same, but not under torchrun)")
    parser.add_argument("--resume", action="store_true", help="continue from RUN/ckpt.pt (its config wins over --config)")


def config_source(args):
    """Where the config comes from: the run's own config.yaml when resuming a run that has a checkpoint, else
    --config."""
    resumable = (args.run / LATEST).exists() or (args.run / PREVIOUS).exists()
    if not (args.resume and resumable) and args.config is None:
        raise SystemExit("--config is required (a YAML file in configs/), unless --resume continues a run")
    return read_config(args.run) if args.resume and resumable else args.config


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


def validation_point(step_in_epoch: int, steps_per_epoch: int, evals_per_epoch: int) -> bool:
    """train.evals_per_epoch n: whether the epoch's optimiser step `step_in_epoch` (progress counts from 1) is one of
    its n evenly spaced validation points, round(k · steps_per_epoch / n) (halves up, at least 1) for k = 1 … n; the
    last is the epoch's end. Progress counters only: a resumed run validates where an uninterrupted one does."""
    n = evals_per_epoch
    return any(step_in_epoch == max(1, (2 * k * steps_per_epoch + n) // (2 * n)) for k in range(1, n + 1))


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


def start_run(run_dir: Path, cfg, progress: dict, cohorts: dict[str, list[Path]]) -> None:
    """The master's first writes: the folder, the resolved config, the nights used per role (cohorts: role -> night
    stores), and metrics.jsonl cut back to the checkpoint's step (a killed run may have logged steps after its last
    checkpoint; the resumed run logs them again)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(run_dir, cfg)
    named = {role: sorted({f"{Path(p).parent.name}/{Path(p).stem}" for p in stores}) for role, stores in cohorts.items()}
    write_atomic(run_dir / COHORTS, lambda temp: temp.write_text(json.dumps(named, indent=1) + "\n"))
    keep_metrics_until(run_dir, progress["step"])


def read_cohorts(run_dir: Path) -> dict[str, list[str]]:
    return json.loads((Path(run_dir) / COHORTS).read_text())


# ----------------------------------------------------------------------------------------------------------------------
# The processes: torchrun/DDP, RNG, epoch order


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
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


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


def die_with_parent(parent: int) -> None:
    """Worker-process initializer (prepare --workers, predict.py --workers): a worker must not outlive a killed parent
    (SIGKILL leaves the parent no time to stop its pool).
    Linux: the kernel kills the worker when its parent dies (PR_SET_PDEATHSIG); elsewhere nothing is set."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent:      # the parent died before prctl took effect
        os._exit(1)


def kill_point(what: str, count: int) -> None:
    """For the kill-and-resume tests: with PFTSLEEP_KILL_AFTER_<WHAT>=k in the environment (e.g. _STEP, _NIGHT), the
    process SIGKILLs itself when `count` reaches k, at a known point instead of after a sleep."""
    if os.environ.get(f"PFTSLEEP_KILL_AFTER_{what.upper()}") == str(count):
        os.kill(os.getpid(), signal.SIGKILL)
