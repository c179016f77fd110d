"""Evaluation scoring speed and memory at real benchmark scale, from synthetic features.

IJB-C 1:1: 469,375 image features x 512 float32, 23,124 templates (3,531 gallery templates as
tid1 and 19,593 probe templates as tid2, the layout of IJB-C's G1/G2 1:1 matches), 15,658,489
pairs (19,557 genuine): template pooling (media mean, template sum, faceness weights), all
pair scores, the ROC (one sort) and TPR at FPR 1e-6..1e-1.
MegaFace: 3,530 probes (530 identities) x 1,000,000 distractors x 512: rank-1/5/10 and
TPR@FPR=1e-6, distractors streamed in blocks.

    python benchmarks/eval_speed.py                    # both, full scale
    python benchmarks/eval_speed.py --scale 0.1 --json out.json

Times are wall-clock for the scoring only (feature generation excluded); peak memory is the
process's max RSS and the growth over the input features.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
from pathlib import Path
from typing import Dict

import numpy as np


def rss_gib() -> float:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 2**20
    return float("nan")


def peak_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def bench_ijbc(scale: float, dim: int, seed: int) -> Dict[str, float]:
    from facetrain.eval import ijbc
    from facetrain.eval.metrics import roc_curve, tpr_at_fpr_from_roc
    rng = np.random.default_rng(seed)
    n_img, n_gal, n_probe = int(469375 * scale), int(3531 * scale), int(19593 * scale)
    n_pairs, n_gen = int(15658489 * scale), int(19557 * scale)
    tids = np.sort(rng.integers(0, n_gal + n_probe, n_img)) * 3 + 1000
    mids = tids * 16 + rng.integers(0, 8, n_img)                  # ~8 media per template
    faceness = rng.uniform(0.5, 1.0, n_img).astype(np.float32)
    feats = rng.standard_normal((n_img, dim), dtype=np.float32)
    t1 = np.unique(tids)[rng.integers(0, n_gal, n_pairs)]
    t2 = np.unique(tids)[n_gal + rng.integers(0, n_probe, n_pairs)]
    label = np.zeros(n_pairs, dtype=bool)
    label[rng.choice(n_pairs, n_gen, replace=False)] = True
    base = rss_gib()
    out: Dict[str, float] = {"images": n_img, "templates": int(np.unique(tids).size),
                             "pairs": n_pairs}
    t0 = time.perf_counter()
    t_ids, tfeat = ijbc.pool_templates(feats, tids, mids, faceness)
    t_pool = time.perf_counter()
    r1 = ijbc.template_rows(t_ids, t1, "pairs")
    r2 = ijbc.template_rows(t_ids, t2, "pairs")
    scores = ijbc.score_pairs(tfeat, r1, r2)
    t_scores = time.perf_counter()
    fpr, tpr, _ = roc_curve(label, scores)
    res = tpr_at_fpr_from_roc(fpr, tpr)
    t_roc = time.perf_counter()
    out.update({"pool_s": t_pool - t0, "scores_s": t_scores - t_pool, "roc_s": t_roc - t_scores,
                "total_s": t_roc - t0, "input_gib": base, "peak_rss_gib": peak_gib(),
                "peak_over_input_gib": peak_gib() - base, "tpr_at_1e-4": res["1e-04"]})
    return out


def bench_megaface(n_distractors: int, n_ids: int, n_probes: int, dim: int, seed: int
                   ) -> Dict[str, float]:
    from facetrain.eval import megaface
    rng = np.random.default_rng(seed)
    base = n_probes // n_ids                                      # FaceScrub: ~6.7 per identity
    ids = np.sort(np.r_[np.repeat(np.arange(n_ids), base),
                        rng.choice(n_ids, n_probes - base * n_ids, replace=False)])
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
    probes = centres[ids] + 0.9 * rng.standard_normal((ids.size, dim), dtype=np.float32)
    dis = rng.standard_normal((n_distractors, dim), dtype=np.float32)
    base = rss_gib()
    t0 = time.perf_counter()
    res = megaface.evaluate(probes, ids, dis)
    t1 = time.perf_counter()
    return {"probes": int(ids.size), "distractors": n_distractors, "total_s": t1 - t0,
            "rank1": res["rank1"], "tpr_at_1e-6": res["tpr_at_fpr"]["1e-06"],
            "input_gib": base, "peak_rss_gib": peak_gib(), "peak_over_input_gib": peak_gib() - base}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's sizes to use")
    p.add_argument("--distractors", type=int, default=1_000_000, help="MegaFace distractors")
    p.add_argument("--identities", type=int, default=530, help="MegaFace probe identities")
    p.add_argument("--probes", type=int, default=3530, help="MegaFace probe images")
    p.add_argument("--dim", type=int, default=512, help="feature dimension")
    p.add_argument("--skip", choices=("ijbc", "megaface"), action="append", default=[],
                   help="skip one benchmark (repeatable)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    p.add_argument("--json", default=None, help="also write the numbers here")
    args = p.parse_args(argv)
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    report = {"torch_threads": torch.get_num_threads()}
    if "ijbc" not in args.skip:
        report["ijbc"] = bench_ijbc(args.scale, args.dim, 0)
        print("IJB-C 1:1  " + ", ".join(f"{k}={v:.4g}" for k, v in report["ijbc"].items()),
              flush=True)
    if "megaface" not in args.skip:
        report["megaface"] = bench_megaface(args.distractors, args.identities, args.probes,
                                            args.dim, 1)
        print("MegaFace   " + ", ".join(f"{k}={v:.4g}" for k, v in report["megaface"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
