"""One training run per output folder: an exclusive lock file held for the life of the run.

Why: two trainings started on the same `train.output_dir` both "succeeded", each silently
resuming from, pruning and exporting over the other's checkpoints. Rank 0 takes this lock before
any rank reads the folder's checkpoints (launch/train_face.py agrees the outcome across ranks),
so the second run is refused at once with a message naming the folder and the holder.

Design, for output folders on a local disk or on shared storage (NFS) seen by many hosts:
- `<output_dir>/.facetrain.lock` is created with O_CREAT|O_EXCL (atomic on local file systems
  and NFSv3+) and holds JSON {host, boot_id, pid, proc_start, start, token}.
- The holder removes it (only while it still holds its own token) on a normal end, an error,
  Ctrl-C and SIGTERM.
- A lock left behind (SIGKILL, a crashed host) never blocks the next run for long:
  * same host (host name and kernel boot id equal): it is stale as soon as no live process has
    that pid *and* that start time (/proc/<pid>/stat), so a reused pid is not mistaken for the
    holder, and a reboot makes every old lock stale;
  * another host: the holder refreshes the file's mtime every `heartbeat_s`; the lock is stale
    when that heartbeat is older than `stale_after_s`. The age is measured against the mtime of
    a probe file written into the same folder just now, so both times come from one clock (the
    file server's), not from two hosts' clocks that may disagree.
- Taking over a stale lock is serialised by a second O_EXCL file (`.facetrain.lock.break`), so
  two new runs never both break the same stale lock and then both start.
- Why not flock(): a lock held on an open file is inherited by forked children (loader workers)
  and can outlive the trainer, and on NFS it is either local to one host or depends on the
  mount's lock daemon; the pid, start time and heartbeat checks above work on both.
"""
from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import threading
import uuid
from pathlib import Path
from typing import Any, Dict, Optional

LOCK_NAME = ".facetrain.lock"
BREAK_SUFFIX = ".break"
HEARTBEAT_S = 30.0          # how often the holder refreshes the lock's mtime
STALE_AFTER_S = 300.0       # a lock of another host without a heartbeat this long is stale

log = logging.getLogger(__name__)


class RunLockedError(RuntimeError):
    """The output folder is held by another run (the message names the folder and holder)."""


def _read_text(path: str) -> Optional[str]:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.read()
    except OSError:
        return None


def boot_id() -> str:
    """This kernel boot's id (Linux); '' where there is none."""
    return (_read_text("/proc/sys/kernel/random/boot_id") or "").strip()


def process_start(pid: int) -> Optional[int]:
    """Start time of process `pid` in clock ticks since boot (Linux /proc), or None.

    Together with the pid it names one process of one boot: a later process that reuses the pid
    has another start time."""
    stat = _read_text(f"/proc/{pid}/stat")
    if not stat or ")" not in stat:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    try:
        return int(fields[19])          # field 22 of stat; fields[0] is field 3 (state)
    except (IndexError, ValueError):
        return None


def process_alive(pid: int, start: Optional[int]) -> bool:
    """True when process `pid` exists on this host, is not a zombie and (when `start` is known)
    started at `start`."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass                            # exists, owned by another user
    stat = _read_text(f"/proc/{pid}/stat")
    if stat and ")" in stat:
        state = stat.rsplit(")", 1)[1].split()[0:1]
        if state and state[0] in ("Z", "X"):        # killed, not yet reaped
            return False
    if start is not None:
        now = process_start(pid)
        if now is not None and now != start:
            return False                # the pid was reused by another process
    return True


def describe(holder: Dict[str, Any]) -> str:
    """'host H, pid P, started T' for a lock's JSON."""
    return (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, "
            f"started {holder.get('start', '?')}")


