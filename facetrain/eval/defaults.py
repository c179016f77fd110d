"""Default locations used by the no-argument evaluation CLIs, in one place.

A CLI run without flags evaluates the newest exported backbone anywhere under ``runs/``
(``runs/<run>/export/backbone.pt`` from launch/train_face.py, and the main job's
``runs/main/<method>_seed<k>/export/backbone.pt``; by modification time) on the embedded glyph
benchmark under ``data/glyphs/eval/``. Paths are relative to the current working directory (the
repository root in the README's commands).
"""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import List, Optional

RUNS_GLOB = "runs/**/export/backbone.pt"
EVAL_ROOT = Path("data/glyphs/eval")
VERIFICATION_PACKS = (EVAL_ROOT / "verification.bin",)
IJBC_ROOT = EVAL_ROOT / "IJBC"
MEGAFACE_ROOT = EVAL_ROOT / "megaface"
REID_ROOT = EVAL_ROOT / "reid"
REPORTS_DIR = Path("runs/eval")


def exported_backbones(pattern: str = RUNS_GLOB) -> List[Path]:
    """Files matching `pattern` (`**` spans any depth), oldest first (mtime, then path)."""
    found = [p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p)]
    return [Path(p) for p in sorted(found, key=lambda p: (os.path.getmtime(p), p))]


def latest_backbone(pattern: str = RUNS_GLOB) -> Optional[Path]:
    """Newest file matching `pattern` (by mtime), or None when there is none."""
    found = exported_backbones(pattern)
    return found[-1] if found else None
