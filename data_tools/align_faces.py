"""Align face photos to the ArcFace 112x112 template (5 landmarks, least-squares similarity
transform), keeping the folder layout.

    python data_tools/align_faces.py photos/ aligned/                         # dlib detector
    python data_tools/align_faces.py photos/ aligned/ --landmarks lmk.txt     # your landmarks
    python data_tools/folders_to_rec.py aligned/ data/mine/train              # then pack them

Landmarks come from a landmarks file (`name x1 y1 ... x5 y5 [score]` per line, InsightFace's
layout, names relative to IMAGE_DIR) or from dlib's face detector with the 68-point model of
face-recognition-models (`pip install 'facetrain[align]'`; nothing is downloaded at run time).
Images with no face, several faces (--multiple) or unreadable bytes are counted and listed in
OUT_DIR/align_report.csv. A rerun keeps the images already aligned and does the rest.
"""
from __future__ import annotations

import argparse
import sys

from facetrain.build.align_folder import align_folder
from _interrupt import Terminated, exit_code, sigterm_raises
from facetrain.logging_utils import setup_tool_logging
from _cli import add_align_options, for_command_line, print_align_summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("image_dir", help="folder of photos (sub-folders kept)")
    p.add_argument("out_dir", help="folder for the aligned images (outside IMAGE_DIR)")
    add_align_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_tool_logging()
    try:
        with sigterm_raises():
            s = align_folder(args.image_dir, args.out_dir, args.landmarks, args.multiple,
                             args.align_size, progress=not args.no_progress)
    except (OSError, ValueError, ImportError) as exc:
        print(f"align_faces: {for_command_line(str(exc), p)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        print(f"align_faces: stopped; the images aligned so far are kept whole in "
              f"{args.out_dir}; run the command again to do the rest", file=sys.stderr)
        return exit_code(exc)
    print_align_summary("align_faces", s, p)
    return 0


if __name__ == "__main__":
    sys.exit(main())
