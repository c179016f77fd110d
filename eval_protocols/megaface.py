"""MegaFace Challenge 1: rank-1 identification (CMC) and TPR@FPR=1e-6 with up to 1M distractors,
and devkit feature files (<image>_<algo>.bin) for the official devkit. Layout: see the docstring
of facetrain/eval/megaface.py.

    python eval_protocols/megaface.py                  # newest model, embedded glyph MegaFace
    python eval_protocols/megaface.py --root /data/megaface --distractors 1000000 \\
        --features mf.npy --devkit-out feats/ --algo facetrain
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import _common  # the sibling module: this folder is first on the path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default=str(_common.MEGAFACE_ROOT),
                   help="folder with facescrub_lst, megaface_lst, facescrub_images/, "
                        "megaface_images/")
    p.add_argument("--distractors", type=int, default=None,
                   help="use the first N distractors of megaface_lst (default: all)")
    p.add_argument("--no-noise", action="store_true",
                   help="ignore facescrub_noises.txt / megaface_noises.txt")
    p.add_argument("--devkit-out", default=None,
                   help="also write devkit feature files under this folder "
                        "(facescrub/ and megaface/ subfolders)")
    p.add_argument("--algo", default="facetrain", help="algorithm name in devkit file names")
    _common.add_fpr_rule_arg(p)
    _common.add_common_args(p, str(_common.REPORTS_DIR / "megaface.json"))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    from facetrain.eval import megaface
    args = _common.parse_args(build_parser(), argv)
    root = _common.require(Path(args.root), "MegaFace folder", "--root DIR")
    probes, ids, dis, keep_p, keep_d = megaface.load_layout(root, not args.no_noise)
    if args.devkit_out:                  # every devkit file name checked before extraction
        out = Path(args.devkit_out)
        megaface.devkit_paths(out / "facescrub", probes, args.algo, root / "facescrub_lst")
        megaface.devkit_paths(out / "megaface", dis, args.algo, root / "megaface_lst")

    def images():
        fs = megaface.ListImages(root / "facescrub_images", probes, root / "facescrub_lst")
        mf = megaface.ListImages(root / "megaface_images", dis, root / "megaface_lst")
        fs.check_exist()
        mf.check_exist()
        return _Concat(fs, mf)

    feats = _common.features_or_extract(
        args, len(probes) + len(dis), f"{root}/facescrub_lst + megaface_lst", images)
    pf, df = feats[:len(probes)], feats[len(probes):]
    if args.devkit_out:
        out = Path(args.devkit_out)
        n = megaface.write_devkit_features(out / "facescrub", probes, pf, args.algo,
                                           root / "facescrub_lst")
        n += megaface.write_devkit_features(out / "megaface", dis, df, args.algo,
                                            root / "megaface_lst")
        print(f"devkit features: {n} files under {out}")
    df = df[keep_d]
    n_dis = df.shape[0] if args.distractors is None else args.distractors
    if n_dis > df.shape[0]:
        raise _common.UsageError(f"--distractors {n_dis} but only {df.shape[0]} distractors remain "
                                 "after noise removal")
    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    res = megaface.evaluate(pf[keep_p], ids[keep_p], df, n_dis, device=device,
                            fpr_rule=args.fpr_rule)
    res["probes_dropped_as_noise"] = int((~keep_p).sum())
    res["distractors_dropped_as_noise"] = int((~keep_d).sum())
    _common.print_table(["distractors", "probes", "rank-1 %", "rank-5 %", "rank-10 %",
                         *[f"TPR@FPR={k} %" for k in res["tpr_at_fpr"]]],
                        [[res["distractors"], res["probes"], res["rank1"], res["rank5"],
                          res["rank10"], *res["tpr_at_fpr"].values()]],
                        f"MegaFace Challenge 1 (FPR rule {args.fpr_rule})")
    _common.write_json(args.json, res)
    png = _common.plot_path(args)
    if png is not None:
        from facetrain.eval.plots import plot_cmc
        print(f"plot: {plot_cmc({'MegaFace': res['cmc']}, png, 'MegaFace CMC')}")
    return 0


class _Concat:
    """Two datasets back to back (probes, then distractors)."""

    def __init__(self, a, b) -> None:
        self.a, self.b = a, b

    def __len__(self) -> int:
        return len(self.a) + len(self.b)

    def __iter__(self):
        yield from self.a
        yield from self.b


if __name__ == "__main__":
    sys.exit(_common.run(main, None, build_parser))
