"""Evaluate a probe run: stage every selected night, then score the hypnograms against the technologists'.

    python evaluate.py --run runs/probe --out runs/probe/eval                          # test split, all datasets
    python evaluate.py --run runs/probe --datasets mesa,apples,mros:2 --split all --out eval/external
    python evaluate.py --run runs/probe --protocol upstream --label-lag 1 --out runs/probe/eval_upstream_lag1

--protocol decides which epochs of a night are staged and scored (`stage.stage_night` stages them either way):
  night      (default) every night whole: the fewest windows of at most --window-s (default: the run's
             data.window_s), of equal length, back to back (stage.staging_windows, as predict.py); with --stride-s,
             one every stride, the stage probabilities of an epoch averaged over the windows that saw it
  upstream   the hours upstream's window covers (docs/upstream.md §11 item 7; our reading, as upstream publishes no
             scoring code, and without its other label handling: §11 items 8, 17, 18): only the first --window-s seconds of
             each night (8 h in the paper), cropped before staging and staged with exactly one window from epoch 0
             (stride = window; a shorter night is zero-padded and masked, so it is staged as under `night`). Epochs
             after the window are not scored at all: not in κ, not in predictions.csv, not in n_epochs. --stride-s
             does not apply.
--label-lag K (default 0) shifts the technologists' stages K epochs later before scoring: truth[e] := stages[e − K],
the first K epochs unscored (K < 0: |K| epochs earlier, the last |K| unscored), as upstream's hypnogram reader delivered
MrOS, APPLES and WSC labels one epoch late (docs/upstream.md §11 item 8): what a label lag costs in κ
(bench/label_lag.py). |K| must be less than the shortest selected night (under `upstream`: than the scored window).
The lag applies to the whole night, before an `upstream` crop.
Epochs the technologists left unscored (stage -1: movement, artefact, no annotation) are excluded everywhere.
A selected night whose store is missing (deleted or moved since manifest.csv listed it) or damaged is skipped with one
line naming the night and the store; the rest are scored, and results.json ("skipped"), results.md and the last lines
printed list what was skipped. If no night can be read, that is one line and nothing is written.
--absent EEG (or THOR,ABDO) zeroes those slots in every night first, as predict.py feeds a slot an EDF lacks: the
κ a user gets without them (bench/channel_dropout.py tabulates it per slot).

Metrics over 30-s epochs, classes 0 W, 1 N1, 2 N2, 3 N3, 4 REM (formulas in metrics.py):
  kappa      Cohen's κ = (p_o − p_e) / (1 − p_e) from the confusion matrix
  accuracy   p_o, the fraction of epochs on the diagonal
  macro_f1   mean of the per-class F1 over the classes present in the truth or the prediction (a class absent from
             both has F1 = 0/0 and is left out: sklearn's f1_score(average='macro') without a `labels` argument)
  auroc      one-vs-rest, Mann-Whitney rank formula with average ranks for ties (= sklearn's roc_auc_score)
  auprc      one-vs-rest average precision Σ (R_n − R_{n−1}) P_n over distinct thresholds (= sklearn's
             average_precision_score)
  confusion  counts, rows = truth, columns = prediction
They are computed pooled (all epochs of all selected nights together), per dataset and per night. The 95 % intervals
(`*_ci`) come from a bootstrap over NIGHTS (resample nights with replacement, recompute the pooled metric, take the
2.5th and 97.5th percentiles; seeded): for kappa, accuracy, macro_f1 and each class's F1. AUROC and AUPRC get none
(each resample would re-sort every epoch).

Sleep statistics (sleep_statistics.sleep_statistics) per night, the technologist's hypnogram against the predicted one on the
same epochs (the prediction is set unscored where the technologist's stage is, so that a difference is the staging's
alone): TST, SE, WASO, SOL, REM latency from sleep onset and minutes per stage. `agreement`, pooled and per dataset:
per statistic the Bland–Altman bias (mean of predicted − technologist over nights) and 95 % limits of agreement
(bias ± 1.96 SD of those differences; metrics.bland_altman), nights without a value on either side (no REM: no REM
latency) left out of that statistic.

Writes into --out (docs/design.md §11), each file atomically:
  results.json      {"pooled": {...}, "datasets": {name: {...}}, "settings": {"protocol": …, "label_lag": K},
                    "skipped": [{night_id, dataset, path, reason}, …]}:
                    kappa, accuracy, macro_f1, f1_per_class, auroc, auprc, confusion, n_nights, n_epochs (scored
                    epochs), classes, and the *_ci intervals; per-class values are {"W": …, "N1": …, …}; undefined
                    values (e.g. κ when p_e = 1) are null; agreement: {statistic: {n, bias, sd, loa: [lo, hi],
                    mean_reference, mean_observed}} (reference: the technologist)
  per_night.csv     night_id, dataset, n_epochs, kappa, accuracy, macro_f1
  sleep_statistics.csv  night_id, dataset, then <statistic>_true and <statistic>_pred for each compared statistic
  predictions.csv   one row per scored epoch: night_id, dataset, epoch, true, pred, p_W, p_N1, p_N2, p_N3, p_REM
  results.md        the settings, the protocol, the label lag and the run's recipe (its config's train.recipe, or
                    "recipe: not recorded"); ours beside the paper's numbers (configs/paper_results.yaml), per
                    dataset and pooled
  confusion.png, hypnogram_<night_id>.png, bland_altman.png (one panel per statistic: mean of the two vs their
                    difference, bias and limits of agreement)   (matplotlib; skipped with a note if not installed)
"""
from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")   # before torch loads OpenMP: docs/benchmarks.md "Threads"

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from tqdm import tqdm

