"""Torch threads per rank: cores from affinity and cgroup quota, the user's choice wins."""
from __future__ import annotations

import os

import pytest
import torch

from facetrain import threads
from facetrain.config import ConfigError, TrainConfig


def test_choice_leaves_room_for_loader_workers():
    env = {}
    assert threads.choose_threads(0, 1, 1, 2, env)[0] == 1          # the 2-core case
    assert threads.choose_threads(0, 2, 1, 16, env)[0] == 14
    assert threads.choose_threads(0, 2, 8, 96, env)[0] == 10        # 12 cores per rank - 2
    assert threads.choose_threads(0, 4, 2, 2, env)[0] == 1          # never below one
    n, why = threads.choose_threads(0, 0, 1, 2, {"OMP_NUM_THREADS": "2"})
    assert n is None and why == "OMP_NUM_THREADS=2"                 # the user's setting stays
    assert threads.choose_threads(3, 2, 1, 2, {"OMP_NUM_THREADS": "1"}) == \
        (3, "train.num_threads=3")                                  # the config field wins


def test_usable_cores_reads_affinity_and_cgroup_quota(tmp_path):
    affinity = len(os.sched_getaffinity(0))
    assert threads.usable_cores(tmp_path) == affinity               # no cgroup files
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert threads.usable_cores(tmp_path) == affinity
    (tmp_path / "cpu.max").write_text("150000 100000\n")            # 1.5 CPUs -> 1
    assert threads.usable_cores(tmp_path) == 1
    (tmp_path / "cpu.max").unlink()
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("100000\n")  # cgroup v1: one CPU
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000\n")
    assert threads.usable_cores(tmp_path) == 1


def test_apply_sets_torch_and_says_why():
    before = torch.get_num_threads()
    try:
        line = threads.apply_threads(1, 2, {"LOCAL_WORLD_SIZE": "1"})
        assert torch.get_num_threads() == 1 and line == "torch threads: 1 (train.num_threads=1)"
        line = threads.apply_threads(0, 0, {"OMP_NUM_THREADS": "1"})
        assert line == "torch threads: 1 (OMP_NUM_THREADS=1)"
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match="train.num_threads"):
        TrainConfig(num_threads=-1)
