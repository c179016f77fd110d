"""Glyph rendering: centring, size, blank/tofu detection, and loose crops that 5-point
alignment undoes."""
from __future__ import annotations

import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

from glyph_benchmark import render
from glyph_benchmark.eval_sets import ARCFACE_TEMPLATE_112, encode_jpeg, loose_crop
from glyph_benchmark.fonts import PROBE_CHARS, find_font_files, read_faces

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glyph_fonts_synth import design, make_font  # noqa: E402


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    d = tmp_path_factory.mktemp("font")
    glyphs = design(PROBE_CHARS, 7)
    glyphs["丁"] = [(0, 0, 1000, 900)]          # one big block: larger than the target box
    glyphs["丂"] = [(500, 400, 503, 403)]       # a speck: "draws nothing"
    path = make_font(d / "s.ttf", "Synth", glyphs, empty="七")
    return render.DesignRenderer.create(str(path), 0, 32, PROBE_CHARS)


def test_render_is_centred_white_background_uint8(synth):
    img = synth.render("永")
    assert img.shape == (32, 32) and img.dtype == np.uint8
    ink = 255.0 - img
    assert ink[0].max() == 0 and ink[-1].max() == 0 and ink[:, 0].max() == 0
    rows, cols = np.nonzero(ink > 0)
    # The ink box is centred (to a pixel of rounding) and inside the FILL box.
    assert abs((rows.min() + rows.max()) / 2 - 15.5) <= 1.0
    assert abs((cols.min() + cols.max()) / 2 - 15.5) <= 1.0
    assert rows.max() - rows.min() + 1 <= np.ceil(render.FILL * 32) + 1


def test_oversized_glyph_is_shrunk_to_fit(synth):
    ink = 255 - synth.render("丁").astype(int)
    rows, cols = np.nonzero(ink > 0)
    assert max(np.ptp(rows), np.ptp(cols)) + 1 == round(render.FILL * 32)


def test_blank_and_speck_glyphs_are_none(synth):
    assert synth.render("七") is None       # empty outline
    assert synth.render("丂") is None       # a few pixels of ink
    assert render.is_blank(np.zeros((0, 0), np.uint8))
    assert not render.is_blank(np.full((4, 4), 255, np.uint8))


def test_tofu_of_real_font_is_none():
    path = [f for f in find_font_files() if f.endswith("/ipag.ttf")]
    assert path, "ipag.ttf missing: run scripts/setup.sh --fonts"
    face = read_faces(path[0])[0]
    rend = render.DesignRenderer.create(face.path, 0, 32, PROBE_CHARS)
    assert rend.notdef is not None         # IPAGothic draws a visible .notdef box
    uncovered = next(chr(c) for c in range(0x4E00, 0xA000) if c not in face.coverage)
    assert rend.render(uncovered) is None
    assert rend.render("永") is not None


def test_to_bgr_and_jpeg_roundtrip(synth):
    img = synth.render("東")
    bgr = render.to_bgr(img)
    assert bgr.shape == (32, 32, 3) and (bgr[..., 0] == img).all() and (bgr[..., 2] == img).all()
    dec = cv2.imdecode(np.frombuffer(encode_jpeg(img), np.uint8), cv2.IMREAD_COLOR)
    assert dec.shape == (32, 32, 3) and np.abs(dec[..., 1].astype(int) - img).mean() < 4


def test_loose_crop_alignment_recovers_glyph(synth):
    img = synth.render("京")
    rng = np.random.default_rng(0)
    for _ in range(5):
        crop, pts = loose_crop(img, rng)
        assert crop.shape[0] == crop.shape[1] == round(32 * 1.75)
        m, _ = cv2.estimateAffinePartial2D(pts.astype(np.float32),
                                           (ARCFACE_TEMPLATE_112 * 32 / 112).astype(np.float32))
        back = cv2.warpAffine(crop, m, (32, 32), borderValue=255)
        assert np.abs(back.astype(int) - img).mean() < 12