import config
import durable
import sleep_statistics
import stage
from data import DataConfig
from metrics import K, accuracy, auroc, average_precision, bootstrap_ci, confusion_matrix, f1_per_class, kappa, macro_f1
from metrics import bland_altman
from prepare.annotations import AASM_LETTERS, STAGES
from prepare.signals import EPOCH_SAMPLES, SLOTS
from prepare.store import DamagedStore, OpenLimit, read_manifest, read_night

PAPER_RESULTS = Path(__file__).resolve().parent / "configs" / "paper_results.yaml"
PROTOCOLS = {   # name -> what results.md says about it
    "night": "every night staged whole: windows of {window_s:g} s {windows}",
    "upstream": "only the first {window_s:g} s of each night, staged with one window from its start (the hours "
                "upstream's 8-h window covers; our reading: upstream publishes no scoring code); later epochs are not "
                "scored",
}
# the per-night sleep statistics compared between technologist and prediction (sleep_statistics.sleep_statistics' keys; the
# minutes per stage flattened to W_min … R_min)
AGREEMENT_STATS = ("TST_min", "SE_pct", "WASO_min", "SOL_min", "REM_latency_from_onset_min",
                   *(f"{name}_min" for name in AASM_LETTERS))


def select_nights(root: Path, split: str, datasets: list | None, split_fractions=None, *, mesa_holdout=None,
                  resplit_seed=None) -> pd.DataFrame:
    if not (root / "manifest.csv").exists():
        raise SystemExit(f"evaluate.py: {root}/manifest.csv not found (--data.root must be a prepare output folder)")
    nights = read_manifest(root, None if split == "all" else split, datasets, split_fractions,
                           mesa_holdout=mesa_holdout, resplit_seed=resplit_seed, field="--datasets")
    if nights.empty:
        raise SystemExit(f"evaluate.py: no night in {root}/manifest.csv matches split={split} "
                         f"datasets={','.join(datasets) if datasets else 'all'}")
    return nights


def lag_labels(stages: np.ndarray, lag: int) -> np.ndarray:
    """stages shifted `lag` epochs later: out[e] = stages[e − lag], -1 (unscored) where e − lag falls outside."""
    stages = np.asarray(stages, np.int64)
    lagged = np.full_like(stages, -1)
    kept = max(len(stages) - abs(lag), 0)
    lagged[max(lag, 0):max(lag, 0) + kept] = stages[max(-lag, 0):max(-lag, 0) + kept]
    return lagged


