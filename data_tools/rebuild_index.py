"""Rebuild missing or stale .idx files of a RecordIO dataset by scanning its .rec files.

    python data_tools/rebuild_index.py data/ms1m/train.rec
    python data_tools/rebuild_index.py data/mine --force      # every shard, even if it looks fine

Every index is first checked at every offset (magic word, continuation flag, length within the
file); only the ones that fail are rebuilt. A .rec that is cut short or damaged is reported as
such (re-copy it): no index can make it whole.
"""
from __future__ import annotations

import argparse
import sys

from facetrain.data.dataset import rebuild_indexes, resolve_shards
from _interrupt import (Terminated, exit_code, sigterm_raises,
                                      stopped_message)
from facetrain.logging_utils import setup_tool_logging
from _cli import for_command_line


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("path", help="dataset prefix, .rec file or folder of shards")
    p.add_argument("--force", action="store_true", help="rebuild every .idx, not only bad ones")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = p.parse_args(argv)
    setup_tool_logging()
    bar = None
    try:
        with sigterm_raises():
            if not args.no_progress:
                from tqdm import tqdm

                total = sum(s.rec.stat().st_size for s in resolve_shards(args.path))
                bar = tqdm(total=total, unit="B", unit_scale=True, desc="scan .rec",
                           mininterval=1.0, leave=False)
            done = rebuild_indexes(args.path, force=args.force,
                                   progress=bar.update if bar is not None else None)
    except (OSError, ValueError) as exc:
        _close(bar)
        print(f"rebuild_index: {for_command_line(str(exc))}", file=sys.stderr)
        return 2
    except (Terminated, KeyboardInterrupt) as exc:
        _close(bar)
        print(stopped_message("rebuild_index", exc, f"the index of {args.path}"), file=sys.stderr)
        return exit_code(exc)
    _close(bar)
    print(f"rebuilt {len(done)} index file(s)" + "".join(f"\n  {d}" for d in done)
          if done else "every index matches its .rec at every offset; nothing to do (use "
                       "--force to rebuild anyway)")
    return 0


def _close(bar) -> None:
    if bar is not None:
        bar.close()


if __name__ == "__main__":
    sys.exit(main())
