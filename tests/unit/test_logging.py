"""One handler per program for the library's `facetrain` logger: a run's RunLogger (rank 0 into
log.txt and the console, other ranks' warnings to stderr and log.txt naming the rank) and the
tools' console setup."""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from facetrain.logging_utils import RunLogger

REPO = Path(__file__).resolve().parents[2]


def test_library_warnings_of_every_rank_reach_log_txt(tmp_path, capsys):
    lib = logging.getLogger("facetrain.data.torch_loader")
    main = RunLogger(tmp_path / "r0", True, 10, tensorboard=False, progress=False)
    lib.warning("skipping undecodable image %s", "x.rec: record 3")
    main.info("step 1")
    # Rank 1 of the same run (same folder, rank 0's file still open): its warning is appended
    # to log.txt, whole, after rank 0's lines, and printed to stderr naming the rank.
    other = RunLogger(tmp_path / "r0", False, 10, tensorboard=False, progress=False, rank=1)
    logging.getLogger("facetrain").removeHandler(main._handler)     # one process plays both
    lib.warning("skipping undecodable image %s", "y.rec: record 5")
    other.close()
    main.info("step 2")
    main.close()
    lines = (tmp_path / "r0" / "log.txt").read_text().splitlines()
    assert [ln.split("] ", 1)[1] for ln in lines] == [
        "WARNING: skipping undecodable image x.rec: record 3", "step 1",
        "WARNING: rank 1: skipping undecodable image y.rec: record 5", "step 2"]
    err = capsys.readouterr().err
    assert "WARNING: rank 1: skipping undecodable image y.rec: record 5" in err
    n = len(logging.getLogger("facetrain").handlers)
    lib.warning("after close")                  # both handlers are gone again
    assert len(logging.getLogger("facetrain").handlers) == n == 0


def test_tools_print_library_records_in_one_format():
    prog = ("import logging; from facetrain.logging_utils import setup_tool_logging; "
            "setup_tool_logging(); logging.getLogger('facetrain.data.shards').info('hello')")
    proc = subprocess.run([sys.executable, "-c", prog], capture_output=True, text=True,
                          cwd=REPO, env={"PYTHONPATH": str(REPO), "PATH": ""}, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "INFO hello", proc.stderr
