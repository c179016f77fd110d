"""Validation characters (experiments/validation.py) on a tiny glyph build from a few installed
fonts: disjoint from every set of the build, deterministic, in the test sets' layouts, and the
build's own files keep their bytes."""
from __future__ import annotations

import hashlib
import json
import os
import pickle
from pathlib import Path

import pytest

from experiments import validation
from glyph_benchmark.build import BuildSettings, GlyphBuildError, build
from glyph_benchmark.fonts import find_font_files

FONTS = ["ipag.ttf", "ipam.ttf", "VL-Gothic-Regular.ttf", "umeplus-gothic.ttf", "Konatu.ttf",
         "cwkai.ttf", "kouzan-mouhitsu.ttf", "setofont.ttf"]


def tree_hashes(root: Path, skip: str = "") -> dict:
    """relative path -> sha256 of every file under root (paths under `skip` left out)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and not (skip and rel.startswith(skip)):
            out[rel] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("val")
    fonts = tmp / "fonts"
    fonts.mkdir()
    real = {os.path.basename(f): f for f in find_font_files()}
    for name in FONTS:
        assert name in real, f"{name} missing: run scripts/setup.sh --fonts"
        os.symlink(real[name], fonts / name)
    root = tmp / "glyphs"
    build(BuildSettings(out=str(root), train_classes=30, eval_classes=20, distractor_classes=6,
                        min_designs=6, jobs=1, verification_pairs=40, ijbc_impostor_pairs=200,
                        font_roots=(str(fonts),)), progress=False)
    return root


def test_validation_is_disjoint_deterministic_and_leaves_the_build_alone(tiny, tmp_path):
    before = tree_hashes(tiny)
    info = validation.build_validation(tiny, classes=20, distractors=5, progress=False,
                                       say=lambda s: None)
    # The build's files (training set, test sets, manifest) are byte for byte the same.
    assert tree_hashes(tiny, skip="validation") == before
    manifest = json.loads((tiny / "manifest.json").read_text())
    used = set(manifest["train"]["classes"] + manifest["eval"]["classes"]
               + manifest["distractors"]["classes"])
    val, dis = info["classes"], info["distractors"]
    assert len(set(val)) == 20 and len(set(dis)) == 5
    assert not (set(val) | set(dis)) & used and not set(val) & set(dis)
    assert validation.check_disjoint(tiny) == {"train": 30, "eval": 20, "distractors": 6,
                                               "validation": 20, "validation distractors": 5}
    # The test sets' layouts, readable by the same code.
    bins, issame = pickle.loads((tiny / "validation" / "verification.bin").read_bytes())
    assert len(issame) == 40 and len(bins) == 80 and sum(issame) == 20
    lst = (tiny / "validation" / "megaface" / "facescrub_lst").read_text().split()
    assert {x.split("/")[0] for x in lst} == {f"u{ord(c):04x}" for c in val}
    assert (tiny / "validation" / "IJBC" / "meta" / "ijbc_template_pair_label.txt").is_file()
    assert validation.validation_is_current(tiny, 20, 5)
    assert not validation.validation_is_current(tiny, 20, 6)
    # Deterministic: a second build gives the same bytes.
    first = tree_hashes(tiny / "validation")
    validation.build_validation(tiny, classes=20, distractors=5, progress=False,
                                say=lambda s: None)
    assert tree_hashes(tiny / "validation") == first
    # ensure_validation reuses a current folder, and rebuilds one of another build.
    assert validation.ensure_validation(tiny, 20, 5, False, say=lambda s: None) == \
        tiny / "validation"
    stale = json.loads((tiny / "validation" / "manifest.json").read_text())
    stale["build_manifest_sha256"] = "0" * 64
    (tiny / "validation" / "manifest.json").write_text(json.dumps(stale))
    said = []
    validation.ensure_validation(tiny, 20, 5, False, say=said.append)
    assert "made from another build" in said[0] and tree_hashes(tiny / "validation") == first


def test_validation_refuses_too_few_classes_and_a_missing_build(tiny, tmp_path):
    with pytest.raises(GlyphBuildError, match="validation needs >= 20 classes"):
        validation.build_validation(tiny, classes=10, distractors=5, say=lambda s: None)
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        validation.manifest_sha256(tmp_path)


def test_validation_defaults_to_the_test_sets_sizes(tiny):
    info = validation.build_validation(tiny, progress=False, say=lambda s: None)
    assert (len(info["classes"]), len(info["distractors"])) == (20, 6)
    assert validation.validation_is_current(tiny)
