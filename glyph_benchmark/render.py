"""Render one CJK character in one font design as a small, centred grayscale image.

A character is an "identity" and a font design one of its "photos". Like an aligned face crop,
every glyph is centred on its ink box; a per-design scale (from that design's typical ink size)
keeps the relative size of characters within a design (a one-stroke 一 stays thin), and a
character larger than the target box is shrunk to fit. Images are dark ink on white, uint8.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Tuple

import cv2
import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Fraction of the output side that the ink of a typical character fills.
FILL = 0.875
# Supersampling: glyphs are rasterised at this many times the output side, then area-downsampled.
SUPERSAMPLE = 2
# A render is "blank" when fewer than this many pixels carry ink (>= INK_LEVEL of 255): fonts list
# characters in their cmap that draw nothing or a speck.
MIN_INK_PIXELS = 6
INK_LEVEL = 96
# A codepoint no font maps: rendering it shows the font's .notdef ("tofu") glyph.
NOTDEF_PROBE = "\U0010FFFD"


def load_font(path: str, index: int, size: int) -> ImageFont.FreeTypeFont:
    """Open face `index` of a font file (collections hold several) rasterised for `size` px output."""
    return ImageFont.truetype(path, size=size * SUPERSAMPLE, index=index)


def raw_ink(font: ImageFont.FreeTypeFont, ch: str) -> np.ndarray:
    """The glyph's ink coverage, uint8 [h, w], cropped to its ink box; shape (0, 0) if none."""
    left, top, right, bottom = font.getbbox(ch)
    if right <= left or bottom <= top:
        return np.zeros((0, 0), np.uint8)
    # Drawing into an "L" image and reading it through the array interface is ~2x faster than
    # converting font.getmask()'s core image element by element.
    canvas = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(canvas).text((-left, -top), ch, font=font, fill=255)
    ink = np.asarray(canvas)
    rows = np.flatnonzero(ink.max(axis=1) > 0)
    cols = np.flatnonzero(ink.max(axis=0) > 0)
    if rows.size == 0:
        return np.zeros((0, 0), np.uint8)
    return ink[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1]


def is_blank(ink: np.ndarray) -> bool:
    """True when a raw render has (almost) no ink: such cmap entries are not real glyphs."""
    return ink.size == 0 or int((ink >= INK_LEVEL).sum()) < MIN_INK_PIXELS


@dataclass(frozen=True)
class DesignRenderer:
    """Renders characters of one font design at `size` x `size` output pixels.

    `scale` maps raw (supersampled) ink pixels to output pixels; `notdef` is the design's tofu
    glyph, so a character that only draws tofu counts as blank."""

    font: ImageFont.FreeTypeFont
    size: int
    scale: float
    notdef: Optional[np.ndarray]

    @classmethod
    def create(cls, path: str, index: int, size: int, probe: Iterable[str]) -> "DesignRenderer":
        """Open the font and derive its scale from the median ink extent of the `probe` chars."""
        font = load_font(path, index, size)
        extents = []
        for ch in probe:
            ink = raw_ink(font, ch)
            if not is_blank(ink):
                extents.append(max(ink.shape))
        typical = float(np.median(extents)) if extents else float(size * SUPERSAMPLE * FILL)
        tofu = raw_ink(font, NOTDEF_PROBE)
        return cls(font, size, FILL * size / typical, None if is_blank(tofu) else tofu)

    def render(self, ch: str) -> Optional[np.ndarray]:
        """uint8 [size, size] image, dark ink on white, or None when the glyph is blank/tofu."""
        ink = raw_ink(self.font, ch)
        if is_blank(ink):
            return None
        if self.notdef is not None and ink.shape == self.notdef.shape \
                and np.array_equal(ink, self.notdef):
            return None
        return place_centred(ink, self.size, self.scale)


def place_centred(ink: np.ndarray, size: int, scale: float) -> np.ndarray:
    """Resize ink [h, w] by `scale` (shrunk further to fit FILL*size) and centre it on white."""
    h, w = ink.shape
    limit = FILL * size
    s = min(scale, limit / max(h, w))
    nh, nw = max(1, int(round(h * s))), max(1, int(round(w * s)))
    # INTER_AREA averages coverage when shrinking, which is what anti-aliasing should do.
    small = cv2.resize(ink, (nw, nh), interpolation=cv2.INTER_AREA)
    canvas = np.zeros((size, size), np.uint8)
    top, left = (size - nh) // 2, (size - nw) // 2
    canvas[top:top + nh, left:left + nw] = small
    return 255 - canvas


def to_bgr(gray: np.ndarray) -> np.ndarray:
    """[H, W] grayscale -> [H, W, 3] BGR, the layout OpenCV encoders (and InsightFace tools) use."""
    return np.repeat(gray[:, :, None], 3, axis=2)


def render_many(path: str, index: int, size: int, chars: Sequence[str],
                probe: Sequence[str]) -> Tuple[Optional[np.ndarray], ...]:
    """Render `chars` in one design; None marks a blank glyph. Runs in a worker process."""
    rend = DesignRenderer.create(path, index, size, probe)
    return tuple(rend.render(ch) for ch in chars)
