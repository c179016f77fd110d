"""End-to-end builds of a tiny glyph benchmark from real installed fonts (the Debian packages
of the glyph study; scripts/setup.sh --fonts installs them): formats, disjointness, determinism."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "data_tools"))
sys.path.insert(0, str(REPO / "tests" / "unit"))
import build_glyphs  # noqa: E402
import glyph_fonts  # noqa: E402

from facetrain.data.dataset import RecordDataset  # noqa: E402
from facetrain.eval.ijbc import read_meta  # noqa: E402
from facetrain.eval.megaface import read_list  # noqa: E402
from facetrain.eval.verification import load_pack  # noqa: E402
from glyph_benchmark import build  # noqa: E402
from glyph_benchmark.fonts import FONT_PACKAGES, find_font_files  # noqa: E402
from test_data_tools_faults import run_and_terminate  # noqa: E402

# 11 designs plus twins: ipagp (proportional) and the extra faces of the .ttc collections.
FILES = ["ipag.ttf", "ipagp.ttf", "ipam.ttf", "wqy-zenhei.ttc", "wqy-microhei.ttc", "uming.ttc",
         "cwkai.ttf", "kouzan-mouhitsu.ttf", "VL-Gothic-Regular.ttf", "umeplus-gothic.ttf",
         "Konatu.ttf", "setofont.ttf"]
ARGS = ["--train-classes", "40", "--eval-classes", "24", "--distractor-classes", "10",
        "--min-designs", "8", "--size", "24", "--verification-pairs", "40",
        "--ijbc-impostor-pairs", "300", "--quiet"]


@pytest.fixture(scope="module")
def font_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("fontroot")
    real = {os.path.basename(f): f for f in find_font_files()}
    for name in FILES:
        assert name in real, f"{name} missing: run scripts/setup.sh --fonts"
        os.symlink(real[name], root / name)
    return root


@pytest.fixture(scope="module")
def built(font_root, tmp_path_factory):
    """Two builds with seed 0 (1 and 2 rendering processes) and one with seed 1."""
    outs = {}
    for tag, extra in (("a", ["--jobs", "1"]), ("b", ["--jobs", "2"]),
                       ("c", ["--jobs", "1", "--seed", "1"])):
        out = tmp_path_factory.mktemp(tag)
        rc = build_glyphs.main(["--out", str(out), "--font-roots", str(font_root)] + ARGS + extra)
        assert rc == 0
        outs[tag] = out
    return outs


def _files(root: Path):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != build.MANIFEST}


def _manifest(root: Path):
    return json.loads((root / build.MANIFEST).read_text(encoding="utf-8"))


def test_same_seed_is_byte_identical_any_jobs(built):
    a, b = _files(built["a"]), _files(built["b"])
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    ma, mb = _manifest(built["a"]), _manifest(built["b"])
    for m in (ma, mb):
        m["settings"].pop("out"), m["settings"].pop("jobs")
    assert ma == mb
    c = _files(built["c"])
    assert c["train.rec"] != a["train.rec"]


def test_designs_and_disjoint_classes(built):
    m = _manifest(built["a"])
    assert len(m["designs"]) == 11
    dropped = {d["name"]: d["why"] for d in m["dropped_fonts"]}
    assert "IPAPGothic" in dropped and "WenQuanYi Zen Hei Mono" in dropped   # twin, .ttc face
    assert all(why.startswith("same design as") for why in dropped.values())
    tr, ev, di = (m[k]["classes"] for k in ("train", "eval", "distractors"))
    assert (len(tr), len(ev), len(di)) == (40, 24, 10)
    assert len(set(tr + ev + di)) == 74
    assert all(0x4E00 <= ord(c) <= 0x9FFF for c in tr + ev + di)


def test_train_recordio(built):
    assert (built["a"] / "property").read_text().strip() == "40,24,24"
    ds = RecordDataset.open(str(built["a"] / "train"))
    assert ds.layout == "insightface" and ds.num_classes == 40
    assert ds.class_counts.min() >= 8 and ds.class_counts.max() <= 11
    assert len(ds) == _manifest(built["a"])["train"]["images"]
    label, data = ds.read(len(ds) - 1)
    img = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    assert label == 39 and img.shape == (24, 24, 3)
    assert img.min() < 64 and np.median(img) > 200          # dark ink on white


def test_verification_pack(built):
    bins, issame = load_pack(built["a"] / "eval" / build.VERIFICATION_BIN)
    assert len(bins) == 80 and issame.tolist() == ([True] * 2 + [False] * 2) * 10
    img = cv2.imdecode(np.frombuffer(bins[0], np.uint8), cv2.IMREAD_COLOR)
    assert img.shape == (24, 24, 3)


def test_ijbc_folder(built):
    root = built["a"] / "eval" / "IJBC"
    meta = read_meta(root)
    assert all((root / "loose_crop" / n).is_file() for n in meta.names)
    pairs = list(zip(meta.pair_t1.tolist(), meta.pair_t2.tolist()))
    assert len(set(pairs)) == len(pairs) and all(a < b for a, b in pairs)
    assert int((~meta.pair_label).sum()) == 300 and meta.pair_label.sum() >= 24
    assert set(meta.pair_t1.tolist() + meta.pair_t2.tolist()) <= set(meta.tids.tolist())
    for tid in np.unique(meta.tids)[:10]:     # a template = several designs (media)
        assert np.unique(meta.mids[meta.tids == tid]).size == 3
    img = cv2.imread(str(root / "loose_crop" / meta.names[0]))
    assert img.shape == (42, 42, 3)


def test_megaface_folder(built):
    root = built["a"] / "eval" / "megaface"
    m = _manifest(built["a"])
    probes, dis = read_list(root / "facescrub_lst"), read_list(root / "megaface_lst")
    assert {p.split("/")[0] for p in probes} == {build.class_name(c) for c in m["eval"]["classes"]}
    assert {p.split("/")[0] for p in dis} == \
        {build.class_name(c) for c in m["distractors"]["classes"]}
    assert all((root / "facescrub_images" / p).is_file() for p in probes)
    assert all((root / "megaface_images" / p).is_file() for p in dis)
    assert len(probes) == m["eval"]["images"] and len(dis) == m["distractors"]["images"]


def test_too_few_designs_names_missing_packages(tmp_path, font_root, monkeypatch, capsys):
    monkeypatch.setattr(build, "missing_packages", lambda pkgs: ["fonts-foo", "fonts-bar"])
    rc = build_glyphs.main(["--out", str(tmp_path / "o"), "--font-roots", str(font_root),
                            "--min-designs", "30", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "found 11 distinct CJK font designs" in err
    assert "apt-get install fonts-foo fonts-bar" in err
    assert not (tmp_path / "o").exists()


def test_glyph_fonts_cli(font_root, capsys):
    assert glyph_fonts.main(["--roots", str(font_root)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("11 distinct CJK designs (18 CJK faces found):")
    assert "dropped  ipagp.ttf#0" in out and "same design as ipag.ttf#0" in out
    assert glyph_fonts.main(["--missing-packages"]) == 0
    listed = capsys.readouterr().out.split()
    assert set(listed) <= set(FONT_PACKAGES)


def test_holdout_designs_stay_out_of_training(font_root, tmp_path):
    out = tmp_path / "h"
    args = ["--out", str(out), "--font-roots", str(font_root), "--train-classes", "10",
            "--eval-classes", "20", "--distractor-classes", "4", "--min-designs", "6",
            "--verification-pairs", "20", "--ijbc-impostor-pairs", "50", "--quiet", "--jobs", "1",
            "--holdout-designs", "Kouzan", "Konatu", "--eval-heldout-only"]
    assert build_glyphs.main(args) == 0
    m = _manifest(out)
    held = {d["index"] for d in m["designs"] if not d["in_training"]}
    assert {m["designs"][i]["name"] for i in held} == {"KouzanBrushFont", "Konatu"}
    ds = RecordDataset.open(str(out / "train"))
    assert ds.class_counts.max() <= 9                  # 11 designs - 2 held out
    probes = read_list(out / "eval" / "megaface" / "facescrub_lst")
    assert {int(p.split("/d")[1][:2]) for p in probes} == held


def test_unknown_holdout_design_is_an_error(font_root, tmp_path, capsys):
    rc = build_glyphs.main(["--out", str(tmp_path / "o"), "--font-roots", str(font_root),
                            "--holdout-designs", "Helvetica", "--quiet"])
    err = capsys.readouterr().err
    assert rc == 2 and "'Helvetica' matches no kept design" in err and "IPAGothic" in err


STOPPED_CHILD = """
import sys, time
sys.path.insert(0, "data_tools")
import build_glyphs
from glyph_benchmark import eval_sets

