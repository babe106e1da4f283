"""Run folders and their checkpoints: the only module that reads or writes a run folder's files.

A run folder is what train_pretrain.py, train_probe.py and import_upstream.py write and what train_probe.py
(--encoder), evaluate.py and predict.py (--run) read:

    config.yaml      the resolved config (sections model:, and pretrain:/probe:, data:, train: for trained runs)
    ckpt.pt          the latest checkpoint while training (every train.ckpt_every steps)
    ckpt_prev.pt     the one before it, kept so that a resume falls back to it when ckpt.pt is unreadable
    ckpt_final.pt    the checkpoint at the end (the only one an imported run has)
    ckpt_best.pt     with train.keep_best (or the probe's train.patience): the checkpoint of the best validation
                     score so far, which then IS the run's model for every reader (read_run)
    metrics.jsonl    one JSON object per logging step (step, loss, lr, …; val_* at validation steps)
    cohorts.json     the nights a training run used, per role: {"train": ["shhs/shhs1-200001", …], "val": […]}
    embeddings/      an encoder run's cached embeddings for the probe (embedding_cache_dir)

A checkpoint is {"model": state dict with keys encoder.*, head.* (pretraining head) and/or probe.*, and, for trained
runs, "optimizer", "scheduler", the counters of new_progress, "rng_cpu"/"rng_cuda" (one state per process:
training.rng_states) and "config"}. Checkpoints load with torch.load(weights_only=True), configs with yaml.safe_load:
a run folder never runs code. Every file is written by durable.write_atomic (temporary name, then rename), so a killed
job never leaves half a file under a final name. A trained model is loaded one way: read_run(RUN).encoder() and
.probe() (stage.load_model wraps it for staging).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import yaml

import config as config_module
from data import DataConfig
from durable import write_atomic
from model import Encoder, ModelConfig, PretrainConfig, ProbeConfig, ProbeHead

CONFIG, LATEST, FINAL, BEST, METRICS = "config.yaml", "ckpt.pt", "ckpt_final.pt", "ckpt_best.pt", "metrics.jsonl"
PREVIOUS = "ckpt_prev.pt"
COHORTS = "cohorts.json"


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
        return self._load(Encoder(ModelConfig(**self.config["model"])), "encoder")

    def probe(self) -> ProbeHead:
        """The run's probe in eval mode: `probe(embeddings, padding_mask) -> logits [B, E, 5]`."""
        return self._load(ProbeHead(ProbeConfig(**self.config["probe"])), "probe")

    def _load(self, module: torch.nn.Module, prefix: str):
        """`module` with the checkpoint's `prefix.` weights, in eval mode; RunFormatError for weights this version's
        module does not have (a newer version's run)."""
        state = self.state(prefix)
        if unknown := sorted(set(state) - set(module.state_dict())):
            shown = ", ".join(f"{prefix}.{key}" for key in unknown[:3]) + (f" and {len(unknown) - 3} more"
                                                                             if len(unknown) > 3 else "")
            raise RunFormatError(f"{self.path}: its checkpoint holds weights this version does not know: {shown}: "
                                 f"{NEWER}")
        module.load_state_dict(state)
        return module.eval()


NEWER = "written by a newer version of pftsleep? Read it with that version"
# config.yaml's sections and the dataclass of each one's fields (train: the training script's, not checked here)
SECTIONS = {"model": ModelConfig, "pretrain": PretrainConfig, "probe": ProbeConfig, "data": DataConfig, "train": None}
VERSION_KEYS = ("format_version", "version", "format")       # none written today: a run that has one is newer


class RunFormatError(ValueError):
    """A run folder's file this version cannot read: config.yaml not YAML, fields or weights it does not know (a
    newer version's run), a value of the wrong type. The message is one line naming the file."""


