"""torchrun entry for test_fault.py: launch/train_face.py with a fault injected through
Trainer.fit's after_step seam. Usage: kill_once.py RANK:STEP MARKER -- train_face args.
Rank RANK SIGKILLs itself right after step STEP unless MARKER exists (it writes MARKER first),
so the job torchrun restarts runs through."""
from __future__ import annotations

import importlib.util
import os
import signal
import sys
from pathlib import Path

LAUNCH = Path(__file__).resolve().parents[2] / "launch" / "train_face.py"


def kill_once(rank: int, at: int, marker: Path):
    def after_step(step: int) -> None:
        if int(os.environ.get("RANK", "0")) == rank and step == at and not marker.exists():
            marker.parent.mkdir(parents=True, exist_ok=True)
            marker.write_text(f"killed once after step {at}\n")
            os.kill(os.getpid(), signal.SIGKILL)
    return after_step


def main(argv: list) -> int:
    spec, marker, sep, *rest = argv
    assert sep == "--", "usage: kill_once.py RANK:STEP MARKER -- train_face args"
    rank, at = (int(x) for x in spec.split(":"))
    loader = importlib.util.spec_from_file_location("train_face", LAUNCH)
    train_face = importlib.util.module_from_spec(loader)
    loader.loader.exec_module(train_face)
    return train_face.main(rest, after_step=kill_once(rank, at, Path(marker)))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
