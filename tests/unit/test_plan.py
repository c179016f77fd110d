"""The capacity planner: one configuration worked out by hand, the largest class count that fits,
LEAP's extra memory, the activation table against a fresh measurement, and the CLI."""
from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest

from facetrain import plan

REPO = Path(__file__).resolve().parents[2]
MB = 2 ** 20


def test_one_configuration_by_hand():
    """iresnet50, 8 GPUs, 1.4M classes, sample rate 0.1, batch 128, fp16, SGD, LEAP full, 20
    images per class, written out from the tensors the code allocates."""
    p = plan.PlanInput(classes=1_400_000, world_size=8, sample_rate=0.1, backbone="iresnet50",
                       batch_size=128, precision="fp16", optimizer="sgd", leap="full",
                       gpu_memory_gb=32)
    m = plan.memory(p)
    c, d, n = 175_000, 512, 1024
    k = 17_500                                   # ceil(0.1 * 175,000) > N = 1,024
    assert m["classifier weights"] == m["classifier gradient"] == c * d * 4
    assert m["classifier optimizer state"] == c * d * 4                     # momentum
    assert m["LEAP centres"] == (c + 1) * d * 4
    assert m["LEAP angle memory"] == (c * 20 + 1) * 4
    assert m["LEAP statistics"] == (c + 1) * (1 + 24 + 16 + 4) + c * 8 + 1_400_000 * 8 + 88
    params = 43_590_848
    assert m["backbone gradients (+ DDP buckets when W > 1)"] == 2 * params * 4
    backward = plan.ACTIVATION_MB["iresnet50"][0] * MB * 128 / 2 \
        + k * d * (4 + 4 + 2) + n * k * (4 * 4 + 2)
    step = c * d * 4 + params * 4
    assert m["peak of the step"] == pytest.approx(max(backward, step))
    state = 3 * c * d * 4 + m["LEAP centres"] + m["LEAP angle memory"] + m["LEAP statistics"] \
        + 4 * params * 4 + 1024 * MB
    assert m["total"] == pytest.approx(state + max(backward, step))
    com = plan.communication(p)
    assert com["embedding all-gather (forward)"] == 7 / 8 * n * d * 4
    assert com["DDP gradient all-reduce"] == 2 * 7 / 8 * params * 4


def test_sampled_rows_keep_every_positive():
    p = plan.PlanInput(classes=10_000, world_size=8, sample_rate=0.01, batch_size=128)
    assert plan.sampled_rows(p) == min(1250, 1024)        # N = 1,024 > 0.01 * 1,250
    assert plan.sampled_rows(replace(p, sample_rate=1.0)) == 1250


def test_largest_class_count_is_the_boundary():
    p = plan.PlanInput(classes=1, world_size=8, sample_rate=0.1, gpu_memory_gb=32)
    top = plan.largest_classes(p)
    assert plan.fits(replace(p, classes=top)) and not plan.fits(replace(p, classes=top + 1))
    assert plan.largest_classes(replace(p, gpu_memory_gb=0.5)) == 0   # not even the backbone
    # twice the GPUs at the same global batch: the classifier blocks, activations halve
    more = plan.largest_classes(replace(p, world_size=16, batch_size=64))
    assert more > 1.8 * top


def test_leap_extra_is_its_state_and_one_vector():
    p = plan.PlanInput(classes=10_000_000, world_size=64, sample_rate=0.1)
    mem, com = plan.leap_extra(p)
    c = plan.local_classes(10_000_000, 64)
    leap = plan.leap_memory(replace(p, leap="full"))
    assert mem == pytest.approx(sum(leap.values()))         # fused on GPU: no per-logit buffer
    n = 128 * 64
    assert com == pytest.approx(2 * 63 / 64 * (n * 4 + 7 * 8 / 5))
    assert leap["LEAP centres"] == (c + 1) * 512 * 4


def test_activation_table_matches_a_measurement():
    """The shipped per-sample activation figure of the smallest backbones, re-measured."""
    got = plan.measure_activations(["iresnet18", "mbf"])
    for name, (plain, ckpt) in got.items():
        assert plain == pytest.approx(plan.ACTIVATION_MB[name][0], rel=0.02), name
        assert ckpt == pytest.approx(plan.ACTIVATION_MB[name][1], rel=0.02), name


def test_cli_prints_the_plan_and_json():
    cmd = [sys.executable, str(REPO / "launch" / "plan.py"), "--classes", "2000000",
           "--world-size", "8", "--sample-rate", "0.1", "--gpu-memory-gb", "32"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert "LEAP angle memory" in out and "DDP gradient all-reduce" in out
    assert "fits: yes" in out and "largest class count that fits" in out
    data = json.loads(subprocess.run(cmd + ["--json"], capture_output=True, text=True,
                                     check=True).stdout)
    assert data["fits"] is True and data["largest_classes"] > 2_000_000
    bad = subprocess.run(cmd + ["--sample-rate", "0"], capture_output=True, text=True)
    assert bad.returncode == 2 and "sample rate must be in (0, 1]" in bad.stderr
