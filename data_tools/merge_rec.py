"""Merge RecordIO datasets into one InsightFace-layout dataset, classes relabelled without
collisions (the first input's classes first), record bytes copied without decoding.

    python data_tools/merge_rec.py data/mine/train /data/ms1mv3/train --output data/mine_ms1m
    python data_tools/make_longtail.py --input data/mine_ms1m --head 5000 --tail 10000 ...

Writes OUTPUT/train.rec/.idx, property and manifest.csv (new_label, input, source,
source_label, images). Inputs of different image sizes are refused unless --allow-mixed-sizes.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from _interrupt import (Terminated, exit_code, sigterm_raises,
                                      stopped_message)
from facetrain.build.merge import merge_datasets
from facetrain.logging_utils import setup_tool_logging
from _cli import for_command_line


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("inputs", nargs="+", metavar="DATASET",
                   help="datasets to merge, in label order: prefix, .rec file or folder of "
                        "shards (InsightFace or im2rec layout)")
    p.add_argument("--output", required=True,
                   help="output folder (a new or empty one; never one of the inputs' folders)")
    p.add_argument("--allow-mixed-sizes", action="store_true",
                   help="merge inputs of different image sizes (property records the first "
                        "input's size; the training loader resizes to data.image_size)")
    p.add_argument("--shard-size", type=int, default=None,
                   help="split the output into train_000.rec, ... of this many images each")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --output folder, replacing its dataset "
                        "files (train*.rec/.idx, caches, property, manifest.csv)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_tool_logging()
    try:
        with sigterm_raises():
            s = merge_datasets(args.inputs, args.output, args.allow_mixed_sizes,
                               args.shard_size, progress=not args.no_progress,
                               overwrite=args.overwrite)
    except (OSError, ValueError) as exc:   # DatasetError/RecordIOError/OutputError: ValueErrors
        print(f"merge_rec: {for_command_line(str(exc), parser)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        print(stopped_message("merge_rec", exc, args.output), file=sys.stderr)
        return exit_code(exc)
    parts = " + ".join(f"{p} ({c} classes, {n} images)" for p, c, n in s.per_input)
    print(f"wrote {s.output}: {parts} = {s.classes} classes, {s.images} images, "
          f"{s.image_shape[0]}x{s.image_shape[1]}, in {s.seconds:.1f} s; manifest: "
          f"{Path(s.output) / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
