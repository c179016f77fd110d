"""Verification packs (lfw.bin, cfp_fp.bin, agedb_30.bin, ...): 10-fold accuracy and TPR@FPR.

    python eval_protocols/lfw.py                       # newest model, embedded glyph pack
    python eval_protocols/lfw.py --pack lfw.bin cfp_fp.bin --model runs/x/export/backbone.pt
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import _common  # the sibling module: this folder is first on the path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--pack", nargs="+", default=[str(x) for x in _common.VERIFICATION_PACKS],
                   help="one or more .bin verification packs (pickle of (bins, issame_list))")
    p.add_argument("--folds", type=int, default=10, help="number of cross-validation folds")
    p.add_argument("--fpr", type=float, nargs="+", default=[1e-3],
                   help="FPR targets for the TPR columns")
    _common.add_common_args(p, str(_common.REPORTS_DIR / "verification.json"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from facetrain.eval import verification
    args = _common.parse_args(build_parser(), argv)
    if args.features and len(args.pack) != 1:
        raise _common.UsageError("--features holds one pack's rows; pass exactly one --pack")
    report, curves, rows = {}, {}, []
    for pack in args.pack:
        path = _common.require(Path(pack), "verification pack", "--pack PATH.bin")
        bins, issame = verification.load_pack(path)
        feats = _common.features_or_extract(
            args, len(bins), f"{path} (pack order)",
            lambda: verification.PackImages(bins, path))
        res = verification.evaluate_pack_features(feats, issame, args.folds, args.fpr)
        curves[path.stem] = res.pop("roc")
        report[path.stem] = res
        rows.append([path.stem, res["pairs"], res["accuracy_mean"], res["accuracy_std"],
                     *res["tpr_at_fpr"].values()])
    headers = ["pack", "pairs", "acc %", "std %", *[f"TPR@FPR={k} %" for k in
                                                     next(iter(report.values()))["tpr_at_fpr"]]]
    _common.print_table(headers, rows, "Verification (flip-sum, 10-fold)"
                        if args.folds == 10 else "Verification")
    _common.write_json(args.json, report)
    png = _common.plot_path(args)
    if png is not None:
        from facetrain.eval.plots import plot_roc
        print(f"plot: {plot_roc(curves, png, 'Verification ROC', xmin=1e-4)}")
    return 0


if __name__ == "__main__":
    sys.exit(_common.run(main, None, build_parser))
