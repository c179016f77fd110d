#!/usr/bin/env python
"""Build the embedded glyph benchmark (CJK characters as identities, font designs as photos).

  python data_tools/build_glyphs.py            -> data/glyphs/{train.rec,train.idx,property,
                                                  eval/verification.bin, eval/IJBC/, eval/megaface/,
                                                  manifest.json}
  python data_tools/build_glyphs.py --large    -> data/glyphs_large/{train.rec,...}: training
                                                  set only, 16,000 characters in >= 5 designs
                                                  (make_longtail's default input)
Same seed and fonts -> byte-identical output. Needs the Debian font packages listed by
`python data_tools/glyph_fonts.py --missing-packages` (scripts/setup.sh --fonts installs them).
"""
from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path
from typing import List, Optional


GLYPHS_ROOT = "data/glyphs"           # where the README's commands keep the builds (relative to
LARGE_ROOT = "data/glyphs_large"      # the current working directory, the repository root)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None,
                   help="output folder (default: data/glyphs; with --large data/glyphs_large)")
    p.add_argument("--large", action="store_true",
                   help="the large training-only set make_longtail reads by default: "
                        "--train-only, 16000 training characters, --min-designs 5 (unless given), "
                        "leaving out the characters data/glyphs holds out for evaluation")
    p.add_argument("--train-only", action="store_true",
                   help="write the training set only, no evaluation sets")
    p.add_argument("--seed", type=int, default=0, help="seed of every random choice (default 0)")
    p.add_argument("--train-classes", type=int, default=None,
                   help="training characters (default 2000; with --large 16000)")
    p.add_argument("--eval-classes", type=int, default=500,
                   help="held-out characters for verification, IJB-C and MegaFace probes "
                        "(default 500)")
    p.add_argument("--distractor-classes", type=int, default=500,
                   help="further characters used only as MegaFace distractors (default 500)")
    p.add_argument("--min-designs", type=int, default=None,
                   help="a character needs this many non-blank designs (default 20; with "
                        "--large 5)")
    p.add_argument("--size", type=int, default=32, help="image side in pixels (default 32)")
    p.add_argument("--jobs", type=int, default=2, help="rendering processes (default 2)")
    p.add_argument("--verification-pairs", type=int, default=3000,
                   help="pairs in verification.bin, a multiple of 20 (default 3000)")
    p.add_argument("--ijbc-impostor-pairs", type=int, default=100000,
                   help="different-class template pairs in the IJB-C pair list (default 100000)")
    p.add_argument("--holdout-designs", nargs="*", default=[],
                   help="designs kept out of training (name or file substrings, e.g. Kouzan "
                        "Soseki kiloji); they still appear in the evaluation sets")
    p.add_argument("--eval-heldout-only", action="store_true",
                   help="with --holdout-designs: evaluation and distractor images use only the "
                        "held-out designs (styles never seen in training)")
    p.add_argument("--font-roots", nargs="+", default=None,
                   help="folders searched for fonts (default: /usr/share/fonts)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or font log")
    return p


def parse_args(argv: Optional[List[str]] = None,
               parser: Optional[argparse.ArgumentParser] = None) -> argparse.Namespace:
    args = (parser or build_parser()).parse_args(argv)
    from glyph_benchmark import large as lg

    large = {"out": LARGE_ROOT, "train_classes": lg.LARGE_TRAIN_CLASSES,
             "min_designs": lg.LARGE_MIN_DESIGNS}
    small = {"out": GLYPHS_ROOT, "train_classes": 2000, "min_designs": 20}
    for key, value in (large if args.large else small).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    args.train_only = args.train_only or args.large
    return args


def _for_command_line(err: Exception, parser: argparse.ArgumentParser) -> str:
    """The library's message with flags for its settings and commands for its calls."""
    from _cli import for_command_line
    text = for_command_line(str(err), parser)
    if "apt-get install" in text:
        text += " (or run scripts/setup.sh --fonts as root)"
    return text


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parse_args(argv, parser)
    from _interrupt import Terminated, exit_code, sigterm_raises, stopped_message
    from glyph_benchmark.build import EVAL_DIR, BuildSettings, GlyphBuildError, build
    from glyph_benchmark.fonts import FONT_ROOTS
    from glyph_benchmark.large import held_out_chars
    from facetrain.logging_utils import setup_tool_logging

    try:
        exclude = held_out_chars(Path(GLYPHS_ROOT)) if args.large else ""
    except GlyphBuildError as err:
        print(f"build_glyphs: {_for_command_line(err, parser)}", file=sys.stderr)
        return 2
    setup_tool_logging(quiet=args.quiet)
    settings = BuildSettings(
        out=args.out, seed=args.seed, train_classes=args.train_classes,
        eval_classes=0 if args.train_only else args.eval_classes,
        distractor_classes=0 if args.train_only else args.distractor_classes,
        min_designs=args.min_designs, size=args.size, jobs=args.jobs,
        verification_pairs=args.verification_pairs, ijbc_impostor_pairs=args.ijbc_impostor_pairs,
        holdout_designs=tuple(args.holdout_designs), eval_heldout_only=args.eval_heldout_only,
        font_roots=tuple(args.font_roots) if args.font_roots else FONT_ROOTS,
        train_only=args.train_only, exclude_chars=exclude)
    start = time.time()
    try:
        with sigterm_raises():
            m = build(settings, progress=not args.quiet)
    except GlyphBuildError as err:
        print(f"build_glyphs: {_for_command_line(err, parser)}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        # The .rec writer removes its own temporary file; the evaluation sets' scratch folder
        # is ours. No manifest is left, so the main job rebuilds the set next time.
        shutil.rmtree(Path(args.out) / (EVAL_DIR + ".partial"), ignore_errors=True)
        print(stopped_message("build_glyphs", exc, args.out), file=sys.stderr)
        return exit_code(exc)
    used = sum(1 for d in m["designs"] if d["in_training"])
    head = (f"built {args.out} in {time.time() - start:.1f}s: {len(m['designs'])} designs "
            f"({used} in training, {len(m['dropped_fonts'])} font faces dropped); "
            f"train {len(m['train']['classes'])} classes / {m['train']['images']} images "
            f"at {args.size}x{args.size}")
    if args.train_only:
        print(f"{head}; no evaluation sets (--train-only)")
        return 0
    print(f"{head}; eval {len(m['eval']['classes'])} classes "
          f"(verification {m['verification']['pairs']} pairs, IJB-C {m['ijbc']['templates']} "
          f"templates / {m['ijbc']['genuine_pairs']}+{m['ijbc']['impostor_pairs']} pairs, "
          f"MegaFace {m['megaface']['facescrub_images']} probes / "
          f"{m['megaface']['megaface_images']} distractors)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
