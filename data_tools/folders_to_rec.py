"""Pack image folders into an InsightFace-layout RecordIO dataset.

    python data_tools/folders_to_rec.py faces/ data/mine/train            # faces/<id>/*.jpg
    python data_tools/folders_to_rec.py Market-1501/bounding_box_train data/market/train
    python data_tools/folders_to_rec.py photos/ data/mine/train --align   # detect + align first

--align (or --landmarks FILE) first aligns every photo to the ArcFace 112x112 template into
--aligned-dir (default: an `aligned` folder beside the output), exactly as
data_tools/align_faces.py does (report, resume), then packs the aligned images.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from facetrain.build.align_folder import align_folder
from facetrain.build.folders import folders_to_rec
from _interrupt import (Terminated, exit_code, sigterm_raises,
                                      stopped_message)
from facetrain.logging_utils import setup_tool_logging
from _cli import add_align_options, for_command_line, print_align_summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("root", help="folder with one sub-folder per identity, or a flat folder of "
                                "Market-1501-style names (PPPP_c1s1_000451_03.jpg)")
    p.add_argument("output", help="output prefix, e.g. data/mine/train (writes train.rec/.idx, "
                                  "property, labels.csv)")
    p.add_argument("--layout", choices=("auto", "folders", "flat"), default="auto",
                   help="input shape (default: folders if root has sub-folders, else flat)")
    p.add_argument("--size", type=int, nargs="+", default=None, metavar="PX",
                   help="resize to S (square) or H W and re-encode as JPEG; default: copy bytes")
    p.add_argument("--shard-size", type=int, default=None,
                   help="split into output_000.rec, ... of this many images each")
    p.add_argument("--no-check", action="store_true",
                   help="skip the decode check of every image (faster; bad files fail later)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out (and list) files that cannot be decoded, e.g. empty .jpg "
                        "files, instead of stopping at the first one; implies the check")
    p.add_argument("--align", action="store_true",
                   help="align the faces to the ArcFace template before packing (dlib detector "
                        "unless --landmarks)")
    add_align_options(p)
    p.add_argument("--aligned-dir", default=None,
                   help="where --align writes the aligned images (default: OUTPUT's folder/"
                        "aligned); a rerun keeps those already there")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_tool_logging()
    root = args.root
    try:
        with sigterm_raises():
            if args.align or args.landmarks:
                root = args.aligned_dir or str(Path(args.output).parent / "aligned")
                a = align_folder(args.root, root, args.landmarks, args.multiple,
                                 args.align_size, progress=not args.no_progress)
                print_align_summary("folders_to_rec", a, p)
            s = folders_to_rec(root, args.output, args.layout, args.size, args.shard_size,
                               check=not args.no_check, progress=not args.no_progress,
                               skip_bad=args.skip_bad)
    except (OSError, ValueError, ImportError) as exc:
        print(f"folders_to_rec: {for_command_line(str(exc), p)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        print(stopped_message("folders_to_rec", exc, args.output), file=sys.stderr)
        return exit_code(exc)
    for line in s.skipped:
        print(f"folders_to_rec: skipped {line}", file=sys.stderr)
    print(f"wrote {s.output}: {s.classes} identities, {s.images} images ({s.layout} layout, "
          f"image shape {s.image_shape[0]}x{s.image_shape[1]}"
          f"{f', {s.dropped} junk files with id < 0 left out' if s.dropped else ''}"
          f"{f', {len(s.skipped)} undecodable files skipped' if s.skipped else ''})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
