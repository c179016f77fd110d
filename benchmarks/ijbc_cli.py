"""IJB-C `--features` CLI end to end, its scoring, the GEMM + sort floor and InsightFace-style
functions, all on the same synthetic arrays, rounds interleaved in one process.

Writes synthetic meta files of IJB-C's shape (469,375 images, 23,124 templates, 15,658,489
template pairs at --scale 1) and a features .npy once into --workdir, then each round runs, in
an order that rotates from round to round:

  cli        facetrain: `eval_protocols/ijbc.py --features` (main(): read_meta, load, pool, score,
             ROC, JSON)
  scoring    facetrain: `verify_features` on the parsed meta and loaded features (pool + scores +
             TPR@FPR), what the CLI spends after parsing and loading
  floor      one float32 GEMM of the templates the pairs use (torch.mm) + one np.sort of the
             15.7M scores: the limit named by the issue
  insight    InsightFace-style functions written here from the algorithm (not its code):
             per-template sum of media means in Python loops, L2-normalise, cosine of the pairs
             in batches of 100,000 (float64), sklearn's roc_curve, TPR at the nearest FPR
  numpy      (--numpy) the older plain-numpy reference (np.loadtxt, np.add.at, argsort ROC)
  before     (--before OLD.py) `verify_features` of another version of facetrain/eval/ijbc.py

and prints best / median seconds per side and the ratios, in wall time and in CPU time of this
process (one thread: under a shared machine's load the CPU time is the steadier of the two),
with the load average. It checks that verify_features gives
the same TPR@FPR (rules "le" and "nearest") as the one-point-per-score ROC of all pair scores
(the code before the corner ROC). Peak RSS of the CLI and of the InsightFace-style side (parsing
with np.loadtxt and np.load included) is measured once each in a fresh subprocess (VmHWM).

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


def side_insightface(tids: np.ndarray, mids: np.ndarray, feats: np.ndarray, t1: np.ndarray,
                     t2: np.ndarray, labels: np.ndarray) -> Tuple[Dict[str, object], Dict]:
    """InsightFace's IJB-C 1:1 evaluation as its algorithm reads (written here, not copied):
    Python loops over templates and their media, float64 templates, pair cosines in batches,
    sklearn's roc_curve and TPR at the ROC point nearest each FPR."""
    from sklearn.metrics import roc_curve
    t0 = time.perf_counter()
    uniq = np.unique(tids)
    tfeat = np.zeros((uniq.size, feats.shape[1]))
    for k, t in enumerate(uniq):
        sel = np.where(tids == t)[0]
        f_t, m_t = feats[sel], mids[sel]
        media = [f_t[m_t == m].mean(0) for m in np.unique(m_t)]
        tfeat[k] = np.sum(media, axis=0)
    tfeat /= np.linalg.norm(tfeat, axis=1, keepdims=True)
    row_of = np.zeros(int(uniq.max()) + 1, dtype=np.int64)
    row_of[uniq] = np.arange(uniq.size)
    scores = np.zeros(t1.size)
    for s in range(0, t1.size, 100000):
        a = tfeat[row_of[t1[s:s + 100000]]]
        b = tfeat[row_of[t2[s:s + 100000]]]
        scores[s:s + 100000] = np.sum(a * b, -1)
    t_score = time.perf_counter()
    fpr, tpr, _ = roc_curve(labels, scores)
    res = {f"{t:.0e}": float(tpr[int(np.argmin(np.abs(fpr - t)))])
           for t in (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)}
    t_end = time.perf_counter()
    return res, {"total": t_end - t0, "templates+scores": t_score - t0, "roc": t_end - t_score}


def side_scoring(meta, feats: np.ndarray, ijbc=None) -> Tuple[Dict[str, object], Dict]:
    """verify_features of facetrain, or of `ijbc`: another version of facetrain/eval/ijbc.py
    (--before), on the same parsed meta and features."""
    if ijbc is None:
        from facetrain.eval import ijbc
    t0 = time.perf_counter()
    res = ijbc.verify_features(meta, feats)
    return ({"tpr": res["tpr_at_fpr"], "roc": res["roc"]} if ijbc.__name__ == "_ijbc_before"
            else res["tpr_at_fpr"]), {"total": time.perf_counter() - t0}


def side_floor(tfeat: np.ndarray, a_rows: np.ndarray, b_rows: np.ndarray,
               scores: np.ndarray) -> Tuple[Dict, Dict]:
    import torch
    a, b = torch.from_numpy(tfeat[a_rows]), torch.from_numpy(tfeat[b_rows])
    c0, t0 = time.process_time(), time.perf_counter()
    torch.mm(a, b.T)
    t1 = time.perf_counter()
    np.sort(scores)
    t2 = time.perf_counter()
    return {}, {"total": t2 - t0, "cpu": time.process_time() - c0, "gemm": t1 - t0,
                "sort": t2 - t1}


