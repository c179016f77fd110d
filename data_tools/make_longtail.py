"""Make a long-tailed subset of a RecordIO face/re-ID dataset (the LEAP paper's protocols).

    python data_tools/make_longtail.py --head 3000 --tail 10000            # face <H3K,T10K>
    python data_tools/make_longtail.py --input data/duke/train --head 20   # re-ID <H20,S5>

The default input, data/glyphs_large/train (16,000 glyph classes with >= 5 images each), is built
on first use from the installed CJK fonts (`python data_tools/build_glyphs.py --large` does the
same). FACETRAIN_GLYPHS_LARGE_CLASSES and FACETRAIN_GLYPH_FONT_ROOTS (folders separated by ':')
reduce that build, e.g. for CI.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional

from facetrain.data.dataset import resolve_shards
from _interrupt import (Terminated, exit_code, sigterm_raises,
                                      stopped_message)
from facetrain.build.longtail import DEFAULT_TAIL_SAMPLES, make_longtail
from facetrain.logging_utils import setup_tool_logging
from _cli import for_command_line

# Repository layout: where the README's commands put things (paths relative to the current
# working directory, the repository root there).
DEFAULT_INPUT = "data/glyphs_large/train"    # the large glyph set, built on first use
GLYPHS_ROOT = "data/glyphs"                  # its held-out characters are left out of it


def default_output(head: int, tail: Optional[int], tail_samples: int) -> str:
    """data/longtail_H{head}_T{tail|all}_S{tail_samples}."""
    return f"data/longtail_H{head}_T{'all' if tail is None else tail}_S{tail_samples}"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--input", default=DEFAULT_INPUT,
                   help=f"source dataset: prefix, .rec file or folder of shards "
                        f"(default {DEFAULT_INPUT}, the large glyph set, built on first "
                        "use)")
    p.add_argument("--output", default=None,
                   help="output folder (default data/longtail_H{head}_T{tail|all}_S{S})")
    p.add_argument("--head", type=int, required=True,
                   help="number of head classes (largest by image count) kept whole")
    p.add_argument("--tail", type=int, default=None,
                   help="number of tail classes after the head (default: every remaining class "
                        "with at least --tail-samples images)")
    p.add_argument("--tail-samples", type=int, default=DEFAULT_TAIL_SAMPLES,
                   help=f"images kept per tail class, chosen at random (default "
                        f"{DEFAULT_TAIL_SAMPLES}, the paper's S)")
    p.add_argument("--seed", type=int, default=0, help="seed of the tail image choice")
    p.add_argument("--tail-exclude", default=None, metavar="CSV",
                   help="images tail classes may not keep: a CSV whose header names label and "
                        "ordinal (position in the class, dataset order), e.g. rows of the glyph "
                        "set's train_designs.csv; a class left with fewer than --tail-samples "
                        "images is not a tail class")
    p.add_argument("--shard-size", type=int, default=None,
                   help="split the output into train_000.rec, ... of this many images each")
    p.add_argument("--overwrite", action="store_true",
                   help="write into an existing non-empty --output folder, replacing its dataset "
                        "files (train*.rec/.idx, their caches, property, manifest.csv); other "
                        "files there are kept and listed")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def _ensure_default_input(progress: bool) -> int:
    """Build the default input (the large glyph set) when missing; 0, or an exit code after
    printing why the build failed or stopped."""
    from glyph_benchmark.build import GlyphBuildError
    from glyph_benchmark.large import ensure_large_set, is_built

    root = Path(DEFAULT_INPUT).parent
    try:
        with sigterm_raises():
            if not is_built(root):
                print(f"make_longtail: the default input {root} is missing; building it (the "
                      "same as `python data_tools/build_glyphs.py --large`)", flush=True)
            ensure_large_set(root, Path(GLYPHS_ROOT), progress=progress,
                             say=lambda msg: print(f"make_longtail: {msg}", flush=True))
    except (GlyphBuildError, OSError) as exc:
        print(f"make_longtail: cannot build the default input {root}: "
              f"{for_command_line(str(exc))}. Pass --input "
              "PREFIX to use another dataset.", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        print(stopped_message("make_longtail", exc, root), file=sys.stderr)
        return exit_code(exc)
    return 0


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_tool_logging()
    if args.input == DEFAULT_INPUT:
        code = _ensure_default_input(progress=not args.no_progress)
        if code:
            return code
    try:
        resolve_shards(args.input)
    except FileNotFoundError as exc:
        print(f"make_longtail: {for_command_line(str(exc), parser)}", file=sys.stderr)
        return 2
    out = args.output or default_output(args.head, args.tail, args.tail_samples)
    try:
        with sigterm_raises():
            s = make_longtail(args.input, out, args.head, args.tail, args.tail_samples,
                              args.seed, args.shard_size, progress=not args.no_progress,
                              tail_exclude=args.tail_exclude, overwrite=args.overwrite)
    except (OSError, ValueError) as exc:   # DatasetError/RecordIOError are ValueErrors
        print(f"make_longtail: {for_command_line(str(exc), parser)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        print(stopped_message("make_longtail", exc, out), file=sys.stderr)
        return exit_code(exc)
    print(f"wrote {s.output}: {s.head_classes} head classes ({s.head_images} images) + "
          f"{s.tail_classes} tail classes ({s.tail_images} images) = "
          f"{s.head_classes + s.tail_classes} classes, {s.head_images + s.tail_images} images "
          f"in {s.seconds:.1f} s ({s.records_per_s:,.0f} records/s); manifest: "
          f"{Path(s.output) / 'manifest.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