def stage_all(nights: pd.DataFrame, root: Path, encoder, probe, window_s: float, stride_s: float | None,
              batch_size: int, device: str, absent: tuple[str, ...] = (), first_epochs: int | None = None,
              label_lag: int = 0, skipped: list | None = None) -> list[dict]:
    """Per night: {night_id, dataset, visit, start_time, stages [E] int64 (-1 unscored), probs [E, K] float32,
    stats_true, stats_pred (night_statistics)}. Slots named in `absent` are zeroed, as predict.py feeds a channel
    missing from an EDF. The stages are shifted `label_lag` epochs later (lag_labels); with `first_epochs` only that
    many epochs from the start of the night are staged and scored (signals and stages cropped before staging: the
    upstream protocol). A night whose store is missing (deleted or moved since manifest.csv listed it) or damaged is
    reported in one line naming the night and the store, appended to `skipped` ({night_id, dataset, path, reason})
    and left out; the others are staged."""
    window = int(round(window_s / 30)) * EPOCH_SAMPLES
    stride = None if stride_s is None else int(round(stride_s / 30)) * EPOCH_SAMPLES
    encoder, probe = encoder.to(device), probe.to(device)
    staged = []
    for row in tqdm(nights.itertuples(), total=len(nights), desc="staging nights", unit="night"):
        path = root / row.path
        try:
            if not path.exists():
                raise DamagedStore(f"{path}: night store not found (manifest.csv lists it: deleted or moved since; "
                                   f"prepare the night again)")
            channels, stages, attrs = read_night(path)
        except DamagedStore as err:
            tqdm.write(f"skipped {row.night_id}: {err}", file=sys.stderr)
            if skipped is not None:
                skipped.append({"night_id": str(row.night_id), "dataset": row.dataset, "path": str(path),
                                "reason": str(err)})
            continue
        except OpenLimit as err:                    # the store is sound: the process or system ran out of a limit
            raise SystemExit(f"evaluate.py: {err}") from None
        stages = lag_labels(stages, label_lag)
        if first_epochs is not None:
            channels, stages = [c[:first_epochs * EPOCH_SAMPLES] for c in channels], stages[:first_epochs]
        signals = np.stack([np.asarray(c, np.float32) for c in channels])                   # [7, T]
        signals[[SLOTS.index(slot) for slot in absent]] = 0.0
        probs = stage.stage_night(encoder, probe, signals, window, stride, batch_size, device).numpy()   # [T // 3750, K]
        n = min(len(probs), len(stages))            # both are T // 3750; guard against a store that disagrees
        night = {"night_id": str(row.night_id), "dataset": row.dataset, "visit": str(row.visit),
                 "start_time": attrs.get("start_time"), "stages": stages[:n], "probs": probs[:n].astype(np.float32)}
        night["stats_true"], night["stats_pred"] = night_statistics(night["stages"], night["probs"])
        staged.append(night)
    return staged


# ----------------------------------------------------------------------------------------------------------------------
# Scoring


def night_confusion(night: dict) -> np.ndarray:
    return confusion_matrix(night["stages"], night["probs"].argmax(axis=1))


def per_class(values) -> dict:
    return {name: values[k] for k, name in enumerate(STAGES)}


def night_statistics(stages: np.ndarray, probs: np.ndarray) -> tuple[dict, dict]:
    """The AGREEMENT_STATS of the technologist's hypnogram and of the predicted one, on the same epochs: the
    prediction is unscored (-1) where the technologist's stage is, so that neither counts an epoch the other lacks."""
    pred = np.where(stages >= 0, probs.argmax(axis=1), -1)

    def flat(stats):
        return {**{key: stats[key] for key in AGREEMENT_STATS if key in stats},
                **{f"{name}_min": minutes for name, minutes in stats["stage_min"].items()}}
    return flat(sleep_statistics.sleep_statistics(stages)), flat(sleep_statistics.sleep_statistics(pred))


def agreement(nights: list[dict]) -> dict:
    """Per compared statistic: bias and 95 % limits of agreement of the prediction against the technologist."""
    return {key: bland_altman([n["stats_true"][key] for n in nights], [n["stats_pred"][key] for n in nights])
            for key in AGREEMENT_STATS}


