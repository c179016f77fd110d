"""The output folder's run lock (facetrain/run_lock.py): a live holder refuses a second run with
its host, pid and start time; a holder that is gone (SIGKILL, a reused pid, a reboot, another
host without heartbeat) is taken over; only the holder's own lock is ever removed."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from facetrain.run_lock import LOCK_NAME, RunLock, RunLockedError, process_start

REPO = Path(__file__).resolve().parents[2]


def _write_lock(folder: Path, **fields) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    holder = {"host": socket.gethostname(), "boot_id": open(
        "/proc/sys/kernel/random/boot_id").read().strip(), "pid": os.getpid(),
        "proc_start": process_start(os.getpid()), "start": "2026-01-01T00:00:00+00:00",
        "token": "theirs", **fields}
    path = folder / LOCK_NAME
    path.write_text(json.dumps(holder) + "\n")
    return path


def test_second_lock_is_refused_with_folder_and_holder_then_released(tmp_path):
    first = RunLock(tmp_path / "out")
    first.acquire()
    held = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname()
    with pytest.raises(RunLockedError) as info:
        RunLock(tmp_path / "out").acquire()
    msg = str(info.value)
    assert msg.startswith(f"{tmp_path / 'out'} is in use by another training run (host "
                          f"{socket.gethostname()}, pid {os.getpid()}, started {held['start']})")
    first.release()
    assert not (tmp_path / "out" / LOCK_NAME).exists()
    first.release()                                  # idempotent
    with RunLock(tmp_path / "out"):                  # free again
        pass


def test_sigkilled_holder_does_not_block_the_next_run(tmp_path):
    code = ("import sys, time; from facetrain.run_lock import RunLock; "
            f"RunLock({str(tmp_path / 'out')!r}).acquire(); print('held', flush=True); "
            "time.sleep(60)")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True,
                            env=env)
    assert proc.stdout.readline().strip() == "held"
    with pytest.raises(RunLockedError, match=f"pid {proc.pid}"):
        RunLock(tmp_path / "out").acquire()
    theirs = json.loads((tmp_path / "out" / LOCK_NAME).read_text())
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock = RunLock(tmp_path / "out")
    lock.acquire()
    assert lock.taken_over == (f"took over the lock of {tmp_path / 'out'} from a run that is "
                               f"gone (host {socket.gethostname()}, pid {proc.pid}, started "
                               f"{theirs['start']}: process {proc.pid} is gone)")
    assert json.loads(lock.path.read_text())["pid"] == os.getpid()
    lock.release()


def test_reused_pid_and_other_boot_are_stale(tmp_path):
    # Our own (live) pid, but another start time: a process that reused the holder's pid.
    _write_lock(tmp_path / "a", proc_start=process_start(os.getpid()) - 1)
    with RunLock(tmp_path / "a") as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    _write_lock(tmp_path / "b", boot_id="an-earlier-boot")
    with RunLock(tmp_path / "b") as lock:
        assert json.loads(lock.path.read_text())["token"] == lock.token
    # The same pid and start time: the holder is alive.
    _write_lock(tmp_path / "c")
    with pytest.raises(RunLockedError, match="started 2026-01-01T00:00:00"):
        RunLock(tmp_path / "c").acquire()


def test_other_host_is_stale_only_without_heartbeat(tmp_path):
    path = _write_lock(tmp_path / "out", host="node-elsewhere", pid=1, boot_id="x")
    with pytest.raises(RunLockedError, match="host node-elsewhere, pid 1") as info:
        RunLock(tmp_path / "out", stale_after_s=300).acquire()
    assert "heartbeat is older than 300 s" in str(info.value)
    old = time.time() - 301
    os.utime(path, (old, old))
    with RunLock(tmp_path / "out", stale_after_s=300) as lock:
        assert json.loads(path.read_text())["token"] == lock.token


def test_holder_heartbeat_refreshes_mtime(tmp_path):
    lock = RunLock(tmp_path / "out", heartbeat_s=0.05)
    lock.acquire()
    old = time.time() - 1000
    os.utime(lock.path, (old, old))
    deadline = time.time() + 5
    while lock.path.stat().st_mtime < old + 500 and time.time() < deadline:
        time.sleep(0.05)
    assert lock.path.stat().st_mtime > old + 500
    lock.release()


def test_release_never_removes_another_runs_lock(tmp_path):
    lock = RunLock(tmp_path / "out")
    lock.acquire()
    path = _write_lock(tmp_path / "out", token="someone-else")     # broken and re-taken
    lock.release()
    assert json.loads(path.read_text())["token"] == "someone-else"
