"""The main job's tuning mode, reduced to CI size: `--eval-on both` builds the validation
characters beside the tiny glyph build, evaluates every run on them and on the test sets, and a
combined method (LEAP on top of a margin head) and a tuned variant train with the right config."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
BUILD = ("--train-classes 60 --eval-classes 20 --distractor-classes 10 --verification-pairs 40 "
         "--ijbc-impostor-pairs 300 --quiet")
TRAIN = ["train.epochs=2", "schedule.cycle_epochs=1", "leap.start_epoch=1", "data.batch_size=16",
         "data.num_workers=0", "train.log_every=5", "train.tensorboard=false",
         "checkpoint.every_steps=0"]


@pytest.mark.slow
def test_main_job_validation_mode(tmp_path):
    out, glyphs = tmp_path / "runs", tmp_path / "data" / "glyphs"
    cmd = [sys.executable, "-m", "experiments.main_job", "--out", str(out), "--glyphs", str(glyphs),
           "--build-args", BUILD, "--methods", "cosface,leap_full+elasticface_cos-width3",
           "--head", "10", "--eval-on", "validation", *TRAIN]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    runs = [out / "cosface_seed0", out / "leap_full+elasticface_cos-width3_seed0"]
    cfg = yaml.safe_load((runs[1] / "config.yaml").read_text())
    assert (cfg["leap"]["mode"], cfg["leap"]["width_scale"], cfg["head"]["margin"]["kind"]) == \
        ("full", 3.0, "elasticface_cos")
    # validation only: no test evaluation, no test report
    for run in runs:
        ev = json.loads((run / "eval_validation.json").read_text())
        assert ev["verification"]["pairs"] == 40 and 0.0 <= ev["megaface"]["rank1"] <= 1.0
        assert not (run / "eval.json").exists()
    assert not (out / "results.md").exists()
    md = (out / "validation.md").read_text()
    assert "Validation characters" in md and "| leap_full+elasticface_cos-width3 | 1 |" in md
    val = json.loads((glyphs / "validation" / "manifest.json").read_text())
    built = json.loads((glyphs / "manifest.json").read_text())
    assert len(val["classes"]) == 20 and len(val["distractors"]) == 10
    assert not set(val["classes"] + val["distractors"]) & set(
        built["train"]["classes"] + built["eval"]["classes"] + built["distractors"]["classes"])
