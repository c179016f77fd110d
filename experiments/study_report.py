"""The round-4 report: every metric gets its own headline, each method's paired gain over the
baseline with k/n positive seeds and its min..max spread, the places where metrics disagree, and
one plot (one panel per metric) a reader takes in at a glance.

    python -m experiments.study_report runs/round4_B runs/round4_H50 --md docs/study/x.md \
        --plot docs/study/img/round4_gains.png
    python -m experiments.study_report runs/round4_B --validation     # the tuning view

Reads `<method>_seed<k>/eval.json` (test) or `eval_validation.json` (`--validation`) of
main-job folders. A seed counts for a method only when the baseline ran it too (paired).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from experiments import report

METRICS: Tuple[report.Metric, ...] = (
    report.Metric("megaface_rank1", "MegaFace-style rank-1"),
    report.Metric("ijbc_tpr@1e-4", "IJB-C-style TPR@1e-4"),
    report.Metric("ijbc_tpr@1e-3", "IJB-C-style TPR@1e-3"),
    report.Metric("verification_acc", "Verification accuracy"),
    report.Metric("verification_tpr@1e-3", "Verification TPR@1e-3"),
)
RUN = re.compile(r"(.+)_seed(\d+)$")
TEST_EVAL, VALIDATION_EVAL = "eval.json", "eval_validation.json"

Gains = Dict[str, Dict[str, Dict[int, float]]]     # method -> metric key -> seed -> points


def load_results(folder: Path, eval_name: str = TEST_EVAL) -> Dict[str, Dict[int, dict]]:
    """method -> seed -> metric values (fractions) of every evaluated run in a main-job folder."""
    res: Dict[str, Dict[int, dict]] = {}
    for p in sorted(Path(folder).glob(f"*_seed*/{eval_name}")):
        m = RUN.match(p.parent.name)
        if not m:
            continue
        try:
            e = json.loads(p.read_text())
            values = report.metrics_from_eval(e["verification"], e["ijbc"], e["megaface"])
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(f"{p}: not an evaluation file of the main job ({err})") from None
        res.setdefault(m.group(1), {})[int(m.group(2))] = values
    return res


def paired_gains(results: Mapping[str, Mapping[int, Mapping[str, float]]], baseline: str,
                 metrics: Sequence[report.Metric] = METRICS) -> Gains:
    """Per method (not the baseline) and metric, method minus baseline at each seed both ran,
    in points."""
    if baseline not in results:
        raise KeyError(f"no {baseline!r} runs among {sorted(results)}: the gains are paired "
                       "against it")
    out: Gains = {}
    for method, per_seed in results.items():
        if method == baseline:
            continue
        out[method] = {}
        for met in metrics:
            out[method][met.key] = {
                s: (per_seed[s][met.key] - results[baseline][s][met.key]) * met.scale
                for s in sorted(per_seed) if s in results[baseline]
                and met.key in per_seed[s] and met.key in results[baseline][s]}
    return out


def gain_cell(per_seed: Mapping[int, float]) -> str:
    """'+2.65 [+2.57..+2.79] (3/3)': mean, min..max over seeds, seeds positive / seeds."""
    if not per_seed:
        return "not run"
    v = np.array(list(per_seed.values()), np.float64)
    return (f"{v.mean():+.2f} [{v.min():+.2f}..{v.max():+.2f}] "
            f"({int((v > 0).sum())}/{v.size})")


def verdict(per_seed: Mapping[int, float]) -> Optional[str]:
    """'better' when every paired seed is above the baseline, 'worse' when every one is below,
    'level' when every one is equal, else 'mixed'."""
    if not per_seed:
        return None
    d = list(per_seed.values())
    if all(x > 0 for x in d):
        return "better"
    if all(x < 0 for x in d):
        return "worse"
    return "level" if all(x == 0 for x in d) else "mixed"


def disagreements(gains: Gains, metrics: Sequence[report.Metric] = METRICS) -> Dict[str, str]:
    """method -> one sentence, for methods whose metrics do not all give the same verdict:
    which metrics are better on every seed, which worse on every seed, which mixed (k/n)."""
    out = {}
    for method, per_metric in gains.items():
        groups: Dict[str, List[str]] = {"better": [], "worse": [], "level": [], "mixed": []}
        for met in metrics:
            d = per_metric.get(met.key, {})
            v = verdict(d)
            if v:
                pos = sum(1 for x in d.values() if x > 0)
                groups[v].append(met.label + ("" if v != "mixed" else f" ({pos}/{len(d)})"))
        if sum(1 for g in groups.values() if g) > 1:
            out[method] = "; ".join(f"mixed: {', '.join(g)}" if k == "mixed"
                                    else f"{k} on every seed: {', '.join(g)}"
                                    for k, g in groups.items() if g)
    return out


def headline_markdown(settings: Mapping[str, Gains], baseline: str,
                      metrics: Sequence[report.Metric] = METRICS, title: str = "") -> str:
    """Per metric, one table: rows are methods, columns settings, cells gain_cell. Then, per
    setting, the methods whose metrics disagree."""
    methods: List[str] = []
    for gains in settings.values():
        methods += [m for m in gains if m not in methods]
    names = list(settings)
    parts = [f"# {title}\n"] if title else []
    parts.append(f"Paired gain over {baseline} in points: mean [min..max over seeds] "
                 "(seeds positive / paired seeds).\n")
    for met in metrics:
        lines = [f"## {met.label}", "", "| method | " + " | ".join(names) + " |",
                 "|---|" + "---|" * len(names)]
        for m in methods:
            lines.append(f"| {m} | " + " | ".join(
                gain_cell(settings[n].get(m, {}).get(met.key, {})) for n in names) + " |")
        parts.append("\n".join(lines) + "\n")
    lines = ["## Where the metrics disagree", ""]
    for n in names:
        for m, sentence in disagreements(settings[n], metrics).items():
            lines.append(f"- {n}, {m}: {sentence}.")
    if len(lines) == 2:
        lines.append("- nowhere: every method is better on every seed, or worse on every seed, "
                     "on all metrics alike.")
    parts.append("\n".join(lines) + "\n")
    return "\n".join(parts)


def plot_gains(settings: Mapping[str, Gains], path: Path, baseline: str,
               metrics: Sequence[report.Metric] = METRICS) -> None:
    """One PNG, one panel per metric: for each method (rows) and setting (marker), the mean
    paired gain over the baseline with a bar from the seeds' min to max."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods: List[str] = []
    for gains in settings.values():
        methods += [m for m in gains if m not in methods]
    names = list(settings)
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.9 * len(metrics) + 1.6,
                                                       0.32 * len(methods) + 1.6),
                             sharey=True, squeeze=False)
    step = 0.7 / max(len(names), 1)
    for ax, met in zip(axes[0], metrics):
        for j, n in enumerate(names):
            ys, means, lo, hi = [], [], [], []
            for i, m in enumerate(methods):
                d = list(settings[n].get(m, {}).get(met.key, {}).values())
                if d:
                    ys.append(i + (j - (len(names) - 1) / 2) * step)
                    means.append(float(np.mean(d)))
                    lo.append(float(np.mean(d) - min(d)))
                    hi.append(float(max(d) - np.mean(d)))
            if ys:
                ax.errorbar(means, ys, xerr=[lo, hi], fmt="o", ms=4, capsize=2, lw=1,
                            color=f"C{j}", label=n)
        ax.axvline(0.0, color="grey", lw=0.8)
        ax.set_title(met.label, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        ax.set_xlabel(f"− {baseline} (points)", fontsize=8)
    axes[0][0].set_yticks(range(len(methods)))
    axes[0][0].set_yticklabels(methods, fontsize=8)
    axes[0][0].invert_yaxis()
    axes[0][-1].legend(fontsize=7, loc="best")
    fig.suptitle(f"Paired gain over {baseline}: mean, bar = min..max over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="main-job run folders (--out)")
    p.add_argument("--baseline", default="cosface")
    p.add_argument("--validation", action="store_true",
                   help="read the validation evaluations (eval_validation.json), not the test")
    p.add_argument("--methods", default="",
                   help="comma-separated methods to show, in this order (default: all)")
    p.add_argument("--md", type=Path, default=None, help="also write the markdown here")
    p.add_argument("--plot", type=Path, default=None, help="also draw the one plot here (PNG)")
    args = p.parse_args(argv)
    eval_name = VALIDATION_EVAL if args.validation else TEST_EVAL
    wanted = [m for m in args.methods.split(",") if m]
    settings: Dict[str, Gains] = {}
    for folder in args.folders:
        if folder.name in settings:
            p.error(f"two folders are named {folder.name!r}: each setting needs its own name")
        gains = paired_gains(load_results(folder, eval_name), args.baseline)
        if wanted:
            gains = {m: gains[m] for m in wanted if m in gains}
        settings[folder.name] = gains
    text = headline_markdown(settings, args.baseline, title="Validation characters (tuning view)"
                             if args.validation else "")
    print(text)
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(text, encoding="utf-8")
    if args.plot:
        plot_gains(settings, args.plot, args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
