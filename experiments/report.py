"""The main job's report: a Table-4-shaped comparison of runs, head-vs-tail angular variance
plots (the LEAP paper's Fig. 1-3) and ROC curves.

Inputs are plain dicts and arrays, so every function runs without training:
- results[method][seed][metric key] = value (fractions, e.g. accuracy 0.9712; shown as percent);
- per-class angular variance arrays with class counts and a head mask;
- ROC curves as (fpr, tpr) arrays.
Paired differences: a method's value minus the baseline's at the same seed (same data order and
initialisation), so seed-to-seed noise shared by both runs cancels; their spread over seeds says
how much of a gain is noise. To compare LEAP against a control rather than the baseline, call
`summarize` again with the control as `baseline`.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import numpy as np


@dataclass(frozen=True)
class Metric:
    """A reported column: `key` in the results dicts, `label` for the table; `scale` maps the
    stored value to the shown one (fractions -> percent points)."""

    key: str
    label: str
    scale: float = 100.0


DEFAULT_METRICS: Tuple[Metric, ...] = (
    Metric("verification_acc", "Verification acc. (%)"),
    Metric("verification_tpr@1e-3", "Verification TPR@FPR=1e-3 (%)"),
    Metric("ijbc_tpr@1e-3", "IJB-C TPR@FPR=1e-3 (%)"),
    Metric("ijbc_tpr@1e-4", "IJB-C TPR@FPR=1e-4 (%)"),
    Metric("megaface_rank1", "MegaFace rank-1 (%)"),
)
Results = Mapping[str, Mapping[int, Mapping[str, float]]]


def metrics_from_eval(verification: Optional[Mapping] = None, ijbc: Optional[Mapping] = None,
                      megaface: Optional[Mapping] = None) -> Dict[str, float]:
    """One run's DEFAULT_METRICS values from the facetrain.eval results: verification
    (`accuracy_mean`), IJB-C 1:1 (`tpr_at_fpr` keyed "1e-03"/"1e-04") and MegaFace (`rank1`).
    Missing evaluations or keys, and None values (an FPR too small for the impostor count), are
    left out (the table shows n/a)."""
    out: Dict[str, float] = {}
    if verification and "accuracy_mean" in verification:
        out["verification_acc"] = float(verification["accuracy_mean"])
    if verification and (verification.get("tpr_at_fpr") or {}).get("1e-03") is not None:
        out["verification_tpr@1e-3"] = float(verification["tpr_at_fpr"]["1e-03"])
    tpr = (ijbc or {}).get("tpr_at_fpr", {})
    for fpr in ("1e-03", "1e-04"):
        if tpr.get(fpr) is not None:              # None: too few impostor pairs (n/a)
            out[f"ijbc_tpr@{fpr.replace('-0', '-')}"] = float(tpr[fpr])
    if megaface and "rank1" in megaface:
        out["megaface_rank1"] = float(megaface["rank1"])
    return out


def _stats(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """mean, sample std (None below 2 values), min, max, n of a list of numbers."""
    v = np.asarray(values, dtype=np.float64)
    if v.size == 0:
        return {"n": 0, "mean": None, "std": None, "min": None, "max": None}
    return {"n": int(v.size), "mean": float(v.mean()),
            "std": float(v.std(ddof=1)) if v.size > 1 else None,
            "min": float(v.min()), "max": float(v.max())}


def summarize(results: Results, baseline: str,
              metrics: Sequence[Metric] = DEFAULT_METRICS) -> Dict[str, object]:
    """Per method and metric: shown values per seed, their mean/std, and (for non-baseline
    methods) the paired differences to `baseline` over the seeds both ran, in points."""
    if baseline not in results:
        raise KeyError(f"baseline {baseline!r} is not among the methods "
                       f"{sorted(results)}; pass one of them as baseline")
    order = [baseline] + [m for m in results if m != baseline]
    methods: Dict[str, Dict] = {}
    for name in order:
        per_metric = {}
        for met in metrics:
            seeds = {int(s): float(r[met.key]) * met.scale for s, r in results[name].items()
                     if met.key in r and r[met.key] is not None}
            entry: Dict[str, object] = {"per_seed": seeds, **_stats(list(seeds.values()))}
            if name != baseline:
                base = {int(s): float(r[met.key]) * met.scale
                        for s, r in results[baseline].items()
                        if met.key in r and r[met.key] is not None}
                paired = sorted(set(seeds) & set(base))
                diffs = {s: seeds[s] - base[s] for s in paired}
                entry["diff"] = {"per_seed": diffs, **_stats(list(diffs.values())),
                                 "positive": sum(1 for d in diffs.values() if d > 0),
                                 "unpaired_seeds": sorted(set(seeds) - set(base))}
            per_metric[met.key] = entry
        methods[name] = per_metric
    return {"baseline": baseline, "metrics": [met.__dict__ for met in metrics],
            "methods": methods}


def _cell(entry: Mapping, digits: int = 2) -> str:
    if entry["mean"] is None:
        return "n/a"
    std = "" if entry["std"] is None else f" ± {entry['std']:.{digits}f}"
    return f"{entry['mean']:.{digits}f}{std}"


def _diff_cell(diff: Mapping, digits: int = 2) -> str:
    if diff["mean"] is None:
        return "n/a (no paired seed)"
    std = "" if diff["std"] is None else f" ± {diff['std']:.{digits}f}"
    seeds = "/".join(f"{d:+.{digits}f}" for _, d in sorted(diff["per_seed"].items()))
    return f"{diff['mean']:+.{digits}f}{std} [{seeds}]"


def format_markdown(summary: Mapping, title: str = "Results") -> str:
    """Two markdown tables: mean ± std over seeds per method, then paired differences to the
    baseline (mean ± std over seeds, then each seed's difference, in points)."""
    metrics = [Metric(**m) for m in summary["metrics"]]
    methods = summary["methods"]
    head = "| method | seeds | " + " | ".join(m.label for m in metrics) + " |"
    rule = "|---|---|" + "---|" * len(metrics)
    lines = [f"## {title}", "", head, rule]
    for name, per in methods.items():
        n = max(per[m.key]["n"] for m in metrics) if metrics else 0
        lines.append(f"| {name} | {n} | " + " | ".join(_cell(per[m.key]) for m in metrics)
                     + " |")
    others = [name for name in methods if name != summary["baseline"]]
    if others:
        lines += ["", f"Paired difference to {summary['baseline']} (points; mean ± std over "
                      "seeds [per seed]):", "",
                  "| method | " + " | ".join(m.label for m in metrics) + " |",
                  "|---|" + "---|" * len(metrics)]
        for name in others:
            lines.append(f"| {name} | " + " | ".join(_diff_cell(methods[name][m.key]["diff"])
                                                      for m in metrics) + " |")
    return "\n".join(lines) + "\n"


def jsonable(obj):
    """Plain JSON: numpy scalars to Python, NaN/inf to None, int dict keys to strings."""
    if isinstance(obj, Mapping):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return jsonable(obj.tolist())
    if isinstance(obj, (np.floating, float)):
        return float(obj) if math.isfinite(float(obj)) else None
    if isinstance(obj, np.integer):
        return int(obj)
    return obj


def write_report(summary: Mapping, out_dir: str | Path, stem: str = "results",
                 title: str = "Results", extra: Optional[Mapping] = None) -> Tuple[Path, Path]:
    """Write `<stem>.md` (the tables) and `<stem>.json` (summary plus `extra`, e.g. settings and
    the variance summary) into out_dir; returns both paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    md, js = out / f"{stem}.md", out / f"{stem}.json"
    md.write_text(format_markdown(summary, title), encoding="utf-8")
    payload = dict(summary)
    if extra:
        payload["extra"] = dict(extra)
    js.write_text(json.dumps(jsonable(payload), indent=1) + "\n", encoding="utf-8")
    return md, js


# --- head vs tail angular variance (paper Fig. 1-3) ---------------------------------------

def class_angular_variance(features: np.ndarray, labels: np.ndarray, num_classes: int,
                           per_class: Optional[int] = None,
                           rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """Per class, the variance of the angles between its L2-normalised features [N, D] and
    their normalised mean direction -> [num_classes] float64 (NaN below 2 samples).

    With `per_class`, each class with more samples is first subsampled (rng) to that many, so a
    head class is measured at a tail class's sample count: a variance estimated from 4 samples
    around their own mean is smaller than one from 40, whatever the true spread."""
    f = features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)
    out = np.full(num_classes, np.nan)
    order = np.argsort(labels, kind="stable")
    bounds = np.searchsorted(labels[order], np.arange(num_classes + 1))
    for c in range(num_classes):
        idx = order[bounds[c]:bounds[c + 1]]
        if per_class is not None and idx.size > per_class:
            idx = np.sort((rng or np.random.default_rng(0)).choice(idx, per_class, replace=False))
        if idx.size < 2:
            continue
        centre = f[idx].mean(axis=0)
        centre /= max(float(np.linalg.norm(centre)), 1e-12)
        # Clamp: rounding can push a cosine just past 1, where arccos is NaN.
        angles = np.arccos(np.clip(f[idx] @ centre, -1.0, 1.0))
        out[c] = float(angles.var())
    return out


def variance_summary(variance: np.ndarray, head_mask: np.ndarray,
                     head_equal: Optional[np.ndarray] = None) -> Dict[str, Optional[float]]:
    """Mean angular variance of head and tail classes (NaNs ignored), and of the head classes
    measured at the tail's sample count when `head_equal` ([C] or [n_head]) is given."""
    v, head = np.asarray(variance, np.float64), np.asarray(head_mask, bool)

    def mean(x):
        x = x[np.isfinite(x)]
        return float(x.mean()) if x.size else None
    out = {"head_mean": mean(v[head]), "tail_mean": mean(v[~head]),
           "n_head": int(head.sum()), "n_tail": int((~head).sum())}
    if head_equal is not None:
        he = np.asarray(head_equal, np.float64)
        out["head_equal_count_mean"] = mean(he[head] if he.size == v.size else he)
    return out


def plot_angular_variance(states: Mapping[str, Mapping[str, np.ndarray]], path: str | Path,
                          title: str = "Per-class angular variance, head vs tail"
                          ) -> Dict[str, Dict]:
    """One panel per state (e.g. "CosFace" and "LEAP"): histograms of per-class angular
    variance for tail classes, head classes, and head classes at the tail's sample count; a last
    panel compares the means. Each state maps "variance" [C], "counts" [C], "head_mask" [C] and
    optionally "head_equal" (see variance_summary). Returns each state's variance_summary."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(states)
    summaries = {}
    fig, axes = plt.subplots(1, len(names) + 1, figsize=(4.2 * (len(names) + 1), 3.6))
    groups = (("tail", "tab:red"), ("head", "tab:blue"), ("head at tail count", "tab:cyan"))
    finite = np.concatenate([np.asarray(states[n][k], float).ravel() for n in names
                             for k in ("variance", "head_equal") if states[n].get(k) is not None])
    finite = finite[np.isfinite(finite)]
    bins = np.linspace(0.0, float(finite.max()) * 1.05 if finite.size else 1.0, 40)
    for ax, name in zip(axes, names):
        st = states[name]
        v, head = np.asarray(st["variance"], float), np.asarray(st["head_mask"], bool)
        he = st.get("head_equal")
        data = [v[~head], v[head]]
        if he is not None:
            he = np.asarray(he, float)
            data.append(he[head] if he.size == v.size else he)
        for (label, color), x in zip(groups, data):
            x = x[np.isfinite(x)]
            if x.size:
                ax.hist(x, bins=bins, alpha=0.45, color=color, density=True,
                        label=f"{label} (n={x.size}, mean {x.mean():.4f})")
                ax.axvline(x.mean(), color=color, linestyle="--", linewidth=1)
        counts = np.asarray(st["counts"])
        tail_k = int(np.median(counts[~head])) if (~head).any() else 0
        ax.set_title(f"{name} (tail: {tail_k} samples/class)", fontsize=9)
        ax.set_xlabel("angular variance (rad$^2$)")
        ax.legend(fontsize=7)
        summaries[name] = variance_summary(v, head, he)
    ax = axes[-1]
    width = 0.8 / 3
    for g, (label, color) in enumerate(groups):
        key = {"tail": "tail_mean", "head": "head_mean",
               "head at tail count": "head_equal_count_mean"}[label]
        vals = [summaries[n].get(key) for n in names]
        xs = [i + (g - 1) * width for i, val in enumerate(vals) if val is not None]
        ax.bar(xs, [val for val in vals if val is not None], width, color=color, label=label)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, fontsize=8)
    ax.set_ylabel("mean angular variance")
    ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return summaries
