"""Plain-numpy metrics shared by every protocol: ROC, TPR at FPR, k-fold verification accuracy,
CMC / mAP. Hand-made (not sklearn) because sklearn is only a dev dependency and because the
protocols need streaming variants (`TopScores`) that sklearn does not have.

Convention for every threshold below: a pair is predicted "same" when ``score >= threshold``
(higher score = more similar), as in ``sklearn.metrics.roc_curve``.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple

import numpy as np

DEFAULT_FPRS: Tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def _check_pairs(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    labels = np.asarray(labels).astype(bool, copy=False).ravel()
    scores = np.asarray(scores).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores must have the same length; got {labels.size} labels "
                         f"and {scores.size} scores")
    if not np.isfinite(scores).all():
        bad = int(np.flatnonzero(~np.isfinite(scores))[0])
        raise ValueError(f"score {bad} is {scores[bad]} (not finite): check the features for "
                         "NaN/inf rows (an all-zero image gives a zero-norm embedding)")
    return labels, scores


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC from one sort: (fpr, tpr, thresholds), thresholds decreasing, one point per distinct
    score plus the (0, 0) start with threshold +inf (sklearn's roc_curve with
    ``drop_intermediate=False``). labels[N] bool, scores[N] float."""
    labels, scores = _check_pairs(labels, scores)
    n_pos = int(labels.sum())
    n_neg = labels.size - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError(f"a ROC needs both classes; got {n_pos} genuine and {n_neg} impostor "
                         "pairs")
    s, y = _sort_desc_with_labels(scores, labels)
    # Last index of each run of equal scores: that is where the threshold `>= s` stops.
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tps = np.cumsum(y, dtype=np.int64)[last]
    fps = (last + 1) - tps
    tpr = np.r_[0.0, tps / n_pos]
    fpr = np.r_[0.0, fps / n_neg]
    thr = np.r_[np.inf, s[last].astype(np.float64)]
    return fpr, tpr, thr


def _sort_desc_with_labels(scores: np.ndarray, labels: np.ndarray
                           ) -> Tuple[np.ndarray, np.ndarray]:
    """Scores sorted decreasingly with their labels. Hand-made because np.argsort of 15M floats
    takes seconds while np.sort of integers is SIMD-fast: each float32 is mapped to an
    order-preserving uint32, the label is packed into the low bit of a uint64, one sort."""
    if scores.dtype != np.float32:                  # keep float64 exact: a plain argsort
        order = np.argsort(scores)[::-1]
        return scores[order].astype(np.float64), labels[order]
    f = np.ascontiguousarray(scores)
    bits = f.view(np.uint32)
    flip = np.where(bits >> 31, np.uint32(0xFFFFFFFF), np.uint32(0x80000000))
    key = ((bits ^ flip).astype(np.uint64) << np.uint64(1)) | labels.astype(np.uint64)
    key = np.sort(key)[::-1]
    y = (key & np.uint64(1)).astype(bool)
    ub = (key >> np.uint64(1)).astype(np.uint32)
    back = np.where(ub >> 31, np.uint32(0x80000000), np.uint32(0xFFFFFFFF))
    return (ub ^ back).view(np.float32), y


FPR_RULES: Tuple[str, ...] = ("le", "nearest")
UNRESOLVED = "n/a (needs >= 1/FPR impostor pairs)"


def resolvable(target: float, n_neg: int) -> bool:
    """Whether `n_neg` impostor pairs can measure FPR `target`: one false accept must be
    <= target of them. Below that the 'TPR' is really TPR at FPR 0, so we report None (n/a)."""
    return target * n_neg >= 1.0 - 1e-9


def _check_rule(rule: str) -> None:
    if rule not in FPR_RULES:
        raise ValueError(f"fpr rule must be one of {', '.join(FPR_RULES)}; got {rule!r}")


