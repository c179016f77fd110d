"""Logging: a training run's log.txt, metrics.jsonl, TensorBoard scalars and progress display
(`RunLogger`), and the console logging of the command-line tools (`setup_tool_logging`).

The library logs through Python's `logging` under the `facetrain` logger and never configures
it. The programs set up the one handler: a training run's RunLogger routes WARNING and up into
log.txt and the console (every rank; other ranks' lines name the rank); the data tools and
evaluation CLIs call `setup_tool_logging`.

Only rank 0 writes run files (other ranks only append their warnings to log.txt); other ranks
get a RunLogger whose methods do nothing, so call sites need no `if rank == 0`. Nothing here
touches a process group.
"""
from __future__ import annotations

import datetime
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np


# The tools' console format: "INFO message" / "WARNING message" on stderr.
TOOL_FORMAT = "%(levelname)s %(message)s"


def setup_tool_logging(quiet: bool = False) -> None:
    """Console logging for a command-line tool: its own records and the library's (INFO and up,
    WARNING and up with `quiet`) to stderr as TOOL_FORMAT; fontTools' notices about old font
    timestamps are silenced. Leaves logging alone when the process already configured it (a
    test harness, a program calling the tool's main)."""
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format=TOOL_FORMAT)
    logging.getLogger("fontTools").setLevel(logging.ERROR)


def format_eta(seconds: float) -> str:
    if not math.isfinite(seconds) or seconds < 0:
        return "?"
    return str(datetime.timedelta(seconds=int(seconds)))


class RunLogger:
    """Writes `<out>/log.txt`, `<out>/metrics.jsonl` and `<out>/tensorboard/` on rank 0.

    `progress` shows a tqdm bar on an interactive terminal; log lines go to stdout either way.
    """

    def __init__(self, out_dir: Path, is_main: bool, total_steps: int,
                 tensorboard: bool = True, progress: bool = True, rank: int = 0) -> None:
        self.enabled = is_main
        self.total_steps = total_steps
        self._tb = None
        self._bar = None
        self._t_last = time.perf_counter()
        self._step_last: Optional[int] = None
        self._handler: logging.Handler
        if not self.enabled:
            # Library warnings of the other ranks (e.g. a skipped image in their shard): stderr
            # and log.txt, in the same format, naming the rank.
            self._handler = _RankWarningHandler(Path(out_dir) / "log.txt", rank)
            logging.getLogger("facetrain").addHandler(self._handler)
            return
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self._log = open(self.out / "log.txt", "a", encoding="utf-8")
        self._metrics = open(self.out / "metrics.jsonl", "a", encoding="utf-8")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:
                self.info("tensorboard is not installed (pip install 'facetrain[tensorboard]'); "
                          "TensorBoard scalars are off, metrics.jsonl has them")
            else:
                self._tb = SummaryWriter(str(self.out / "tensorboard"))
        if progress and sys.stderr.isatty():
            from tqdm import tqdm

            self._bar = tqdm(total=total_steps, unit="step", dynamic_ncols=True)
        # Library warnings (skipped images, data-layer notices) go to log.txt and the console
        # like the run's own lines; without a handler Python prints them to stderr only.
        self._handler = _RunLogHandler(self)
        logging.getLogger("facetrain").addHandler(self._handler)

    def info(self, msg: str) -> None:
        """One timestamped line to stdout and log.txt."""
        if not self.enabled:
            return
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] {msg}"
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def start(self, step: int) -> None:
        self._t_last, self._step_last = time.perf_counter(), step
        if self._bar is not None:
            self._bar.n = step
            self._bar.refresh()

    def throughput(self, step: int, samples_per_step: int) -> Dict[str, float]:
        """samples/s and ETA since the previous call (the caller has synced the device)."""
        now = time.perf_counter()
        done = step - (self._step_last if self._step_last is not None else step)
        dt = max(now - self._t_last, 1e-9)
        self._t_last, self._step_last = now, step
        sps = done * samples_per_step / dt if done > 0 else float("nan")
        eta = (self.total_steps - step) * dt / done if done > 0 else float("nan")
        return {"samples_per_s": sps, "eta_s": eta}

    def metrics(self, step: int, values: Dict[str, Any], tb_prefix: str = "train") -> None:
        """Append one JSON line and the numeric values as TensorBoard scalars."""
        if not self.enabled:
            return
        clean = {k: _plain(v) for k, v in values.items()}
        self._metrics.write(json.dumps({"step": step, **clean}) + "\n")
        self._metrics.flush()
        if self._tb is not None:
            for k, v in clean.items():
                if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
                    self._tb.add_scalar(f"{tb_prefix}/{k}", v, step)
            self._tb.flush()

    def advance(self, step: int) -> None:
        if self._bar is not None:
            self._bar.update(step - self._bar.n)

    def warning(self, msg: str) -> None:
        """A timestamped WARNING line to stderr and log.txt."""
        if not self.enabled:
            return
        line = f"[{datetime.datetime.now().strftime('%H:%M:%S')}] WARNING: {msg}"
        if self._bar is not None:
            self._bar.write(line, file=sys.stderr)
        else:
            print(line, file=sys.stderr, flush=True)
        self._log.write(line + "\n")
        self._log.flush()

    def close(self) -> None:
        """Idempotent: closes the files and removes this logger's `logging` handler."""
        logging.getLogger("facetrain").removeHandler(self._handler)
        if not self.enabled or self._log.closed:
            return
        if self._bar is not None:
            self._bar.close()
        if self._tb is not None:
            self._tb.close()
        self._log.close()
        self._metrics.close()


def _plain(v: Any) -> Any:
    if hasattr(v, "item") and getattr(v, "ndim", 0) == 0:
        v = v.item()
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    return v


def read_metrics(path: Path) -> Dict[int, Dict[str, Any]]:
    """metrics.jsonl -> {step: last record of that step} (a restarted run repeats steps)."""
    out: Dict[int, Dict[str, Any]] = {}
    with open(path, encoding="utf-8") as fh:
        for line in fh:
            if line.strip():
                rec = json.loads(line)
                if "loss" in rec:
                    out[int(rec["step"])] = rec
    return out


class _RunLogHandler(logging.Handler):
    """Routes `logging` records of the facetrain package (WARNING and up) into a RunLogger."""

    def __init__(self, run: RunLogger) -> None:
        super().__init__(logging.WARNING)
        self.run = run

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.run.warning(record.getMessage())
        except Exception:          # a logging failure must never end a training
            self.handleError(record)


class _RankWarningHandler(logging.Handler):
    """WARNING and up of a rank other than 0: to stderr and appended to the run's log.txt.

    Each line is one O_APPEND write, so it lands whole after rank 0's lines (rank 0 flushes one
    line per write too) instead of being lost, as it was when only rank 0 wrote log.txt. The file
    is opened per record: warnings are rare, and no descriptor is held for the run."""

    def __init__(self, path: Path, rank: int) -> None:
        super().__init__(logging.WARNING)
        self.path, self.rank = path, rank
        self.setFormatter(logging.Formatter(f"[%(asctime)s] %(levelname)s: rank {rank}: "
                                            "%(message)s", datefmt="%H:%M:%S"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
            print(line, file=sys.stderr, flush=True)
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                os.write(fd, (line + "\n").encode("utf-8"))
            finally:
                os.close(fd)
        except Exception:          # a logging failure must never end a training
            self.handleError(record)
