"""IJB-C `--features` CLI end to end against a plain-numpy reference, rounds interleaved.

Writes synthetic meta files of IJB-C's shape (469,375 images, 23,124 templates, 15,658,489
template pairs at --scale 1) and a features .npy once into --workdir, then alternates:

  A  facetrain: `eval_protocols/ijbc.py --features` (main(); read_meta, load, pool, score, ROC)
  B  reference: np.loadtxt of the three meta files, per-(template, media) means summed per
     template with np.add.at, one float32 matmul for the scores, a full sort for the ROC

and prints per-side best / median seconds, the ratio, and whether the TPRs are identical. Each
side's peak memory is measured once in a fresh subprocess (VmHWM above the features' size).

    python benchmarks/ijbc_cli.py --scale 0.25 --rounds 3
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, Tuple

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def load_script(path: Path, name: str):
    """A script of this repository as a module, as `python path` would run it, its folder's
    sibling modules (eval_protocols/_common.py) included, without editing sys.path."""
    import importlib.util

    for sibling in sorted(path.parent.glob("_*.py")):
        if sibling.stem != "__init__" and sibling.stem not in sys.modules:
            _exec(importlib.util.spec_from_file_location(sibling.stem, sibling))
    return _exec(importlib.util.spec_from_file_location(name, path))


def _exec(spec):
    import importlib.util

    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def write_synthetic(root: Path, scale: float, dim: int, seed: int = 0) -> Path:
    """IJB-C-shaped meta/ + features.npy under root (skipped when already there)."""
    feats_path = root / f"features_{scale}_{dim}.npy"
    meta = root / "meta"
    if feats_path.is_file() and (meta / "ijbc_template_pair_label.txt").is_file():
        return feats_path
    meta.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n_img, n_gal, n_probe = int(469375 * scale), int(3531 * scale), int(19593 * scale)
    n_pairs, n_gen = int(15658489 * scale), int(19557 * scale)
    n_t = n_gal + n_probe
    subj = rng.integers(0, max(1, n_t // 6), n_t)                 # ~6 templates per subject
    tid_of = np.arange(n_t) * 3 + 1000
    t_img = np.sort(np.r_[np.arange(n_t), rng.integers(0, n_t, n_img - n_t)])
    tids = tid_of[t_img]
    mids = tids * 16 + rng.integers(0, 8, n_img)
    centres = rng.standard_normal((subj.max() + 1, dim), dtype=np.float32)
    feats = centres[subj[t_img]] + 1.5 * rng.standard_normal((n_img, dim), dtype=np.float32)
    np.save(feats_path, feats)
    del feats
    names = np.char.add(np.arange(n_img).astype("U"), ".jpg")
    np.savetxt(meta / "ijbc_face_tid_mid.txt", np.c_[names, tids, mids], fmt="%s")
    lmk = rng.uniform(30, 80, (n_img, 10)).round(3)
    face = rng.uniform(0.5, 1.0, n_img).round(4)
    np.savetxt(meta / "ijbc_name_5pts_score.txt",
               np.c_[names, lmk.astype("U8"), face.astype("U8")], fmt="%s")
    a = rng.integers(0, n_gal, n_pairs)
    b = n_gal + rng.integers(0, n_probe, n_pairs)
    gen = rng.choice(n_pairs, n_gen, replace=False)             # some pairs of one subject
    label = (subj[a] == subj[b]).astype(np.int64)
    label[gen] = 1
    np.savetxt(meta / "ijbc_template_pair_label.txt", np.c_[tid_of[a], tid_of[b], label],
               fmt="%d")
    return feats_path


def side_facetrain(root: Path, feats_path: Path, out: Path) -> Tuple[Dict[str, object], Dict]:
    cli = load_script(REPO / "eval_protocols" / "ijbc.py", "_ijbc_cli")
    import json
    t0 = time.perf_counter()
    rc = cli.main(["--root", str(root), "--features", str(feats_path), "--no-1n", "--no-plot",
                   "--quiet", "--json", str(out)])
    dt = time.perf_counter() - t0
    assert rc == 0
    return json.loads(out.read_text())["1:1"]["tpr_at_fpr"], {"total": dt}


def side_reference(root: Path, feats_path: Path) -> Tuple[Dict[str, object], Dict]:
    """Plain numpy, written from the protocol's definition (no facetrain code)."""
    t0 = time.perf_counter()
    meta = root / "meta"
    tm = np.loadtxt(meta / "ijbc_face_tid_mid.txt", dtype=np.int64, usecols=(1, 2),
                    comments=None)
    pr = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=np.int64, comments=None)
    t_parse = time.perf_counter()
    feats = np.load(feats_path)
    t_ids, t_inv = np.unique(tm[:, 0], return_inverse=True)
    _, k_inv, k_cnt = np.unique(tm[:, 0] * (tm[:, 1].max() + 1) + tm[:, 1], return_inverse=True,
                                return_counts=True)
    w = (1.0 / k_cnt[k_inv]).astype(np.float32)
    tf = np.zeros((t_ids.size, feats.shape[1]), np.float32)
    np.add.at(tf, t_inv, feats * w[:, None])
    tf /= np.linalg.norm(tf, axis=1, keepdims=True)
    r1, r2 = np.searchsorted(t_ids, pr[:, 0]), np.searchsorted(t_ids, pr[:, 1])
    u1, i1 = np.unique(r1, return_inverse=True)
    u2, i2 = np.unique(r2, return_inverse=True)
    scores = (tf[u1] @ tf[u2].T)[i1, i2]
    t_score = time.perf_counter()
    lab = pr[:, 2].astype(bool)
    order = np.argsort(-scores, kind="stable")
    s, y = scores[order], lab[order]
    last = np.flatnonzero(np.r_[s[1:] != s[:-1], True])
    tps = np.cumsum(y)[last]
    fps = last + 1 - tps
    n_pos, n_neg = int(lab.sum()), int((~lab).sum())
    tpr, fpr = tps / n_pos, fps / n_neg
    res = {}
    for t in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1):
        key = f"{t:.0e}"
        if t * n_neg < 1 - 1e-9:
            res[key] = None
        else:
            ok = fpr <= t
            res[key] = float(max(tpr[ok].max() if ok.any() else 0.0, 0.0))
    t_end = time.perf_counter()
    return res, {"total": t_end - t0, "parse": t_parse - t0, "score": t_score - t_parse,
                 "roc": t_end - t_score}


