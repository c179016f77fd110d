"""How many torch threads a training process uses.

torch starts one OpenMP thread per core it sees, and the loader's workers (or DALI's CPU
threads) decode on the same cores. With both, a loaded machine spends its time in libgomp's
spin-waits (on 2 cores one process fell from ~1,600 to under 250 samples/s). So by default a
rank gets its share of the usable cores minus its loader workers, at least one thread.
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Mapping, Optional, Tuple


def usable_cores(cgroup_root: Path = Path("/sys/fs/cgroup")) -> int:
    """CPUs this process may run on: its affinity mask, capped by a cgroup CPU quota (v2
    cpu.max or v1 cfs_quota_us / cfs_period_us) rounded down, at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    quota = _cgroup_quota(cgroup_root)
    if quota is not None:
        cores = min(cores, max(1, math.floor(quota)))
    return max(1, cores)


def _cgroup_quota(root: Path) -> Optional[float]:
    try:
        fields = (root / "cpu.max").read_text().split()
        if len(fields) == 2 and fields[0] != "max":
            return int(fields[0]) / int(fields[1])
        return None
    except (OSError, ValueError):
        pass
    try:
        q = int((root / "cpu" / "cpu.cfs_quota_us").read_text())
        p = int((root / "cpu" / "cpu.cfs_period_us").read_text())
        return q / p if q > 0 and p > 0 else None
    except (OSError, ValueError):
        return None


def choose_threads(configured: int, loader_workers: int, local_ranks: int, cores: int,
                   env: Mapping[str, str]) -> Tuple[Optional[int], str]:
    """(threads to set, or None to leave torch's choice; why). An explicit train.num_threads
    wins, then the user's OMP_NUM_THREADS (torchrun sets 1 for several local ranks), else
    cores // local ranks - loader workers, at least 1."""
    if configured > 0:
        return configured, f"train.num_threads={configured}"
    omp = env.get("OMP_NUM_THREADS", "").strip()
    if omp:
        return None, f"OMP_NUM_THREADS={omp}"
    share = max(1, cores // max(1, local_ranks))
    n = max(1, share - loader_workers)
    return n, (f"auto: {cores} usable cores / {local_ranks} local rank(s) - {loader_workers} "
               "loader worker(s)")


def apply_threads(configured: int, loader_workers: int,
                  env: Optional[Mapping[str, str]] = None) -> str:
    """Set torch's intra-op threads for this rank (see choose_threads); returns the log line."""
    import torch

    env = os.environ if env is None else env
    local = int(env.get("LOCAL_WORLD_SIZE", "1") or 1)
    n, why = choose_threads(configured, loader_workers, local, usable_cores(), env)
    if n is not None:
        torch.set_num_threads(n)
    return f"torch threads: {torch.get_num_threads()} ({why})"
