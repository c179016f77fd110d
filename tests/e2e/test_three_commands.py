"""The three commands a user types after the README's main command, in that order, each with no
other step: `torchrun launch/train_face.py`, `python data_tools/make_longtail.py --head H --tail T`
(whose default input, the large glyph set, is built on first use) and `python
eval_protocols/ijbc.py` (which evaluates the newest export under runs/).

Reduced: a temporary folder laid out like a clone after the main job (the code linked in, a tiny
glyph set built from a few installed fonts, its long-tailed split under the default config's
name, an older main-job export), and the large set shrunk through its environment variables."""
from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "data_tools"))
import build_glyphs  # noqa: E402

from facetrain.build.longtail import make_longtail  # noqa: E402
from facetrain.data.dataset import RecordDataset  # noqa: E402
from glyph_benchmark.fonts import find_font_files  # noqa: E402
from glyph_benchmark.large import CLASSES_ENV, FONT_ROOTS_ENV  # noqa: E402

# Eight distinct designs among the smaller installed CJK fonts (scripts/setup.sh --fonts).
FONTS = ["ipag.ttf", "ipam.ttf", "VL-Gothic-Regular.ttf", "umeplus-gothic.ttf", "Konatu.ttf",
         "cwkai.ttf", "kouzan-mouhitsu.ttf", "setofont.ttf"]
BUILD = ["--train-classes", "40", "--eval-classes", "20", "--distractor-classes", "10",
         "--min-designs", "6", "--verification-pairs", "40", "--ijbc-impostor-pairs", "300",
         "--jobs", "1", "--quiet"]
SPLIT = "data/longtail_H100_Tall_S3"          # configs/default.yaml's data.rec
TRAIN = ["train.epochs=1", "data.batch_size=16", "data.num_workers=0", "train.log_every=2",
         "train.tensorboard=false", "checkpoint.every_steps=0", "leap.start_epoch=0",
         "leap.head_threshold=0"]                       # every class is head: no tail


@pytest.fixture()
def clone(tmp_path) -> Path:
    """A working folder like a clone after the main job (reduced data, an older export)."""
    fonts = tmp_path / "fonts"
    fonts.mkdir()
    real = {os.path.basename(f): f for f in find_font_files()}
    for name in FONTS:
        assert name in real, f"{name} missing: run scripts/setup.sh --fonts"
        os.symlink(real[name], fonts / name)
    root = tmp_path / "clone"
    root.mkdir()
    for part in ("configs", "data_tools", "eval_protocols", "facetrain", "launch"):
        os.symlink(REPO / part, root / part)
    glyphs = root / "data" / "glyphs"
    assert build_glyphs.main(["--out", str(glyphs), "--font-roots", str(fonts), *BUILD]) == 0
    make_longtail(str(glyphs / "train"), str(root / SPLIT), head=10, tail=None, tail_samples=3)
    old = root / "runs" / "main" / "cosface_seed0" / "export" / "backbone.pt"
    old.parent.mkdir(parents=True)
    old.write_bytes(b"an older main-job export; never loaded when a newer one exists")
    os.utime(old, (1e9, 1e9))
    return root


def _run(cmd, cwd: Path, env) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_three_commands_in_order(clone):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO),
               **{CLASSES_ENV: "30", FONT_ROOTS_ENV: str(clone.parent / "fonts")})
    env.pop("WORLD_SIZE", None)

    # 1. train with the default config (its data.rec and output_dir), 2 processes
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "launch/train_face.py", *TRAIN], clone, env)
    export = clone / "runs" / "default" / "export" / "backbone.pt"
    assert export.is_file()
    log = (clone / "runs" / "default" / "log.txt").read_text()
    assert "tail: no tail classes" in log and "tail nan" not in log

    # 2. the paper's split command: the default input is built first, then split
    proc = _run([sys.executable, "data_tools/make_longtail.py", "--head", "5", "--tail", "20",
                 "--no-progress"], clone, env)
    assert "data/glyphs_large is missing: building it once" in proc.stdout
    assert "built data/glyphs_large in" in proc.stdout
    assert "5 head classes" in proc.stdout and "20 tail classes" in proc.stdout
    large = RecordDataset.open(str(clone / "data" / "glyphs_large" / "train"))
    counts = large.class_counts
    assert counts.size == 30 and counts.min() >= 5
    assert not (clone / "data" / "glyphs_large.partial").exists()
    manifest = json.loads((clone / "data" / "glyphs_large" / "manifest.json").read_text())
    assert manifest["settings"]["train_only"] and manifest["ijbc"] is None
    small = json.loads((clone / "data" / "glyphs" / "manifest.json").read_text())
    held_out = set(small["eval"]["classes"] + small["distractors"]["classes"])
    assert "leaving out the 30 characters data/glyphs holds out" in proc.stdout
    assert not held_out & set(manifest["train"]["classes"])     # evaluation stays unseen
    with open(clone / "data" / "longtail_H5_T20_S5" / "manifest.csv") as fh:
        rows = list(csv.DictReader(fh))
    head = [int(r["images"]) for r in rows if r["part"] == "head"]
    assert head == sorted(counts.tolist(), reverse=True)[:5]     # the largest classes

    # 3. evaluate with no model argument: the newest export is the first command's
    proc = _run([sys.executable, "eval_protocols/ijbc.py"], clone, env)
    assert f"using the newest of 2 exported backbone(s) under runs/: " \
           f"{Path('runs/default/export/backbone.pt')}" in proc.stderr
    report = json.loads((clone / "runs" / "eval" / "ijbc.json").read_text())
    assert report["1:1"]["templates"] > 0
