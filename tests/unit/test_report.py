"""The main job's report: Table-4-shaped summary with paired differences, markdown/JSON,
angular variance and ROC plots, all from plain dicts/arrays."""
from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import report

BASE = {0: {"verification_acc": 0.90, "ijbc_tpr@1e-3": 0.50, "ijbc_tpr@1e-4": 0.30,
            "megaface_rank1": 0.70},
        1: {"verification_acc": 0.91, "ijbc_tpr@1e-3": 0.52, "ijbc_tpr@1e-4": 0.31,
            "megaface_rank1": 0.71},
        2: {"verification_acc": 0.92, "ijbc_tpr@1e-3": 0.51, "ijbc_tpr@1e-4": 0.29,
            "megaface_rank1": 0.69}}
GAIN = {0: 0.0025, 1: 0.0012, 2: 0.0010}


def _results():
    leap = {s: {k: v + GAIN[s] for k, v in r.items()} for s, r in BASE.items()}
    leap[3] = dict(BASE[0])                              # a seed the baseline did not run
    vanilla = {0: {"verification_acc": 0.905}}           # one seed, one metric
    return {"CosFace baseline": BASE, "LEAP full": leap, "LEAP vanilla": vanilla}


def test_paired_differences_and_spread():
    s = report.summarize(_results(), "CosFace baseline")
    assert list(s["methods"]) == ["CosFace baseline", "LEAP full", "LEAP vanilla"]
    base = s["methods"]["CosFace baseline"]["verification_acc"]
    assert base["mean"] == pytest.approx(91.0) and base["std"] == pytest.approx(1.0)
    d = s["methods"]["LEAP full"]["ijbc_tpr@1e-3"]["diff"]
    assert d["per_seed"] == pytest.approx({0: 0.25, 1: 0.12, 2: 0.10})
    assert d["mean"] == pytest.approx(np.mean([0.25, 0.12, 0.10]))
    assert d["std"] == pytest.approx(np.std([0.25, 0.12, 0.10], ddof=1))
    assert d["positive"] == 3 and d["unpaired_seeds"] == [3]
    v = s["methods"]["LEAP vanilla"]
    assert v["verification_acc"]["diff"]["per_seed"] == pytest.approx({0: 0.5})
    assert v["verification_acc"]["diff"]["std"] is None and v["megaface_rank1"]["n"] == 0


def test_unknown_baseline_is_an_error_naming_methods():
    with pytest.raises(KeyError, match="CosFace baseline"):
        report.summarize(_results(), "ArcFace")


def test_markdown_and_json(tmp_path):
    s = report.summarize(_results(), "CosFace baseline")
    md, js = report.write_report(s, tmp_path / "r", title="Glyphs <H200,S4>",
                                 extra={"variance": {"tail_mean": float("nan")}})
    text = md.read_text()
    assert "## Glyphs <H200,S4>" in text
    assert "| CosFace baseline | 3 | 91.00 ± 1.00 |" in text
    assert "+0.16 ± 0.08 [+0.25/+0.12/+0.10]" in text
    assert "n/a (no paired seed)" in text               # vanilla has no rank-1
    data = json.loads(js.read_text())
    assert data["baseline"] == "CosFace baseline"
    assert data["extra"]["variance"]["tail_mean"] is None
    assert data["methods"]["LEAP full"]["ijbc_tpr@1e-3"]["diff"]["per_seed"]["0"] == \
        pytest.approx(0.25)


def _ring(angles_deg):
    a = np.deg2rad(np.asarray(angles_deg, float))
    return np.stack([np.cos(a), np.sin(a), np.zeros_like(a)], axis=1) * 3.0   # unnormalised


def test_class_angular_variance_matches_hand_computation():
    a = np.deg2rad(10.0)
    feats = np.concatenate([_ring([-10, 0, 10]), _ring([90, 90]), _ring([45])])
    labels = np.array([0, 0, 0, 1, 1, 2])
    var = report.class_angular_variance(feats, labels, 4)
    assert var[0] == pytest.approx(np.var([a, 0.0, a]), rel=1e-6)
    assert var[1] == pytest.approx(0.0, abs=1e-12)
    assert np.isnan(var[2]) and np.isnan(var[3])         # 1 sample / none


def test_equal_count_subsampling_uses_that_many_samples():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(40, 8)) + np.array([4.0] + [0] * 7)
    labels = np.zeros(40, np.int64)
    sub = report.class_angular_variance(feats, labels, 1, per_class=4,
                                        rng=np.random.default_rng(5))
    idx = np.sort(np.random.default_rng(5).choice(np.arange(40), 4, replace=False))
    ref = report.class_angular_variance(feats[idx], labels[idx], 1)
    assert sub[0] == pytest.approx(ref[0])
    # Averaged over draws, 4-sample estimates sit below the full-class one (the probe's effect).
    draws = [report.class_angular_variance(feats, labels, 1, 4, np.random.default_rng(s))[0]
             for s in range(50)]
    assert np.mean(draws) < report.class_angular_variance(feats, labels, 1)[0]


def _state(head_var, tail_var):
    rng = np.random.default_rng(1)
    n_head, n_tail = 20, 60
    v = np.concatenate([rng.normal(head_var, 0.001, n_head), rng.normal(tail_var, 0.001, n_tail)])
    counts = np.concatenate([np.full(n_head, 25), np.full(n_tail, 4)])
    head = counts > 4
    return {"variance": v, "counts": counts, "head_mask": head,
            "head_equal": np.where(head, v * 0.5, np.nan)}


def test_angular_variance_plot_and_summary(tmp_path):
    states = {"CosFace": _state(0.018, 0.010), "LEAP": _state(0.017, 0.013)}
    states["CosFace"]["variance"][-1] = np.nan           # a class without 2 samples
    out = tmp_path / "plots" / "variance.png"
    summ = report.plot_angular_variance(states, out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert summ["CosFace"]["head_mean"] == pytest.approx(0.018, abs=5e-4)
    assert summ["LEAP"]["tail_mean"] == pytest.approx(0.013, abs=5e-4)
    assert summ["CosFace"]["head_equal_count_mean"] == pytest.approx(0.009, abs=5e-4)
    assert summ["CosFace"]["n_head"] == 20 and summ["CosFace"]["n_tail"] == 60


def test_metrics_from_eval_results():
    got = report.metrics_from_eval(
        verification={"accuracy_mean": 0.97, "accuracy_std": 0.01, "tpr_at_fpr": {"1e-03": 0.8}},
        ijbc={"tpr_at_fpr": {"1e-04": 0.61, "1e-03": 0.74, "1e-02": 0.9}},
        megaface={"rank1": 0.83, "rank5": 0.9})
    assert got == {"verification_acc": 0.97, "verification_tpr@1e-3": 0.8, "ijbc_tpr@1e-3": 0.74,
                   "ijbc_tpr@1e-4": 0.61, "megaface_rank1": 0.83}
    assert set(got) == {m.key for m in report.DEFAULT_METRICS}
    assert report.metrics_from_eval(ijbc={"tpr_at_fpr": {"1e-03": 0.5}}) == {"ijbc_tpr@1e-3": 0.5}
    # None: an FPR the impostor pairs cannot resolve (JSON null) is left out, shown as n/a
    assert report.metrics_from_eval(
        verification={"tpr_at_fpr": {"1e-03": None}},
        ijbc={"tpr_at_fpr": {"1e-03": 0.5, "1e-04": None}}) == {"ijbc_tpr@1e-3": 0.5}
