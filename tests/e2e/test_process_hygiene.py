"""A finished or killed run leaves no process behind, and a 2-rank run ends with exit 0 and its
export every time.

Orphans are found by a marker in the environment: every process the run starts inherits it, so
after the run any process still carrying it in /proc/<pid>/environ is a leftover (the loader's
forkserver and its workers included, whatever their parent became)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import List

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_overrides  # noqa: E402

MARK = "FACETRAIN_TEST_PROCESS_MARK"


def _marked(tag: str) -> List[int]:
    """PIDs of live processes whose environment carries MARK=tag."""
    needle = f"{MARK}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes()
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if needle in env.split(b"\0") and state != "Z":
            pids.append(int(entry.name))
    return pids


def _wait_gone(tag: str, seconds: float) -> List[int]:
    deadline = time.monotonic() + seconds
    while True:
        left = _marked(tag)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.2)


def _env(tag: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **{MARK: tag})
    env.pop("WORLD_SIZE", None)
    return env


LOADER_SCRIPT = """
import sys, time
from facetrain.config import load_config
from facetrain.data import build_train_loader
from facetrain.dist import single_process
sys.path.insert(0, sys.argv[3])
from test_train_data import tiny_overrides
cfg = load_config(None, tiny_overrides(sys.argv[1], sys.argv[2], ["data.num_workers=2"]))
loader = build_train_loader(cfg.data, single_process(), 0)
batches = iter(loader.iter_from(0))
next(batches)
print("ready", flush=True)
time.sleep(300)
"""


def test_killed_trainer_leaves_no_loader_processes(tmp_path):
    """SIGKILL of a process mid-epoch: its forkserver and loader workers go with it."""
    rec = make_tiny_rec(tmp_path / "data")
    tag = uuid.uuid4().hex
    proc = subprocess.Popen([sys.executable, "-c", LOADER_SCRIPT, rec, str(tmp_path / "out"),
                             str(REPO / "tests" / "distributed")], env=_env(tag),
                            stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "ready"
        assert len(_marked(tag)) >= 3          # the process, its forkserver, 2 workers
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        left = _wait_gone(tag, 15)
        assert not left, f"processes left behind after the trainer was killed: {left}"
    finally:
        for pid in _marked(tag):
            os.kill(pid, signal.SIGKILL)


def test_two_rank_end_of_training_is_clean_every_time(tmp_path):
    """The end of a 2-rank run (checkpoint, stats, rank 0's export while rank 1 is done) run
    many times: exit 0, the "done" line, both exports, no process left."""
    rec = make_tiny_rec(tmp_path / "data", counts=[6] * 8)
    runs = int(os.environ.get("FACETRAIN_TEST_EXIT_RUNS", "6"))
    for i in range(runs):
        out = tmp_path / f"run{i}"
        tag = uuid.uuid4().hex
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               str(REPO / "launch" / "train_face.py"),
               *tiny_overrides(rec, out, ["train.epochs=1", "data.num_workers=1",
                                          "checkpoint.every_steps=0", "leap.start_epoch=0"])]
        proc = subprocess.run(cmd, env=_env(tag), capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, f"run {i}: " + proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "done: step" in (out / "log.txt").read_text()
        assert (out / "export" / "backbone.pt").is_file()
        assert (out / "export" / "backbone.onnx").is_file()
        left = _wait_gone(tag, 10)
        assert not left, f"run {i}: processes left behind: {left}"
