"""IJB-C / IJB-B 1:1 verification (TPR at FPR 1e-6 ... 1e-1, ROC plot) and, when the gallery and
probe CSVs are present, 1:N identification (rank-N, TPIR at FPIR).

    python eval_protocols/ijbc.py                     # newest model, embedded glyph IJB-C
    python eval_protocols/ijbc.py --root /data/IJB_release/IJBC --model backbone.pt
    python eval_protocols/ijbc.py --root /data/IJBB --prefix ijbb --features ijbb.npy
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import _common  # the sibling module: this folder is first on the path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default=str(_common.IJBC_ROOT),
                   help="IJB folder holding loose_crop/ and meta/")
    p.add_argument("--prefix", default="ijbc", choices=("ijbc", "ijbb"),
                   help="meta file prefix: ijbc or ijbb")
    p.add_argument("--faceness", action="store_true",
                   help="weight image features by the detector's faceness score")
    p.add_argument("--normalize-images", action="store_true",
                   help="L2-normalise each image feature before pooling (default keeps the norm)")
    p.add_argument("--no-1n", action="store_true", help="skip 1:N even when its CSVs exist")
    _common.add_fpr_rule_arg(p)
    _common.add_common_args(p, str(_common.REPORTS_DIR / "ijbc.json"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from facetrain.eval import ijbc, ijbc_1n
    args = _common.parse_args(build_parser(), argv)
    root = _common.require(Path(args.root), "IJB folder", "--root DIR")
    _common.require(root / "meta", "IJB meta folder", "--root DIR (the folder above meta/)")
    need = not args.features or args.faceness      # to align images, or to weight by faceness
    meta = ijbc.read_meta(root, args.prefix, need_landmarks=need, skip_landmarks=not need)
    do_1n = not args.no_1n and _check_1n(root, args.prefix)
    feats = _common.features_or_extract(
        args, len(meta.names), str(ijbc.meta_path(root, args.prefix, "face_tid_mid")),
        lambda: _checked(ijbc.AlignedImages(meta, args.image_size)))
    res = ijbc.verify_features(meta, feats, args.faceness, args.normalize_images,
                               fpr_rule=args.fpr_rule)
    fpr, tpr = res.pop("roc")
    t_ids, tfeat = res.pop("template_ids"), res.pop("template_features")
    name = args.prefix.upper()
    _common.print_table(["FPR", *res["tpr_at_fpr"]], [["TPR %", *res["tpr_at_fpr"].values()]],
                        f"{name} 1:1 ({res['templates']} templates, {res['pairs']} pairs, "
                        f"{res['genuine_pairs']} genuine; FPR rule {args.fpr_rule})")
    report = {"1:1": res}
    if do_1n:
        one_n = ijbc_1n.identify_templates(root, args.prefix, t_ids, tfeat)
        report["1:N"] = one_n
        rows = []
        for g in (*ijbc_1n.GALLERIES, "mean"):
            r = one_n[g]
            rows.append([g, r["rank1"], r["rank5"], r["rank10"],
                         *r.get("tpir_at_fpir", {}).values()])
        fpirs = next(iter(one_n[g].get("tpir_at_fpir", {}) for g in ijbc_1n.GALLERIES))
        print()
        _common.print_table(["gallery", "rank-1 %", "rank-5 %", "rank-10 %",
                             *[f"TPIR@FPIR={k} %" for k in fpirs]], rows, f"{name} 1:N")
    _common.write_json(args.json, report)
    png = _common.plot_path(args)
    if png is not None:
        from facetrain.eval.plots import plot_roc
        print(f"plot: {plot_roc({f'{name} 1:1': (fpr, tpr)}, png, f'{name} 1:1 ROC')}")
    return 0


def _check_1n(root: Path, prefix: str) -> bool:
    """True when all 1:N CSVs exist; a partial set is an error (never a silent 1:1-only run)."""
    from facetrain.eval import ijbc_1n
    missing = ijbc_1n.missing_1n(root, prefix)
    if len(missing) == len(ijbc_1n.PARTS):
        print(f"1:N skipped: no {prefix}_1N_*.csv in {root / 'meta'} (1:1 only)", file=sys.stderr)
        return False
    if missing:
        raise _common.UsageError(f"1:N file {missing[0]} is missing ({len(missing)} of "
                                 f"{len(ijbc_1n.PARTS)} 1:N CSVs absent) while the others exist; "
                                 "restore it from the IJB release, or pass --no-1n for 1:1 only")
    return True


def _checked(images):
    images.check_exist()
    return images


if __name__ == "__main__":
    sys.exit(_common.run(main, None, build_parser))
