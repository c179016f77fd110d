"""Metrics against simple references: sklearn's ROC, brute-force threshold search, sorting."""
from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import roc_curve as sk_roc
from sklearn.model_selection import KFold

from facetrain.eval import metrics


def _data(seed=0, n=3000, ties=True):
    rng = np.random.default_rng(seed)
    y = rng.random(n) < 0.3
    s = rng.normal(size=n) + 1.5 * y
    return y, (np.round(s, 1) if ties else s)


@pytest.mark.parametrize("ties,dtype", [(True, np.float64), (False, np.float64),
                                        (True, np.float32), (False, np.float32)])
def test_roc_matches_sklearn(ties, dtype):
    y, s = _data(ties=ties)
    s = s.astype(dtype)
    s[:5] = [-0.0, 0.0, -3.5, np.float32(7.25), -1e-30]          # signed zeros, extremes
    fpr, tpr, thr = metrics.roc_curve(y, s)
    f2, t2, th2 = sk_roc(y, s, drop_intermediate=False)
    np.testing.assert_allclose(fpr, f2)
    np.testing.assert_allclose(tpr, t2)
    np.testing.assert_allclose(thr[1:], th2[1:])


def _brute_tpr_at_fpr(y, s, target):
    best = 0.0
    for t in np.r_[np.unique(s), np.inf]:
        pred = s >= t
        if np.mean(pred[~y]) <= target:
            best = max(best, np.mean(pred[y]))
    return best


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tpr_at_fpr_is_largest_tpr_with_fpr_at_most_target(seed):
    y, s = _data(seed, n=1500)
    targets = (1e-4, 1e-3, 5e-3, 1e-2, 0.1, 0.5)
    fpr, tpr, _ = metrics.roc_curve(y, s)
    n_neg = int((~y).sum())
    a = metrics.tpr_at_fpr_from_roc(fpr, tpr, targets)
    b = metrics.tpr_at_fpr(y, s, targets)
    c = metrics.tpr_at_fpr_from_roc(fpr, tpr, targets, n_neg=n_neg)
    for t in targets:
        ref = _brute_tpr_at_fpr(y, s, t)
        assert a[f"{t:.0e}"] == pytest.approx(ref)
        if t * n_neg < 1:            # one false accept is already above t: not measurable
            assert b[f"{t:.0e}"] is None and c[f"{t:.0e}"] is None
        else:
            assert b[f"{t:.0e}"] == pytest.approx(ref) and c[f"{t:.0e}"] == pytest.approx(ref)


def test_top_scores_streaming_equals_sorting():
    rng = np.random.default_rng(3)
    data = np.round(rng.normal(size=10000), 2).astype(np.float32)    # many ties
    top = metrics.TopScores(37)
    for block in np.array_split(data, 13):
        top.add(block if top.values.size < top.k else block[block > top.values.min()])
    np.testing.assert_array_equal(np.sort(top.values), np.sort(data)[-37:])
    pos = rng.normal(size=200) + 2
    full = metrics.tpr_at_fpr_split(pos, data, (1e-3, 3e-3))
    streamed = metrics.tpr_at_fpr_split(pos, top.values, (1e-3, 3e-3), n_neg=data.size)
    assert full == streamed


def test_best_threshold_is_brute_force_optimum():
    y, s = _data(4, n=400)
    thr = metrics.best_threshold(s, y)
    cands = np.r_[s.min() - 1, np.unique(s), s.max() + 1]
    best = max(np.mean((s >= t) == y) for t in cands)
    assert np.mean((s >= thr) == y) == pytest.approx(best)


