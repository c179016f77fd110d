"""Tables of a glyph study: every method against the baseline, LEAP against the uniform control,
and head-vs-tail angular variance at equal sample counts, from finished main-job folders.

    python -m experiments.study_tables runs/study_B                  # one setting
    python -m experiments.study_tables runs/study_B runs/study_C --md docs/tables.md

Reads `<method>_seed<k>/eval.json` and `angular_variance.npz` (written by experiments/main_job.py);
differences are paired by seed, in points, mean ± sample std [per seed].
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

if not __package__:     # run as a file: the harness package is not importable that way
    sys.exit("run it from the repository root as: python -m experiments.study_tables ...")

from experiments import evaluation, report  # noqa: E402

METRICS = report.DEFAULT_METRICS + (report.Metric("ijbc_tpr@1e-5", "IJB-C TPR@1e-5"),)
RUN = re.compile(r"(.+)_seed(\d+)$")


def load_setting(folder: Path) -> Dict[str, Dict[int, dict]]:
    """method -> seed -> metrics of every evaluated run in a main-job folder."""
    res: Dict[str, Dict[int, dict]] = {}
    for p in sorted(folder.glob("*_seed*/eval.json")):
        m = RUN.match(p.parent.name)
        if not m:
            continue
        e = json.loads(p.read_text())
        r = report.metrics_from_eval(e["verification"], e["ijbc"], e["megaface"])
        if e["ijbc"]["tpr_at_fpr"].get("1e-05") is not None:      # None: too few impostors
            r["ijbc_tpr@1e-5"] = e["ijbc"]["tpr_at_fpr"]["1e-05"]
        res.setdefault(m.group(1), {})[int(m.group(2))] = r
    return res


def variance_rows(folder: Path) -> List[str]:
    """One markdown row per method: head, head at the tail's count, tail, and tail/head-at-count."""
    per: Dict[str, List[dict]] = {}
    for p in sorted(folder.glob("*_seed*/angular_variance.npz")):
        m = RUN.match(p.parent.name)
        d = np.load(p)
        per.setdefault(m.group(1), []).append(
            report.variance_summary(d["variance"], d["head_mask"], d["head_equal"]))
    rows = []
    for method, items in per.items():
        def mean(key: str) -> float:
            return float(np.mean([i[key] for i in items]))
        head, at, tail = mean("head_mean"), mean("head_equal_count_mean"), mean("tail_mean")
        # With 2 samples per class both angles to the mean direction are equal: the variance is
        # 0 up to rounding and the ratio means nothing.
        ratio = f"{tail / at:.2f}" if at > 1e-6 else "n/a (2 samples: variance is 0)"
        rows.append(f"| {folder.name} | {method} | {len(items)} | {head:.4f} | {at:.4f} | "
                    f"{tail:.4f} | {ratio} |")
    return rows


def setting_markdown(folder: Path, baseline: str = "cosface") -> str:
    res = load_setting(folder)
    if baseline not in res:
        return f"## {folder.name}\n\nno {baseline} run with eval.json yet\n"
    out = [report.format_markdown(report.summarize(res, baseline, METRICS), title=folder.name)]
    leap = [m for m in res if m.startswith("leap")]
    if "uniform_control" in res and leap:
        sub = {"uniform_control": res["uniform_control"], **{m: res[m] for m in leap}}
        out.append(report.format_markdown(report.summarize(sub, "uniform_control", METRICS),
                                          title=f"{folder.name}: LEAP against the uniform control"))
    return "\n".join(out)


def _diff(summary: dict, method: str, key: str) -> str:
    entry = summary["methods"].get(method, {}).get(key)
    if not entry or "diff" not in entry or entry["diff"]["n"] == 0:
        return "not run"
    d = entry["diff"]
    std = f" ± {d['std']:.2f}" if d["std"] is not None else ""
    return f"{d['mean']:+.2f}{std} ({d['positive']}/{d['n']} > 0)"


HEADLINE_METRICS = (("megaface_rank1", "MegaFace-style rank-1 (%)"),
                    ("ijbc_tpr@1e-3", "IJB-C-style TPR@FPR=1e-3 (%)"),
                    ("verification_acc", "Verification accuracy (%)"))
