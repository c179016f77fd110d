"""Tiny synthetic TrueType fonts for the glyph tests (fontTools FontBuilder).

A "character" is drawn as bars chosen by a per-(structure seed, char) random stream, so two
fonts with the same seed draw the same design and different seeds draw different designs;
`weight` thickens every bar (a weight twin)."""
from __future__ import annotations

from pathlib import Path
from typing import Dict, Iterable, List, Tuple

import numpy as np

Rect = Tuple[int, int, int, int]   # x0, y0, x1, y1 in font units (em = 1000)


def bars(ch: str, seed: int, weight: int = 0) -> List[Rect]:
    rng = np.random.default_rng([seed, ord(ch)])
    out = []
    for _ in range(int(rng.integers(3, 6))):
        w = 60 + weight
        if rng.random() < 0.5:   # horizontal bar
            y = int(rng.integers(100, 800))
            x0, x1 = sorted(int(v) for v in rng.integers(50, 950, 2))
            out.append((x0, y, max(x1, x0 + 200), y + w))
        else:
            x = int(rng.integers(100, 800))
            y0, y1 = sorted(int(v) for v in rng.integers(0, 850, 2))
            out.append((x, y0, x + w, max(y1, y0 + 200)))
    return out


def make_font(path: Path, family: str, glyphs: Dict[str, List[Rect]],
              empty: Iterable[str] = ()) -> Path:
    """Write a TrueType font mapping each char of `glyphs` to its rectangles and each char of
    `empty` to a glyph with no outline (as brush fonts do for characters they lack)."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    names = [".notdef"] + [f"g{ord(c):x}" for c in glyphs] + [f"e{ord(c):x}" for c in empty]
    fb = FontBuilder(1000, isTTF=True)
    fb.setupGlyphOrder(names)
    cmap = {ord(c): f"g{ord(c):x}" for c in glyphs}
    cmap.update({ord(c): f"e{ord(c):x}" for c in empty})
    fb.setupCharacterMap(cmap)
    drawn = {}
    pen = TTGlyphPen(None)
    drawn[".notdef"] = pen.glyph()
    for c, rects in glyphs.items():
        pen = TTGlyphPen(None)
        for x0, y0, x1, y1 in rects:
            pen.moveTo((x0, y0))
            pen.lineTo((x0, y1))
            pen.lineTo((x1, y1))
            pen.lineTo((x1, y0))
            pen.closePath()
        drawn[f"g{ord(c):x}"] = pen.glyph()
    for c in empty:
        drawn[f"e{ord(c):x}"] = TTGlyphPen(None).glyph()
    fb.setupGlyf(drawn)
    fb.setupHorizontalMetrics({n: (1000, 0) for n in names})
    fb.setupHorizontalHeader(ascent=880, descent=-120)
    fb.setupNameTable({"familyName": family, "styleName": "Regular", "fullName": family})
    fb.setupOS2(sTypoAscender=880, sTypoDescender=-120, usWinAscent=880, usWinDescent=120)
    fb.setupPost()
    fb.save(str(path))
    return path


def design(chars: str, seed: int, weight: int = 0) -> Dict[str, List[Rect]]:
    return {c: bars(c, seed, weight) for c in chars}