def same_as_full_roc(meta, feats: np.ndarray) -> bool:
    """verify_features' TPR@FPR against the full one-point-per-score ROC of all pair scores
    (the computation before the corner ROC), both FPR rules."""
    from facetrain.eval import ijbc
    from facetrain.eval.metrics import roc_curve, tpr_at_fpr_from_roc
    ok = True
    for rule in ("le", "nearest"):
        res = ijbc.verify_features(meta, feats, fpr_rule=rule)
        t_ids, tf = res["template_ids"], res["template_features"]
        scores = ijbc.score_pairs(tf, ijbc.template_rows(t_ids, meta.pair_t1, "p"),
                                  ijbc.template_rows(t_ids, meta.pair_t2, "p"))
        fpr, tpr, _ = roc_curve(meta.pair_label, scores)
        ref = tpr_at_fpr_from_roc(fpr, tpr, n_neg=int((~meta.pair_label).sum()), rule=rule)
        print(f"rule {rule}: corner ROC {res['tpr_at_fpr']}\n         full ROC   {ref}",
              flush=True)
        ok &= ref == res["tpr_at_fpr"]
    return ok


def stages(root: Path, feats_path: Path) -> Dict[str, float]:
    """facetrain's CLI path split into its steps (the steps of `verify_features`), CPU seconds
    of this process (one thread)."""
    from facetrain.eval import ijbc
    from facetrain.eval.embed import load_features
    t = [time.process_time()]
    meta = ijbc.read_meta(root, "ijbc", need_landmarks=False, skip_landmarks=True)
    t.append(time.process_time())
    feats = load_features(feats_path, len(meta.names), "face_tid_mid")
    t.append(time.process_time())
    t_ids, tfeat = ijbc.pool_templates(feats, meta.tids, meta.mids)
    t.append(time.process_time())
    scores = ijbc._pair_scores(tfeat, t_ids, meta.pair_t1, meta.pair_t2, "pairs")
    t.append(time.process_time())
    pos, neg = np.sort(scores[meta.pair_label]), scores[~meta.pair_label]
    neg.sort()
    t.append(time.process_time())
    ijbc.roc_from_sorted(pos, neg)
    t.append(time.process_time())
    names = ("read_meta", "load_features", "pool", "tables+gemm+gather", "split+sort", "roc")
    return {n: t[i + 1] - t[i] for i, n in enumerate(names)}


def load_average() -> str:
    """The 1/5/15-minute load averages, for the record next to every timing."""
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def _insight_from_files(root: Path, feats_path: Path) -> None:
    meta = root / "meta"
    tm = np.loadtxt(meta / "ijbc_face_tid_mid.txt", dtype=np.int64, usecols=(1, 2),
                    comments=None)
    pr = np.loadtxt(meta / "ijbc_template_pair_label.txt", dtype=np.int64, comments=None)
    side_insightface(tm[:, 0], tm[:, 1], np.load(feats_path), pr[:, 0], pr[:, 1],
                     pr[:, 2].astype(bool))


