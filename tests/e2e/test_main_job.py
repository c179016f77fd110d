"""The README's main job, reduced to CI size: tiny glyph build -> long-tailed split -> CosFace
and LEAP trained under torchrun (2 gloo processes, classifier sharded) -> every evaluator ->
report and plots. Checks that each stage left sane output, not the science."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD = ("--train-classes 60 --eval-classes 40 --distractor-classes 20 --verification-pairs 200 "
         "--ijbc-impostor-pairs 2000 --quiet")
TRAIN = ["train.epochs=2", "schedule.cycle_epochs=1", "leap.start_epoch=1", "data.batch_size=16",
         "data.num_workers=0", "train.log_every=5", "train.tensorboard=false",
         "checkpoint.every_steps=0"]


def test_reduced_main_job_end_to_end(tmp_path):
    out, glyphs = tmp_path / "runs", tmp_path / "data" / "glyphs"
    cmd = [sys.executable, "-m", "experiments.main_job", "--out", str(out),
           "--glyphs", str(glyphs), "--build-args", BUILD,
           "--methods", "cosface,leap_full,uniform_control", "--head", "10",
           "--tail-samples", "3", *TRAIN]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    # data: the glyph set and its long-tailed split beside it
    assert (glyphs / "train.rec").stat().st_size > 0
    designs = (glyphs / "train_designs.csv").read_text().splitlines()
    assert designs[0] == "label,ordinal,design,name"
    assert len(designs) - 1 == json.loads((glyphs / "manifest.json").read_text())["train"]["images"]
    ordinals = {}
    for row in designs[1:]:
        label, ordinal = (int(x) for x in row.split(",")[:2])
        ordinals.setdefault(label, []).append(ordinal)
    assert len(ordinals) == 60 and all(o == list(range(len(o))) for o in ordinals.values())
    split = tmp_path / "data" / "longtail_H10_Tall_S3"
    manifest = (split / "manifest.csv").read_text().splitlines()[1:]
    parts = [line.split(",")[3] for line in manifest]
    assert parts.count("head") == 10 and parts.count("tail") > 0
    assert all(int(line.split(",")[2]) == 3 for line in manifest if line.endswith("tail"))

    # training: resolved configs differ only where the method says, exports exist
    cfgs = {m: yaml.safe_load((out / f"{m}_seed0" / "config.yaml").read_text())
            for m in ("cosface", "leap_full")}
    assert cfgs["cosface"]["leap"]["mode"] == "off" and cfgs["leap_full"]["leap"]["mode"] == "full"
    assert cfgs["cosface"]["train"]["epochs"] == 2
    for m in cfgs:
        assert (out / f"{m}_seed0" / "export" / "backbone.pt").is_file()
    assert (out / "leap_full_seed0" / "leap_stats_end.npz").is_file()

    # evaluation: every protocol produced a probability-valued score
    for m in cfgs:
        ev = json.loads((out / f"{m}_seed0" / "eval.json").read_text())
        assert 0.5 <= ev["verification"]["accuracy_mean"] <= 1.0
        assert ev["verification"]["pairs"] == 200
        assert all(v is None or 0.0 <= v <= 1.0 for v in ev["ijbc"]["tpr_at_fpr"].values())
        assert 0.0 <= ev["megaface"]["rank1"] <= 1.0 and ev["megaface"]["distractors"] > 0
        var = np.load(out / f"{m}_seed0" / "angular_variance.npz")
        assert var["variance"].shape == var["counts"].shape and var["head_mask"].sum() == 10

    # report: the table names both methods and the paired difference, plots are PNGs
    md = (out / "results.md").read_text()
    assert "| cosface | 1 |" in md and "| leap_full | 1 |" in md and "Paired difference" in md
    # LEAP against the untargeted control, paired the same way
    assert "Paired difference to uniform_control" in md
    summary = json.loads((out / "results.json").read_text())
    diff = summary["extra"]["leap_vs_uniform_control"]["methods"]["leap_full"]["megaface_rank1"]
    assert diff["diff"]["n"] == 1
    for png in ("roc.png", "angular_variance.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Verification acc." in proc.stdout

    # the study tables tool reads the same folder: paired differences and the variance table
    plot = tmp_path / "paired.png"
    strength = tmp_path / "strength.png"
    tables = subprocess.run([sys.executable, "-m", "experiments.study_tables", str(out),
                             "--plot", str(plot), "--plot-strength", str(strength)], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert tables.returncode == 0, tables.stderr[-2000:]
    assert "Paired difference to cosface" in tables.stdout
    assert re.search(r"\| runs \| leap_full \| 1 \| 0\.\d{4} \| 0\.\d{4} \| 0\.\d{4} \| "
                     r"\d+\.\d\d \|", tables.stdout), tables.stdout[-2000:]
    # one headline per reported metric, LEAP against both matched controls, and the realised
    # noise strengths of LEAP and its control side by side
    for label in ("MegaFace-style rank-1", "IJB-C-style TPR@FPR=1e-3", "Verification accuracy"):
        assert f"## Headline: {label} (%), paired differences in points" in tables.stdout
    assert "| LEAP full − uniform | LEAP full − shuffled |" in tables.stdout
    noise = dict(re.findall(r"\| runs \| (leap_full|uniform_control) \| 1 \| ([0-9.]+) \|",
                            tables.stdout))
    assert set(noise) == {"leap_full", "uniform_control"}, tables.stdout[-2000:]
    assert float(noise["leap_full"]) > 0
    for png in (plot, strength):
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