def test_kfold_matches_reference_loop():
    y, s = _data(5, n=605)
    res = metrics.verification_kfold(s, y, 10)
    accs = []
    for tr, te in KFold(10, shuffle=False).split(s):
        cands = np.r_[s[tr].min() - 1, np.unique(s[tr]), s[tr].max() + 1]
        acc_tr = [np.mean((s[tr] >= t) == y[tr]) for t in cands]
        # any threshold in the winning gap gives the same training accuracy: compare test acc
        # of the library's threshold with its own training accuracy being optimal
        accs.append(np.mean((s[te] >= res["fold_threshold"][len(accs)]) == y[te]))
        assert np.mean((s[tr] >= res["fold_threshold"][len(accs) - 1]) == y[tr]) == \
            pytest.approx(max(acc_tr))
    assert res["fold_accuracy"] == pytest.approx(accs)
    assert res["accuracy_mean"] == pytest.approx(np.mean(accs))
    assert res["accuracy_std"] == pytest.approx(np.std(accs))


def test_perfect_separation_gives_full_accuracy():
    y = np.tile([True, False], 50)
    s = np.where(y, 0.9, 0.1)
    assert metrics.verification_kfold(s, y)["accuracy_mean"] == 1.0
    assert metrics.tpr_at_fpr(y, s, (0.1,))["1e-01"] == 1.0
    assert metrics.tpr_at_fpr(y, s, (1e-6,))["1e-06"] is None      # 50 impostors: n/a


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="not finite"):
        metrics.roc_curve(np.array([1, 0]), np.array([np.nan, 0.1]))
    with pytest.raises(ValueError, match="same length"):
        metrics.roc_curve(np.array([1, 0, 1]), np.array([0.2, 0.1]))
    with pytest.raises(ValueError, match="both classes"):
        metrics.roc_curve(np.array([1, 1]), np.array([0.2, 0.1]))


def test_cmc_map_against_hand_computed_case():
    # query 0: matches at sorted positions 1 and 3 -> AP = (1/2 + 2/4) / 2, rank-1 miss, rank-5 hit
    match = np.array([[0, 1, 0, 1, 0], [1, 0, 0, 0, 0], [0, 0, 0, 0, 0]], dtype=bool)
    valid = np.ones_like(match)
    valid[1, 0] = False                                         # excluded -> no match left
    res = metrics.cmc_map_from_ranks(match, valid, (1, 5))
    assert res["queries_scored"] == 1 and res["queries_skipped"] == 2
    assert res["mAP"] == pytest.approx(0.5)
    assert res["rank1"] == 0.0 and res["rank5"] == 1.0


def _insightface_nearest(y, s, target):
    """InsightFace's IJB-C rule, literally: sklearn's default ROC, flipped, nearest FPR."""
    fpr, tpr, _ = sk_roc(y, s)
    fpr, tpr = np.flipud(fpr), np.flipud(tpr)
    return tpr[np.argmin(np.abs(fpr - target))]


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nearest_rule_reproduces_insightface(seed):
    y, s = _data(seed, n=1500)
    s = np.round(s, 2)                                    # ties: collinear ROC points
    n_neg = int((~y).sum())
    targets = (1e-3, 5e-3, 1e-2, 0.1, 0.5)
    fpr, tpr, _ = metrics.roc_curve(y, s)
    got = metrics.tpr_at_fpr_from_roc(fpr, tpr, targets, n_neg=n_neg, rule="nearest")
    for t in targets:
        assert got[f"{t:.0e}"] == pytest.approx(_insightface_nearest(y, s, t)), t
    # the streamed form: the reachable false-accept count nearest t * N, at its best TPR
    split = metrics.tpr_at_fpr_split(s[y], s[~y], targets, rule="nearest")
    neg = np.sort(s[~y])[::-1]
    for t in targets:
        counts = np.r_[0, np.flatnonzero(np.r_[neg[1:] != neg[:-1], True]) + 1]
        c = counts[::-1][np.argmin(np.abs(counts[::-1] - t * n_neg))]
        ref = 1.0 if c == n_neg else np.mean(s[y] > neg[c])
        assert split[f"{t:.0e}"] == pytest.approx(ref), t
    with pytest.raises(ValueError, match="fpr rule"):
        metrics.tpr_at_fpr(y, s, (0.1,), rule="closest")