def score(nights: list[dict], n_boot: int, seed: int) -> dict:
    """Pooled metrics of a group of nights (all their scored epochs together) with bootstrap intervals over nights."""
    night_cms = np.stack([night_confusion(n) for n in nights])                             # [nights, K, K]
    cm = night_cms.sum(axis=0)                                                              # [K, K]
    true = np.concatenate([n["stages"] for n in nights])
    probs = np.concatenate([n["probs"] for n in nights])
    scored = true >= 0
    true, probs = true[scored], probs[scored]                                               # [E], [E, K]
    result = {
        "n_nights": len(nights), "n_epochs": int(cm.sum()), "classes": STAGES,
        "kappa": kappa(cm), "accuracy": accuracy(cm), "macro_f1": macro_f1(cm),
        "f1_per_class": per_class(f1_per_class(cm)),
        "auroc": per_class([auroc(probs[:, k], true == k) for k in range(K)]),
        "auprc": per_class([average_precision(probs[:, k], true == k) for k in range(K)]),
        "confusion": cm.tolist(),
    }
    ci = bootstrap_ci(night_cms, n_boot, seed)
    for name in ("kappa", "accuracy", "macro_f1"):
        result[f"{name}_ci"] = ci[name].tolist() if ci else None
    result["f1_per_class_ci"] = per_class(ci["f1_per_class"].tolist()) if ci else None
    result["agreement"] = agreement(nights)
    return result


def per_night_table(nights: list[dict]) -> pd.DataFrame:
    rows = []
    for night in nights:
        cm = night_confusion(night)
        rows.append({"night_id": night["night_id"], "dataset": night["dataset"], "n_epochs": int(cm.sum()),
                     "kappa": kappa(cm), "accuracy": accuracy(cm), "macro_f1": macro_f1(cm)})
    return pd.DataFrame(rows, columns=["night_id", "dataset", "n_epochs", "kappa", "accuracy", "macro_f1"])


def statistics_table(nights: list[dict]) -> pd.DataFrame:
    """One row per night: each compared statistic, the technologist's (_true) and the prediction's (_pred)."""
    return pd.DataFrame([{"night_id": n["night_id"], "dataset": n["dataset"],
                          **{f"{key}_{side}": n[f"stats_{side}"][key] for key in AGREEMENT_STATS
                             for side in ("true", "pred")}} for n in nights])


def predictions_table(nights: list[dict]) -> pd.DataFrame:
    """One row per scored epoch, so that anyone can recompute every metric."""
    parts = []
    for night in nights:
        epochs = np.flatnonzero(night["stages"] >= 0)
        probs = night["probs"][epochs]                                                      # [E_scored, K]
        part = pd.DataFrame({"night_id": night["night_id"], "dataset": night["dataset"], "epoch": epochs,
                             "true": night["stages"][epochs], "pred": probs.argmax(axis=1)})
        for k, name in enumerate(STAGES):
            part[f"p_{name}"] = probs[:, k]
        parts.append(part)
    return pd.concat(parts, ignore_index=True)


def to_json(value):
    """numpy → plain Python; NaN → null (JSON has no NaN)."""
    if isinstance(value, dict):
        return {k: to_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, np.ndarray)):
        return [to_json(v) for v in value]
    if isinstance(value, (float, np.floating)):
        return None if np.isnan(value) else float(value)
    if isinstance(value, np.integer):
        return int(value)
    return value


# ----------------------------------------------------------------------------------------------------------------------
# The report: ours beside the paper's


def paper_kappa(paper: dict, dataset: str, visits: set[str]) -> tuple[float | None, str]:
    """The paper's κ for a dataset (for a single visit where the paper distinguishes visits) and its note."""
    entry = paper.get("datasets", {}).get(dataset)
    if entry is None:
        return None, ""
    by_visit = entry.get("visits")
    if by_visit:
        if len(visits) != 1 or next(iter(visits)) not in {str(v) for v in by_visit}:
            return None, f"the paper reports {dataset} per visit; select one (e.g. --datasets {dataset}:2)"
        entry = {str(v): e for v, e in by_visit.items()}[next(iter(visits))]
    return entry.get("kappa"), entry.get("note", "")