def stages(root: Path, feats_path: Path) -> Dict[str, float]:
    """facetrain's CLI path split into its steps, and the floor the issue names: one float32
    GEMM of the used templates plus one sort of the scores."""
    import torch
    from facetrain.eval import ijbc
    from facetrain.eval.embed import load_features
    from facetrain.eval.metrics import roc_curve, tpr_at_fpr_from_roc
    t = [time.perf_counter()]
    meta = ijbc.read_meta(root, "ijbc", need_landmarks=False)
    t.append(time.perf_counter())
    feats = load_features(feats_path, len(meta.names), "face_tid_mid")
    t.append(time.perf_counter())
    t_ids, tfeat = ijbc.pool_templates(feats, meta.tids, meta.mids)
    t.append(time.perf_counter())
    r1 = ijbc.template_rows(t_ids, meta.pair_t1, "pairs")
    r2 = ijbc.template_rows(t_ids, meta.pair_t2, "pairs")
    scores = ijbc.score_pairs(tfeat, r1, r2)
    t.append(time.perf_counter())
    fpr, tpr, _ = roc_curve(meta.pair_label, scores)
    tpr_at_fpr_from_roc(fpr, tpr)
    t.append(time.perf_counter())
    a = torch.from_numpy(tfeat[np.unique(r1)])
    b = torch.from_numpy(tfeat[np.unique(r2)])
    g0 = time.perf_counter()
    torch.mm(a, b.T)
    g1 = time.perf_counter()
    np.sort(scores)
    g2 = time.perf_counter()
    names = ("read_meta", "load_features", "pool", "score", "roc")
    out = {n: t[i + 1] - t[i] for i, n in enumerate(names)}
    out.update(gemm=g1 - g0, sort=g2 - g1, pairs=float(scores.size),
               scores_computed=float(a.shape[0] * b.shape[0]))
    return out