def read_config(run_dir: str | Path) -> dict:
    """RUN/config.yaml as a dict; RunFormatError (one line naming the file) when it is not a YAML mapping."""
    path = Path(run_dir) / CONFIG
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as err:
        raise RunFormatError(f"{path}: not YAML (not UTF-8 text: byte 0x{err.object[err.start]:02x} at offset "
                             f"{err.start})") from None
    except OSError as err:
        raise RunFormatError(f"{path}: cannot read the config ({err.strerror or err})") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        cause = getattr(err, "problem", None) or (str(err).splitlines() or [type(err).__name__])[0]
        raise RunFormatError(f"{path}: not YAML{where} ({cause})") from None
    if not isinstance(config, dict):
        raise RunFormatError(f"{path}: not a config (a YAML mapping of sections: model:, probe:, data:, …)")
    return config


def check_config(path: Path, config: dict) -> None:
    """RunFormatError (one line naming `path`) for sections or fields this version does not know, as a newer
    version's run has, or a field whose value has the wrong type; the train: section's fields are the training
    script's and are not checked."""
    unknown = [str(section) for section in config if section not in SECTIONS]
    for section, cls in SECTIONS.items():
        values = config.get(section)
        if values is not None and not isinstance(values, dict):
            raise RunFormatError(f"{path}: section {section}: must be a mapping of fields, got {values!r}")
        if cls is not None and values:
            fields = {f.name for f in dataclasses.fields(cls)}
            unknown += [f"{section}.{key}" for key in values if key not in fields]
    if unknown:
        versions = [f"{key} {config[key]!r}" for key in VERSION_KEYS if key in config]
        said = f" (it says {', '.join(versions)}; this version writes none)" if versions else ""
        raise RunFormatError(f"{path} has fields this version does not know: {', '.join(unknown)}{said}: {NEWER}")
    for section, cls in SECTIONS.items():
        types = {f.name: str(f.type) for f in dataclasses.fields(cls)} if cls is not None else {}
        for key, value in (config.get(section) or {}).items() if cls is not None else ():
            try:
                config_module.coerce(value, types[key], f"{section}.{key}")
            except SystemExit as err:
                raise RunFormatError(f"{path}: {str(err.code).removeprefix('config: ')}") from None