def paper_pooled_kappa(paper: dict, nights: list[dict]) -> tuple[float | None, str]:
    """The paper's κ for its held-out pool, if every selected night belongs to the pool's datasets/visits."""
    pool = paper.get("held_out_pool", {})
    selectors = [str(s).partition(":") for s in pool.get("datasets", [])]
    inside = all(any(n["dataset"] == name and (not visit or n["visit"] == visit) for name, _, visit in selectors)
                 for n in nights)
    return (pool.get("kappa"), pool.get("note", "")) if selectors and inside else (None, "")


def fmt(value, ci=None, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return "—"
    text = f"{value:.{digits}f}"
    if ci and None not in ci and not any(np.isnan(ci)):
        text += f" [{ci[0]:.3f}, {ci[1]:.3f}]"
    return text


def results_markdown(results: dict, nights: list[dict], paper: dict, settings: dict, recipe=None) -> str:
    """settings: the options as given (protocol and label_lag among them); recipe: the run's train.recipe, if any."""
    lag = settings["label_lag"]
    lag_text = ("none (the technologists' stages as scored)" if lag == 0 else
                f"{abs(lag)} epoch{'s' * (abs(lag) != 1)} {'later' if lag > 0 else 'earlier'} (the "
                f"{'first' if lag > 0 else 'last'} {abs(lag)} of each night unscored)")
    lines = ["# Sleep staging results", "",
             "Settings: " + ", ".join(f"{k} `{v}`" for k, v in settings.items()), "",
             f"Protocol `{settings['protocol']}`: " + PROTOCOLS[settings["protocol"]].format(**settings, windows=(
                 "back to back from its start, the fewest of equal length" if settings["stride_s"] is None else
                 f"every {settings['stride_s']:g} s, probabilities averaged where windows overlap")) + ".  ",
             f"Label lag: {lag_text}.  ",
             f"recipe: {'not recorded' if recipe is None else recipe}", "",
             "| | nights | epochs | κ (95 % CI) | paper κ | accuracy (95 % CI) | macro-F1 (95 % CI) |",
             "|---|---|---|---|---|---|---|"]
    notes = []
    groups = [("pooled", results["pooled"], paper_pooled_kappa(paper, nights))]
    for name, r in results["datasets"].items():
        visits = {n["visit"] for n in nights if n["dataset"] == name}
        groups.append((name, r, paper_kappa(paper, name, visits)))
    for name, r, (paper_k, note) in groups:
        lines.append(f"| {name} | {r['n_nights']} | {r['n_epochs']} | {fmt(r['kappa'], r['kappa_ci'])} | "
                     f"{fmt(paper_k, digits=2)} | {fmt(r['accuracy'], r['accuracy_ci'])} | {fmt(r['macro_f1'], r['macro_f1_ci'])} |")
        if note:
            notes.append(f"- {name}: {note}")
    lines += ["", "Per class (pooled over the selected nights):", "",
              "| | " + " | ".join(STAGES) + " |", "|---" * (K + 1) + "|"]
    for metric in ("f1_per_class", "auroc", "auprc"):
        lines.append(f"| {metric} | " + " | ".join(fmt(results["pooled"][metric][s]) for s in STAGES) + " |")
    lines += ["", f"The paper's numbers come from the paper (Fox et al. 2025, SLEEP; {PAPER_RESULTS.name}) and apply "
              "only to the real cohorts it used (its splits, its test sets); beside results on other nights (e.g. the "
              "synthetic demo cohort) they are a reference, not a comparison. Intervals: bootstrap over nights.", ""]
    if paper.get("note"):
        lines += [" ".join(paper["note"].split()), ""]
    return "\n".join(lines + notes + agreement_markdown(results["pooled"]["agreement"])) + "\n"


def agreement_markdown(agreement: dict) -> list[str]:
    """The pooled sleep-statistics agreement as a table (lines of results.md)."""
    lines = ["", "Sleep statistics per night, PFTSleep against the technologist on the epochs the technologist scored "
             "(pooled; bias = mean of PFTSleep − technologist; 95 % limits of agreement = bias ± 1.96 SD of the "
             "per-night differences; minutes, SE in %; bland_altman.png):", "",
             "| statistic | nights | technologist mean | PFTSleep mean | bias | 95 % limits of agreement |",
             "|---|---|---|---|---|---|"]
    for key, a in agreement.items():
        limits = "—" if a["loa"][0] is None else f"{fmt(a['loa'][0], digits=1)} to {fmt(a['loa'][1], digits=1)}"
        lines.append(f"| {key} | {a['n']} | {fmt(a['mean_reference'], digits=1)} | {fmt(a['mean_observed'], digits=1)} "
                     f"| {fmt(a['bias'], digits=1)} | {limits} |")
    return lines


# ----------------------------------------------------------------------------------------------------------------------
# Figures: the confusion matrix here, the hypnograms from stage.py


def plot_confusion(cm: np.ndarray, path: Path, plt) -> None:
    """Row-normalised (each true stage sums to 1) with the counts written in the cells."""
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = cm / cm.sum(axis=1, keepdims=True)
    fig, ax = plt.subplots(figsize=(5.5, 4.5))
    image = ax.imshow(np.nan_to_num(norm), cmap="Blues", vmin=0, vmax=1)
    for i in range(K):
        for j in range(K):
            share = norm[i, j]
            ax.text(j, i, f"{0 if np.isnan(share) else share:.2f}\n({cm[i, j]})", ha="center", va="center",
                    fontsize=8, color="white" if share > 0.5 else "black")
    ax.set(xticks=range(K), yticks=range(K), xticklabels=STAGES, yticklabels=STAGES,
           xlabel="predicted", ylabel="true", title="confusion (rows normalised; counts)")
    fig.colorbar(image, ax=ax, fraction=0.046)
    fig.tight_layout()
    durable.write_atomic(path, lambda temp: fig.savefig(temp, dpi=120, format="png"))
    plt.close(fig)


def plot_bland_altman(nights: list[dict], pooled_agreement: dict, path: Path, plt) -> None:
    """One panel per statistic: per night, the mean of technologist and PFTSleep (x) against PFTSleep − technologist
    (y); the bias (solid) and the 95 % limits of agreement (dashed)."""
    n_cols = 5
    n_rows = -(-len(AGREEMENT_STATS) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.2 * n_cols, 2.9 * n_rows), squeeze=False)
    for ax, key in zip(axes.flat, AGREEMENT_STATS):
        pairs = np.array([(n["stats_true"][key], n["stats_pred"][key]) for n in nights
                          if n["stats_true"][key] is not None and n["stats_pred"][key] is not None], float)
        pairs = pairs.reshape(-1, 2)                                                        # [nights, 2]
        ax.scatter(pairs.mean(axis=1), pairs[:, 1] - pairs[:, 0], s=12, color="tab:blue", alpha=0.7)
        a = pooled_agreement[key]
        for value, style in ((a["bias"], "-"), (a["loa"][0], "--"), (a["loa"][1], "--")):
            if value is not None and not np.isnan(value):
                ax.axhline(value, color="tab:red" if style == "-" else "0.4", ls=style, lw=1)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_title(f"{key} (n={a['n']})", fontsize=9)
        ax.tick_params(labelsize=7)
    for ax in axes.flat[len(AGREEMENT_STATS):]:
        ax.axis("off")
    for ax in axes[:, 0]:
        ax.set_ylabel("PFTSleep − technologist", fontsize=8)
    for ax in axes[-1]:
        ax.set_xlabel("mean of the two", fontsize=8)
    fig.suptitle("Bland–Altman: bias (red) and 95 % limits of agreement (dashed), one point per night", fontsize=10)
    fig.tight_layout()
    durable.write_atomic(path, lambda temp: fig.savefig(temp, dpi=110, format="png"))
    plt.close(fig)


