"""Rebuild missing or stale .idx files of a RecordIO dataset by scanning its .rec files.

    python data_tools/rebuild_index.py data/ms1m/train.rec
    python data_tools/rebuild_index.py data/mine --force      # every shard, even if it looks fine
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from facetrain.data.dataset import rebuild_indexes  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", help="dataset prefix, .rec file or folder of shards")
    p.add_argument("--force", action="store_true", help="rebuild every .idx, not only bad ones")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        done = rebuild_indexes(args.path, force=args.force)
    except (OSError, ValueError) as exc:
        print(f"rebuild_index: {exc}", file=sys.stderr)
        return 2
    print(f"rebuilt {len(done)} index file(s)" + "".join(f"\n  {d}" for d in done)
          if done else "every index matches its .rec; nothing to do (use --force to redo)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