def stalled(*args, **kwargs):
    print("WRITING", flush=True)      # train.rec is written, eval.partial is half written
    time.sleep(60)
eval_sets.write_megaface = stalled
sys.exit(build_glyphs.main(sys.argv[1:]))
"""


def test_sigterm_leaves_no_partial_set_and_no_manifest(font_root, built, tmp_path):
    """A rebuild stopped by SIGTERM: exit 143 with one line, its scratch folder gone, and no
    manifest, so the set is not taken for finished (the main job rebuilds it); the next run
    writes the same bytes as an uninterrupted build."""
    from glyph_benchmark.large import is_built
    out = tmp_path / "g"
    args = ["--out", str(out), "--font-roots", str(font_root), *ARGS, "--jobs", "1"]
    assert build_glyphs.main(args) == 0 and is_built(out)
    res = run_and_terminate(args, STOPPED_CHILD)
    err = res.stderr
    assert res.returncode == 128 + signal.SIGTERM, err
    assert f"build_glyphs: stopped by SIGTERM while writing {out}" in err
    assert "Traceback" not in err
    assert not (out / (build.EVAL_DIR + ".partial")).exists()
    assert not (out / build.MANIFEST).exists() and not is_built(out)
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]
    assert build_glyphs.main(args) == 0 and is_built(out)
    assert _files(out) == _files(built["a"])