def read_run(run_dir: str | Path, latest: bool = False) -> Run:
    """The config and checkpoint of a run folder; FileNotFoundError (one line) if it is not one. The checkpoint is
    ckpt_best.pt for a run trained with train.keep_best or train.patience (the best validation score, upstream's
    choice), else ckpt_final.pt. A run without ckpt_final.pt (still training, or killed: its ckpt_best.pt is only the
    best so far) is refused unless `latest`: then its ckpt_best.pt or ckpt.pt (evaluate.py and predict.py --latest).
    RunFormatError (one line naming the file) for a config.yaml that is not YAML, has sections or fields this version
    does not know (a newer version's run: no version number is recorded, so unknown fields are how one shows) or
    values of the wrong type, and for a checkpoint that carries a format version."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).exists():
        raise FileNotFoundError(f"{run_dir}: not a run folder (needs {CONFIG} and {FINAL})")
    config = read_config(run_dir)
    check_config(run_dir / CONFIG, config)
    train = config.get("train") or {}
    unfinished = not (run_dir / FINAL).exists() and any((run_dir / name).exists() for name in (LATEST, BEST))
    if unfinished and not latest:
        raise FileNotFoundError(f"{run_dir}: no final checkpoint ({FINAL}): the run is still training or was killed "
                                f"(resume it with --resume), or pass --latest to use its {LATEST}")
    names = ((BEST,) if train.get("keep_best") or train.get("patience") else ()) + (FINAL,) + ((LATEST,) if latest else ())
    ckpt = next((run_dir / name for name in names if (run_dir / name).exists()), None)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir}: not a run folder (needs {CONFIG} and {FINAL})")
    checkpoint = load_checkpoint(ckpt, "cpu")
    if isinstance(checkpoint, dict) and (versions := [f"{key} {checkpoint[key]!r}" for key in VERSION_KEYS
                                                      if key in checkpoint]):
        raise RunFormatError(f"{ckpt}: it says {', '.join(versions)}; this version writes none: {NEWER}")
    return Run(run_dir, config, checkpoint)


def load_checkpoint(path: Path, device) -> dict:
    """torch.load(weights_only=True), with one line naming the file when it is not a readable checkpoint."""
    try:
        return torch.load(path, map_location=device, weights_only=True)
    except Exception as err:    # truncated zip, bytes of another file, a pickle beyond weights_only: all unreadable
        raise CorruptCheckpoint(f"{path}: not a readable checkpoint ({type(err).__name__}: "
                                f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None


class CorruptCheckpoint(ValueError):
    pass


# ----------------------------------------------------------------------------------------------------------------------
# Writing a run folder


def save_config(run_dir: Path, values) -> None:
    """The resolved config (a config dataclass or a dict), as RUN/config.yaml."""
    values = dataclasses.asdict(values) if dataclasses.is_dataclass(values) else values
    write_atomic(Path(run_dir) / CONFIG, lambda temp: temp.write_text(yaml.safe_dump(values, sort_keys=False)))


def write_run(run_dir: str | Path, config: dict, weights: dict, overwrite: bool = False) -> Path:
    """A finished run folder, the one writer of one (import_upstream.py, write_random_run): ckpt_final.pt, then
    config.yaml, each atomically. FileExistsError (one line) when run_dir holds a run and not `overwrite`."""
    run_dir = Path(run_dir)
    if (run_dir / FINAL).exists() and not overwrite:
        raise FileExistsError(f"{run_dir} already holds a run (use --overwrite to replace it)")
    run_dir.mkdir(parents=True, exist_ok=True)
    save_checkpoint(run_dir / FINAL, {"model": weights})
    save_config(run_dir, config)
    return run_dir


def write_random_run(run_dir, model_cfg: ModelConfig, probe_cfg: ProbeConfig, data: dict) -> Path:
    """A probe run folder of untrained weights from seed 0 (it seeds torch's global generator): what predict.py and
    the API read, for tests and benchmarks. data: the run's data config (window_s)."""
    torch.manual_seed(0)
    weights = torch.nn.ModuleDict({"encoder": Encoder(model_cfg), "probe": ProbeHead(probe_cfg)})
    return write_run(run_dir, {"model": dataclasses.asdict(model_cfg), "probe": dataclasses.asdict(probe_cfg),
                               "data": data}, weights.state_dict())


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically; ckpt.pt keeps its predecessor as ckpt_prev.pt. A full disk is one line, the old files intact and
    no temporary left (write_atomic)."""
    path = Path(path)
    previous = path.with_name(PREVIOUS) if path.name == LATEST else None
    try:
        write_atomic(path, lambda temp: torch.save(state, temp), previous)
    except (OSError, RuntimeError) as err:   # torch.save's zip writer raises RuntimeError on a full disk, errno lost
        kept = "the previous one is kept" if path.exists() else "nothing was written"
        raise SystemExit(f"{path}: cannot write the checkpoint ({write_failure(err, path, state)}); {kept}") from None


def write_failure(err: Exception, path: Path, state: dict) -> str:
    """The cause of a failed checkpoint write, in words. torch.save's writer reports a full disk as "PytorchStreamWriter
    failed writing file …" (a RuntimeError without errno): when the disk now has less room than the checkpoint's
    tensors need, that is the cause."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    try:
        free = shutil.disk_usage(path.parent).free
    except OSError:
        free = None
    need = sum(t.nbytes for t in _tensors(state))
    if free is not None and free < need:
        return f"no space left on device: the checkpoint needs {need / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free"
    return f"torch.save: {str(err).splitlines()[0] if str(err) else type(err).__name__}"


def _tensors(value):
    """Every tensor in a nested checkpoint dict (or list)."""
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


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


def new_progress() -> dict:
    """The counters a training checkpoint carries: best (the best validation score so far, None before any) and stale
    (validations since it) serve train.keep_best and train.patience; nonfinite_steps (skipped optimiser steps in all)
    and nonfinite_run (in a row, up to now) serve optimizer_step's guard."""
    return {"step": 0, "epoch": 0, "step_in_epoch": 0, "best": None, "stale": 0, "nonfinite_steps": 0,
            "nonfinite_run": 0}


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