HEADLINE_COLUMNS = ("LEAP full − base", "LEAP vanilla − base", "uniform − base",
                    "shuffled − base", "LEAP full − uniform", "LEAP full − shuffled")


def headline_row(folder: Path, key: str = "megaface_rank1", baseline: str = "cosface") -> str:
    """One row: baseline mean, LEAP full/vanilla and the two matched controls minus the
    baseline, then LEAP full minus each control; paired by seed, in points, with how many
    seeds were positive."""
    res = load_setting(folder)
    if baseline not in res:
        return f"| {folder.name} | no {baseline} run |"
    vs_base = report.summarize(res, baseline, METRICS)
    base = vs_base["methods"][baseline][key]
    cells = [f"{base['mean']:.2f} (n={base['n']})"]
    cells += [_diff(vs_base, m, key)
              for m in ("leap_full", "leap_vanilla", "uniform_control", "shuffled_control")]
    for control in ("uniform_control", "shuffled_control"):
        vs_ctl = leap_vs_control(res, control)
        cells.append(_diff(vs_ctl, "leap_full", key) if vs_ctl else "not run")
    return f"| {folder.name} | " + " | ".join(cells) + " |"


def headline_markdown(folders: List[Path], baseline: str = "cosface") -> str:
    """The headline table once per headline metric."""
    parts = []
    for key, label in HEADLINE_METRICS:
        parts.append(f"## Headline: {label}, paired differences in points\n\n"
                     f"| setting | {baseline} | " + " | ".join(HEADLINE_COLUMNS) + " |\n"
                     + "|---" * (len(HEADLINE_COLUMNS) + 2) + "|\n"
                     + "\n".join(headline_row(f, key, baseline) for f in folders) + "\n")
    return "\n".join(parts)


def run_folders(folder: Path) -> Dict[str, Dict[int, Path]]:
    """method -> seed -> run folder, for every run in a main-job folder that logged metrics."""
    per: Dict[str, Dict[int, Path]] = {}
    for p in sorted(folder.glob("*_seed*/metrics.jsonl")):
        m = RUN.match(p.parent.name)
        if m:
            per.setdefault(m.group(1), {})[int(m.group(2))] = p.parent
    return per


def leap_vs_control(res: Dict[str, Dict[int, dict]], control: str) -> Optional[dict]:
    """LEAP full paired against one control (None when either did not run)."""
    if control not in res or "leap_full" not in res:
        return None
    return report.summarize({control: res[control], "leap_full": res["leap_full"]}, control,
                            METRICS)


def noise_rows(folder: Path) -> List[str]:
    """Per method with an active cloud: the realised noise strengths, mean over seeds (from each
    run's metrics.jsonl), so a reader sees LEAP and its controls were matched."""
    per = run_folders(folder)
    strengths = evaluation.noise_strengths(per)
    return [f"| {folder.name} | {method} | {len(per[method])} | "
            + " | ".join(f"{v[k]:.5f}" for k in evaluation.NOISE_COLUMNS) + " |"
            for method, v in strengths.items()]


PLOT_ORDER = ("leap_full", "leap_vanilla", "uniform_control", "shuffled_control",
              "class_balanced", "repeat_factor")


def _dots(ax, per_method: Dict[str, Dict[int, float]]) -> None:
    """Per method one dot per seed and a red bar at the mean."""
    for x, ys in enumerate(per_method.values()):
        ys = list(ys.values())
        ax.scatter([x] * len(ys), ys, s=14, color="C0", zorder=3)
        if ys:
            ax.hlines(float(np.mean(ys)), x - 0.3, x + 0.3, color="C3", zorder=4)
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlim(-0.6, max(len(per_method), 2) - 0.4)
    ax.set_xticks(range(len(per_method)))
    ax.set_xticklabels([m.replace("_control", "").replace("_", " ") for m in per_method],
                       rotation=45, ha="right", fontsize=8)
    ax.grid(axis="y", alpha=0.3)


