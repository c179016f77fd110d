"""Describe a RecordIO dataset: layout, shards, classes, images, images-per-class histogram.

Always checks the framing (magic word, length within the file) at every indexed offset and exits
non-zero when it is broken; --check-decode also reads and decodes the images.

    python data_tools/inspect_rec.py data/glyphs/train
    python data_tools/inspect_rec.py data/ms1m/train --check-decode 10000
"""
from __future__ import annotations

import argparse
import json
import sys

from facetrain.data.summary import describe, format_summary
from facetrain.logging_utils import setup_tool_logging
from _cli import for_command_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", help="dataset prefix, .rec file or folder of shards")
    p.add_argument("--check-decode", type=int, nargs="?", const=-1, default=0, metavar="N",
                   help="decode the first N images (all when N is omitted) and list bad ones")
    p.add_argument("--rebuild-index", action="store_true",
                   help="rebuild missing or stale .idx files first")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.add_argument("--no-progress", action="store_true", help="no progress bar for --check-decode")
    args = p.parse_args(argv)
    setup_tool_logging()
    decode = None if args.check_decode == -1 else args.check_decode
    try:
        info = describe(args.path, decode=decode, rebuild_index=args.rebuild_index,
                        progress=not args.no_progress)
    except (OSError, ValueError) as exc:   # DatasetError/RecordIOError are ValueErrors
        print(f"inspect_rec: unhealthy: {for_command_line(str(exc), p)}", file=sys.stderr)
        return 2
    print(json.dumps(info, indent=1) if args.json else format_summary(info))
    return 1 if info.get("undecodable") else 0


if __name__ == "__main__":
    sys.exit(main())