def tpr_at_fpr_from_roc(fpr: np.ndarray, tpr: np.ndarray,
                        targets: Sequence[float] = DEFAULT_FPRS, n_neg: Optional[int] = None,
                        rule: str = "le") -> Dict[str, Optional[float]]:
    """TPR at each FPR target from a `roc_curve` ROC; keys like "1e-04".

    rule "le": the LARGEST TPR whose FPR is <= the target (no interpolation; conservative).
    rule "nearest": InsightFace's IJB-C rule, the ROC point whose FPR is nearest the target
    (may lie above it), on sklearn's default ROC (collinear points dropped), ties to the later
    point. With `n_neg` (impostor count), targets it cannot resolve give None.
    """
    _check_rule(rule)
    if rule == "nearest":
        fpr, tpr = _drop_collinear(np.asarray(fpr), np.asarray(tpr))
    out: Dict[str, Optional[float]] = {}
    for t in targets:
        if n_neg is not None and not resolvable(t, n_neg):
            out[_fpr_key(t)] = None
        elif rule == "le":
            ok = fpr <= t
            out[_fpr_key(t)] = float(tpr[ok].max()) if ok.any() else 0.0
        else:
            d = np.abs(fpr - t)[::-1]                      # reversed: ties go to the later point
            out[_fpr_key(t)] = float(tpr[fpr.size - 1 - int(np.argmin(d))])
    return out