def plot_paired(folders: List[Path], path: Path, key: str = "megaface_rank1",
                baseline: str = "cosface") -> None:
    """One column per setting. Top: each method's paired difference to the baseline; bottom:
    LEAP full minus each matched control. One dot per seed and a bar at the mean, so spread and
    sign are seen at a glance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, len(folders), figsize=(3.0 * len(folders) + 0.6, 6.4),
                             sharey="row", squeeze=False)
    for col, folder in enumerate(folders):
        res = load_setting(folder)
        top: Dict[str, Dict[int, float]] = {}
        bottom: Dict[str, Dict[int, float]] = {}
        if baseline in res:
            summary = report.summarize(res, baseline, METRICS)["methods"]
            top = {m: summary[m][key]["diff"]["per_seed"] for m in PLOT_ORDER if m in res}
        for control in ("uniform_control", "shuffled_control"):
            vs = leap_vs_control(res, control)
            if vs:
                bottom["LEAP full − " + control] = \
                    vs["methods"]["leap_full"][key]["diff"]["per_seed"]
        _dots(axes[0][col], top)
        _dots(axes[1][col], bottom)
        axes[0][col].set_title(folder.name, fontsize=9)
    axes[0][0].set_ylabel(f"rank-1: method − {baseline} (points)", fontsize=9)
    axes[1][0].set_ylabel("rank-1: LEAP full − control (points)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_strength(folders: List[Path], path: Path, key: str = "megaface_rank1",
                  baseline: str = "cosface") -> None:
    """Gain over the baseline against the realised noise variance, one point per method and
    setting (mean ± std over seeds), points of one method joined in folder order: shows
    whether a gain follows the amount of noise or where it goes."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    points: Dict[str, List[tuple]] = {}
    for folder in folders:
        res = load_setting(folder)
        if baseline not in res:
            continue
        summary = report.summarize(res, baseline, METRICS)["methods"]
        for method, v in evaluation.noise_strengths(run_folders(folder)).items():
            if method in summary:
                d = summary[method][key]["diff"]
                points.setdefault(method, []).append(
                    (v["leap_batch_noise_var"], d["mean"], d["std"] or 0.0, folder.name))
    fig, ax = plt.subplots(figsize=(6.4, 4.4))
    for i, (method, pts) in enumerate(points.items()):
        x, y, e, names = zip(*pts)
        ax.errorbar(x, y, yerr=e, fmt="o-", color=f"C{i}", capsize=3, label=method)
        for xi, yi, name in zip(x, y, names):
            ax.annotate(name.replace("study_", ""), (xi, yi), fontsize=7,
                        xytext=(4, -10), textcoords="offset points", color=f"C{i}")
    ax.set_xscale("log")
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set_xlabel("realised noise variance per training sample (rad², log scale)")
    ax.set_ylabel(f"rank-1: method − {baseline} (points)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("folders", nargs="+", type=Path, help="main-job run folders (--out)")
    p.add_argument("--baseline", default="cosface")
    p.add_argument("--md", type=Path, default=None, help="also write the tables here")
    p.add_argument("--plot", type=Path, default=None,
                   help="also draw the paired rank-1 differences, one panel per setting (PNG)")
    p.add_argument("--plot-strength", type=Path, default=None,
                   help="also draw each method's rank-1 gain against its realised noise (PNG)")
    args = p.parse_args(argv)
    parts = [headline_markdown(args.folders, args.baseline)]
    parts += [setting_markdown(f, args.baseline) for f in args.folders]
    var = [r for f in args.folders for r in variance_rows(f)]
    if var:
        parts.append("## Angular variance of the training classes (means over seeds)\n\n"
                     "| setting | method | seeds | head | head at tail count | tail | "
                     "tail / head-at-count |\n|---|---|---|---|---|---|---|\n" + "\n".join(var) + "\n")
    noise = [r for f in args.folders for r in noise_rows(f)]
    if noise:
        parts.append("## Noise strength per training sample while the cloud is on (means over "
                     "seeds)\n\n| setting | method | seeds | "
                     + " | ".join(evaluation.NOISE_COLUMNS.values()) + " |\n"
                     + "|---" * (len(evaluation.NOISE_COLUMNS) + 3) + "|\n" + "\n".join(noise) + "\n")
    text = "\n".join(parts)
    print(text)
    if args.md:
        args.md.write_text(text)
    if args.plot:
        plot_paired(args.folders, args.plot, baseline=args.baseline)
    if args.plot_strength:
        plot_strength(args.folders, args.plot_strength, baseline=args.baseline)
    return 0


if __name__ == "__main__":
    sys.exit(main())
