"""The large glyph training set: make_longtail's default input, built on first use.

The paper's <H3K,T10K> split needs at least 13,000 classes with >= 5 images each; the main job's
glyph set has 2,000 (each in >= 20 designs). The same fonts cover 12k-21k ideographs each, so
asking for >= 5 designs admits ~16,000 characters: those covered by few fonts are a natural tail,
those covered by all ~25 designs the head (make_longtail ranks classes by image count). Training
set only: the evaluation sets stay in data/glyphs/eval, and the characters data/glyphs holds out
(its evaluation and distractor classes, read from its manifest) are left out of the large set so
that those sets stay unseen. The caller says where both builds live.

Two environment variables reduce the build (CI, quick tries): FACETRAIN_GLYPHS_LARGE_CLASSES
(training characters) and FACETRAIN_GLYPH_FONT_ROOTS (font folders, separated by os.pathsep).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Dict, Mapping, Optional

from glyph_benchmark.build import (MANIFEST, TRAIN_PREFIX, BuildSettings,
                                    GlyphBuildError, build)
from glyph_benchmark.fonts import FONT_ROOTS

LARGE_TRAIN_CLASSES = 16000
LARGE_MIN_DESIGNS = 5
CLASSES_ENV = "FACETRAIN_GLYPHS_LARGE_CLASSES"
FONT_ROOTS_ENV = "FACETRAIN_GLYPH_FONT_ROOTS"


def held_out_chars(glyphs_root: Path) -> str:
    """The evaluation and distractor characters of the glyph build at `glyphs_root` ("" when it
    is not built): a training set that avoids them keeps that build's evaluation sets unseen."""
    path = Path(glyphs_root) / MANIFEST
    if not path.is_file():
        return ""
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
        return "".join(m[part]["classes"] for part in ("eval", "distractors") if m.get(part))
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise GlyphBuildError(f"{path} is not a glyph build manifest ({err}); rebuild "
                              f"{glyphs_root} with glyph_benchmark.build.build") from None


def large_settings(root: Path, environ: Optional[Mapping[str, str]] = None,
                   jobs: int = 2, exclude_chars: str = "") -> BuildSettings:
    """Build settings of the large set, with the two environment overrides applied."""
    env = os.environ if environ is None else environ
    classes = LARGE_TRAIN_CLASSES
    if env.get(CLASSES_ENV):
        try:
            classes = int(env[CLASSES_ENV])
        except ValueError:
            raise GlyphBuildError(f"{CLASSES_ENV} must be an integer class count; "
                                  f"got {env[CLASSES_ENV]!r}") from None
    roots = tuple(r for r in env.get(FONT_ROOTS_ENV, "").split(os.pathsep) if r) or FONT_ROOTS
    return BuildSettings(out=str(root), train_classes=classes, eval_classes=0,
                         distractor_classes=0, min_designs=LARGE_MIN_DESIGNS, jobs=jobs,
                         font_roots=roots, train_only=True, exclude_chars=exclude_chars)


def is_built(root: Path) -> bool:
    """True when a finished build is there (the manifest is written last)."""
    root = Path(root)
    return all((root / n).is_file() for n in (TRAIN_PREFIX + ".rec", TRAIN_PREFIX + ".idx",
                                              MANIFEST))


def ensure_large_set(root: Path, glyphs_root: Path, progress: bool = True,
                     say: Callable[[str], None] = print,
                     environ: Optional[Mapping[str, str]] = None) -> Optional[Dict[str, object]]:
    """Build the large set under `root` unless already there, leaving out the characters that
    `glyphs_root` holds out; returns the new manifest, or None when nothing was built. Builds
    into `<root>.partial` and renames at the end, so an interrupted build is never mistaken for
    a finished one (it restarts from scratch)."""
    root = Path(root)
    if is_built(root):
        return None
    if root.exists() and any(root.iterdir()):
        raise GlyphBuildError(f"{root} exists but holds no finished glyph build "
                              f"({TRAIN_PREFIX}.rec, {TRAIN_PREFIX}.idx, {MANIFEST}); remove it "
                              "to rebuild")
    excluded = held_out_chars(glyphs_root)
    settings = large_settings(root.with_name(root.name + ".partial"), environ,
                              exclude_chars=excluded)
    left_out = (f"leaving out the {len(excluded)} characters {glyphs_root} holds out for "
                "evaluation" if excluded else f"{glyphs_root} is not built: no characters "
                "left out")
    say(f"{root} is missing: building it once (training set only, {settings.train_classes} "
        f"characters rendered in >= {settings.min_designs} font designs each, from "
        f"{', '.join(settings.font_roots)}; {left_out})")
    start = time.perf_counter()
    shutil.rmtree(settings.out, ignore_errors=True)
    logging.getLogger("fontTools").setLevel(logging.ERROR)   # noisy about old font timestamps
    try:
        manifest = build(settings, progress=progress)
        manifest["settings"]["out"] = str(root)                # where it lives from now on
        Path(settings.out, MANIFEST).write_text(
            json.dumps(manifest, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        if root.exists():
            root.rmdir()                                        # empty (checked above)
        os.replace(settings.out, root)
    except BaseException:        # failed, Ctrl-C or SIGTERM: leave nothing half-built behind
        shutil.rmtree(settings.out, ignore_errors=True)
        raise
    say(f"built {root} in {time.perf_counter() - start:.0f} s: "
        f"{len(manifest['train']['classes'])} classes, {manifest['train']['images']} images, "
        f"{folder_mb(root):.0f} MB")
    return manifest


def folder_mb(root: Path) -> float:
    """Size of the files under `root` in MB (10^6 bytes)."""
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file()) / 1e6