def write_figures(out: Path, results: dict, nights: list[dict], n_hypnograms: int) -> list[Path]:
    plt = stage.pyplot()
    if plt is None:
        return []
    paths = [out / "confusion.png", out / "bland_altman.png"]
    plot_confusion(np.array(results["pooled"]["confusion"]), paths[0], plt)
    plot_bland_altman(nights, results["pooled"]["agreement"], paths[1], plt)
    for night in nights[:n_hypnograms]:
        paths.append(out / f"hypnogram_{re.sub(r'[^A-Za-z0-9._-]', '_', night['night_id'])}.png")
        stage.plot_hypnogram(paths[-1], night["probs"], f"{night['night_id']} ({night['dataset']})",
                             truth=night["stages"], plt=plt, start_time=night["start_time"])
    return paths


# ----------------------------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="evaluate.py", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run", "--run-dir", dest="run", type=Path, required=True,
                        help="probe run folder (config.yaml + ckpt_final.pt)")
    parser.add_argument("--latest", action="store_true",
                        help="accept a run without a final checkpoint (still training, or killed): use its ckpt.pt")
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, CSVs, results.md and PNGs")
    parser.add_argument("--data.root", dest="data_root", type=Path,
                        help="prepare output folder holding manifest.csv (default: the run's data.root)")
    parser.add_argument("--datasets", help="comma-separated dataset names or name:visit, e.g. mesa,apples,mros:2 "
                                           "(default: every dataset in the manifest); results are grouped by dataset name, so "
                                           "select one MrOS visit to compare with the paper's per-visit κ")
    parser.add_argument("--split", default="test", choices=["test", "val", "train", "all"],
                        help="manifest split to evaluate; 'all' ignores the split, e.g. for an external test cohort "
                             "(default: test)")
    parser.add_argument("--protocol", default="night", metavar="{" + ",".join(PROTOCOLS) + "}",
                        help="night: stage and score every night whole; upstream: only the first --window-s seconds "
                             "of each night, one window from its start, as upstream's pipeline (default: night)")
    parser.add_argument("--label-lag", dest="label_lag", default="0", metavar="K",
                        help="shift the technologists' stages this many epochs later before scoring (negative: "
                             "earlier); the epochs left without a stage are unscored. |K| must be less than the "
                             "shortest selected night (default: 0)")
    parser.add_argument("--window-s", dest="window_s", type=config.positive(float),
                        help="window length in seconds (default: the run's data.window_s); under --protocol upstream "
                             "also the part of each night that is scored")
    parser.add_argument("--stride-s", dest="stride_s", type=config.positive(float),
                        help="hop between windows in seconds, at least 30; overlapping epochs average their "
                             "probabilities (default: none, the fewest equal windows back to back, as predict.py; "
                             "not with --protocol upstream)")
    parser.add_argument("--absent", default="",
                        help="comma-separated slots to zero in every night, e.g. EEG or THOR,ABDO: how the model does "
                             f"when an EDF lacks them (slots: {', '.join(SLOTS)}; default: none)")
    parser.add_argument("--batch-size", dest="batch_size", type=config.positive(int), default=4,
                        help="windows per forward pass (default: 4)")
    parser.add_argument("--bootstrap", type=config.non_negative, default=1000,
                        help="bootstrap resamples of the nights for the 95 %% intervals; 0 = none (default: 1000)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the bootstrap (default: 0)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--png-nights", dest="png_nights", type=config.non_negative, default=3,
                        help="hypnogram PNGs for the first this many nights (default: 3)")
    return parser.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    try:
        model = stage.load_model(args.run, "cpu", args.latest)
    except stage.StagingError as err:
        raise SystemExit(f"evaluate.py: {err}") from None
    encoder, probe, run_config = model.encoder, model.probe, model.config
    data = {**vars(DataConfig()), **(run_config.get("data") or {})}          # an imported run may have no data:
    root = args.data_root or Path(data["root"])
    window_s = args.window_s or data["window_s"]
    if args.protocol not in PROTOCOLS:
        raise SystemExit(f"evaluate.py: --protocol {args.protocol}: unknown (protocols: {', '.join(PROTOCOLS)})")
    if args.protocol == "upstream" and args.stride_s:
        raise SystemExit("evaluate.py: --stride-s does not apply to --protocol upstream (one window per night)")
    stride_s = window_s if args.protocol == "upstream" else args.stride_s               # None: back to back
    try:
        label_lag = int(args.label_lag)
    except ValueError:
        raise SystemExit(f"evaluate.py: --label-lag {args.label_lag}: not a whole number of epochs") from None
    if window_s < 30 or (stride_s or window_s) < 30:
        raise SystemExit(f"evaluate.py: --window-s ({window_s}) and --stride-s ({stride_s}) must be at least 30")
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()] if args.datasets else None
    absent = tuple(slot.strip().upper() for slot in args.absent.split(",") if slot.strip())
    if unknown := [slot for slot in absent if slot not in SLOTS]:
        raise SystemExit(f"evaluate.py: --absent {','.join(unknown)}: not a slot (slots: {', '.join(SLOTS)})")

    # the split the run was trained with (data.split_fractions, e.g. the upstream recipe's 0.49/0.21/0.30;
    # data.mesa_holdout, data.resplit_seed)
    selected = select_nights(root, args.split, datasets, data.get("split_fractions"),
                             mesa_holdout=data.get("mesa_holdout"), resplit_seed=data.get("resplit_seed"))
    first_epochs = int(round(window_s / 30)) if args.protocol == "upstream" else None
    scored_epochs = selected["n_epochs"].clip(upper=first_epochs)                   # epochs each night has to score
    if abs(label_lag) >= scored_epochs.min():
        shortest = selected["night_id"][scored_epochs.idxmin()]
        raise SystemExit(f"evaluate.py: --label-lag {label_lag}: |K| must be less than the shortest selected night "
                         f"({shortest}: {scored_epochs.min()} epochs{' in the window' if first_epochs else ''})")

    skipped = []
    nights = stage_all(selected, root, encoder, probe, window_s, stride_s, args.batch_size, args.device, absent,
                       first_epochs, label_lag, skipped)
    if not nights:
        raise SystemExit(f"evaluate.py: none of the {len(selected)} selected nights could be read; the first: "
                         f"{skipped[0]['night_id']}: {skipped[0]['reason']}")
    results = {"pooled": score(nights, args.bootstrap, args.seed), "datasets": {}}
    for name in sorted({n["dataset"] for n in nights}):
        results["datasets"][name] = score([n for n in nights if n["dataset"] == name], args.bootstrap, args.seed)
    results = to_json({**results, "settings": {"protocol": args.protocol, "label_lag": label_lag},
                       "skipped": skipped})

    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    durable.write_atomic(out / "results.json", lambda temp: temp.write_text(json.dumps(results, indent=1) + "\n"))
    for name, table in (("per_night.csv", per_night_table(nights)), ("predictions.csv", predictions_table(nights)),
                        ("sleep_statistics.csv", statistics_table(nights))):
        durable.write_atomic(out / name, lambda temp: table.to_csv(temp, index=False, float_format="%.6g"))
    paper = yaml.safe_load(PAPER_RESULTS.read_text()) if PAPER_RESULTS.exists() else {}
    settings = {"run": args.run, "data.root": root, "split": args.split, "datasets": args.datasets or "all",
                "protocol": args.protocol, "window_s": window_s, "stride_s": stride_s, "label_lag": label_lag,
                "absent": ",".join(absent) or "none", "bootstrap": args.bootstrap, "seed": args.seed}
    report = results_markdown(results, nights, paper, settings, (run_config.get("train") or {}).get("recipe"))
    if skipped:
        report += (f"\nSkipped {len(skipped)} of the {len(selected)} selected nights (not scored, not in any number "
                   f"above):\n\n" + "".join(f"- {s['night_id']}: {s['reason']}\n" for s in skipped))
    durable.write_atomic(out / "results.md", lambda temp: temp.write_text(report))
    figures = write_figures(out, results, nights, args.png_nights)

    print(report)
    for path in figures:
        print(path)
    print(f"wrote {out}/results.json, per_night.csv, predictions.csv, sleep_statistics.csv, results.md")
    for s in skipped:
        print(f"  skipped {s['night_id']}: {s['reason']}")
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