class RunLock:
    """The exclusive lock on one output folder; `acquire()`, then `release()` (idempotent)."""

    def __init__(self, folder: Path, heartbeat_s: float = HEARTBEAT_S,
                 stale_after_s: float = STALE_AFTER_S) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self.token = uuid.uuid4().hex
        self.held = False
        # Set when acquire() removed a stale lock: the warning for the run's log.
        self.taken_over: Optional[str] = None
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    # ---- taking and giving back ----------------------------------------------------------
    def acquire(self) -> None:
        """Take the lock, or raise RunLockedError naming the folder and the live holder. A stale
        lock (its holder is gone) is taken over with a warning."""
        self.folder.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._create():
                self._start_heartbeat()
                return
            raw = self._read_raw()
            if raw is None:             # released between our create and our read
                continue
            holder = _parse(raw)
            reason = self._stale_reason(holder)
            if reason is None:
                raise RunLockedError(self._refusal(holder))
            self._break(raw, holder, reason)
        raise RunLockedError(f"{self.folder} is being claimed by several runs at once (lock "
                             f"{self.path}); start one run per train.output_dir")

    def release(self) -> None:
        """Stop the heartbeat and remove the lock file if it is still ours. Safe to call from a
        signal handler and more than once."""
        self._stop.set()
        if not self.held:
            return
        self.held = False
        raw = self._read_raw()
        if raw is not None and _parse(raw).get("token") == self.token:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass

    def __enter__(self) -> "RunLock":
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ---- internals -------------------------------------------------------------------------
    def _create(self) -> bool:
        me = {"host": socket.gethostname(), "boot_id": boot_id(), "pid": os.getpid(),
              "proc_start": process_start(os.getpid()),
              "start": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
              "token": self.token}
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            return False
        try:
            os.write(fd, (json.dumps(me) + "\n").encode())
            os.fsync(fd)
        finally:
            os.close(fd)
        self.held = True
        return True

    def _read_raw(self) -> Optional[bytes]:
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return None

    def _age_s(self, path: Path) -> Optional[float]:
        """Seconds since `path` was last modified, by the clock of the folder's file system
        (the mtime of a probe file written now), or None when `path` is gone."""
        probe = self.folder / f"{LOCK_NAME}.probe.{socket.gethostname()}.{os.getpid()}"
        try:
            probe.write_bytes(b"")
            now = probe.stat().st_mtime
        finally:
            try:
                probe.unlink()
            except FileNotFoundError:
                pass
        try:
            return now - path.stat().st_mtime
        except FileNotFoundError:
            return None

    def _stale_reason(self, holder: Dict[str, Any]) -> Optional[str]:
        """Why the lock described by `holder` is stale, or None while its holder may live."""
        same_host = holder.get("host") == socket.gethostname()
        if same_host and holder.get("boot_id") and holder.get("boot_id") != boot_id():
            return "its host was restarted since"
        if same_host and isinstance(holder.get("pid"), int):
            if not process_alive(holder["pid"], holder.get("proc_start")):
                return f"process {holder['pid']} is gone"
            return None
        age = self._age_s(self.path)    # another host, or a lock whose JSON is unreadable
        if age is None or age > self.stale_after_s:
            return (f"its heartbeat is {age:.0f} s old (limit {self.stale_after_s:.0f} s)"
                    if age is not None else "it was removed")
        return None

    def _refusal(self, holder: Dict[str, Any]) -> str:
        if not holder:
            who = "a run whose lock file is unreadable or still being written"
        else:
            who = describe(holder)
        same_host = holder.get("host") == socket.gethostname()
        gone = ("it is taken over as soon as that process is gone" if same_host else
                f"if that run died, its lock is taken over once its heartbeat is older than "
                f"{self.stale_after_s:.0f} s")
        return (f"{self.folder} is in use by another training run ({who}); wait for it to end "
                f"or stop it, or choose another train.output_dir ({gone}; lock file "
                f"{self.path})")

    def _break(self, raw: bytes, holder: Dict[str, Any], reason: str) -> None:
        """Remove the stale lock whose bytes are `raw`, unless another run is doing so."""
        breaker = self.path.with_name(LOCK_NAME + BREAK_SUFFIX)
        try:
            fd = os.open(breaker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        except FileExistsError:
            age = self._age_s(breaker)
            if age is not None and age > 60:      # a breaker killed mid-way
                try:
                    breaker.unlink()
                except FileNotFoundError:
                    pass
                return
            raise RunLockedError(f"{self.folder}: another run is taking over the stale lock "
                                 f"{self.path} right now; start one run per train.output_dir")
        os.close(fd)
        try:
            if self._read_raw() == raw:           # still the lock we judged stale
                self.path.unlink()
                self.taken_over = (f"took over the lock of {self.folder} from a run that is "
                                   f"gone ({describe(holder) if holder else 'holder unknown'}: "
                                   f"{reason})")
        finally:
            breaker.unlink()

    def _start_heartbeat(self) -> None:
        def beat() -> None:
            while not self._stop.wait(self.heartbeat_s):
                raw = self._read_raw()
                if raw is None or _parse(raw).get("token") != self.token:
                    log.warning(f"the lock {self.path} of this run was removed or taken over "
                                "by another run; two runs may now share "
                                f"{self.folder}")
                    return
                try:
                    os.utime(self.path, None)
                except OSError:
                    pass                # the next beat tries again

        self._stop.clear()
        self._thread = threading.Thread(target=beat, name="facetrain-run-lock", daemon=True)
        self._thread.start()


def _parse(raw: bytes) -> Dict[str, Any]:
    try:
        value = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}
