"""Build a verification pack (`.bin`, what InsightFace's loader and eval_protocols/lfw.py read)
from an image folder and a pairs file.

    python data_tools/make_pack.py lfw_aligned/ pairs.txt --output data/packs/lfw.bin
    python data_tools/make_pack.py mine_aligned/ pairs.csv --output data/packs/mine.bin

Pairs files: LFW's pairs.txt (header `10 300`, then `name n1 n2` for the same person and
`name1 n1 name2 n2` for different people; images name/name_0001.jpg), or a CSV
`path1,path2,same` with paths relative to the image folder. The pairs keep the file's order,
so the evaluator's 10 folds (cut in pair order) are the file's folds; a pair count the folds
cannot split evenly is refused. Images are copied as they are, or with --align (or
--landmarks FILE) aligned to the ArcFace 112x112 template first, as data_tools/align_faces.py
does; an image that cannot be aligned stops the run with its name and pairs-file line.

    python data_tools/make_pack.py lfw/ pairs.txt --output lfw.bin --align      # raw LFW photos
"""
from __future__ import annotations

import argparse
import sys

from facetrain.build.align_folder import Aligner
from _interrupt import (Terminated, exit_code, sigterm_raises,
                                      stopped_message)
from facetrain.build.packs import make_pack
from facetrain.logging_utils import setup_tool_logging
from _cli import add_align_options, for_command_line


def build_parser() -> argparse.ArgumentParser:
    """The options; destinations are make_pack's parameter names (--folds -> n_folds), so the
    library's messages render as these flags."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("image_dir", help="folder the pairs file's image paths are relative to")
    p.add_argument("pairs", help="pairs file: LFW pairs.txt or CSV path1,path2,same")
    p.add_argument("--output", required=True, help="the .bin file to write")
    p.add_argument("--format", choices=("auto", "lfw", "csv"), default="auto",
                   help="pairs file format (default: csv for a .csv file, else LFW)")
    p.add_argument("--ext", default="jpg",
                   help="image extension of LFW-format names (default jpg)")
    p.add_argument("--folds", dest="n_folds", type=int, default=10,
                   help="folds the pair count must split into evenly (default 10)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    p.add_argument("--align", action="store_true",
                   help="align every image to the ArcFace template first (dlib detector unless "
                        "--landmarks)")
    add_align_options(p)
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_tool_logging()
    try:
        transform = None
        if args.align or args.landmarks:
            from facetrain.build.landmarks import read_landmarks_file

            lmk = read_landmarks_file(args.landmarks) if args.landmarks else None
            transform = Aligner(lmk, None, args.multiple, args.align_size).encoded
        with sigterm_raises():
            s = make_pack(args.image_dir, args.pairs, args.output, args.format, args.n_folds,
                          args.ext.lstrip("."), args.overwrite, transform=transform,
                          progress=not args.no_progress)
    except (OSError, ValueError, ImportError) as exc:
        print(f"make_pack: {for_command_line(str(exc), parser)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        print(stopped_message("make_pack", exc, args.output), file=sys.stderr)
        return exit_code(exc)
    print(f"wrote {s.output}: {s.pairs} pairs ({s.same} same, {s.pairs - s.same} different), "
          f"{s.images} distinct images of {s.image_shape[0]}x{s.image_shape[1]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
