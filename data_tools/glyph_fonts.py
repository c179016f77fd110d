#!/usr/bin/env python
"""List the CJK font designs the glyph benchmark would use, or the missing font packages.

  python data_tools/glyph_fonts.py                     designs kept / fonts dropped and why
  python data_tools/glyph_fonts.py --missing-packages  Debian packages to apt-get install
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--missing-packages", action="store_true",
                        help="print the glyph study's font packages that are not installed, space "
                             "separated (nothing when none), and exit")
    parser.add_argument("--roots", nargs="+", default=None,
                        help="folders searched for font files (default: /usr/share/fonts)")
    args = parser.parse_args(argv)

    from glyph_benchmark import fonts
    from facetrain.logging_utils import setup_tool_logging
    setup_tool_logging()
    if args.missing_packages:
        print(" ".join(fonts.missing_packages()))
        return 0
    faces = fonts.discover_faces(tuple(args.roots) if args.roots else fonts.FONT_ROOTS)
    choice = fonts.select_designs(faces)
    print(f"{len(choice.kept)} distinct CJK designs ({len(faces)} CJK faces found):")
    for face in choice.kept:
        print(f"  kept     {face.key:32s} {face.name:28s} {len(face.coverage):6d} ideographs")
    for face, why in choice.dropped:
        print(f"  dropped  {face.key:32s} {why}")
    missing = fonts.missing_packages()
    if missing:
        print(f"missing font packages: {' '.join(missing)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
