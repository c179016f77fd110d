"""Evaluate one trained run of the main job on every embedded protocol, and build its report.

The same library functions as the CLIs in eval_protocols/ (verification pack, IJB-C-style 1:1,
MegaFace-style identification), plus the per-class angular variance of the training classes
(head vs tail, also at equal sample counts) that the paper plots in Fig. 1-3.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List, Mapping, Sequence, Tuple

import numpy as np
import torch

from experiments import report
from facetrain.eval import ijbc, megaface, verification
from facetrain.eval.plots import plot_roc
from facetrain.eval.embed import extract_features, load_backbone_with_info


class _EncodedImages:
    """The encoded image bytes of a RecordIO dataset in record order (labels kept aside), as
    extract_features takes them."""

    def __init__(self, dataset) -> None:
        self.ds = dataset

    def __len__(self) -> int:
        return len(self.ds)

    def __getitem__(self, i: int) -> bytes:
        return self.ds.read(i)[1]

    def __iter__(self):
        return (self[i] for i in range(len(self)))


class _Concat:
    def __init__(self, *parts) -> None:
        self.parts = parts

    def __len__(self) -> int:
        return sum(len(p) for p in self.parts)

    def __iter__(self):
        for p in self.parts:
            yield from p


def evaluate_run(run: Path, eval_root: Path, rec: Path, tail_samples: int,
                 batch_size: int = 256, threads: int = 2, cache_name: str = "eval.json",
                 train_stats: bool = True) -> Dict[str, object]:
    """Metrics of one run (cached in run/eval.json; ROC in run/roc.npz; variances in
    run/angular_variance.npz). Another `eval_root` (the validation characters) takes its own
    `cache_name` and `train_stats=False`: only its protocol metrics are written."""
    cache = run / cache_name
    if cache.is_file():
        return json.loads(cache.read_text())
    from facetrain.data.dataset import RecordDataset
    torch.set_num_threads(threads)
    model, info = load_backbone_with_info(run / "export" / "backbone.pt", "cpu")
    size = info.get("image_size") or 112

    def feats(images, desc: str) -> np.ndarray:
        # Glyphs are not mirror-symmetric and train without flips: no flip-sum here.
        return extract_features(model, images, batch_size=batch_size, flip=False,
                                image_size=size, num_threads=threads, desc=desc)

    bins, issame = verification.load_pack(eval_root / "verification.bin")
    ver = verification.evaluate_pack_features(
        feats(verification.PackImages(bins, eval_root / "verification.bin"), "verification"),
        issame)
    ver.pop("roc", None)
    meta = ijbc.read_meta(eval_root / "IJBC", "ijbc")
    ij = ijbc.verify_features(meta, feats(ijbc.AlignedImages(meta, size), "ijbc"))
    fpr, tpr = ij.pop("roc")
    ij.pop("template_ids", None)
    ij.pop("template_features", None)
    mf_root = eval_root / "megaface"
    probes, ids, dis, keep_p, keep_d = megaface.load_layout(mf_root)
    mf_feats = feats(_Concat(
        megaface.ListImages(mf_root / "facescrub_images", probes, mf_root / "facescrub_lst"),
        megaface.ListImages(mf_root / "megaface_images", dis, mf_root / "megaface_lst")),
        "megaface")
    pf, df = mf_feats[:len(probes)], mf_feats[len(probes):]
    mf = megaface.evaluate(pf[keep_p], ids[keep_p], df[keep_d])
    mf.pop("cmc", None)
    out = report.jsonable({"verification": ver, "ijbc": ij, "megaface": mf})
    if not train_stats:
        cache.write_text(json.dumps(out, indent=1))
        return out

    ds = RecordDataset.open(str(rec))
    train_feats = feats(_EncodedImages(ds), "train classes")
    labels, counts = np.asarray(ds.labels), np.asarray(ds.class_counts)
    ds.close()
    rng = np.random.default_rng(0)
    variance = report.class_angular_variance(train_feats, labels, counts.size)
    head_equal = report.class_angular_variance(train_feats, labels, counts.size,
                                               per_class=tail_samples, rng=rng)
    np.savez(run / "angular_variance.npz", variance=variance, head_equal=head_equal,
             counts=counts, head_mask=counts > tail_samples)
    np.savez(run / "roc.npz", fpr=fpr, tpr=tpr)
    cache.write_text(json.dumps(out, indent=1))
    return out


CONTROL = "uniform_control"
# metrics.jsonl keys (trainer.LOGGED_LEAP with the `leap_` prefix) -> report column.
NOISE_COLUMNS = {"leap_noise_var": "expected noise var", "leap_target_noise_var": "LEAP's (matched)",
                 "leap_batch_noise_var": "realised noise var", "leap_mean_abs_alpha": "mean abs(alpha)"}


def noise_strengths(runs: Mapping[str, Mapping[int, Path]]) -> Dict[str, Dict[str, float]]:
    """Per method, the mean over seeds of each run's mean LEAP noise while the cloud was active
    (logged rows with leap_active): shows that LEAP and its matched controls add the same
    per-sample noise. Methods without an active cloud (the baseline) are left out."""
    from facetrain.logging_utils import read_metrics
    out: Dict[str, Dict[str, float]] = {}
    for method, per_seed in runs.items():
        per_run = []
        for run in per_seed.values():
            path = Path(run) / "metrics.jsonl"
            rows = [r for r in read_metrics(path).values() if r.get("leap_active")] \
                if path.is_file() else []
            if rows:
                per_run.append({k: float(np.mean([r.get(k, 0.0) for r in rows])) for k in NOISE_COLUMNS})
        if per_run:
            out[method] = {k: float(np.mean([r[k] for r in per_run])) for k in NOISE_COLUMNS}
    return out


def format_noise_markdown(strengths: Mapping[str, Mapping[str, float]]) -> str:
    """A markdown table of `noise_strengths` (empty string when no method had a cloud)."""
    if not strengths:
        return ""
    lines = ["## LEAP noise strength (per training sample, mean over seeds)", "",
             "| method | " + " | ".join(NOISE_COLUMNS.values()) + " |",
             "| --- |" + " --- |" * len(NOISE_COLUMNS)]
    for method, vals in strengths.items():
        lines.append(f"| {method} | " + " | ".join(f"{vals[k]:.4g}" for k in NOISE_COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def write_job_report(out: Path, runs: Mapping[str, Mapping[int, Path]],
                     evals: Mapping[str, Mapping[int, Mapping]], baseline: str,
                     settings: Mapping[str, object]) -> Dict[str, Path]:
    """Table (markdown + JSON), ROC plot and head-vs-tail variance plot for the whole job."""
    results = {m: {seed: report.metrics_from_eval(e["verification"], e["ijbc"], e["megaface"])
                   for seed, e in per_seed.items()} for m, per_seed in evals.items()}
    summary = report.summarize(results, baseline)
    first_seed = {m: min(per_seed) for m, per_seed in runs.items()}
    curves = {}
    states = {}
    for m, seed in first_seed.items():
        roc = np.load(runs[m][seed] / "roc.npz")
        curves[f"{m} (seed {seed})"] = (roc["fpr"], roc["tpr"])
        av = np.load(runs[m][seed] / "angular_variance.npz")
        states[m] = {k: av[k] for k in ("variance", "counts", "head_mask", "head_equal")}
    roc_png, var_png = out / "roc.png", out / "angular_variance.png"
    neg = min(float(c[0][c[0] > 0].min()) for c in curves.values() if (c[0] > 0).any())
    plot_roc(curves, roc_png, "IJB-C-style 1:1 verification ROC", xmin=neg)
    var_summary = report.plot_angular_variance(states, var_png)
    # LEAP against its untargeted control: is the class targeting what helps?
    leap = [m for m in results if m.startswith("leap")]
    vs_control = None
    if CONTROL in results and leap:
        vs_control = report.summarize({CONTROL: results[CONTROL], **{m: results[m] for m in leap}},
                                      CONTROL)
    strengths = noise_strengths(runs)
    md, js = report.write_report(summary, out, "results", "Baseline vs LEAP on the long-tailed "
                                 "glyph benchmark", extra={"settings": dict(settings),
                                                           "angular_variance": var_summary,
                                                           "leap_vs_uniform_control": vs_control,
                                                           "leap_noise": strengths})
    with open(md, "a", encoding="utf-8") as fh:
        if vs_control is not None:
            fh.write("\n" + report.format_markdown(vs_control, "LEAP against the uniform-noise "
                                                   "control (same per-sample noise, untargeted)"))
        if strengths:
            fh.write("\n" + format_noise_markdown(strengths))
    return {"markdown": md, "json": js, "roc": roc_png, "variance": var_png}
