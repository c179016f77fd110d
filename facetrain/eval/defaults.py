"""Default locations used by the no-argument evaluation CLIs, in one place.

A CLI run without flags evaluates the newest exported backbone (``runs/*/export/backbone.pt`` by
modification time) on the embedded glyph benchmark under ``data/glyphs/eval/``. Paths are
relative to the current working directory (the repository root in the README's commands).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Optional

RUNS_GLOB = "runs/*/export/backbone.pt"
EVAL_ROOT = Path("data/glyphs/eval")
VERIFICATION_PACKS = (EVAL_ROOT / "verification.bin",)
IJBC_ROOT = EVAL_ROOT / "IJBC"
MEGAFACE_ROOT = EVAL_ROOT / "megaface"
REID_ROOT = EVAL_ROOT / "reid"
REPORTS_DIR = Path("runs/eval")


def latest_backbone(pattern: str = RUNS_GLOB) -> Optional[Path]:
    """Newest file matching `pattern` (by mtime), or None when there is none."""
    found = glob.glob(pattern)
    if not found:
        return None
    return Path(max(found, key=os.path.getmtime))
