"""Kill-and-restart under `torchrun --max-restarts=1`: rank 1 is SIGKILLed once after step 12;
the job restarts, resumes from the last checkpoint (step 10) and finishes, losing only the steps
since that checkpoint. The fault goes in through Trainer.fit's after_step seam (kill_once.py);
the library carries no fault-injection code."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_overrides  # noqa: E402

from facetrain.logging_utils import read_metrics  # noqa: E402


def test_rank_killed_mid_run_restarts_and_resumes(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "run"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "--max-restarts=1", str(Path(__file__).with_name("kill_once.py")), "1:12",
           str(out / ".killed_rank1_step12"), "--",
           *tiny_overrides(rec, out, ["train.epochs=2", "checkpoint.every_steps=5"])]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert (out / ".killed_rank1_step12").is_file()              # the fault did happen
    log = (out / "log.txt").read_text()
    assert log.count("training tiny") == 2                       # started twice
    assert "resumed from" in log and "ckpt_step10 (step 10," in log
    assert "done: step 30" in log
    m = read_metrics(out / "metrics.jsonl")
    assert sorted(m) == list(range(1, 31)) and np.isfinite([m[k]["loss"] for k in m]).all()
