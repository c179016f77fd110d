"""The launcher on one CUDA GPU (NCCL group of one rank): fp16 with the grad scaler and
channels_last, stopped and resumed, then bf16; the export is loadable on the CPU."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_overrides  # noqa: E402

from facetrain.logging_utils import read_metrics  # noqa: E402


def _run(rec, out, extra):
    env = dict(os.environ, OMP_NUM_THREADS="2", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1",
           str(REPO / "launch" / "train_face.py"),
           *tiny_overrides(rec, out, ["train.device=cuda", "data.batch_size=8", *extra])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.gpu
def test_cuda_fp16_resume_and_bf16(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "fp16"
    fp16 = ["train.precision=fp16", "model.channels_last=true", "train.max_steps=12"]
    _run(rec, out, fp16 + ["train.max_steps=6"])
    _run(rec, out, fp16)
    log = (out / "log.txt").read_text()
    assert "(nccl, cuda:0)" in log and "resumed from" in log and "done: step 12" in log
    m = read_metrics(out / "metrics.jsonl")
    assert sorted(m) == list(range(1, 13)) and np.isfinite([m[k]["loss"] for k in m]).all()
    from facetrain.eval.embed import load_backbone

    model = load_backbone(out / "export" / "backbone.pt", "cpu")
    assert model(__import__("torch").zeros(2, 3, 16, 16)).shape == (2, 32)
    out = tmp_path / "bf16"
    _run(rec, out, ["train.precision=bf16", "train.max_steps=6"])
    assert len(read_metrics(out / "metrics.jsonl")) == 6