def _drop_collinear(fpr: np.ndarray, tpr: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """sklearn's roc_curve(drop_intermediate=True) points from our full ROC (whose first point
    is the prepended (0, 0)): inner points where the curve does not turn are dropped."""
    f, t = fpr[1:], tpr[1:]
    if f.size <= 2:
        return fpr, tpr
    turn = (np.abs(np.diff(f, 2)) > 1e-12) | (np.abs(np.diff(t, 2)) > 1e-12)
    keep = np.r_[True, turn, True]
    return np.r_[fpr[:1], f[keep]], np.r_[tpr[:1], t[keep]]


def tpr_at_fpr(labels: np.ndarray, scores: np.ndarray,
               targets: Sequence[float] = DEFAULT_FPRS, rule: str = "le"
               ) -> Dict[str, Optional[float]]:
    """TPR at FPR targets without a full sort (np.partition on the impostor scores only); equals
    ``tpr_at_fpr_from_roc(*roc_curve(labels, scores)[:2], n_neg=impostors)`` for rule "le"."""
    labels, scores = _check_pairs(labels, scores)
    neg = scores[~labels]
    pos = scores[labels]
    return tpr_at_fpr_split(pos, neg, targets, rule=rule)


def tpr_at_fpr_split(pos: np.ndarray, neg: np.ndarray,
                     targets: Sequence[float] = DEFAULT_FPRS, n_neg: int | None = None,
                     rule: str = "le") -> Dict[str, Optional[float]]:
    """TPR at FPR targets from genuine scores `pos` and impostor scores `neg`; None where the
    N impostors cannot resolve the target (N * target < 1).

    rule "le": with k = floor(target * N) false accepts allowed, the best threshold lies just
    above the (k+1)-th largest impostor score v, so TPR = mean(pos > v). rule "nearest": the
    reachable false-accept count nearest target * N (ties: the larger), at its highest TPR.
    `neg` may hold only the largest impostor scores (see `TopScores`) when `n_neg` gives N.
    """
    _check_rule(rule)
    n_neg = int(neg.size if n_neg is None else n_neg)
    if pos.size == 0 or n_neg == 0:
        raise ValueError(f"TPR@FPR needs genuine and impostor pairs; got {pos.size} and {n_neg}")
    neg_sorted = np.sort(np.asarray(neg, dtype=np.float64))[::-1]
    out: Dict[str, Optional[float]] = {}
    for t in targets:
        if not resolvable(t, n_neg):
            out[_fpr_key(t)] = None
            continue
        k = int(np.floor(t * n_neg * (1 + 1e-12)))
        if rule == "nearest" and k < n_neg:
            k = _nearest_count(neg_sorted, k, t * n_neg)
        if k >= n_neg:
            out[_fpr_key(t)] = 1.0
            continue
        if k >= neg_sorted.size:
            raise ValueError(f"FPR {t:g} needs the {k + 1} largest impostor scores; only "
                             f"{neg_sorted.size} were kept")
        out[_fpr_key(t)] = float(np.mean(pos > neg_sorted[k]))
    return out


def _nearest_count(neg_sorted: np.ndarray, k: int, want: float) -> int:
    """Of the false-accept counts a threshold can reach around k (ties in the impostor scores
    make some unreachable), the one nearest `want`; ties go to the larger count."""
    if k >= neg_sorted.size:
        return k                                   # the caller reports the missing scores
    v = neg_sorted[k]
    below = int(np.sum(neg_sorted > v))            # reachable: threshold just above v
    above = int(np.sum(neg_sorted >= v))           # reachable: threshold at v (when the run
    # of v ends among the kept scores; else the caller reports that more are needed)
    return above if abs(above - want) <= abs(below - want) else below


class TopScores:
    """Keeps the `k` largest values seen over many blocks (streamed impostor scores) in O(k)
    memory: each block only contributes the values above the current k-th largest."""

    def __init__(self, k: int) -> None:
        self.k = int(k)
        self.values = np.empty(0, dtype=np.float32)
        self.count = 0

    def add(self, block: np.ndarray) -> None:
        block = np.asarray(block, dtype=np.float32).ravel()
        self.count += block.size
        if self.k <= 0:
            return
        if self.values.size >= self.k:
            block = block[block > self.values.min()]
        vals = np.concatenate([self.values, block])
        if vals.size > self.k:
            vals = np.partition(vals, vals.size - self.k)[vals.size - self.k:]
        self.values = vals


def _fpr_key(t: float) -> str:
    return f"{t:.0e}"


def verification_kfold(scores: np.ndarray, labels: np.ndarray, n_folds: int = 10
                       ) -> Dict[str, object]:
    """LFW-style accuracy: folds in pair order without shuffling (sklearn KFold layout); on each
    fold the threshold with the best accuracy on the other folds is applied. The threshold is
    searched exactly over the midpoints between sorted training scores (InsightFace uses a
    0.01 grid on squared L2 distance instead; the exact search can only do as well or better
    on the training folds). Returns mean/std accuracy, the per-fold accuracies and thresholds."""
    labels, scores = _check_pairs(labels, scores)
    n = scores.size
    if n < n_folds:
        raise ValueError(f"{n_folds}-fold verification needs at least {n_folds} pairs; got {n}")
    sizes = np.full(n_folds, n // n_folds)
    sizes[: n % n_folds] += 1
    bounds = np.r_[0, np.cumsum(sizes)]
    accs, thrs = [], []
    for f in range(n_folds):
        test = np.zeros(n, dtype=bool)
        test[bounds[f]:bounds[f + 1]] = True
        thr = best_threshold(scores[~test], labels[~test])
        accs.append(float(np.mean((scores[test] >= thr) == labels[test])))
        thrs.append(thr)
    return {"accuracy_mean": float(np.mean(accs)), "accuracy_std": float(np.std(accs)),
            "fold_accuracy": accs, "fold_threshold": thrs}


def best_threshold(scores: np.ndarray, labels: np.ndarray) -> float:
    """Threshold maximising accuracy of ``score >= thr``; ties go to the smallest threshold.
    Candidates: below every score, and each midpoint between consecutive distinct scores."""
    order = np.argsort(scores, kind="stable")
    s, y = scores[order].astype(np.float64), labels[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])          # end of each equal-score run
    # threshold just above run r: everything up to last[r] is predicted "different"
    neg_below = np.r_[0, np.cumsum(~y)[last]]                     # correct rejections
    pos_above = int(y.sum()) - np.r_[0, np.cumsum(y)[last]]       # correct accepts
    correct = neg_below + pos_above
    best = int(np.argmax(correct))
    cand = np.r_[s[0] - 1.0, (s[last][:-1] + s[last][1:]) / 2, s[-1] + 1.0]
    return float(cand[best])


def cmc_map_from_ranks(match: np.ndarray, valid: np.ndarray, ranks: Sequence[int] = (1, 5, 10)
                       ) -> Dict[str, float]:
    """CMC and mAP from per-query sorted match flags: match[Q, G] bool (gallery sorted by
    decreasing similarity), valid[Q, G] bool (False = excluded gallery entry). Queries without any
    valid match are skipped (Market-1501 convention) and counted."""
    out: Dict[str, float] = {}
    hits_rank, aps = [], []
    for m, v in zip(match, valid):
        m = m[v]
        if not m.any():
            continue
        pos = np.flatnonzero(m)
        hits_rank.append(pos[0])
        aps.append(float(np.mean(np.arange(1, pos.size + 1) / (pos + 1))))
    if not aps:
        raise ValueError("no query has a valid gallery match: check the ids/cameras in the folders")
    hits_rank = np.asarray(hits_rank)
    for r in ranks:
        out[f"rank{r}"] = float(np.mean(hits_rank < r))
    out["mAP"] = float(np.mean(aps))
    out["queries_scored"] = len(aps)
    out["queries_skipped"] = int(len(match) - len(aps))
    return out
