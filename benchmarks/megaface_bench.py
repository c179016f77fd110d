"""MegaFace identification with 1M distractors against its GEMM floor, rounds interleaved in one
process.

Synthetic FaceScrub-shaped probes (3,530 images of 530 identities, 512-d) and --distractors
random distractor features; each round runs, in alternating order:

  evaluate  facetrain.eval.megaface.evaluate (rank-1/5/10 and TPR at FPR 1e-6, block 16,384)
  tiled     (--tiled) evaluate with 16 MB probe-row tiles of each [P, block] product
  floor     the probe x distractor float32 matrix product alone, over the same 16,384-row
            blocks into one reused output buffer (torch.mm, all torch threads)

and prints best / median seconds, their spread and the ratio floor / evaluate (target >= 0.9).
With --before PATH (an older megaface.py, e.g. from `git show REV:facetrain/eval/megaface.py`)
that version runs once on the same arrays and the results are compared for equality.

    python benchmarks/megaface_bench.py --distractors 1000000 --rounds 3
"""
from __future__ import annotations

import argparse
import importlib.util
import statistics
import sys
import time
from typing import Dict

import numpy as np
import torch



def make_data(n_distractors: int, n_ids: int, n_probes: int, dim: int, seed: int):
    rng = np.random.default_rng(seed)
    base = n_probes // n_ids
    ids = np.sort(np.r_[np.repeat(np.arange(n_ids), base),
                        rng.choice(n_ids, n_probes - base * n_ids, replace=False)])
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
    probes = centres[ids] + 0.9 * rng.standard_normal((ids.size, dim), dtype=np.float32)
    dis = rng.standard_normal((n_distractors, dim), dtype=np.float32)
    return probes, ids, dis


def floor(probes: np.ndarray, dis: np.ndarray, block: int = 16384) -> float:
    """Seconds of the probe x distractor products alone (the same blocks evaluate uses)."""
    p = torch.from_numpy(probes)
    d_all = torch.from_numpy(dis)
    out = torch.empty(p.shape[0] * block)
    t0 = time.perf_counter()
    for s in range(0, d_all.shape[0], block):
        d = d_all[s:s + block]
        torch.mm(p, d.T, out=out[:p.shape[0] * d.shape[0]].view(p.shape[0], d.shape[0]))
    return time.perf_counter() - t0


def load_module(path: str):
    spec = importlib.util.spec_from_file_location("megaface_before", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--distractors", type=int, default=1_000_000)
    p.add_argument("--identities", type=int, default=530)
    p.add_argument("--probes", type=int, default=3530)
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--before", default=None, help="an older megaface.py to compare results with")
    p.add_argument("--tiled", action="store_true",
                   help="also time evaluate with 16 MB probe-row tiles of each block's product")
    args = p.parse_args(argv)
    from facetrain.eval import megaface
    t0 = time.perf_counter()
    probes, ids, dis = make_data(args.distractors, args.identities, args.probes, args.dim,
                                 args.seed)
    print(f"data: {probes.shape[0]} probes, {dis.shape[0]} distractors x {args.dim} "
          f"({time.perf_counter() - t0:.1f} s), torch threads {torch.get_num_threads()}",
          flush=True)
    names = ["evaluate", "floor"] + (["tiled"] if args.tiled else [])
    times: Dict[str, list] = {k: [] for k in names}
    res = None
    for r in range(args.rounds):
        for side in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            if side == "evaluate":
                res = megaface.evaluate(probes, ids, dis)
            elif side == "tiled":                   # 16 MB probe-row tiles of each product
                assert megaface.evaluate(probes, ids, dis, tile_bytes=16 * 2**20) == res \
                    or res is None
            else:
                floor(probes, dis)
            times[side].append(time.perf_counter() - t0)
            print(f"round {r} {side}: {times[side][-1]:.2f} s", flush=True)
    for side, ts in times.items():
        print(f"{side}: best {min(ts):.2f} s, median {statistics.median(ts):.2f} s, "
              f"spread {max(ts) - min(ts):.2f} s")
    ratios = [f / e for f, e in zip(times["floor"], times["evaluate"])]
    if args.tiled:
        ur = [f / e for f, e in zip(times["floor"], times["tiled"])]
        print(f"floor / tiled: best-of-each {min(times['floor']) / min(times['tiled']):.3f}, "
              f"median of round ratios {statistics.median(ur):.3f}")
    print(f"floor / evaluate: best-of-each {min(times['floor']) / min(times['evaluate']):.3f}, "
          f"median of round ratios {statistics.median(ratios):.3f} (target >= 0.9)")
    print(f"rank1 {res['rank1']:.6f} rank5 {res['rank5']:.6f} rank10 {res['rank10']:.6f} "
          f"TPR@1e-6 {res['tpr_at_fpr']}")
    if args.before:
        t0 = time.perf_counter()
        old = load_module(args.before).evaluate(probes, ids, dis)
        print(f"before ({args.before}): {time.perf_counter() - t0:.2f} s")
        same = all(old[k] == res[k] for k in old)
        print(f"results identical to before: {same}")
        if not same:
            print({k: (old[k], res[k]) for k in old if old[k] != res[k]})
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
