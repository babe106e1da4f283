"""The paper's protocol end to end on CPU: docs/reproduce.md's commands for the paper's table, for both recipes.

Builds a small synthetic cohort of all five datasets in their native NSRR layouts (MrOS with visits 1 and 2), prepares
it with `python -m prepare`, then runs exactly docs/reproduce.md's commands (torchrun with 2 gloo processes, `train_pretrain.py`,
`train_probe.py`, `evaluate.py`) for configs/*_paper.yaml and configs/*_upstream.yaml, with tiny model widths and 1-h
windows (TINY below) so that it fits a CPU. Writes one results.md: the paper's four rows and "MESA in the probe", ours
beside the paper's κ. Synthetic nights say nothing about sleep: the table shows that the protocol runs and which
nights each row scores, not the paper's numbers. Each step is skipped when its output exists (a killed run resumes).

    python bench/paper_protocol.py [--nights 20] [--hours 1.5] [--out bench/out/paper_protocol]
"""
import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]
import machine  # noqa: E402  (bench/machine.py)
from prepare.store import read_manifest  # noqa: E402
from runs import read_config  # noqa: E402
DATASETS = ("shhs", "wsc", "mros", "mesa", "apples")
TINY = ["--model.d_model", "32", "--model.n_layers", "2", "--model.n_heads", "4", "--model.d_ff", "64",
        "--model.max_patches", "600", "--data.window_s", "3600", "--data.num_workers", "0", "--train.batch_size", "2",
        "--train.grad_accum", "1", "--train.bf16", "false", "--train.log_every", "5"]
PRETRAIN = ["--train.epochs", "3", "--train.max_lr", "0.003", "--train.eval_every", "20", "--train.ckpt_every", "20"]
PROBE = ["--probe.hidden_size", "32", "--train.epochs", "8", "--train.eval_every", "20", "--train.ckpt_every", "20"]
# (row, paper κ, evaluate.py selection for the paper-text recipe, for the upstream recipe, probe trained with MESA)
ROWS = [("held-out SHHS + WSC + MrOS 1", 0.81, ["--datasets", "shhs,wsc,mros:1", "--split", "test"], None, False),
        ("MESA", 0.60, ["--datasets", "mesa", "--split", "all"], ["--datasets", "mesa", "--split", "test"], False),
        ("APPLES", 0.59, ["--datasets", "apples", "--split", "all"], None, False),
        ("MrOS visit 2", 0.75, ["--datasets", "mros:2", "--split", "all"], None, False),
        ("MESA in the probe", 0.76, ["--datasets", "mesa", "--split", "test"], None, True)]


def run(*command, log: Path) -> None:
    started = time.time()
    with open(log, "a") as f:
        done = subprocess.run([*map(str, command)], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
    if done.returncode:
        raise SystemExit(f"{' '.join(map(str, command))} failed (log: {log})")
    print(f"  {time.time() - started:5.0f} s  {' '.join(map(str, command[:4]))} …", flush=True)


def torchrun(script: str, *args, log: Path) -> None:
    run(sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29000 + os.getpid() % 1000),
        script, *args, log=log)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nights", type=int, default=20, help="synthetic nights per dataset (default 20)")
    parser.add_argument("--hours", type=float, default=1.5, help="hours per night (default 1.5)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/out/paper_protocol", help="work folder")
    args = parser.parse_args()
    out, started = args.out.resolve(), time.time()
    out.mkdir(parents=True, exist_ok=True)
    log, nights = out / "log.txt", out / "data" / "nights"
    for i, dataset in enumerate(DATASETS):
        if not (nights / dataset).exists():
            run(sys.executable, "-m", "synthetic", dataset, out / "nsrr" / dataset, "--nights", args.nights,
                "--hours", args.hours, "--seed", 10 + i, log=log)
            run(sys.executable, "-m", "prepare", dataset, out / "nsrr" / dataset, nights, "--workers", "2", log=log)
    kappas = {}
    for recipe in ("paper", "upstream"):
        encoder, probe = out / recipe / "encoder", out / recipe / "probe"
        # upstream holds out 100 MESA nights; of the few synthetic ones a quarter, so that MESA is also trained on
        data = ["--data.root", nights] + (["--data.mesa_holdout", max(1, args.nights // 4)] if recipe == "upstream" else [])
        if not (encoder / "ckpt_final.pt").exists():
            torchrun("train_pretrain.py", "--config", f"configs/pretrain_{recipe}.yaml", "--run-dir", encoder, *data,
                     *TINY, *PRETRAIN, "--resume", log=log)
        probes = {False: probe, True: out / recipe / "probe_with_mesa"}
        datasets = {"paper": "[shhs,wsc,'mros:1']", "upstream": "[shhs]"}[recipe]
        for with_mesa, folder in probes.items():
            extra = ["--data.datasets", datasets[:-1] + ",mesa]"] if with_mesa else []
            if not (folder / "ckpt_final.pt").exists():
                torchrun("train_probe.py", "--config", f"configs/probe_{recipe}.yaml", "--encoder", encoder,
                         "--run-dir", folder, *data, *TINY, *PROBE, *extra, "--resume", log=log)
        for name, _, selection, upstream_selection, with_mesa in ROWS:
            selection = (upstream_selection or selection) if recipe == "upstream" else selection
            eval_dir = out / recipe / "eval" / name.replace(" ", "_").replace("+", "")
            split, datasets_selected = selection[3], selection[1].split(",")
            split_data = read_config(probes[with_mesa]).get("data") or {}       # what evaluate.py selects with
            if read_manifest(nights, None if split == "all" else split, datasets_selected,
                             split_data.get("split_fractions"), mesa_holdout=split_data.get("mesa_holdout"),
                             resplit_seed=split_data.get("resplit_seed")).empty:
                kappas[recipe, name] = (None, 0, " ".join(selection))     # the split left no such night
                continue
            if not (eval_dir / "results.json").exists():
                run(sys.executable, "evaluate.py", "--run", probes[with_mesa], *selection, "--bootstrap", "200",
                    "--png-nights", "0", "--out", eval_dir, log=log)
            pooled = json.loads((eval_dir / "results.json").read_text())["pooled"]
            kappas[recipe, name] = (pooled["kappa"], pooled["n_nights"], " ".join(selection))
    lines = ["# The paper's protocol on a synthetic cohort", "",
             f"{args.nights} synthetic nights of {args.hours:g} h per dataset (MrOS visits 1 and 2), tiny widths, 1-h "
             "windows; the commands of docs/reproduce.md for both recipes. Synthetic "
             "nights say nothing about sleep: compare the rows with each other, not with the paper.", "",
             "| row | paper κ | `_paper` recipe κ (nights; selection) | `_upstream` recipe κ (nights; selection) |",
             "|---|---|---|---|"]
    for name, paper, *_ in ROWS:
        cells = [f"{kappas[r, name][0]:.3f} ({kappas[r, name][1]}; `{kappas[r, name][2]}`)"
                 if kappas[r, name][0] is not None else f"— ({kappas[r, name][1]})" for r in ("paper", "upstream")]
        lines.append(f"| {name} | {paper:.2f} | {cells[0]} | {cells[1]} |")
    lines += ["", f"Wall time: {(time.time() - started) / 60:.1f} min on {machine.describe('auto')}."]
    (out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