def peak_memory(side: str, root: Path, feats_path: Path) -> float:
    """VmHWM in GiB of a fresh process that runs one side once."""
    code = ("import importlib.util as u; s = u.spec_from_file_location('ijbc_cli', %r);"
            "b = u.module_from_spec(s); s.loader.exec_module(b);"
            "from pathlib import Path; import tempfile;"
            "r, f = Path(%r), Path(%r);"
            "b.side_facetrain(r, f, Path(tempfile.mkdtemp()) / 'o.json') if %r == 'A' "
            "else b.side_reference(r, f);"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
            % (str(Path(__file__).resolve()), str(root), str(feats_path), side))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("VmHWM")][0]
    return int(line.split()[1]) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's sizes")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="A/B rounds (order alternates)")
    p.add_argument("--workdir", default="/tmp/ijbc_bench", help="synthetic data cache")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    args = p.parse_args(argv)
    root = Path(args.workdir) / f"s{args.scale}"
    t0 = time.perf_counter()
    feats_path = write_synthetic(root, args.scale, args.dim)
    print(f"data: {root} ({time.perf_counter() - t0:.1f} s to prepare)", flush=True)
    out = root / "report.json"
    times: Dict[str, list] = {"A": [], "B": []}
    tprs = {}
    for r in range(args.rounds):
        for side in (("A", "B") if r % 2 == 0 else ("B", "A")):
            if side == "A":
                res, t = side_facetrain(root, feats_path, out)
            else:
                res, t = side_reference(root, feats_path)
            tprs[side] = res
            times[side].append(t["total"])
            print(f"round {r} {side}: " + ", ".join(f"{k}={v:.2f}s" for k, v in t.items()),
                  flush=True)
    for side, name in (("A", "facetrain CLI"), ("B", "numpy reference")):
        ts = times[side]
        print(f"{name}: best {min(ts):.2f} s, median {statistics.median(ts):.2f} s")
    print(f"ratio reference/facetrain (best): {min(times['B']) / min(times['A']):.2f}x, "
          f"(median): {statistics.median(times['B']) / statistics.median(times['A']):.2f}x")
    st = stages(root, feats_path)
    print("facetrain steps: " + ", ".join(f"{k}={v:.2f}s" for k, v in st.items()
                                          if k not in ("pairs", "scores_computed")))
    scoring = st["pool"] + st["score"] + st["roc"]
    print(f"scoring (pool + scores + ROC) {scoring:.2f} s against the GEMM + sort floor "
          f"{st['gemm'] + st['sort']:.2f} s ({scoring / (st['gemm'] + st['sort']):.2f}x); CLI best "
          f"{min(times['A']):.2f} s = {min(times['A']) / scoring:.2f}x scoring; "
          f"{st['scores_computed'] / 1e6:.0f}M scores computed for {st['pairs'] / 1e6:.1f}M pairs")
    same = tprs["A"] == tprs["B"]
    print(f"TPRs identical: {same}\n  facetrain {tprs['A']}\n  reference {tprs['B']}")
    if not args.no_memory:
        feat_gib = feats_path.stat().st_size / 2**30
        for side in ("A", "B"):
            hwm = peak_memory(side, root, feats_path)
            print(f"peak RSS {side}: {hwm:.2f} GiB ({hwm - feat_gib:.2f} GiB above the "
                  f"{feat_gib:.2f} GiB of features)", flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
