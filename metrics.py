"""Agreement between two hypnograms: confusion matrix, Cohen's κ, accuracy, F1, AUROC/AUPRC, bootstrap intervals;
and between two scorers' sleep statistics over nights: Bland–Altman bias and 95 % limits of agreement.

Small pure numpy functions over 30-s epochs with classes 0 W, 1 N1, 2 N2, 3 N3, 4 REM (prepare.annotations.STAGES).
The confusion-matrix ones accept a stack [..., K, K], so that the bootstrap evaluates all its resamples at once.
evaluate.py reports them; train_probe.py's validation uses κ and accuracy.
"""
from __future__ import annotations

import warnings

import numpy as np

from prepare.annotations import STAGES

K = len(STAGES)


def confusion_matrix(true, pred, n_classes: int = K) -> np.ndarray:
    """Counts [K, K], rows = truth, columns = prediction. Epochs with true < 0 (unscored) are dropped."""
    true, pred = np.asarray(true, np.int64), np.asarray(pred, np.int64)
    keep = true >= 0
    return np.bincount(true[keep] * n_classes + pred[keep], minlength=n_classes * n_classes).reshape(n_classes, n_classes)


def accuracy(cm: np.ndarray) -> np.ndarray:
    """p_o = Σ_k cm[k, k] / n. NaN for an empty matrix."""
    cm = np.asarray(cm, float)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.trace(cm, axis1=-2, axis2=-1) / cm.sum(axis=(-2, -1))


def kappa(cm: np.ndarray) -> np.ndarray:
    """Cohen's κ = (p_o − p_e) / (1 − p_e), p_o = Σ_k cm[k, k] / n, p_e = Σ_k (row_k / n)(col_k / n): agreement beyond
    what the two marginals give by chance. NaN when p_e = 1 (truth and prediction one and the same single class)."""
    cm = np.asarray(cm, float)
    n = cm.sum(axis=(-2, -1))
    with np.errstate(invalid="ignore", divide="ignore"):
        p_o = np.trace(cm, axis1=-2, axis2=-1) / n
        p_e = (cm.sum(axis=-1) * cm.sum(axis=-2)).sum(axis=-1) / n**2
        return (p_o - p_e) / (1 - p_e)


def f1_per_class(cm: np.ndarray) -> np.ndarray:
    """F1_k = 2 TP / (2 TP + FP + FN) for each class k (one vs rest) [..., K]; NaN (0/0) for a class absent from both
    the truth and the prediction."""
    cm = np.asarray(cm, float)
    tp = np.diagonal(cm, axis1=-2, axis2=-1)
    fn = cm.sum(axis=-1) - tp                     # true k, predicted otherwise
    fp = cm.sum(axis=-2) - tp                     # predicted k, truly otherwise
    with np.errstate(invalid="ignore", divide="ignore"):
        return 2 * tp / (2 * tp + fp + fn)


def macro_f1(cm: np.ndarray) -> np.ndarray:
    """Mean of F1_k over the classes present in the truth or the prediction (the NaN ones are left out)."""
    f1 = f1_per_class(cm)
    present = ~np.isnan(f1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(present, f1, 0).sum(axis=-1) / present.sum(axis=-1)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n of x, tied values sharing the mean of their ranks."""
    values, inverse, counts = np.unique(x, return_inverse=True, return_counts=True)
    first = np.cumsum(counts) - counts + 1                 # rank of the first member of each tie group
    return (first + (counts - 1) / 2)[inverse]


def auroc(scores, positive) -> float:
    """One-vs-rest AUROC = P(score_pos > score_neg) + ½ P(tie), by the Mann-Whitney formula
    (Σ ranks of the positives − n₊(n₊+1)/2) / (n₊ n₋) with average ranks. NaN without positives or negatives."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    n_pos, n_neg = positive.sum(), (~positive).sum()
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    rank_sum = average_ranks(scores)[positive].sum()
    return float((rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(scores, positive) -> float:
    """AUPRC as average precision, Σ_n (R_n − R_{n−1}) P_n over the distinct thresholds t_n taken from the highest
    score down (R_0 = 0), P_n and R_n the precision and recall of "score ≥ t_n". NaN without positives."""
    scores, positive = np.asarray(scores, float), np.asarray(positive, bool)
    if positive.sum() == 0:
        return float("nan")
    order = np.argsort(-scores, kind="stable")
    scores, positive = scores[order], positive[order]
    tp = np.cumsum(positive)                                                   # [n] true positives above each cut
    last = np.r_[np.flatnonzero(np.diff(scores)), len(scores) - 1]             # last index of each distinct score
    precision = tp[last] / (last + 1)
    recall = tp[last] / tp[-1]
    return float(np.sum(np.diff(recall, prepend=0) * precision))


def bootstrap_ci(night_cms: np.ndarray, n_boot: int, seed: int) -> dict:
    """95 % percentile intervals over nights: resample the nights with replacement n_boot times, pool each resample's
    confusion matrices and recompute. night_cms [nights, K, K] -> {metric: [lo, hi]}; per-class F1 as [K, 2]."""
    if n_boot <= 0 or len(night_cms) == 0:
        return {}
    rng = np.random.default_rng(seed)
    n = len(night_cms)
    picks = rng.integers(0, n, size=(n_boot, n))                                           # [B, nights]
    times = np.stack([np.bincount(p, minlength=n) for p in picks])                         # [B, nights] multiplicity
    pooled = np.einsum("bn,nij->bij", times, night_cms.astype(float))                      # [B, K, K]

    def interval(values):                                                                   # [B] or [B, K]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)     # a class absent from every resample: NaN interval
            return np.nanpercentile(values, [2.5, 97.5], axis=0).T                          # [2] or [K, 2]
    return {"kappa": interval(kappa(pooled)), "accuracy": interval(accuracy(pooled)),
            "macro_f1": interval(macro_f1(pooled)), "f1_per_class": interval(f1_per_class(pooled))}


def bland_altman(reference, observed, z: float = 1.96) -> dict:
    """Bland–Altman agreement of paired per-night values (e.g. the technologist's TST and the model's):
    differences d = observed − reference, bias = mean(d), sd = standard deviation of d (n − 1 in the denominator),
    95 % limits of agreement = bias ± z·sd (YASA's SleepStatsAgreement likewise). Pairs with a None/NaN on either
    side (a REM latency without REM) are left out; n counts the pairs used. bias is NaN without a pair, sd and the
    limits with fewer than two. Also the means of both sides over those pairs."""
    reference = np.array([np.nan if v is None else v for v in reference], float)
    observed = np.array([np.nan if v is None else v for v in observed], float)
    paired = ~np.isnan(reference) & ~np.isnan(observed)
    reference, observed = reference[paired], observed[paired]                  # [n]
    d = observed - reference
    n = len(d)
    bias = float(d.mean()) if n else float("nan")
    sd = float(d.std(ddof=1)) if n > 1 else float("nan")
    return {"n": n, "bias": bias, "sd": sd, "loa": [bias - z * sd, bias + z * sd],
            "mean_reference": float(reference.mean()) if n else float("nan"),
            "mean_observed": float(observed.mean()) if n else float("nan")}
