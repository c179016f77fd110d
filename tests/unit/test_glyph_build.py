"""Builder logic without rendering: design hold-out, seeded candidate order, settings checks."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest

from glyph_benchmark.build import (BuildSettings, GlyphBuildError, candidate_order, class_name,
                                    training_designs)
from glyph_benchmark.fonts import FontFace


TOOLS = Path(__file__).resolve().parents[2] / "data_tools"


def build_glyphs_main(argv) -> int:
    """data_tools/build_glyphs.py's main, loaded as the command line runs it (its folder first
    on the path)."""
    if str(TOOLS) not in sys.path:
        sys.path.insert(0, str(TOOLS))
    spec = importlib.util.spec_from_file_location("_tool_build_glyphs", TOOLS / "build_glyphs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.main(argv)


def _face(name: str, cps) -> FontFace:
    return FontFace(f"/fonts/{name.lower()}.ttf", 0, name, frozenset(cps), len(cps))


DESIGNS = [_face("Gothic", range(0x4E00, 0x4E10)), _face("KouzanBrush", range(0x4E00, 0x4E08)),
           _face("Mincho", range(0x4E04, 0x4E10))]


def test_training_designs_hold_out_by_name_or_file():
    assert training_designs(DESIGNS, ()) == [0, 1, 2]
    assert training_designs(DESIGNS, ("kouzan",)) == [0, 2]
    assert training_designs(DESIGNS, ("mincho.ttf", "GOTHIC")) == [1]


def test_candidate_order_is_seeded_and_respects_min_designs():
    every = candidate_order(DESIGNS, [0, 1, 2], 1, seed=0)
    assert sorted(every) == [chr(c) for c in range(0x4E00, 0x4E10)]
    two = candidate_order(DESIGNS, [0, 1, 2], 2, seed=0)
    assert sorted(two) == [chr(c) for c in range(0x4E00, 0x4E10)]   # each in >= 2 of 3
    three = candidate_order(DESIGNS, [0, 1, 2], 3, seed=0)
    assert sorted(three) == [chr(c) for c in range(0x4E04, 0x4E08)]
    held = candidate_order(DESIGNS, [0, 2], 2, seed=0)   # brush held out: count the others
    assert sorted(held) == [chr(c) for c in range(0x4E04, 0x4E10)]
    assert candidate_order(DESIGNS, [0, 1, 2], 1, seed=0) == every
    assert candidate_order(DESIGNS, [0, 1, 2], 1, seed=1) != every


def test_class_name_is_folder_safe():
    assert class_name("\u4e00") == "u4e00" and class_name("\u9fa5") == "u9fa5"


SETTINGS_ERRORS = [({"min_designs": 1}, "`min_designs` must be >= 2", "--min-designs must be >= 2"),
                   ({"train_classes": 0}, "`train_classes` must be >= 1",
                    "--train-classes must be >= 1"),
                   ({"distractor_classes": 0}, "`distractor_classes`", "--distractor-classes"),
                   ({"size": 4}, "`size` must be >= 8", "--size must be >= 8"),
                   ({"verification_pairs": 50}, "multiple of 20", "multiple of 20"),
                   ({"eval_classes": 19}, "`eval_classes` must be >= 20",
                    "--eval-classes must be >= 20"),
                   ({"ijbc_impostor_pairs": 0}, "`ijbc_impostor_pairs`", "--ijbc-impostor-pairs")]


@pytest.mark.parametrize("kw, msg, flag_msg", SETTINGS_ERRORS)
def test_settings_errors_name_the_setting_and_the_cli_the_flag(kw, msg, flag_msg, capsys):
    """The library names its own setting; build_glyphs.py names its flag instead."""
    with pytest.raises(GlyphBuildError, match=msg):
        BuildSettings(out="unused", **kw).validate()
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in kw.items()] + ["--out", "unused", "--quiet"]
    assert build_glyphs_main(argv) == 2
    err = capsys.readouterr().err
    assert flag_msg in err and "`" not in err.split(flag_msg)[0], err


@pytest.mark.parametrize("enumerate_up_to", [10 ** 9, 0])   # list all pairs / rejection sampling
def test_template_pairs(monkeypatch, enumerate_up_to):
    import numpy as np
    from glyph_benchmark import eval_sets
    monkeypatch.setattr(eval_sets, "ENUMERATE_PAIRS_UP_TO", enumerate_up_to)
    cls = np.repeat(np.arange(6), 3)                       # 6 classes x 3 templates
    pairs = eval_sets._template_pairs(cls, 40, np.random.default_rng(0))
    assert pairs == sorted(set(pairs)) and all(a < b for a, b, _ in pairs)
    assert all((cls[a - 1] == cls[b - 1]) == bool(lab) for a, b, lab in pairs)
    assert sum(lab for *_, lab in pairs) == 6 * 3 and len(pairs) == 18 + 40
    every = eval_sets._template_pairs(cls, 10 ** 6, np.random.default_rng(0))
    assert len(every) == 18 * 17 // 2                      # capped at all pairs that exist
    assert eval_sets._template_pairs(cls, 40, np.random.default_rng(0)) == pairs


def test_train_only_settings():
    BuildSettings(out="unused", train_only=True, eval_classes=0, distractor_classes=0,
                  verification_pairs=0).validate()           # eval knobs are not checked
    with pytest.raises(GlyphBuildError, match="`train_only` writes no evaluation sets"):
        BuildSettings(out="unused", train_only=True).validate()


def test_large_settings_and_environment_overrides(tmp_path):
    from glyph_benchmark import large
    s = large.large_settings(tmp_path / "big", environ={})
    assert (s.train_classes, s.min_designs, s.train_only) == (16000, 5, True)
    assert s.out == str(tmp_path / "big") and s.font_roots == ("/usr/share/fonts",)
    s.validate()
    env = {large.CLASSES_ENV: "30", large.FONT_ROOTS_ENV: f"/a{os.pathsep}/b"}
    s = large.large_settings(tmp_path / "x", environ=env)
    assert (s.train_classes, s.font_roots, s.out) == (30, ("/a", "/b"), str(tmp_path / "x"))
    with pytest.raises(GlyphBuildError, match=large.CLASSES_ENV):
        large.large_settings(tmp_path, environ={large.CLASSES_ENV: "many"})


def test_ensure_large_set_skips_built_and_refuses_foreign_folder(tmp_path):
    from glyph_benchmark import large
    root = tmp_path / "glyphs_large"
    root.mkdir()
    (root / "notes.txt").write_text("mine")
    with pytest.raises(GlyphBuildError, match="holds no finished glyph build"):
        large.ensure_large_set(root, tmp_path / "glyphs", progress=False, say=lambda m: None)
    for name in ("train.rec", "train.idx", "manifest.json"):
        (root / name).write_text("")
    said = []
    assert large.ensure_large_set(root, tmp_path / "glyphs", progress=False, say=said.append) is None and not said


def test_failed_large_build_leaves_nothing(tmp_path):
    from glyph_benchmark import large
    (tmp_path / "nofonts").mkdir()
    env = {large.FONT_ROOTS_ENV: str(tmp_path / "nofonts")}
    with pytest.raises(GlyphBuildError, match="found 0 distinct CJK font designs"):
        large.ensure_large_set(tmp_path / "g", tmp_path / "glyphs", progress=False, say=lambda m: None, environ=env)
    assert not any(tmp_path.glob("g*"))


def test_excluded_chars_are_never_candidates(monkeypatch):
    from glyph_benchmark import build
    monkeypatch.setattr(build, "render_chars", lambda designs, chars, *a: {
        c: [(d, None) for d, f in enumerate(designs) if ord(c) in f.coverage] for c in chars})
    s = BuildSettings(out="unused", train_classes=4, eval_classes=0, distractor_classes=0, min_designs=2,
                      train_only=True, exclude_chars="\u4e04\u4e05")
    got = build.choose_classes(DESIGNS, s, progress=False)
    names = [ch for ch, _ in got.train]
    assert len(names) == 4 and not set(names) & {"\u4e04", "\u4e05"}


def test_held_out_chars_read_from_the_manifest(tmp_path):
    import json
    from glyph_benchmark.large import held_out_chars
    assert held_out_chars(tmp_path) == ""
    (tmp_path / "manifest.json").write_text(json.dumps(
        {"eval": {"classes": "\u4e00\u4e01"}, "distractors": {"classes": "\u4e02"}}))
    assert held_out_chars(tmp_path) == "\u4e00\u4e01\u4e02"
    (tmp_path / "manifest.json").write_text("[1]")
    with pytest.raises(GlyphBuildError, match="not a glyph build manifest"):
        held_out_chars(tmp_path)