def peak_memory(side: str, root: Path, feats_path: Path) -> float:
    """VmHWM in GiB of a fresh process that runs one side once (A: the CLI, C: InsightFace-style
    functions with np.loadtxt / np.load for their inputs)."""
    code = ("import importlib.util as u; s = u.spec_from_file_location('ijbc_cli', %r);"
            "b = u.module_from_spec(s); s.loader.exec_module(b);"
            "from pathlib import Path; import tempfile;"
            "r, f = Path(%r), Path(%r);"
            "b.side_facetrain(r, f, Path(tempfile.mkdtemp()) / 'o.json') if %r == 'A' "
            "else b._insight_from_files(r, f);"
            "print([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0])"
            % (str(REPO / "benchmarks" / "ijbc_cli.py"), str(root), str(feats_path), side))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    line = [ln for ln in out.stdout.splitlines() if ln.startswith("VmHWM")][0]
    return int(line.split()[1]) / 2**20


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--scale", type=float, default=1.0, help="fraction of IJB-C's sizes")
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--rounds", type=int, default=3, help="rounds (the side order rotates)")
    p.add_argument("--workdir", default="/tmp/ijbc_bench", help="synthetic data cache")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--no-insight", action="store_true", help="skip the InsightFace-style side")
    p.add_argument("--numpy", action="store_true", help="also run the plain-numpy reference")
    p.add_argument("--stages", action="store_true", help="also time the CLI's steps once")
    p.add_argument("--before", metavar="IJBC_PY",
                   help="another facetrain/eval/ijbc.py (e.g. `git show REV:facetrain/eval/ijbc.py"
                        " > old.py`): its verify_features joins the rounds as side 'before', "
                        "and its TPR@FPR and thinned ROC are compared with the current ones")
    args = p.parse_args(argv)
    from facetrain.eval import ijbc
    root = Path(args.workdir) / f"s{args.scale}"
    t0 = time.perf_counter()
    feats_path = write_synthetic(root, args.scale, args.dim)
    print(f"data: {root} ({time.perf_counter() - t0:.1f} s to prepare); load {load_average()}",
          flush=True)
    out = root / "report.json"
    meta = ijbc.read_meta(root, "ijbc", need_landmarks=False, skip_landmarks=True)
    feats = np.load(feats_path)
    same = same_as_full_roc(meta, feats)
    print(f"TPR@FPR identical to the full ROC (both rules): {same}", flush=True)
    res = ijbc.verify_features(meta, feats)
    t_ids, tfeat = res["template_ids"], res["template_features"]
    a_rows = np.unique(ijbc.template_rows(t_ids, meta.pair_t1, "p"))
    b_rows = np.unique(ijbc.template_rows(t_ids, meta.pair_t2, "p"))
    scores = np.random.default_rng(0).random(meta.pair_t1.size, dtype=np.float32)
    print(f"{a_rows.size * b_rows.size / 1e6:.0f}M scores computed for "
          f"{meta.pair_t1.size / 1e6:.1f}M pairs", flush=True)
    sides = {"cli": lambda: side_facetrain(root, feats_path, out),
             "scoring": lambda: side_scoring(meta, feats),
             "floor": lambda: side_floor(tfeat, a_rows, b_rows, scores)}
    if not args.no_insight:
        sides["insight"] = lambda: side_insightface(meta.tids, meta.mids, feats, meta.pair_t1,
                                                    meta.pair_t2, meta.pair_label)
    if args.numpy:
        sides["numpy"] = lambda: side_reference(root, feats_path)
    if args.before:
        import importlib.util
        spec = importlib.util.spec_from_file_location("_ijbc_before", args.before)
        before = _exec(spec)
        sides["before"] = lambda: side_scoring(meta, feats, before)
    names = list(sides)
    times: Dict[str, list] = {k: [] for k in names}
    cpus: Dict[str, list] = {k: [] for k in names}
    tprs = {}
    for r in range(args.rounds):
        order = names[r % len(names):] + names[:r % len(names)]
        for side in order:
            c0 = time.process_time()
            res, t = sides[side]()
            t.setdefault("cpu", time.process_time() - c0)
            tprs[side] = res
            times[side].append(t["total"])
            cpus[side].append(t["cpu"])
            print(f"round {r} {side}: " + ", ".join(f"{k}={v:.2f}s" for k, v in t.items()),
                  flush=True)
    for label, tab in (("wall", times), ("CPU", cpus)):
        med = {k: statistics.median(v) for k, v in tab.items()}
        best = {k: min(v) for k, v in tab.items()}
        for side in names:
            ts = tab[side]
            print(f"{label} {side}: best {best[side]:.2f} s, median {med[side]:.2f} s, "
                  f"spread {max(ts) - min(ts):.2f} s")
        print(f"{label} scoring / floor: best {best['scoring'] / best['floor']:.2f}x, "
              f"median {med['scoring'] / med['floor']:.2f}x (target <= 1.5)")
        print(f"{label} cli / scoring: best {best['cli'] / best['scoring']:.2f}x, "
              f"median {med['cli'] / med['scoring']:.2f}x (target <= 1.5)")
    print(f"load {load_average()}", flush=True)
    if args.stages:
        st = stages(root, feats_path)
        print("facetrain steps (CPU): " + ", ".join(f"{k}={v:.2f}s" for k, v in st.items()))
    med = {k: statistics.median(v) for k, v in times.items()}        # wall, as before
    best = {k: min(v) for k, v in times.items()}
    if "before" in times:
        print(f"before / scoring (wall): best {best['before'] / best['scoring']:.2f}x, "
              f"median {med['before'] / med['scoring']:.2f}x")
        ref = ijbc.verify_features(meta, feats)
        same_before = (tprs["before"]["tpr"] == ref["tpr_at_fpr"]
                       and all(np.array_equal(x, y) for x, y in zip(tprs["before"]["roc"],
                                                                     ref["roc"])))
        print(f"TPR@FPR and thinned ROC identical to --before: {same_before}")
        same &= same_before
    if "insight" in times:
        print(f"insight / scoring: best {best['insight'] / best['scoring']:.1f}x, "
              f"median {med['insight'] / med['scoring']:.1f}x (target >= 10)")
        print(f"TPR@FPR: facetrain (rule le) {tprs['scoring']}\n"
              f"         InsightFace-style (nearest, float64) {tprs['insight']}")
    if not args.no_memory:
        feat_gib = feats_path.stat().st_size / 2**30
        for side in ("A", "C") if not args.no_insight else ("A",):
            hwm = peak_memory(side, root, feats_path)
            print(f"peak RSS {'CLI' if side == 'A' else 'InsightFace-style'}: {hwm:.2f} GiB "
                  f"({hwm - feat_gib:.2f} GiB above the {feat_gib:.2f} GiB of features)",
                  flush=True)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
