"""Builder logic without rendering: design hold-out, seeded candidate order, settings checks."""
from __future__ import annotations

import pytest

from facetrain.glyphs.build import (BuildSettings, GlyphBuildError, candidate_order, class_name,
                                    training_designs)
from facetrain.glyphs.fonts import FontFace


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


@pytest.mark.parametrize("kw, msg", [({"min_designs": 1}, "--min-designs must be >= 2"),
                                     ({"train_classes": 0}, "--train-classes must be >= 1"),
                                     ({"distractor_classes": 0}, "--distractor-classes"),
                                     ({"size": 4}, "--size must be >= 8"),
                                     ({"verification_pairs": 50}, "multiple of 20"),
                                     ({"eval_classes": 19}, "--eval-classes must be >= 20"),
                                     ({"ijbc_impostor_pairs": 0}, "--ijbc-impostor-pairs")])
def test_settings_errors_name_the_flag(kw, msg):
    with pytest.raises(GlyphBuildError, match=msg):
        BuildSettings(**kw).validate()


@pytest.mark.parametrize("enumerate_up_to", [10 ** 9, 0])   # list all pairs / rejection sampling
def test_template_pairs(monkeypatch, enumerate_up_to):
    import numpy as np
    from facetrain.glyphs import eval_sets
    monkeypatch.setattr(eval_sets, "ENUMERATE_PAIRS_UP_TO", enumerate_up_to)
    cls = np.repeat(np.arange(6), 3)                       # 6 classes x 3 templates
    pairs = eval_sets._template_pairs(cls, 40, np.random.default_rng(0))
    assert pairs == sorted(set(pairs)) and all(a < b for a, b, _ in pairs)
    assert all((cls[a - 1] == cls[b - 1]) == bool(lab) for a, b, lab in pairs)
    assert sum(lab for *_, lab in pairs) == 6 * 3 and len(pairs) == 18 + 40
    every = eval_sets._template_pairs(cls, 10 ** 6, np.random.default_rng(0))
    assert len(every) == 18 * 17 // 2                      # capped at all pairs that exist
    assert eval_sets._template_pairs(cls, 40, np.random.default_rng(0)) == pairs
