"""Font discovery, blank filtering and design dedup: synthetic fonts for the rules, the real
Debian packages for the measured threshold."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from glyph_benchmark import fonts
from glyph_benchmark.fonts import PROBE_CHARS, discover_faces, read_faces, select_designs

sys.path.insert(0, str(Path(__file__).resolve().parent))
from glyph_fonts_synth import design, make_font  # noqa: E402

EXTRA = "丁七万丈三上下不与丑专且世丘丙业丛东丝丞两严"


@pytest.fixture(scope="module")
def synth_dir(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("fonts")
    chars = PROBE_CHARS + EXTRA
    make_font(d / "a.ttf", "SynA", design(chars, 1))
    make_font(d / "a_mono.ttf", "SynA Mono", design(chars, 1))             # identical twin
    make_font(d / "a_bold.ttf", "SynA Bold", design(chars, 1, weight=20))  # weight twin
    make_font(d / "b.ttf", "SynB", design(chars, 2), empty=EXTRA[:5])      # distinct design
    make_font(d / "blank.ttf", "SynBlank", design(EXTRA[:2], 3), empty=PROBE_CHARS)
    os.symlink(d / "a.ttf", d / "alias-of-a.ttf")                           # counted once
    (d / "notes.txt").write_text("not a font")
    return d


def test_find_font_files_dedupes_symlinks(synth_dir):
    files = fonts.find_font_files([str(synth_dir)])
    assert [Path(f).name for f in files] == ["a.ttf", "a_bold.ttf", "a_mono.ttf", "b.ttf",
                                             "blank.ttf"]


def test_coverage_excludes_empty_outlines(synth_dir):
    (b,) = read_faces(str(synth_dir / "b.ttf"))
    assert b.listed == len(PROBE_CHARS) + len(EXTRA)
    assert len(b.coverage) == b.listed - 5
    assert all(ord(c) not in b.coverage for c in EXTRA[:5])
    (blank,) = read_faces(str(synth_dir / "blank.ttf"))
    assert blank.listed == len(PROBE_CHARS) + 2 and len(blank.coverage) == 2


def test_unreadable_font_file_is_skipped(tmp_path):
    bad = tmp_path / "broken.ttf"
    bad.write_bytes(b"\x00\x01\x00\x00garbage")
    assert read_faces(str(bad)) == []


def test_select_designs_drops_twins_and_blank(synth_dir):
    faces = discover_faces([str(synth_dir)], min_coverage=1)
    choice = select_designs(faces, min_coverage=10)
    assert sorted(f.name for f in choice.kept) == ["SynA", "SynB"]
    why = {f.name: reason for f, reason in choice.dropped}
    assert why["SynBlank"].startswith("blank")
    assert "same design as a.ttf#0" in why["SynA Mono"] and "distance 0.0000" in why["SynA Mono"]
    assert "same design as a.ttf#0" in why["SynA Bold"]


def test_design_distance_orders_twins_below_distinct(synth_dir):
    vec = {n: fonts.probe_vectors(read_faces(str(synth_dir / n))[0])
           for n in ("a.ttf", "a_mono.ttf", "a_bold.ttf", "b.ttf")}
    same = fonts.design_distance(vec["a.ttf"], vec["a_mono.ttf"])
    bold = fonts.design_distance(vec["a.ttf"], vec["a_bold.ttf"])
    other = fonts.design_distance(vec["a.ttf"], vec["b.ttf"])
    assert same == pytest.approx(0.0, abs=1e-6)
    assert 0 < bold < fonts.SAME_DESIGN_DISTANCE < other
    assert fonts.design_distance(vec["a.ttf"], {}) == float("inf")


def test_missing_packages_uses_dpkg():
    assert fonts.missing_packages(["dpkg", "facetrain-no-such-package"]) == \
        ["facetrain-no-such-package"]


# Known pairs among the glyph study's Debian packages (scripts/setup.sh --fonts installs them).
REAL = "/usr/share/fonts"
TWINS = [("ipag.ttf", "ipagp.ttf"), ("kiloji.ttf", "kiloji_b.ttf"), ("kiloji.ttf", "kiloji_d.ttf"),
         ("MTLc3m.ttf", "MTLmr3m.ttf"), ("uming.ttc", "bsmi00lp.ttf"),
         ("VL-Gothic-Regular.ttf", "VL-PGothic-Regular.ttf")]
DISTINCT = [("ipag.ttf", "ipam.ttf"), ("ipag.ttf", "MTLc3m.ttf"), ("uming.ttc", "cwming.ttf"),
            ("kouzan-mouhitsu.ttf", "AoyagiKouzanT.ttf"), ("wqy-zenhei.ttc", "wqy-microhei.ttc")]


def _real(name: str):
    found = [f for f in fonts.find_font_files([REAL]) if os.path.basename(f) == name]
    assert found, (f"{name} missing: run scripts/setup.sh --fonts (installs the glyph study's "
                   "packages)")
    return read_faces(found[0])[0]


def test_threshold_separates_real_twins_from_distinct_designs():
    names = {n for pair in TWINS + DISTINCT for n in pair}
    vec = {n: fonts.probe_vectors(_real(n)) for n in names}
    twin = max(fonts.design_distance(vec[a], vec[b]) for a, b in TWINS)
    distinct = min(fonts.design_distance(vec[a], vec[b]) for a, b in DISTINCT)
    assert twin < fonts.SAME_DESIGN_DISTANCE < distinct, (twin, distinct)


def test_real_blank_font_is_dropped():
    seto_ex = _real("setofont-ex.ttf")      # lists 12,204 ideographs, draws none of them
    assert seto_ex.listed > 10000 and len(seto_ex.coverage) < 100
    choice = select_designs([seto_ex, _real("ipag.ttf")])
    assert [f.name for f in choice.kept] == ["IPAGothic"]
    assert choice.dropped[0][1].startswith("blank")
