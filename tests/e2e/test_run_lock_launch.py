"""One run per output folder under torchrun (2 gloo ranks): a second run on a folder in use is
refused at once with one message naming the folder and the holder; Ctrl-C prints one line and
frees the folder; SIGTERM frees it; a SIGKILLed run's lock does not block the next run."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "tests" / "distributed"))
from test_train_data import make_tiny_rec, tiny_overrides  # noqa: E402

LAUNCH = str(REPO / "launch" / "train_face.py")
LOCK = ".facetrain.lock"


def _cmd(*overrides, nproc=2):
    return [sys.executable, "-m", "torch.distributed.run", "--standalone",
            f"--nproc_per_node={nproc}", LAUNCH, *overrides]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    env.pop("WORLD_SIZE", None)
    return env


def _start_long_run(rec: str, out: Path) -> subprocess.Popen:
    """A 2-rank run that trains far longer than the test; returns once it has made a step."""
    proc = subprocess.Popen(_cmd(*tiny_overrides(rec, out, ["train.epochs=500"])), env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            start_new_session=True)
    log = out / "log.txt"
    seen = log.stat().st_size if log.is_file() else 0       # a previous run's lines
    deadline = time.time() + 120
    while time.time() < deadline:
        if log.is_file() and "] step " in log.read_text()[seen:]:
            return proc
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(0.3)
    raise AssertionError("the first run made no step in 120 s")


def _our_lines(text: str) -> list:
    return [ln for ln in text.splitlines() if "train_face.py:" in ln]


def test_second_run_is_refused_then_ctrl_c_prints_one_line_and_frees_the_folder(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "out"
    first = _start_long_run(rec, out)
    try:
        holder = json.loads((out / LOCK).read_text())
        t0 = time.time()
        second = subprocess.run(_cmd(*tiny_overrides(rec, out)), env=_env(),
                                capture_output=True, text=True, timeout=300)
        assert second.returncode != 0
        text = second.stdout + second.stderr
        assert "[rank0]: Traceback" not in text and "[rank1]: Traceback" not in text, text
        lines = _our_lines(text)
        assert lines == [
            f"train_face.py: {out} is in use by another training run (host "
            f"{socket.gethostname()}, pid {holder['pid']}, started {holder['start']}); wait "
            "for it to end or stop it, or choose another train.output_dir (it is taken over as "
            f"soon as that process is gone; lock file {out / LOCK})"], lines
        assert time.time() - t0 < 60                      # refused at once, not after a wait
        assert first.poll() is None                       # the first run is untouched
        assert json.loads((out / LOCK).read_text()) == holder
        # Ctrl-C in the terminal: SIGINT to the whole foreground group (agent and ranks).
        os.killpg(first.pid, signal.SIGINT)
        rest = first.communicate(timeout=120)[0]
    finally:
        if first.poll() is None:
            os.killpg(first.pid, signal.SIGKILL)
            first.wait()
    assert _our_lines(rest) == [
        f"train_face.py: stopped by Ctrl-C (SIGINT); the last checkpoint in {out / 'checkpoints'}"
        " is kept; run the same command to resume"], rest[-3000:]
    assert "KeyboardInterrupt" not in rest and "[rank0]: Traceback" not in rest, rest[-3000:]
    assert "[rank1]: Traceback" not in rest, rest[-3000:]
    assert not (out / LOCK).exists()


def test_sigterm_frees_the_folder_and_a_sigkilled_run_does_not_block_the_next(tmp_path):
    rec = make_tiny_rec(tmp_path / "data")
    out = tmp_path / "out"
    first = _start_long_run(rec, out)
    first.send_signal(signal.SIGTERM)                    # the agent stops its ranks by SIGTERM
    first.communicate(timeout=120)
    assert not (out / LOCK).exists()
    second = _start_long_run(rec, out)
    holder = json.loads((out / LOCK).read_text())
    os.kill(holder["pid"], signal.SIGKILL)       # rank 0 killed (OOM killer, kill -9): no
    second.communicate(timeout=120)              # handler runs; torchrun stops rank 1
    assert json.loads((out / LOCK).read_text()) == holder
    third = subprocess.run(_cmd(*tiny_overrides(rec, out, ["train.epochs=500",
                                                           "train.max_steps=12"])),
                           env=_env(), capture_output=True, text=True, timeout=300)
    assert third.returncode == 0, (third.stdout + third.stderr)[-3000:]
    log = (out / "log.txt").read_text()
    assert f"took over the lock of {out} from a run that is gone (host " \
        f"{socket.gethostname()}, pid {holder['pid']}" in log
    assert "done: step 12" in log
    assert not (out / LOCK).exists()
