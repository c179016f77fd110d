"""Person re-ID (Market-1501 / DukeMTMC-reID): mAP and CMC rank-1/5/10 with same-camera exclusion.

    python eval_protocols/reid.py --root /data/Market-1501-v15.09.15 --model reid_backbone.pt \\
        --image-size 256 128
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, Sequence

import _common  # the sibling module: this folder is first on the path


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--root", default=str(_common.REID_ROOT),
                   help="dataset folder holding query/ and bounding_box_test/")
    _common.add_common_args(p, str(_common.REPORTS_DIR / "reid.json"), image_size=(256, 128))
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    import numpy as np
    from facetrain.eval import reid
    args = _common.parse_args(build_parser(), argv)
    args.image_size = tuple(args.image_size)
    root = _common.require(Path(args.root), "re-ID folder", "--root DIR")
    qp, q_pids, q_cams = reid.parse_folder(root / reid.QUERY_DIR)
    gp, g_pids, g_cams = reid.parse_folder(root / reid.GALLERY_DIR)
    feats = _common.features_or_extract(
        args, len(qp) + len(gp), f"{root} query/ + bounding_box_test/ (sorted names)",
        lambda: reid.FolderImages(qp + gp))
    feats = np.asarray(feats)
    res = reid.evaluate(feats[:len(qp)], q_pids, q_cams, feats[len(qp):], g_pids, g_cams)
    _common.print_table(["queries", "gallery", "mAP %", "rank-1 %", "rank-5 %", "rank-10 %"],
                        [[res["queries_scored"], res["gallery"], res["mAP"], res["rank1"],
                          res["rank5"], res["rank10"]]], f"re-ID {root.name}")
    if res["queries_skipped"]:
        print(f"{res['queries_skipped']} queries had no true match outside their camera (skipped)")
    _common.write_json(args.json, res)
    png = _common.plot_path(args)
    if png is not None:
        from facetrain.eval.plots import plot_cmc
        print(f"plot: {plot_cmc({root.name: res['cmc'][:20]}, png, 're-ID CMC')}")
    return 0


if __name__ == "__main__":
    sys.exit(_common.run(main, None, build_parser))
